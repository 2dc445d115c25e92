// cuda_runtime.h of the host emulation of CUDA (docs/emulator.md): what gradcomp's kernels use
// of CUDA's execution model, for the host compiler. Found before the real header by the
// emulator build's include path (-I csrc/emu), so csrc/cuda/*.cu compile unchanged.
//
// Model: a launch is queued on its stream and runs at the next synchronization; its CTAs
// run one after another (in a shuffled order), each CTA's threads as fibers on one OS
// thread that switch only where CUDA threads would wait for each other: __syncthreads, and
// the warp-synchronous intrinsics, where the lanes named in the mask meet and exchange
// values, and (at random) at atomics. A plain read-modify-write is never interrupted: a race
// where an atomic is needed goes unseen (docs/emulator.md). Shared memory is one static copy (one CTA runs at a time),
// filled with a poison pattern before every CTA (runtime.cpp finds it: the function-local statics of gradcomp's
// anonymous namespaces, where the kernels live). Misuse CUDA leaves undefined (a barrier some threads never
// reach, a lane that calls a warp intrinsic without its own bit in the mask, a shuffle from a
// lane outside the mask, lanes meeting at different intrinsics, a deadlock) ends the process
// with a message: the tests treat it as a failure.
#pragma once

// Every standard header the kernels or this shim need, before the CUDA macros below exist.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#define GRADCOMP_CUDA_EMULATION 1
// codec.h then takes its device branches (the __f*_rn intrinsics below), as nvcc's device pass does.
#define __CUDACC__ 1
#define __CUDA_ARCH__ 900
#define CUDART_VERSION 13000

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __restrict__ __restrict
// One copy of every __shared__ variable (one CTA runs at a time), which the runtime finds in
// the symbol table and poisons before each CTA: shared memory starts undefined on a GPU.
#define __shared__ static

// ---------------------------------------------------------------- types
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
// CUDA's alignment: a vector access through a misaligned address is undefined, and UBSan's
// alignment check reports it here, as a GPU would fault on it.
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInsufficientDriver = 35,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorNoKernelImageForDevice = 209,
  cudaErrorUnsupportedPtxVersion = 222,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaDeviceAttr : int { cudaDevAttrComputeCapabilityMajor = 75, cudaDevAttrComputeCapabilityMinor = 76 };
struct cudaFuncAttributes {
  int maxThreadsPerBlock;
  int numRegs;
};

// ---------------------------------------------------------------- the runtime (runtime.cpp)
namespace gcemu {

struct Thread {
  uint3 idx;
  int warp, lane;
};
extern Thread* g_thread;  // the fiber running now
extern uint3 g_block_idx;
extern dim3 g_block_dim, g_grid_dim;

[[noreturn]] void fail(const std::string& what);

// Warp-synchronous operations: every lane named in the mask must arrive at the same one.
enum class WarpOp : int { ShflXor, ShflUp, ShflDown, ShflIdx, Ballot, Any, All, Sync };
uint64_t warp_meet(WarpOp op, unsigned mask, uint64_t bits, int bytes, int arg, int width);
void syncthreads();
// At an atomic: sometimes lets the block's other threads run first (a GPU runs them at once).
void maybe_yield();

void set_last_error(cudaError_t e);
// Queues `work` on `stream`: streams are in-order queues, drained at a synchronization.
void enqueue(cudaStream_t stream, std::function<void()> work);
// Runs one grid: `body` is the kernel call every thread makes.
void run_grid(const char* name, dim3 grid, dim3 block, const std::function<void()>& body);
bool valid_launch(dim3 grid, dim3 block);

template <class T>
T warp_value(WarpOp op, unsigned mask, T v, int arg, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = warp_meet(op, mask, bits, static_cast<int>(sizeof(T)), arg, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

template <class T>
T implicit(T v) {
  return v;
}

// A launch: checks its configuration at once (as the runtime does), copies the arguments,
// and queues the grid on its stream.
template <class... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  cudaStream_t stream;
  const char* name;
  template <class... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel argument count");
    if (!valid_launch(grid, block)) return set_last_error(cudaErrorInvalidConfiguration);
    // implicit conversions only, as a call through <<<>>> converts its arguments
    std::tuple<std::decay_t<P>...> copied(implicit<std::decay_t<P>>(std::forward<A>(args))...);
    auto k = kernel;
    const dim3 g = grid, b = block;
    const char* n = name;
    enqueue(stream, [k, g, b, n, copied] { run_grid(n, g, b, [&] { std::apply(k, copied); }); });
  }
};
template <class... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t stream, const char* name) {
  return {kernel, grid, block, stream, name};
}

}  // namespace gcemu

