// Kernels that check the emulator itself (tests/cuda/test_emulated.py runs them): what the
// warp intrinsics return, that barriers order a block's threads, that shared memory starts
// poisoned in every CTA, that atomics count, that launches check their configuration and
// streams keep their order — and, one scenario each, that the misuse CUDA leaves undefined
// ends the process with a message instead of passing.
#include <string>

#include "../cuda/common.cuh"  // GC_LAUNCH, as the kernels launch

namespace gcemu {
int selftest(const std::string& name, int32_t* out);
}

// In gradcomp's anonymous namespace, as the real kernels are: their statics are shared memory.
namespace gradcomp {
namespace {

constexpr unsigned kFull = 0xffffffffu;

// Per thread of 2 warps: 16 results of the warp intrinsics.
__global__ void shuffles_kernel(int32_t* out /* [64, 16] */) {
  const int t = static_cast<int>(threadIdx.x), lane = t % 32;
  int32_t* o = out + t * 16;
  o[0] = __shfl_xor_sync(kFull, t * 10, 5);
  o[1] = __shfl_up_sync(kFull, t * 10, 3);
  o[2] = __shfl_down_sync(kFull, t * 10, 7);
  o[3] = __shfl_sync(kFull, t * 10, 9);
  o[4] = static_cast<int32_t>(__ballot_sync(kFull, lane % 3 == 0));
  o[5] = __any_sync(kFull, t == 40);
  o[6] = __all_sync(kFull, lane < 31);
  // a half-warp meeting of its own: lanes 0-15 and 16-31 exchange within their halves
  const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  o[7] = __shfl_xor_sync(half, t, 1);
  o[8] = static_cast<int32_t>(__ballot_sync(half, lane % 2 == 0));
  o[9] = __all_sync(kFull, lane < 32);
  o[10] = __any_sync(half, lane == 3);
  // PTX takes the lane or offset from its low 5 bits
  o[11] = __shfl_xor_sync(kFull, t, 37);            // xor 5
  o[12] = __shfl_up_sync(kFull, t, 33);             // up 1
  o[13] = __shfl_down_sync(kFull, t, 0xffffffffu);  // down 31
  o[14] = __shfl_sync(kFull, t, 40);                // lane 8
  __syncwarp();
  const unsigned long long wide = (static_cast<unsigned long long>(t) << 40) | 7u;
  o[15] = __shfl_xor_sync(kFull, wide, 16) == ((static_cast<unsigned long long>(t ^ 16) << 40) | 7u);
}

// Block b, thread t: what shared memory held before this CTA wrote it, then a neighbour's
// value across a barrier.
__global__ void shared_kernel(int32_t* out /* [2, 128, 2] */) {
  __shared__ int32_t cell[128];
  const int t = static_cast<int>(threadIdx.x);
  int32_t* o = out + (blockIdx.x * 128 + t) * 2;
  o[0] = cell[t];
  __syncthreads();
  cell[t] = static_cast<int32_t>(blockIdx.x) * 1000 + t;
  __syncthreads();
  o[1] = cell[(t + 1) % 128];
}

// counter[0]: every thread adds 1 (its old value recorded at 2 + its global index); counter[1]: the max index
__global__ void atomics_kernel(uint32_t* counter /* [2 + threads] */) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  counter[2 + i] = atomicAdd(counter, 1u);
  atomicMax(counter + 1, i);
}

__global__ void add_one(int32_t* p /* [1] */) {
  if (threadIdx.x == 0) *p += 1;
}

__global__ void times_ten(int32_t* p /* [1] */) {
  if (threadIdx.x == 0) *p *= 10;
}

// ---- misuse, one kernel each
__global__ void divergent_barrier() {
  if (threadIdx.x < 32) return;
  __syncthreads();
}

__global__ void mask_without_caller() { (void)__shfl_xor_sync(0x7fffffffu, 1, 1); }

__global__ void read_outside_mask() {
  if (threadIdx.x < 16) (void)__shfl_xor_sync(0x0000ffffu, 1, 16);
}

__global__ void different_intrinsics() {
  if (threadIdx.x % 2)
    (void)__shfl_xor_sync(kFull, 1, 1);
  else
    (void)__ballot_sync(kFull, 1);
}

__global__ void deadlock() {
  if (threadIdx.x == 0)
    __syncthreads();
  else
    (void)__shfl_xor_sync(kFull, 1, 1);
}

__global__ void partial_warp() { (void)__shfl_xor_sync(kFull, 1, 1); }

__global__ void misaligned_vector(const float* p /* [8] */, float* out /* [1] */) {
  const float4 v = *reinterpret_cast<const float4*>(p + 1);
  out[0] = v.x;
}

__global__ void out_of_bounds(int32_t* p /* [64] */) { p[threadIdx.x + 1] = 1; }

__global__ void write_before(int32_t* p /* [64] */) {
  if (threadIdx.x == 0) p[-1] = 1;
}

// p: one table row [1, 4] int64 whose word 2 is an address
__global__ void write_table_word(int32_t* p) {
  if (threadIdx.x == 0) reinterpret_cast<int64_t*>(p)[2] += 8;
}

}  // namespace
}  // namespace gradcomp

