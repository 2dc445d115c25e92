// CUDA backend of the block quantizer: the three fused passes of gradcomp.h. One warp per
// quantization block (one table row); lane l handles elements l, l+32, l+64, ... so every
// warp-wide load is coalesced. The arithmetic is codec.h's, the same calls the CPU twin
// makes, so both backends produce the same bits.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../gradcomp.h"

#define GC_STR2(...) #__VA_ARGS__
#define GC_STR(...) GC_STR2(__VA_ARGS__)

namespace gradcomp {
namespace {

using namespace codec;

constexpr int kWarpsPerCta = 8;
constexpr unsigned kFull = 0xffffffffu;
// Blocks up to 512 values keep them in registers (16 per lane); larger blocks are read
// twice (the second read mostly hits L2).

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("gradcomp CUDA ") + what + ": " + cudaGetErrorString(err));
}

void check_args(int bits, int64_t block, int64_t world, int64_t slots) {
  if (bits != 8) throw std::invalid_argument("gradcomp: only 8-bit codes are implemented, got " + std::to_string(bits));
  if (block < 32 || block > 4096 || (block & (block - 1)) != 0)
    throw std::invalid_argument("gradcomp: block size must be a power of two in [32, 4096], got " +
                                std::to_string(block));
  if (world < 1 || slots < 0) throw std::invalid_argument("gradcomp: bad world size or slot count");
}

__device__ __forceinline__ uint32_t warp_absmax(uint32_t m) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = absmax_bits_combine(m, __shfl_xor_sync(kFull, m, o));
  return m;
}

__device__ __forceinline__ float* residual_ptr(const int64_t* row) {
  return reinterpret_cast<float*>(static_cast<intptr_t>(row[2]));
}

// Zeroes a shard's header and the padding after its scales (codec.h's zero bytes).
__device__ void zero_unused(uint8_t* shard /* [SB] */, int64_t slots) {
  *reinterpret_cast<uint4*>(shard) = make_uint4(0, 0, 0, 0);
  for (int64_t b = shard_scale_pad_begin(slots); b < shard_codes_offset(slots); ++b) shard[b] = 0;
}

// Zero every shard's unused bytes (the flags are OR-ed into afterwards).
__global__ void zero_headers(uint8_t* shards /* [W * SB] */, int64_t world, int64_t slots, int64_t sb) {
  for (int64_t r = threadIdx.x; r < world; r += blockDim.x) zero_unused(shards + r * sb, slots);
}

// Kernels are templated on PerLane = B / 32 for blocks whose values stay in registers
// (B <= 512); PerLane = 0 is the one kernel for larger blocks, B read at run time.

// Pass 1. One warp per row of the table.
template <DType D, int PerLane>
__global__ void encode_kernel(const typename Elem<D>::storage* __restrict__ bucket,  // [n]
                              const int64_t* __restrict__ table,                     // [W * S, 3]
                              int64_t rows, int64_t world, int64_t slots, int64_t sb, int B,
                              uint8_t* __restrict__ send) {  // [W * SB]
  using E = Elem<D>;
  constexpr bool kKeep = PerLane > 0;
  const int kPerLane = kKeep ? PerLane : B / 32;
  // Warps walk the table slot-major (slot, then owner): for parameters laid out one after
  // another that is the bucket's own order, so neighbouring warps read neighbouring memory.
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / 32;
  if (i >= rows) return;
  const int64_t slot = i / world, owner = i % world, row = owner * slots + slot;
  const int lane = threadIdx.x % 32;
  const int64_t* t = table + row * kRowWords;
  const int64_t off = t[0], len = t[1];
  float* res = residual_ptr(t);
  uint8_t* shard = send + owner * sb;
  int8_t* codes = reinterpret_cast<int8_t*>(shard + shard_codes_offset(slots)) + slot * B;

  auto load_a = [&](int64_t i) -> float {
    if (i >= len) return 0.0f;
    const float x = E::load(bucket, off + i);
    return res ? add_rn(x, res[i]) : x;
  };

  float keep[kKeep ? PerLane : 1];
  uint32_t m = 0;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const float a = load_a(lane + 32 * k);
    if (kKeep) keep[k] = a;
    m = absmax_bits_update(m, a);
  }
  m = warp_absmax(m);
  const BlockScale bs = block_scale<8>(m);
  const float scale = bs.scale;
  const bool finite = is_finite(scale);
  if (lane == 0) {
    reinterpret_cast<float*>(shard + shard_scales_offset())[slot] = scale;
    if (!finite) atomicOr(reinterpret_cast<unsigned*>(shard), 1u);
  }
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int64_t i = lane + 32 * k;
    const float a = kKeep ? keep[k] : load_a(i);
    const int q = i < len ? quantize<8>(a, bs) : 0;
    codes[i] = static_cast<int8_t>(q);
    if (res && i < len) {
      if (finite)
        res[i] = residual_after<8>(a, q, scale);
      else if (!is_finite(a))
        res[i] = 0.0f;  // keep the old residual where a is finite
    }
  }
}