#define threadIdx (static_cast<const uint3&>(::gcemu::g_thread->idx))
#define blockIdx (static_cast<const uint3&>(::gcemu::g_block_idx))
#define blockDim (static_cast<const dim3&>(::gcemu::g_block_dim))
#define gridDim (static_cast<const dim3&>(::gcemu::g_grid_dim))

// ---------------------------------------------------------------- device intrinsics
inline void __syncthreads() { gcemu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { gcemu::warp_meet(gcemu::WarpOp::Sync, mask, 0, 0, 0, 32); }
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return gcemu::warp_value(gcemu::WarpOp::ShflXor, mask, v, lane_mask, width);
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return gcemu::warp_value(gcemu::WarpOp::ShflUp, mask, v, static_cast<int>(delta), width);
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return gcemu::warp_value(gcemu::WarpOp::ShflDown, mask, v, static_cast<int>(delta), width);
}
template <class T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return gcemu::warp_value(gcemu::WarpOp::ShflIdx, mask, v, src_lane, width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(gcemu::warp_meet(gcemu::WarpOp::Ballot, mask, pred != 0, 4, 0, 32));
}
inline int __any_sync(unsigned mask, int pred) {
  return static_cast<int>(gcemu::warp_meet(gcemu::WarpOp::Any, mask, pred != 0, 4, 0, 32));
}
inline int __all_sync(unsigned mask, int pred) {
  return static_cast<int>(gcemu::warp_meet(gcemu::WarpOp::All, mask, pred != 0, 4, 0, 32));
}

// Atomics: the fibers of a CTA never run at once, and CTAs run one after another, so a
// read-modify-write is atomic as written. Each may first let other threads run. Integers
// only: a GPU's float atomics flush subnormals, which this would not model.
namespace gcemu {
template <class T, class F>
T atomic_update(T* p, F next) {
  static_assert(std::is_integral<T>::value, "float atomics are not emulated");
  maybe_yield();
  const T old = *p;
  *p = next(old);
  return old;
}
}  // namespace gcemu
template <class T>
T atomicAdd(T* p, T v) {
  return gcemu::atomic_update(p, [v](T old) { return static_cast<T>(old + v); });
}
template <class T>
T atomicOr(T* p, T v) {
  return gcemu::atomic_update(p, [v](T old) { return static_cast<T>(old | v); });
}
template <class T>
T atomicAnd(T* p, T v) {
  return gcemu::atomic_update(p, [v](T old) { return static_cast<T>(old & v); });
}
template <class T>
T atomicMax(T* p, T v) {
  return gcemu::atomic_update(p, [v](T old) { return v > old ? v : old; });
}
template <class T>
T atomicMin(T* p, T v) {
  return gcemu::atomic_update(p, [v](T old) { return v < old ? v : old; });
}
template <class T>
T atomicExch(T* p, T v) {
  return gcemu::atomic_update(p, [v](T) { return v; });
}

// IEEE single operations, rounded to nearest even: what the __f*_rn intrinsics compute
// (the emulator's build pins floating point: no contraction, no fast-math).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __ull2float_rn(unsigned long long v) { return static_cast<float>(v); }
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---------------------------------------------------------------- host API
const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaGetDevice(int* d);
cudaError_t cudaSetDevice(int d);
cudaError_t cudaDriverGetVersion(int* v);
cudaError_t cudaRuntimeGetVersion(int* v);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t stream = nullptr);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, int kind, cudaStream_t stream = nullptr);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaDeviceSynchronize();
template <class T>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attrs, T*) {
  *attrs = {1024, 32};
  return cudaSuccess;
}
