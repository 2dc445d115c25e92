// The CPU backend's entry points (gradcomp.h): validate, then run the kernels of the best
// instruction set this processor has (the same bits whichever runs: cpu/quant.cpp).
#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <string>

#include "../gradcomp.h"
#include "isa.h"

namespace gradcomp {
namespace {

enum class Isa : int { Baseline = 0, Avx2 = 1 };

bool has_avx2() {
#if defined(GRADCOMP_HAVE_AVX2)
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

std::atomic<int>& current() {
  static std::atomic<int> isa{has_avx2() ? static_cast<int>(Isa::Avx2) : static_cast<int>(Isa::Baseline)};
  return isa;
}

void check_args(int bits, int64_t block, int64_t world, int64_t slots, DType residual = DType::F32,
                bool stochastic = false) {
  if (!codec::is_valid_bits(bits))
    throw std::invalid_argument("gradcomp: codes are 8, 4, 2 or 1 bits, got " + std::to_string(bits));
  if (block < codec::kMinBlock || block > kMaxBlock || (block & (block - 1)) != 0)
    throw std::invalid_argument("gradcomp: block size must be a power of two in [32, 4096], got " +
                                std::to_string(block));
  if (world < 1 || slots < 0) throw std::invalid_argument("gradcomp: bad world size or slot count");
  if (residual != DType::F32 && residual != DType::BF16)
    throw std::invalid_argument("gradcomp: residuals are float32 or bfloat16");
  if (stochastic && bits == 1)
    throw std::invalid_argument("gradcomp: the scaled sign (bits 1) has no stochastic rounding");
}

}  // namespace

const char* cpu_isa() { return current().load() == static_cast<int>(Isa::Avx2) ? "avx2" : "baseline"; }

bool set_cpu_isa(const char* name) {
  if (std::strcmp(name, "auto") == 0) {
    current() = has_avx2() ? static_cast<int>(Isa::Avx2) : static_cast<int>(Isa::Baseline);
  } else if (std::strcmp(name, "avx2") == 0) {
    if (!has_avx2()) return false;
    current() = static_cast<int>(Isa::Avx2);
  } else if (std::strcmp(name, "baseline") == 0) {
    current() = static_cast<int>(Isa::Baseline);
  } else {
    return false;
  }
  return true;
}

#if defined(GRADCOMP_HAVE_AVX2)
#define GC_DISPATCH(fn, ...) \
  (current().load() == static_cast<int>(Isa::Avx2) ? isa_avx2::fn(__VA_ARGS__) : isa_baseline::fn(__VA_ARGS__))
#else
#define GC_DISPATCH(fn, ...) isa_baseline::fn(__VA_ARGS__)
#endif

void quant_encode_cpu(int bits, int64_t block, DType dtype, DType residual_dtype, const void* bucket,
                      const int64_t* table, int64_t world, int64_t slots, uint8_t* send, codec::Rounding rounding,
                      int threads) {
  check_args(bits, block, world, slots, residual_dtype, rounding.stochastic != 0);
  GC_DISPATCH(encode, bits, block, dtype, residual_dtype, bucket, table, world, slots, send, rounding,
              std::max(threads, 1));
}

void quant_reduce_cpu(int bits, int64_t block, DType residual_dtype, const uint8_t* recv, const int64_t* my_rows,
                      int64_t world, int64_t slots, uint8_t* slice, codec::Rounding rounding, int threads) {
  check_args(bits, block, world, slots, residual_dtype, rounding.stochastic != 0);
  GC_DISPATCH(reduce, bits, block, residual_dtype, recv, my_rows, world, slots, slice, rounding, std::max(threads, 1));
}

void quant_decode_cpu(int bits, int64_t block, DType dtype, const uint8_t* gathered, const int64_t* table,
                      int64_t world, int64_t slots, void* bucket, int threads) {
  check_args(bits, block, world, slots);
  GC_DISPATCH(decode, bits, block, dtype, gathered, table, world, slots, bucket, std::max(threads, 1));
}

}  // namespace gradcomp