// Writes my slice's header: the OR of the W incoming flags.
__global__ void reduce_header(const uint8_t* recv /* [W * SB] */, int64_t world, int64_t slots, int64_t sb,
                              uint8_t* slice /* [SB] */) {
  if (threadIdx.x != 0) return;
  unsigned f = 0;
  for (int64_t r = 0; r < world; ++r) f |= *reinterpret_cast<const unsigned*>(recv + r * sb);
  zero_unused(slice, slots);
  *reinterpret_cast<unsigned*>(slice) = f ? 1u : 0u;
}

// Pass 2. One warp per slot I own.
template <int PerLane>
__global__ void reduce_kernel(const uint8_t* __restrict__ recv,     // [W * SB]
                              const int64_t* __restrict__ my_rows,  // [S, 3]
                              int64_t world, int64_t slots, int64_t sb, int B,
                              uint8_t* __restrict__ slice) {  // [SB]
  constexpr bool kKeep = PerLane > 0;
  const int kPerLane = kKeep ? PerLane : B / 32;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / 32;
  if (slot >= slots) return;
  const int lane = threadIdx.x % 32;
  const int64_t* t = my_rows + slot * kRowWords;
  const int64_t len = t[1];
  float* res = residual_ptr(t);
  const int64_t codes_off = shard_codes_offset(slots);
  const float world_f = static_cast<float>(world);

  auto mean_at = [&](int64_t i) -> float {  // sum in rank order, then / W
    if (i >= len) return 0.0f;
    float s = 0.0f;
    for (int64_t src = 0; src < world; ++src) {
      const uint8_t* shard = recv + src * sb;
      const float scale = reinterpret_cast<const float*>(shard + shard_scales_offset())[slot];
      const int8_t q = reinterpret_cast<const int8_t*>(shard + codes_off)[slot * B + i];
      s = add_rn(s, dequantize<8>(q, scale));
    }
    return div_rn(s, world_f);
  };

  float keep[kKeep ? PerLane : 1];
  uint32_t m = 0;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const float a = mean_at(lane + 32 * k);
    if (kKeep) keep[k] = a;
    m = absmax_bits_update(m, a);
  }
  m = warp_absmax(m);
  const BlockScale bs = block_scale<8>(m);
  const float scale = bs.scale;
  const bool finite = is_finite(scale);
  if (lane == 0) {
    reinterpret_cast<float*>(slice + shard_scales_offset())[slot] = scale;
    if (!finite) atomicOr(reinterpret_cast<unsigned*>(slice), 1u);
  }
  int8_t* codes = reinterpret_cast<int8_t*>(slice + codes_off) + slot * B;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int64_t i = lane + 32 * k;
    const float a = kKeep ? keep[k] : mean_at(i);
    const int q = i < len ? quantize<8>(a, bs) : 0;
    codes[i] = static_cast<int8_t>(q);
    if (res && finite && i < len) res[i] = add_rn(res[i], mul_rn(world_f, residual_after<8>(a, q, scale)));
  }
}

// Pass 3. One warp per row of the table.
template <DType D>
__global__ void decode_kernel(const uint8_t* __restrict__ gathered,  // [W * SB]
                              const int64_t* __restrict__ table,     // [W * S, 3]
                              int64_t rows, int64_t world, int64_t slots, int64_t sb, int B,
                              typename Elem<D>::storage* __restrict__ bucket) {  // [n]
  using E = Elem<D>;
  // Warps walk the table slot-major (slot, then owner): for parameters laid out one after
  // another that is the bucket's own order, so neighbouring warps read neighbouring memory.
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / 32;
  if (i >= rows) return;
  const int64_t slot = i / world, owner = i % world, row = owner * slots + slot;
  const int lane = threadIdx.x % 32;
  unsigned f = 0;
  for (int64_t r = lane; r < world; r += 32) f |= *reinterpret_cast<const unsigned*>(gathered + r * sb);
  const bool flagged = __any_sync(kFull, f != 0);
  const int64_t* t = table + row * kRowWords;
  const int64_t off = t[0], len = t[1];
  const uint8_t* shard = gathered + owner * sb;
  const float scale = reinterpret_cast<const float*>(shard + shard_scales_offset())[slot];
  const int8_t* codes = reinterpret_cast<const int8_t*>(shard + shard_codes_offset(slots)) + slot * B;
#pragma unroll 4
  for (int k = 0; k < B / 32; ++k) {
    const int64_t i = lane + 32 * k;
    if (i < len) E::store(bucket, off + i, flagged ? quiet_nan() : dequantize<8>(codes[i], scale));
  }
}

