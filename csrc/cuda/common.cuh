// Host-side helpers both CUDA translation units use: error checks, the dtype switch, the
// device to launch on.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "../codec.h"

// A kernel launch: GC_LAUNCH(grid, block, stream, kernel)(args...) is
// kernel<<<grid, block, 0, stream>>>(args...) under nvcc; the host emulation
// (csrc/emu/cuda_runtime.h, docs/emulator.md) queues the same call on its stream instead.
#if defined(GRADCOMP_CUDA_EMULATION)
#define GC_LAUNCH(grid, block, stream, ...) ::gcemu::launch(&__VA_ARGS__, grid, block, stream, #__VA_ARGS__)
#else
#define GC_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, stream>>>
#endif

namespace gradcomp {
namespace cuda_util {

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("gradcomp CUDA ") + what + ": " + cudaGetErrorString(err));
}

// Calls f(std::integral_constant<DType, D>) for the runtime dtype.
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

// Throws, saying why and what to do, when this machine's driver cannot run this build, or
// `device` (current) has no kernels it can load. Checked once per process and device.
void ensure_ready(int device);

// Makes `device` current for the launch, after ensure_ready's checks. The caller
// (python/gradcomp/ops.py) wraps the call in torch's device guard, which restores the
// previous device the way torch does (without creating a context on a device that has
// none), so the switch is a no-op in practice.
inline void use_device(int device) {
  int now = -1;
  ensure_ready(-1);  // the driver first: cudaGetDevice would only say "insufficient driver"
  check(cudaGetDevice(&now), "get device");
  if (now != device) check(cudaSetDevice(device), "set device");
  ensure_ready(device);
}

}  // namespace cuda_util
}  // namespace gradcomp
