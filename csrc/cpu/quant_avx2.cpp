// The CPU kernels built with AVX2 (this file is compiled with -mavx2; dispatch.cpp runs it
// only on processors that have AVX2).
#define GC_CPU_ISA isa_avx2
#define GC_CODEC_ABI abi_avx2
#include "quant.cpp"