unsigned grid_for(int64_t warps) { return static_cast<unsigned>((warps + kWarpsPerCta - 1) / kWarpsPerCta); }

// Calls f(std::integral_constant<int, PerLane>) for the runtime block size.
template <class F>
void with_block(int64_t block, F&& f) {
  switch (block) {
    case 32:
      return f(std::integral_constant<int, 1>{});
    case 64:
      return f(std::integral_constant<int, 2>{});
    case 128:
      return f(std::integral_constant<int, 4>{});
    case 256:
      return f(std::integral_constant<int, 8>{});
    case 512:
      return f(std::integral_constant<int, 16>{});
    default:
      return f(std::integral_constant<int, 0>{});  // 1024..4096, checked by check_args
  }
}

template <class F>
void with_dtype(DType d, F&& f) {
  switch (d) {
    case DType::F32:
      return f(std::integral_constant<DType, DType::F32>{});
    case DType::F16:
      return f(std::integral_constant<DType, DType::F16>{});
    case DType::BF16:
      return f(std::integral_constant<DType, DType::BF16>{});
  }
  throw std::invalid_argument("gradcomp: unsupported dtype");
}

}  // namespace

bool cuda_compiled() { return true; }

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error (no driver / no device)
    return 0;
  }
  return n;
}

std::string cuda_archs() {
#if defined(__CUDA_ARCH_LIST__)
  return GC_STR(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

int cuda_runtime_version() { return CUDART_VERSION; }

void quant_encode_cuda(int bits, int64_t block, DType dtype, const void* bucket, const int64_t* table, int64_t world,
                       int64_t slots, uint8_t* send, int device, intptr_t stream) {
  check_args(bits, block, world, slots);
  check(cudaSetDevice(device), "set device");
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const int64_t sb = shard_bytes(slots, block, bits);
  zero_headers<<<1, 32, 0, s>>>(send, world, slots, sb);
  check(cudaGetLastError(), "zero_headers launch");
  const int64_t rows = world * slots;
  if (rows == 0) return;
  with_dtype(dtype, [&](auto d) {
    with_block(block, [&](auto b) {
      constexpr DType D = decltype(d)::value;
      constexpr int P = decltype(b)::value;
      encode_kernel<D, P>
          <<<grid_for(rows), kWarpsPerCta * 32, 0, s>>>(static_cast<const typename Elem<D>::storage*>(bucket), table,
                                                        rows, world, slots, sb, static_cast<int>(block), send);
    });
  });
  check(cudaGetLastError(), "encode launch");
}

void quant_reduce_cuda(int bits, int64_t block, const uint8_t* recv, const int64_t* my_rows, int64_t world,
                       int64_t slots, uint8_t* slice, int device, intptr_t stream) {
  check_args(bits, block, world, slots);
  check(cudaSetDevice(device), "set device");
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const int64_t sb = shard_bytes(slots, block, bits);
  reduce_header<<<1, 32, 0, s>>>(recv, world, slots, sb, slice);
  check(cudaGetLastError(), "reduce_header launch");
  if (slots == 0) return;
  with_block(block, [&](auto b) {
    constexpr int P = decltype(b)::value;
    reduce_kernel<P>
        <<<grid_for(slots), kWarpsPerCta * 32, 0, s>>>(recv, my_rows, world, slots, sb, static_cast<int>(block), slice);
  });
  check(cudaGetLastError(), "reduce launch");
}

void quant_decode_cuda(int bits, int64_t block, DType dtype, const uint8_t* gathered, const int64_t* table,
                       int64_t world, int64_t slots, void* bucket, int device, intptr_t stream) {
  check_args(bits, block, world, slots);
  check(cudaSetDevice(device), "set device");
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const int64_t sb = shard_bytes(slots, block, bits);
  const int64_t rows = world * slots;
  if (rows == 0) return;
  with_dtype(dtype, [&](auto d) {
    constexpr DType D = decltype(d)::value;
    decode_kernel<D><<<grid_for(rows), kWarpsPerCta * 32, 0, s>>>(gathered, table, rows, world, slots, sb,
                                                                  static_cast<int>(block),
                                                                  static_cast<typename Elem<D>::storage*>(bucket));
  });
  check(cudaGetLastError(), "decode launch");
}

}  // namespace gradcomp
