// codec.h — the one source of truth for gradcomp's arithmetic.
//
// Every function here is compiled both by the host compiler (CPU backend) and by nvcc
// (CUDA backend), so the two backends produce bit-identical payloads. Floating point is
// pinned: each operation is a single IEEE round-to-nearest op (explicit __f*_rn intrinsics
// on the device, -ffp-contract=off on the host), so no FMA contraction or reassociation
// can change a bit.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define GC_HD __host__ __device__ __forceinline__
#else
#define GC_HD inline
#endif

namespace gradcomp {

// Element type of a bucket (the wire never carries these: it carries codes and scales).
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// Translation units built for another instruction set (cpu/quant_avx2.cpp) define
// GC_CODEC_ABI, so their copies of these inline functions get names of their own and the
// linker never hands a baseline caller an AVX2 copy.
#ifndef GC_CODEC_ABI
#define GC_CODEC_ABI abi_default
#endif

namespace codec {

// How a pass rounds its codes (see "stochastic rounding" below). Outside the ABI namespace:
// the same type in every instruction-set build.
struct Rounding {
  uint64_t seed;        // agreed by every rank
  uint64_t step;        // the hook's step counter
  uint32_t rank;        // the rank that encodes
  uint32_t stochastic;  // 0: round to nearest even (the other fields are unused)
};

inline namespace GC_CODEC_ABI {

// ---------------------------------------------------------------- pinned float ops
GC_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

GC_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

GC_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

GC_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

GC_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

GC_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

GC_HD float abs_f32(float v) { return bits_f32(f32_bits(v) & 0x7fffffffu); }

GC_HD bool is_finite(float v) { return (f32_bits(v) & 0x7f800000u) != 0x7f800000u; }

GC_HD float quiet_nan() { return bits_f32(0x7fc00000u); }

// Block absmax, NaN-propagating, in the bit domain: a non-negative float orders as its bit
// pattern, and every NaN pattern sorts above Inf, so an unsigned max of |v|'s bits is the
// absmax, Inf, or a NaN if any value is NaN (fmaxf would drop the NaN). Max is exact and
// order-free, so any reduction tree — a CPU vector loop, a warp shuffle — gives these bits.
GC_HD uint32_t abs_bits(float v) { return f32_bits(v) & 0x7fffffffu; }
GC_HD uint32_t absmax_bits_update(uint32_t m, float v) {
  const uint32_t b = abs_bits(v);
  return b > m ? b : m;
}
GC_HD uint32_t absmax_bits_combine(uint32_t m1, uint32_t m2) { return m1 > m2 ? m1 : m2; }

// ---------------------------------------------------------------- 16-bit floats
GC_HD float bf16_to_f32(uint16_t b) { return bits_f32(static_cast<uint32_t>(b) << 16); }

// Round to nearest even; NaN becomes the canonical quiet NaN.
GC_HD uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>(((u >> 16) & 0x8000u) | 0x7fc0u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

GC_HD float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_f32(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    // subnormal (or zero): man · 2^-24, exact in f32
    const float mag = mul_rn(static_cast<float>(man), 5.9604644775390625e-08f);
    return bits_f32(sign | f32_bits(mag));
  }
  return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

// Round to nearest even, overflow to ±Inf, NaN to the canonical quiet NaN.
GC_HD uint16_t f32_to_f16(float f) {
  const uint32_t x_all = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x_all >> 16) & 0x8000u);
  const uint32_t x = x_all & 0x7fffffffu;
  if (x >= 0x7f800000u) return static_cast<uint16_t>(sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (x >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to Inf
  if (x < 0x38800000u) {                                               // below 2^-14: subnormal
    if (x < 0x33000000u) return sign;                                  // <= 2^-25 rounds to 0
    const uint32_t e = x >> 23;
    const uint32_t m = (x & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;  // 14..24
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return static_cast<uint16_t>(sign | q);
  }
  uint32_t h = (((x >> 23) - 112u) << 10) | ((x & 0x7fffffu) >> 13);
  const uint32_t rem = x & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right
  return static_cast<uint16_t>(sign | h);
}

template <DType D>
struct Elem;
template <>
struct Elem<DType::F32> {
  using storage = float;
  static GC_HD float to_f32(float v) { return v; }
  static GC_HD float load(const float* p, int64_t i) { return p[i]; }
  static GC_HD void store(float* p, int64_t i, float v) { p[i] = v; }
};
template <>
struct Elem<DType::F16> {
  using storage = uint16_t;
  static GC_HD float to_f32(uint16_t v) { return f16_to_f32(v); }
  static GC_HD float load(const uint16_t* p, int64_t i) { return f16_to_f32(p[i]); }
  static GC_HD void store(uint16_t* p, int64_t i, float v) { p[i] = f32_to_f16(v); }
};
template <>
struct Elem<DType::BF16> {
  using storage = uint16_t;
  static GC_HD float to_f32(uint16_t v) { return bf16_to_f32(v); }
  static GC_HD float load(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }
  static GC_HD void store(uint16_t* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }
};

// ---------------------------------------------------------------- symmetric quantizer
// Bits 8, 4, 2: block-wise absmax quantization to signed codes in [-qmax, qmax]
// (qmax 127, 7, 1); scale = absmax / qmax; q = round_half_even(a / scale); value = q · scale.
// Bits 1: scaled sign (EF-signSGD, 1-bit Adam): q = -1 for a < 0, else +1; scale = the
// block's mean |a|; value = q · scale.
template <int Bits>
struct Quant {
  static_assert(Bits == 8 || Bits == 4 || Bits == 2 || Bits == 1, "codes are 8, 4, 2 or 1 bits");
  static constexpr int qmax = Bits == 1 ? 1 : (1 << (Bits - 1)) - 1;
  static constexpr float qmax_f = static_cast<float>(qmax);
  static constexpr uint32_t mask = (1u << Bits) - 1u;
  static constexpr int per_byte = 8 / Bits;
};

constexpr bool is_valid_bits(int bits) { return bits == 8 || bits == 4 || bits == 2 || bits == 1; }

// Round half to even for |v| < 2^22 without a libm call: adding 1.5·2^23 leaves no
// fraction bits, so the add itself rounds (to nearest even), and the subtract is exact.
GC_HD float round_half_even(float v) {
  const float magic = 12582912.0f;
  return sub_rn(add_rn(v, magic), magic);
}

// A block's scale (sent on the wire) and inverse scale (used to quantize: one multiply per
// value instead of a division). From the block's absmax bits:
//   non-finite absmax            -> scale NaN, inv 0: the block carries "non-finite" through
//                                   every stage
//   absmax 0, or so tiny that    -> scale 0, inv 0: every code is 0, nothing is sent and
//   qmax / absmax overflows         error feedback keeps the values
//   otherwise                    -> scale = absmax / qmax, inv = qmax / absmax
struct BlockScale {
  float scale;
  float inv;
};

template <int Bits>
GC_HD BlockScale block_scale(uint32_t absmax_bits) {
  static_assert(Bits != 1, "the sign codec's scale is sign_scale()");
  const float absmax = bits_f32(absmax_bits);
  if (!is_finite(absmax)) return {quiet_nan(), 0.0f};
  const float inv = div_rn(Quant<Bits>::qmax_f, absmax);
  if (!is_finite(inv)) return {0.0f, 0.0f};
  float scale = div_rn(absmax, Quant<Bits>::qmax_f);
  // Near FLT_MAX, qmax · scale can round past it: one ulp less keeps every dequantized value
  // (and so every residual) finite.
  if (!is_finite(mul_rn(scale, Quant<Bits>::qmax_f))) scale = bits_f32(f32_bits(scale) - 1u);
  return {scale, inv};
}

// ---------------------------------------------------------------- scaled sign's mean |a|
// The mean must not depend on the order values are added in (a CPU vector loop and a warp
// tree add in different orders), so |a| is summed exactly, in 64-bit fixed point relative to
// the block's absmax: value v = m · 2^(e-150) (m the 24-bit significand, e the biased
// exponent) becomes m · 2^(e + 27 - E) truncated (E the absmax's biased exponent), below
// 2^51; 4096 of them stay below 2^63. Integer adds are exact, so any order gives one sum.
GC_HD int fixed_exponent(uint32_t absmax_bits) {
  const int e = static_cast<int>(absmax_bits >> 23);
  return e == 0 ? 1 : e;  // subnormals share exponent 1's scale
}

GC_HD uint64_t abs_fixed(float v, int absmax_exp) {
  const uint32_t b = abs_bits(v);
  const int e = static_cast<int>(b >> 23);
  const uint64_t m = e == 0 ? (b & 0x7fffffu) : ((b & 0x7fffffu) | 0x800000u);
  const int shift = (e == 0 ? 1 : e) + 27 - absmax_exp;  // <= 27
  // both shifts in range and a select, no branch: the CPU sum loop vectorizes
  const uint64_t left = m << (shift > 0 ? shift : 0);
  const uint64_t right = m >> (shift < 0 ? (shift > -64 ? -shift : 63) : 0);
  return shift >= 0 ? left : (shift > -64 ? right : 0u);
}

GC_HD float u64_to_f32_rn(uint64_t v) {
#if defined(__CUDA_ARCH__)
  return __ull2float_rn(v);
#else
  return static_cast<float>(v);  // round to nearest: the default rounding mode
#endif
}

// 2^k for k in [-126, 127] (the normal range: E - 127 and -50 here), exact.
GC_HD float exp2_exact(int k) { return bits_f32(static_cast<uint32_t>(k + 127) << 23); }

// Scale of a sign block from its absmax bits, its fixed-point |a| sum and its valid length:
// min(fl(fl(fl(fl(sum) / len) · 2^-50) · 2^(E-127)), absmax) — each step one rounding, both
// powers exact, dividing first so no step overflows; the min only bites near FLT_MAX, where
// those roundings could carry the mean an ulp past the absmax (and so to Inf).
// Non-finite absmax -> NaN; a zero mean (all zero, or underflow) -> 0, unusable.
GC_HD BlockScale sign_scale(uint32_t absmax_bits, uint64_t abs_sum, int64_t len) {
  const float absmax = bits_f32(absmax_bits);
  if (!is_finite(absmax)) return {quiet_nan(), 0.0f};
  if (absmax_bits == 0 || len == 0) return {0.0f, 0.0f};
  const int E = fixed_exponent(absmax_bits);
  const float per_value = div_rn(u64_to_f32_rn(abs_sum), static_cast<float>(len));
  float mean = mul_rn(mul_rn(per_value, exp2_exact(-50)), exp2_exact(E - 127));
  if (mean > absmax) mean = absmax;
  if (!(mean > 0.0f)) return {0.0f, 0.0f};
  return {mean, 1.0f};  // inv is unused by the sign quantizer: 1 marks the block usable
}

// Whether a block quantizes (inv > 0); otherwise every code is 0.
GC_HD bool scale_usable(BlockScale s) { return s.inv > 0.0f; }

// Code of one value as a float, for a usable block: round_half_even(a · inv) clamped to
// [-qmax, qmax], or the sign. Branch-free, so the CPU loop over a block vectorizes.
template <int Bits>
GC_HD float quantize_usable(float a, float inv) {
  if constexpr (Bits == 1) {
    return a < 0.0f ? -1.0f : 1.0f;
  } else {
    const float lim = Quant<Bits>::qmax_f;
    const float v = round_half_even(mul_rn(a, inv));
    return v > lim ? lim : (v < -lim ? -lim : v);
  }
}

// ---------------------------------------------------------------- stochastic rounding
// Rounding of a pass: to nearest even, or stochastically (unbiased: a value v between
// integers f and f + 1 becomes f + 1 with probability v - f). The random numbers are a pure
// function of (seed, rank, stage, step, parameter ordinal, element offset in the parameter):
// the same on every backend and in a resumed run, independent across ranks (the same
// stream on every rank would correlate their errors and defeat averaging), and unchanged by
// DDP's bucket layout.

// Stages of the pipeline that draw: the first encoding, and the reducing rank's re-encoding.
constexpr uint32_t kStageEncode = 1;
constexpr uint32_t kStageReduce = 2;

// splitmix64's finalizer and the "lowbias32" integer hash: bijective mixers with full
// avalanche, integer-only (so every compiler and the GPU give the same bits).
GC_HD uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

GC_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  return x ^ (x >> 16);
}

// A table row's noise word (row[3]): parameter ordinal << 40 | element offset in the
// parameter of the block's first value. Blocks start at multiples of B (a power of two) in
// their parameter, so a block's low 32 offset bits never wrap: the per-value counter is the
// low word plus the value's index, and the high offset bits go into the block's key.
constexpr int kNoiseOffsetBits = 40;

GC_HD uint64_t noise_word(uint64_t ordinal, uint64_t offset_in_param) {
  return (ordinal << kNoiseOffsetBits) | offset_in_param;
}

// The key of one block's random stream (once per block).
GC_HD uint64_t noise_key(const Rounding& r, uint32_t stage, uint64_t row_word) {
  uint64_t k = mix64(r.seed ^ 0x9e3779b97f4a7c15ull);
  k = mix64(k ^ r.step);
  k = mix64(k ^ ((static_cast<uint64_t>(r.rank) << 8) | stage));
  return mix64(k ^ (row_word >> 32));
}

// Uniform in [0, 1) on a grid of 2^-24 for value i of a block (two 32-bit rounds: cheap,
// and vectorizable on the CPU). Distinct i give distinct draws under one key.
GC_HD float noise_uniform(uint64_t key, uint64_t row_word, int64_t i) {
  const uint32_t counter = static_cast<uint32_t>(row_word) + static_cast<uint32_t>(i);
  const uint32_t h = mix32(mix32(counter ^ static_cast<uint32_t>(key)) ^ static_cast<uint32_t>(key >> 32));
  // exact: an integer below 2^24 (converted as a signed one, which vectorizes on the CPU) times 2^-24
  return mul_rn(static_cast<float>(static_cast<int32_t>(h >> 8)), 5.9604644775390625e-08f);
}

// Code of one value of a usable block, rounded stochastically with draw u in [0, 1):
// v = a · inv, f = floor(v) (exact, from round_half_even), q = f + (u < v - f), clamped to
// [-qmax, qmax]. E[q] = v up to the 2^-24 grid of u and the rounding of v - f (exact for
// |v| >= 1; within 2^-24 of 1 otherwise).
template <int Bits>
GC_HD float quantize_stochastic_usable(float a, float inv, float u) {
  static_assert(Bits != 1, "the scaled sign has no stochastic rounding");
  const float lim = Quant<Bits>::qmax_f;
  // selects between constants, not between operations, so the CPU loop if-converts and
  // vectorizes; r (hence f) is never -0, so adding or subtracting 0 changes no bit
  const float v = mul_rn(a, inv);
  const float r = round_half_even(v);
  const float f = sub_rn(r, r > v ? 1.0f : 0.0f);
  const float q = add_rn(f, u < sub_rn(v, f) ? 1.0f : 0.0f);
  return q > lim ? lim : (q < -lim ? -lim : q);
}

// ---------------------------------------------------------------- packing
// A block's codes are B·Bits/8 bytes; value i of the block sits in byte i·Bits/8 at bit
// (i·Bits) mod 8, least significant first. A field is the code's two's complement in Bits
// bits; for the sign codec, bit 1 means -1 and 0 means +1 (so an all-zero block decodes to
// +0·scale).
template <int Bits>
GC_HD uint32_t code_field(int q) {
  if constexpr (Bits == 1) {
    return q < 0 ? 1u : 0u;
  } else {
    return static_cast<uint32_t>(q) & Quant<Bits>::mask;
  }
}

template <int Bits>
GC_HD int field_code(uint32_t field) {
  if constexpr (Bits == 1) {
    return (field & 1u) ? -1 : 1;
  } else {
    return static_cast<int32_t>(field << (32 - Bits)) >> (32 - Bits);  // sign-extend
  }
}

// Code i of a packed block.
template <int Bits>
GC_HD int code_at(const uint8_t* codes, int64_t i) {
  if constexpr (Bits == 8) {
    return static_cast<int8_t>(codes[i]);
  } else {
    const uint32_t byte = codes[i / Quant<Bits>::per_byte];
    return field_code<Bits>((byte >> ((i % Quant<Bits>::per_byte) * Bits)) & Quant<Bits>::mask);
  }
}

// Code of one value for any block.
template <int Bits>
GC_HD int quantize(float a, BlockScale s) {
  return scale_usable(s) ? static_cast<int>(quantize_usable<Bits>(a, s.inv)) : 0;
}

template <int Bits>
GC_HD float dequantize(int q, float scale) {
  return mul_rn(static_cast<float>(q), scale);
}

// 1/W, the factor a sum of W ranks' values is averaged with (x · 1/W: one multiply per value;
// exact for W a power of two, and the same bits on every backend otherwise).
GC_HD float inv_world(int64_t world) { return div_rn(1.0f, static_cast<float>(world)); }

// Residual after sending code q for value a: what error feedback carries to the next step.
template <int Bits>
GC_HD float residual_after(float a, int q, float scale) {
  return sub_rn(a, dequantize<Bits>(q, scale));
}

// ---------------------------------------------------------------- payload format
// A payload is W shards, one per owning rank; each shard:
//   [16-byte header: uint32 non-finite flag, 12 zero bytes]
//   [S fp32 scales, padded to 16 bytes]
//   [S · B codes of Bits bits]
// Sizes depend only on S (block slots per shard), B and Bits: never on the data.
constexpr int64_t kHeaderBytes = 16;
// Block sizes: powers of two in [kMinBlock, kMaxBlock]. Payload tensors start on a
// kPayloadAlign-byte boundary (a shard's size is a multiple of 4, so every shard starts
// 4-byte aligned).
constexpr int64_t kMinBlock = 32;
constexpr int64_t kMaxBlock = 4096;
constexpr int64_t kPayloadAlign = 16;

GC_HD int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
GC_HD int64_t shard_scales_offset() { return kHeaderBytes; }
GC_HD int64_t shard_codes_offset(int64_t slots) { return kHeaderBytes + round_up(4 * slots, 16); }
// The bytes no value lives in (header after the flag, scale padding) are written as zeros,
// so a payload is a pure function of the input: no uninitialized memory goes on the wire.
GC_HD int64_t shard_scale_pad_begin(int64_t slots) { return kHeaderBytes + 4 * slots; }
GC_HD int64_t block_code_bytes(int64_t block, int bits) { return block * bits / 8; }  // B >= 32: whole words
GC_HD int64_t shard_bytes(int64_t slots, int64_t block, int bits) {
  return shard_codes_offset(slots) + slots * block_code_bytes(block, bits);
}

// One row of a bucket's block table (int64[4]): where a block of the payload comes from.
//   [0] element offset of the block in the bucket
//   [1] valid elements (0 for a padding slot; < B for the last block of a parameter)
//   [2] address of the block's first residual element (fp32 or bf16, as the pass is told),
//       0 without error feedback
//   [3] the block's noise word (noise_word: parameter ordinal, offset in the parameter)
constexpr int kRowWords = 4;

// ---------------------------------------------------------------- sparsification
// Top-k and random-k send, for each compressed parameter p of n_p values, exactly
// k_p = ceil(ratio · n_p) (int32 index, value) pairs: sizes never depend on the data.
//
// A sparse table row (int64[8]) says where a parameter lives and where its pairs go:
//   [0] element offset in the bucket     [1] n_p (elements, < 2^31)
//   [2] address of its float32 residual, 0 without error feedback
//   [3] k_p                              [4] its first pair (sum of k over earlier rows)
//   [5] parameter ordinal (keys random-k's draws)
//   [6] its first tile (sum of tiles over earlier rows; tiles of kSparseTile elements
//       are the units of parallel work)  [7] 0
constexpr int kSparseRowWords = 8;
constexpr int64_t kSparseTile = 4096;

GC_HD int64_t sparse_tiles(int64_t n) { return (n + kSparseTile - 1) / kSparseTile; }

// Top-k payload of one rank: [16-byte header: uint32 non-finite flag, 12 zero bytes]
// [K int32 indices (in the parameter), padded to 16 bytes][K values, padded to 16 bytes],
// K the pairs of every row, row by row, each row's pairs in ascending index order.
GC_HD int64_t topk_values_offset(int64_t pairs) { return kHeaderBytes + round_up(4 * pairs, 16); }
GC_HD int64_t topk_payload_bytes(int64_t pairs, int value_bytes) {
  return topk_values_offset(pairs) + round_up(static_cast<int64_t>(value_bytes) * pairs, 16);
}

// Selection order: the key of a value is abs_bits(a) (31 bits). Non-negative floats order
// as their bits, Inf above every finite value and every NaN above Inf, so a non-finite value
// is always selected first. Exact top-k finds the k-th largest key T by radix select over
// three digits (bits 30..20, 19..10, 9..0, most significant first), then takes every key
// above T and the lowest-indexed keys equal to T.
constexpr int kRadixDigits = 3;
constexpr int kRadixMaxBins = 2048;
GC_HD int radix_bits(int d) { return d == 0 ? 11 : 10; }
GC_HD int radix_shift(int d) { return d == 0 ? 20 : (d == 1 ? 10 : 0); }
GC_HD uint32_t radix_digit(uint32_t key, int d) { return (key >> radix_shift(d)) & ((1u << radix_bits(d)) - 1u); }
// The bits above digit d: a key takes part in digit d's histogram when they equal the prefix
// chosen so far (always, for d = 0).
GC_HD uint32_t radix_above(uint32_t key, int d) { return d == 0 ? 0u : key >> (radix_shift(d) + radix_bits(d)); }

// The bin of a digit's histogram that holds the need-th largest key (need >= 1 and at most
// the histogram's total): scanning from the top bin down, the first whose running count
// reaches need. need becomes the count still needed inside that bin.
GC_HD uint32_t radix_pick(const uint32_t* hist,  // [bins]
                          int bins, uint32_t& need) {
  uint32_t above = 0;
  for (int b = bins - 1; b > 0; --b) {
    if (above + hist[b] >= need) {
      need -= above;
      return static_cast<uint32_t>(b);
    }
    above += hist[b];
  }
  need -= above;
  return 0u;
}

// What the final compaction keeps of a parameter: every key >= upper, and, in ascending
// index order, the first `need` keys in [tie_lo, upper). Exact: upper = T + 1, tie_lo = T.
struct SparseCut {
  uint32_t upper;
  uint32_t tie_lo;
  uint32_t need;
};

GC_HD bool cut_always(uint32_t key, SparseCut c) { return key >= c.upper; }
GC_HD bool cut_tie(uint32_t key, SparseCut c) { return key >= c.tie_lo && key < c.upper; }

// Approximate top-k (as DGC does): the threshold T0 is the key of rank kappa in a strided
// sample of s values (positions floor(j · n / s)), kappa taken 1.5x the sample's share of
// k, so that normally at least k keys are >= T0. With c >= k such keys the result is the
// exact top-k (found among those c); with fewer, the c keys >= T0 and then the
// lowest-indexed keys below T0 (recall >= c / k): exactly k pairs either way.
GC_HD int64_t approx_sample_size(int64_t n) {
  const int64_t s = n / 100 > 4096 ? n / 100 : 4096;
  return s < n ? s : n;
}
GC_HD int64_t approx_sample_pos(int64_t j, int64_t n, int64_t s) { return j * n / s; }
GC_HD int64_t approx_sample_rank(int64_t k, int64_t n, int64_t s) {
  const int64_t share = (k * s + n - 1) / n;  // ceil(k · s / n) >= 1
  const int64_t kappa = share + share / 2 + 1;
  return kappa < s ? kappa : s;
}

// A value as it travels (float32, float16 or bfloat16 with F32 / F16 / BF16): finite values
// saturate to the wire type's largest finite value instead of overflowing to Inf (the
// residual keeps the excess); NaN and Inf stay non-finite.
GC_HD float sparse_wire_round(float a, DType wire) {
  if (wire == DType::F32 || !is_finite(a)) return a;
  const float lim = wire == DType::F16 ? 65504.0f : bits_f32(0x7f7f0000u);
  const float c = a > lim ? lim : (a < -lim ? -lim : a);
  return wire == DType::F16 ? f16_to_f32(f32_to_f16(c)) : bf16_to_f32(f32_to_bf16(c));
}

// One sparse row, read from the table.
struct SparseRow {
  int64_t offset;  // in the bucket
  int64_t n;
  float* residual;  // [n] or null
  int64_t k;
  int64_t first_pair;
  int64_t ordinal;
  int64_t first_tile;
};

GC_HD SparseRow sparse_row(const int64_t* table,  // [P, 8]
                           int64_t i) {
  const int64_t* t = table + i * kSparseRowWords;
  return {t[0], t[1], reinterpret_cast<float*>(static_cast<intptr_t>(t[2])), t[3], t[4], t[5], t[6]};
}

// One parameter's a = x + residual: `first` computes it (before the first pass stores it in
// the residual), `again` reads it back after.
template <DType D>
struct SparseSource {
  const typename Elem<D>::storage* x;  // [n] the parameter's gradient in the bucket
  float* r;                            // [n] its residual, or null
  GC_HD float first(int64_t i) const { return r ? add_rn(Elem<D>::load(x, i), r[i]) : Elem<D>::load(x, i); }
  GC_HD float again(int64_t i) const { return r ? r[i] : Elem<D>::load(x, i); }
};

template <DType D>
GC_HD SparseSource<D> sparse_source(const typename Elem<D>::storage* bucket,  // [n]
                                    const SparseRow& row) {
  return {bucket + row.offset, row.residual};
}

// Values on the wire: float32, or 16 bits (float16 / bfloat16) of an already rounded value.
GC_HD int sparse_value_bytes(DType wire) { return wire == DType::F32 ? 4 : 2; }

GC_HD void sparse_store_value(uint8_t* values,  // [K] of the wire type
                              int64_t j, DType wire, float v) {
  if (wire == DType::F32)
    reinterpret_cast<float*>(values)[j] = v;
  else
    reinterpret_cast<uint16_t*>(values)[j] = wire == DType::F16 ? f32_to_f16(v) : f32_to_bf16(v);
}

GC_HD float sparse_load_value(const uint8_t* values,  // [K] of the wire type
                              int64_t j, DType wire) {
  if (wire == DType::F32) return reinterpret_cast<const float*>(values)[j];
  const uint16_t h = reinterpret_cast<const uint16_t*>(values)[j];
  return wire == DType::F16 ? f16_to_f32(h) : bf16_to_f32(h);
}

// Decoding adds each rank's pairs in rank order, each value times 1/W: one pinned multiply
// and add per pair, so every rank and backend sums the same numbers in the same order.
GC_HD float sparse_accumulate(float acc, float value, float inv_w) { return add_rn(acc, mul_rn(value, inv_w)); }

// Random-k: one index drawn uniformly from each of k equal strata of [0, n) (stratum j is
// [floor(j · n / k), floor((j + 1) · n / k))), from a key every rank computes alike (seed,
// step, parameter ordinal: no rank), so all ranks pick the same ascending, distinct indices
// and the values can be all-reduced.
constexpr uint32_t kStageRandomK = 3;

GC_HD uint64_t randomk_key(uint64_t seed, uint64_t step, uint64_t ordinal) {
  const Rounding shared{seed, step, 0u, 1u};
  return noise_key(shared, kStageRandomK, noise_word(ordinal, 0));
}

GC_HD int64_t randomk_index(uint64_t key, int64_t j, int64_t n, int64_t k) {
  const int64_t lo = j * n / k;
  const int64_t size = (j + 1) * n / k - lo;  // >= 1 as k <= n
  const uint32_t h =
      mix32(mix32(static_cast<uint32_t>(j) ^ static_cast<uint32_t>(key)) ^ static_cast<uint32_t>(key >> 32));
  return lo + static_cast<int64_t>((static_cast<uint64_t>(h) * static_cast<uint64_t>(size)) >> 32);
}

// Random-k payload (float32, all-reduced by summation): [flag, 0, 0, 0][K values]; flag is
// 1 on a rank whose bucket holds a non-finite value, so a nonzero (or NaN) sum marks the
// reduced bucket non-finite on every rank.
constexpr int64_t kRandomKHeader = 4;

}  // namespace GC_CODEC_ABI
}  // namespace codec
}  // namespace gradcomp