namespace gcemu {

using namespace gradcomp;

// Runs scenario `name`; returns 0 (a misuse scenario returns only if it was not caught).
int selftest(const std::string& name, int32_t* out) {
  auto sync = [] { cudaDeviceSynchronize(); };
  if (name == "shuffles") {
    GC_LAUNCH(1, 64, nullptr, shuffles_kernel)(out);
  } else if (name == "shared") {
    GC_LAUNCH(2, 128, nullptr, shared_kernel)(out);
  } else if (name == "atomics") {
    GC_LAUNCH(7, 96, nullptr, atomics_kernel)(reinterpret_cast<uint32_t*>(out));
  } else if (name == "launch_config") {
    GC_LAUNCH(1, 2048, nullptr, add_one)(out);  // more threads than a block may have
    out[1] = cudaGetLastError();
    out[2] = cudaGetLastError();  // not sticky
    GC_LAUNCH(dim3(1, 0), 32, nullptr, add_one)(out);
    out[3] = cudaGetLastError();
  } else if (name == "streams") {
    // one stream in order: ((0 + 1) * 10 + 1) * 10 = 110; nothing runs before a synchronization
    auto* s = reinterpret_cast<cudaStream_t>(intptr_t{7});
    cudaMemsetAsync(out, 0, 4, s);
    GC_LAUNCH(1, 32, s, add_one)(out);
    GC_LAUNCH(1, 32, s, times_ten)(out);
    GC_LAUNCH(1, 32, s, add_one)(out);
    GC_LAUNCH(1, 32, s, times_ten)(out);
    out[1] = out[0];  // -1 from the caller if the queue had already run
    cudaStreamSynchronize(s);
  } else if (name == "divergent_barrier") {
    GC_LAUNCH(1, 64, nullptr, divergent_barrier)();
  } else if (name == "mask_without_caller") {
    GC_LAUNCH(1, 32, nullptr, mask_without_caller)();
  } else if (name == "read_outside_mask") {
    GC_LAUNCH(1, 32, nullptr, read_outside_mask)();
  } else if (name == "different_intrinsics") {
    GC_LAUNCH(1, 32, nullptr, different_intrinsics)();
  } else if (name == "deadlock") {
    GC_LAUNCH(1, 32, nullptr, deadlock)();
  } else if (name == "partial_warp") {
    GC_LAUNCH(1, 48, nullptr, partial_warp)();
  } else if (name == "misaligned_vector") {
    GC_LAUNCH(1, 32, nullptr, misaligned_vector)(reinterpret_cast<const float*>(out), reinterpret_cast<float*>(out));
  } else if (name == "out_of_bounds") {
    GC_LAUNCH(1, 64, nullptr, out_of_bounds)(out);
  } else if (name == "write_before") {
    GC_LAUNCH(1, 32, nullptr, write_before)(out);
  } else if (name == "write_table_word") {
    GC_LAUNCH(1, 32, nullptr, write_table_word)(out);
  } else {
    throw std::invalid_argument("emulator: unknown self-test '" + name + "'");
  }
  sync();
  return 0;
}

}  // namespace gcemu
