// The CPU backend's kernels, compiled once per instruction set (cpu/quant.cpp), and the
// run-time choice between them (cpu/dispatch.cpp). Arguments arrive validated.
#pragma once

#include <cstdint>

#include "../codec.h"

namespace gradcomp {

using codec::kMaxBlock;  // the largest block: a kernel's stack arrays hold one

#define GC_DECLARE_CPU_KERNELS(ns)                                                                                 \
  namespace ns {                                                                                                   \
  /* bucket [n] dtype; table [W * S, 4]; send [W * SB] */                                                          \
  void encode(int bits, int64_t block, DType dtype, DType residual, const void* bucket, const int64_t* table,      \
              int64_t world, int64_t slots, uint8_t* send, const codec::Rounding& rounding, int threads);          \
  /* recv [W * SB]; my_rows [S, 4]; slice [SB] */                                                                  \
  void reduce(int bits, int64_t block, DType residual, const uint8_t* recv, const int64_t* my_rows, int64_t world, \
              int64_t slots, uint8_t* slice, const codec::Rounding& rounding, int threads);                        \
  /* gathered [W * SB]; table [W * S, 4]; bucket [n] dtype */                                                      \
  void decode(int bits, int64_t block, DType dtype, const uint8_t* gathered, const int64_t* table, int64_t world,  \
              int64_t slots, void* bucket, int threads);                                                           \
  }

GC_DECLARE_CPU_KERNELS(isa_baseline)
#if defined(GRADCOMP_HAVE_AVX2)
GC_DECLARE_CPU_KERNELS(isa_avx2)
#endif

// "avx2" or "baseline": the kernels the CPU backend runs now.
const char* cpu_isa();
// Chooses the kernels: "auto" (the best this processor runs), "avx2" or "baseline".
// Returns false, changing nothing, for a name this build or processor cannot run.
bool set_cpu_isa(const char* name);

}  // namespace gradcomp
