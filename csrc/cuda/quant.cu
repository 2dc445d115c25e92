// CUDA backend of the block quantizer: the three fused passes of gradcomp.h. One warp per
// quantization block (one table row); lane l handles V consecutive values of every chunk of
// 32·V (Map below), so every warp-wide load is coalesced. The arithmetic is codec.h's, the
// same calls the CPU twin makes, so both backends produce the same bits.
#include <cuda_runtime.h>

#include <atomic>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../gradcomp.h"
#include "common.cuh"

#define GC_STR2(...) #__VA_ARGS__
#define GC_STR(...) GC_STR2(__VA_ARGS__)

namespace gradcomp {
namespace {

using namespace codec;
using cuda_util::check;
using cuda_util::use_device;
using cuda_util::with_dtype;

constexpr int kWarpsPerCta = 8;
constexpr unsigned kFull = 0xffffffffu;

void check_args(int bits, int64_t block, int64_t world, int64_t slots) {
  if (!is_valid_bits(bits))
    throw std::invalid_argument("gradcomp: codes are 8, 4, 2 or 1 bits, got " + std::to_string(bits));
  if (block < 32 || block > 4096 || (block & (block - 1)) != 0)
    throw std::invalid_argument("gradcomp: block size must be a power of two in [32, 4096], got " +
                                std::to_string(block));
  if (world < 1 || slots < 0) throw std::invalid_argument("gradcomp: bad world size or slot count");
}

// The arguments only passes 1 and 2 take (they write residuals and may round stochastically).
void check_residual_rounding(int bits, DType residual_dtype, const Rounding& rounding) {
  if (residual_dtype != DType::F32 && residual_dtype != DType::BF16)
    throw std::invalid_argument("gradcomp: residuals are float32 or bfloat16");
  if (rounding.stochastic && bits == 1)
    throw std::invalid_argument("gradcomp: the scaled sign (bits 1) has no stochastic rounding");
}

__device__ __forceinline__ uint32_t warp_absmax(uint32_t m) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = absmax_bits_combine(m, __shfl_xor_sync(kFull, m, o));
  return m;
}

// Integer adds are exact and order-free, so the warp's tree gives the CPU loop's sum.
__device__ __forceinline__ uint64_t warp_sum(uint64_t s) {
  unsigned long long v = s;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// Zeroes a shard's header and the padding after its scales (codec.h's zero bytes). Word by
// word: a shard is only 4-byte aligned (narrow codes of small blocks make SB a multiple of 4,
// not of 16, so shard r > 0 of a payload can start anywhere on a 4-byte boundary).
__device__ void zero_unused(uint8_t* shard /* [SB] */, int64_t slots) {
  auto* header = reinterpret_cast<uint32_t*>(shard);
  header[0] = header[1] = header[2] = header[3] = 0u;
  for (int64_t b = shard_scale_pad_begin(slots); b < shard_codes_offset(slots); ++b) shard[b] = 0;
}

// Zero every shard's unused bytes (the flags are OR-ed into afterwards).
__global__ void zero_headers(uint8_t* shards /* [W * SB] */, int64_t world, int64_t slots, int64_t sb) {
  for (int64_t r = threadIdx.x; r < world; r += blockDim.x) zero_unused(shards + r * sb, slots);
}

// Element mapping inside a block: lane l owns V consecutive values per chunk of 32·V,
//   element(k, j) = k·32·V + l·V + j      (k < chunks, j < V),
// so a lane's codes are one field of V·Bits bits and, when the block is whole and aligned,
// its floats one 16-byte (fp32) or 8-byte (16-bit) vector.
// Kernels are templated on PerLane = B / 32 for blocks whose values stay in registers
// (B <= 512); PerLane = 0 is the one kernel for larger blocks (B read at run time, values
// read again — the later reads mostly hit L2).
template <int PerLane>
struct Map {
  static constexpr bool kKeep = PerLane > 0;
  static constexpr int V = kKeep && PerLane < 4 ? PerLane : 4;
  static constexpr int kKept = kKeep ? PerLane : 1;  // size of the register copy
  static __device__ __forceinline__ int chunks(int B) { return kKeep ? PerLane / V : B / (32 * V); }
};

template <int Bytes>
struct Word;
template <>
struct Word<1> {
  using type = uint8_t;
};
template <>
struct Word<2> {
  using type = uint16_t;
};
template <>
struct Word<4> {
  using type = uint32_t;
};

// Packing (codec.h): value i of a block sits at bit i·Bits of its code bytes, so lane l's V
// values of chunk k form one field of F = V·Bits bits at bit (k·32 + l)·F. A field of whole
// bytes is a word of the lane's own; a narrower one (F = 1, 2, 4) shares a 32-bit word with
// its group of G = 32 / F lanes, which OR their (disjoint) fields together by shuffles before
// one of them stores the word. Block code bytes start 4-byte aligned (shard_codes_offset is
// a multiple of 16, block_code_bytes of 4).
template <int Bits, int V>
struct Pack {
  static constexpr int F = V * Bits;
  static constexpr bool kOwn = F % 8 == 0;
};

// Stores this lane's codes q of chunk k. Every lane of the warp calls it (full-mask shuffles).
template <int Bits, int V>
__device__ __forceinline__ void store_codes(uint8_t* codes /* [B·Bits/8] */, int k, int lane, const int (&q)[V]) {
  using P = Pack<Bits, V>;
  uint32_t f = 0;
#pragma unroll
  for (int j = 0; j < V; ++j) f |= code_field<Bits>(q[j]) << (j * Bits);
  if constexpr (P::kOwn) {
    using W = typename Word<P::F / 8>::type;
    reinterpret_cast<W*>(codes)[k * 32 + lane] = static_cast<W>(f);
  } else {
    constexpr int G = 32 / P::F;
    f <<= (lane % G) * P::F;
#pragma unroll
    for (int o = 1; o < G; o <<= 1) f |= __shfl_xor_sync(kFull, f, o);
    if (lane % G == 0) reinterpret_cast<uint32_t*>(codes)[k * P::F + lane / G] = f;
  }
}

// Loads this lane's codes q of chunk k (a narrow field: from the word that holds it).
template <int Bits, int V>
__device__ __forceinline__ void load_codes(const uint8_t* codes /* [B·Bits/8] */, int k, int lane, int (&q)[V]) {
  using P = Pack<Bits, V>;
  uint32_t f;
  if constexpr (P::kOwn) {
    using W = typename Word<P::F / 8>::type;
    f = reinterpret_cast<const W*>(codes)[k * 32 + lane];
  } else {
    constexpr int G = 32 / P::F;
    f = reinterpret_cast<const uint32_t*>(codes)[k * P::F + lane / G] >> ((lane % G) * P::F);
  }
#pragma unroll
  for (int j = 0; j < V; ++j) q[j] = field_code<Bits>((f >> (j * Bits)) & Quant<Bits>::mask);
}

__device__ __forceinline__ bool aligned(const void* p, int bytes) {
  return (reinterpret_cast<uintptr_t>(p) & static_cast<uintptr_t>(bytes - 1)) == 0;
}

// V elements of type D (bucket or residual) from element i on, converted to float; zero past valid.
template <DType D, int V>
__device__ __forceinline__ void load_elems(const typename Elem<D>::storage* p /* [n] */, int64_t i, int64_t valid,
                                           bool vec, float (&v)[V]) {
  using E = Elem<D>;
  if (V == 4 && vec) {
    if constexpr (D == DType::F32) {
      const float4 f = *reinterpret_cast<const float4*>(p + i);
      v[0] = f.x, v[1 % V] = f.y, v[2 % V] = f.z, v[3 % V] = f.w;
    } else {
      const uint2 u = *reinterpret_cast<const uint2*>(p + i);
      v[0] = E::to_f32(static_cast<uint16_t>(u.x)), v[1 % V] = E::to_f32(static_cast<uint16_t>(u.x >> 16));
      v[2 % V] = E::to_f32(static_cast<uint16_t>(u.y)), v[3 % V] = E::to_f32(static_cast<uint16_t>(u.y >> 16));
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < V; ++j) v[j] = j < valid ? E::load(p, i + j) : 0.0f;
}

template <DType D, int V>
__device__ __forceinline__ void store_elems(typename Elem<D>::storage* p /* [n] */, int64_t i, int64_t valid, bool vec,
                                            const float (&v)[V]) {
  using E = Elem<D>;
  if (V == 4 && vec) {
    if constexpr (D == DType::F32) {
      *reinterpret_cast<float4*>(p + i) = make_float4(v[0], v[1 % V], v[2 % V], v[3 % V]);
    } else {
      typename E::storage h[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) E::store(h, j, v[j % V]);
      *reinterpret_cast<uint2*>(p + i) =
          make_uint2(h[0] | (static_cast<uint32_t>(h[1]) << 16), h[2] | (static_cast<uint32_t>(h[3]) << 16));
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < V; ++j)
    if (j < valid) E::store(p, i + j, v[j]);
}

// Whether V elements of type D at p can move as one vector.
template <DType D>
__device__ __forceinline__ bool vec_aligned(const void* p) {
  return aligned(p, D == DType::F32 ? 16 : 8);
}

// A row's residuals: fp32 or bf16 elements, as the pass is told. The type is a warp-uniform
// run-time branch, not a template parameter: that would double the encode and reduce
// kernels, and the build time with them.
struct Residuals {
  void* p;    // [len] float or bf16; null without error feedback
  bool bf16;  // element type: bf16 (else fp32)
  bool vec;   // whole block, aligned: vector loads and stores

  __device__ __forceinline__ Residuals(const int64_t* row /* [4] */, DType type, bool whole)
      : p(reinterpret_cast<void*>(static_cast<intptr_t>(row[2]))), bf16(type == DType::BF16) {
    vec = whole && (bf16 ? vec_aligned<DType::BF16>(p) : vec_aligned<DType::F32>(p));
  }
  template <int V>
  __device__ __forceinline__ void load(int64_t e, int64_t valid, float (&r)[V]) const {
    if (bf16)
      load_elems<DType::BF16, V>(static_cast<const uint16_t*>(p), e, valid, vec, r);
    else
      load_elems<DType::F32, V>(static_cast<const float*>(p), e, valid, vec, r);
  }
  template <int V>
  __device__ __forceinline__ void store(int64_t e, int64_t valid, const float (&r)[V]) const {
    if (bf16)
      store_elems<DType::BF16, V>(static_cast<uint16_t*>(p), e, valid, vec, r);
    else
      store_elems<DType::F32, V>(static_cast<float*>(p), e, valid, vec, r);
  }
  __device__ __forceinline__ void store_one(int64_t i, float v) const {
    if (bf16)
      Elem<DType::BF16>::store(static_cast<uint16_t*>(p), i, v);
    else
      Elem<DType::F32>::store(static_cast<float*>(p), i, v);
  }
};

// Chunk k's values again: from registers, or recomputed.
template <int PerLane, class Values>
__device__ __forceinline__ void revisit(Values&& values, int k, const float (&keep)[Map<PerLane>::kKept],
                                        float (&a)[Map<PerLane>::V]) {
  using M = Map<PerLane>;
  if constexpr (M::kKeep) {
#pragma unroll
    for (int j = 0; j < M::V; ++j) a[j] = keep[(k * M::V + j) % M::kKept];
  } else {
    values(k, a);
  }
}

// First pass over one block, shared by passes 1 and 2: `values(k, a)` yields chunk k's
// values (zero past the valid length); they are kept in `keep` when they fit in registers.
// Returns the block's scale from the warp's NaN-propagating absmax (and, for the scaled
// sign, its exact fixed-point |a| sum: a second look at the values); lane 0 stores it at
// `scale_out` and flags the shard at `flag` when it is non-finite.
template <int Bits, int PerLane, class Values>
__device__ __forceinline__ BlockScale scan_block(Values&& values, int chunks, int lane, int64_t len,
                                                 float (&keep)[Map<PerLane>::kKept], float* scale_out /* [1] */,
                                                 unsigned* flag /* [1] */) {
  using M = Map<PerLane>;
  constexpr int V = M::V;
  uint32_t m = 0;
#pragma unroll
  for (int k = 0; k < chunks; ++k) {
    float a[V];
    values(k, a);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (M::kKeep) keep[(k * V + j) % M::kKept] = a[j];
      m = absmax_bits_update(m, a[j]);
    }
  }
  m = warp_absmax(m);
  BlockScale bs;
  if constexpr (Bits == 1) {
    uint64_t sum = 0;
    if (is_finite(bits_f32(m)) && m != 0) {  // warp-uniform: m is the warp's
      const int E = fixed_exponent(m);
#pragma unroll
      for (int k = 0; k < chunks; ++k) {
        float a[V];
        revisit<PerLane>(values, k, keep, a);
#pragma unroll
        for (int j = 0; j < V; ++j) sum += abs_fixed(a[j], E);  // padding: 0 adds 0
      }
      sum = warp_sum(sum);
    }
    bs = sign_scale(m, sum, len);
  } else {
    bs = block_scale<Bits>(m);
  }
  if (lane == 0) {
    *scale_out = bs.scale;
    if (!is_finite(bs.scale)) atomicOr(flag, 1u);
  }
  return bs;
}

// How one block's values round: to nearest, or stochastically from the block's stream
// (codec.h: keyed once per block; only a usable block draws, the others send code 0).
struct Draw {
  bool stochastic;
  uint64_t key;
  uint64_t row_word;  // the row's noise word (row[3])
};

template <int Bits>
__device__ __forceinline__ Draw block_draw(const Rounding& rounding, uint32_t stage, uint64_t row_word, BlockScale bs) {
  if constexpr (Bits == 1) {
    return {false, 0, row_word};  // rejected by check_residual_rounding
  } else {
    const bool s = rounding.stochastic != 0 && scale_usable(bs);
    return {s, s ? noise_key(rounding, stage, row_word) : 0, row_word};
  }
}

// Code of value i of a block (a valid value: padding is code 0).
template <int Bits>
__device__ __forceinline__ int code_of(float a, BlockScale bs, const Draw& d, int i) {
  if constexpr (Bits != 1) {
    if (d.stochastic)
      return static_cast<int>(quantize_stochastic_usable<Bits>(a, bs.inv, noise_uniform(d.key, d.row_word, i)));
  }
  return quantize<Bits>(a, bs);
}

// Pass 1. One warp per row of the table.
template <int Bits, DType D, int PerLane>
__global__ void encode_kernel(const typename Elem<D>::storage* __restrict__ bucket,  // [n]
                              const int64_t* __restrict__ table,                     // [W * S, 4]
                              int64_t rows, int64_t world, int64_t slots, int64_t sb, int B, DType residual_dtype,
                              Rounding rounding, uint8_t* __restrict__ send) {  // [W * SB]
  using M = Map<PerLane>;
  constexpr int V = M::V;
  // Warps walk the table slot-major (slot, then owner): for parameters laid out one after
  // another that is the bucket's own order, so neighbouring warps read neighbouring memory.
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / 32;
  if (w >= rows) return;  // whole warps only: the shuffles below need every lane
  const int64_t slot = w / world, owner = w % world, row = owner * slots + slot;
  const int lane = threadIdx.x % 32;
  const int64_t* t = table + row * kRowWords;
  const int64_t off = t[0], len = t[1];
  const bool whole = len == B;
  const Residuals res(t, residual_dtype, whole);
  uint8_t* shard = send + owner * sb;
  uint8_t* codes = shard + shard_codes_offset(slots) + slot * block_code_bytes(B, Bits);
  const int chunks = M::chunks(B);
  const bool vec_x = whole && vec_aligned<D>(bucket + off);

  auto load_a = [&](int k, float (&a)[V]) {
    const int e = k * 32 * V + lane * V;
    const int64_t valid = len - e;
    load_elems<D, V>(bucket, off + e, valid, vec_x, a);
    if (res.p) {
      float r[V];
      res.load<V>(e, valid, r);
#pragma unroll
      for (int j = 0; j < V; ++j) a[j] = add_rn(a[j], r[j]);  // padding: 0 + 0
    }
  };

  float keep[M::kKept];
  const BlockScale bs = scan_block<Bits, PerLane>(load_a, chunks, lane, len, keep,
                                                  reinterpret_cast<float*>(shard + shard_scales_offset()) + slot,
                                                  reinterpret_cast<unsigned*>(shard));
  const float scale = bs.scale;
  const bool finite = is_finite(scale);
  const Draw draw = block_draw<Bits>(rounding, kStageEncode, static_cast<uint64_t>(t[3]), bs);
#pragma unroll
  for (int k = 0; k < chunks; ++k) {
    const int e = k * 32 * V + lane * V;
    const int64_t valid = len - e;
    float a[V];
    revisit<PerLane>(load_a, k, keep, a);
    int q[V];
    float r[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      q[j] = j < valid ? code_of<Bits>(a[j], bs, draw, e + j) : 0;
      r[j] = residual_after<Bits>(a[j], q[j], scale);  // stored only for a finite block
    }
    store_codes<Bits, V>(codes, k, lane, q);
    if (res.p) {
      if (finite) {
        res.store<V>(e, valid, r);
      } else {  // a non-finite block keeps the old residual where a is finite, clears it where not
#pragma unroll
        for (int j = 0; j < V; ++j)
          if (j < valid && !is_finite(a[j])) res.store_one(e + j, 0.0f);
      }
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
template <int Bits, int PerLane>
__global__ void reduce_kernel(const uint8_t* __restrict__ recv,     // [W * SB]
                              const int64_t* __restrict__ my_rows,  // [S, 4]
                              int64_t world, int64_t slots, int64_t sb, int B, DType residual_dtype, Rounding rounding,
                              uint8_t* __restrict__ slice) {  // [SB]
  using M = Map<PerLane>;
  constexpr int V = M::V;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / 32;
  if (slot >= slots) return;  // whole warps only
  const int lane = threadIdx.x % 32;
  const int64_t* t = my_rows + slot * kRowWords;
  const int64_t len = t[1];
  const Residuals res(t, residual_dtype, len == B);
  const int64_t codes_off = shard_codes_offset(slots) + slot * block_code_bytes(B, Bits);
  const float world_f = static_cast<float>(world), inv_w = inv_world(world);
  const int chunks = M::chunks(B);

  auto mean_at = [&](int k, float (&a)[V]) {  // sum in rank order from +0, then · 1/W
#pragma unroll
    for (int j = 0; j < V; ++j) a[j] = 0.0f;
    const int e = k * 32 * V + lane * V;
    for (int64_t src = 0; src < world; ++src) {
      const uint8_t* shard = recv + src * sb;
      const float scale = reinterpret_cast<const float*>(shard + shard_scales_offset())[slot];
      int q[V];
      load_codes<Bits, V>(shard + codes_off, k, lane, q);
#pragma unroll
      for (int j = 0; j < V; ++j) a[j] = add_rn(a[j], dequantize<Bits>(q[j], scale));
    }
    // padding is 0 (a sign code's padding field decodes to +scale, a NaN scale to NaN)
#pragma unroll
    for (int j = 0; j < V; ++j) a[j] = e + j < len ? mul_rn(a[j], inv_w) : 0.0f;
  };

  float keep[M::kKept];
  const BlockScale bs = scan_block<Bits, PerLane>(mean_at, chunks, lane, len, keep,
                                                  reinterpret_cast<float*>(slice + shard_scales_offset()) + slot,
                                                  reinterpret_cast<unsigned*>(slice));
  const float scale = bs.scale;
  const bool finite = is_finite(scale);
  const Draw draw = block_draw<Bits>(rounding, kStageReduce, static_cast<uint64_t>(t[3]), bs);
  uint8_t* codes = slice + codes_off;
#pragma unroll
  for (int k = 0; k < chunks; ++k) {
    const int e = k * 32 * V + lane * V;
    const int64_t valid = len - e;
    float a[V];
    revisit<PerLane>(mean_at, k, keep, a);
    int q[V];
#pragma unroll
    for (int j = 0; j < V; ++j) q[j] = j < valid ? code_of<Bits>(a[j], bs, draw, e + j) : 0;
    store_codes<Bits, V>(codes, k, lane, q);
    if (res.p && finite) {  // a non-finite block leaves the residual as pass 1 wrote it
      float r[V];
      res.load<V>(e, valid, r);
#pragma unroll
      for (int j = 0; j < V; ++j) r[j] = add_rn(r[j], mul_rn(world_f, residual_after<Bits>(a[j], q[j], scale)));
      res.store<V>(e, valid, r);
    }
  }
}

// Pass 3. One warp per row of the table.
template <int Bits, DType D, int PerLane>
__global__ void decode_kernel(const uint8_t* __restrict__ gathered,  // [W * SB]
                              const int64_t* __restrict__ table,     // [W * S, 4]
                              int64_t rows, int64_t world, int64_t slots, int64_t sb, int B,
                              typename Elem<D>::storage* __restrict__ bucket) {  // [n]
  using M = Map<PerLane>;
  constexpr int V = M::V;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / 32;
  if (w >= rows) return;
  const int64_t slot = w / world, owner = w % world, row = owner * slots + slot;
  const int lane = threadIdx.x % 32;
  unsigned f = 0;
  for (int64_t r = lane; r < world; r += 32) f |= *reinterpret_cast<const unsigned*>(gathered + r * sb);
  const bool flagged = __any_sync(kFull, f != 0);
  const int64_t* t = table + row * kRowWords;
  const int64_t off = t[0], len = t[1];
  const uint8_t* shard = gathered + owner * sb;
  const float scale = reinterpret_cast<const float*>(shard + shard_scales_offset())[slot];
  const uint8_t* codes = shard + shard_codes_offset(slots) + slot * block_code_bytes(B, Bits);
  const bool vec = len == B && vec_aligned<D>(bucket + off);
  const int chunks = M::chunks(B);
#pragma unroll 4
  for (int k = 0; k < chunks; ++k) {
    const int e = k * 32 * V + lane * V;
    int q[V];
    load_codes<Bits, V>(codes, k, lane, q);
    float v[V];
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = flagged ? quiet_nan() : dequantize<Bits>(q[j], scale);
    store_elems<D, V>(bucket, off + e, len - e, vec, v);
  }
}

unsigned grid_for(int64_t warps) { return static_cast<unsigned>((warps + kWarpsPerCta - 1) / kWarpsPerCta); }

// Calls f(std::integral_constant<int, Bits>) for bits check_args accepted.
template <class F>
void with_bits(int bits, F&& f) {
  switch (bits) {
    case 8:
      return f(std::integral_constant<int, 8>{});
    case 4:
      return f(std::integral_constant<int, 4>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    default:
      return f(std::integral_constant<int, 1>{});
  }
}

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

int cuda_driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) {  // 0 and success without a driver; be sure
    cudaGetLastError();
    return 0;
  }
  return v;
}

std::string cuda_problem() {
  static const std::string problem = cuda_driver_problem(cuda_driver_version(), CUDART_VERSION);
  return problem;
}

namespace cuda_util {
namespace {
__global__ void probe_kernel() {}
}  // namespace

void ensure_ready(int device) {
  if (device < 0) {
    const std::string& problem = cuda_problem();
    if (!problem.empty()) throw std::runtime_error("gradcomp: " + problem);
    return;
  }
  static std::atomic<uint64_t> ready{0};  // one bit per device ordinal checked
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (bit && (ready.load(std::memory_order_acquire) & bit)) return;
  cudaFuncAttributes attrs;
  const cudaError_t err = cudaFuncGetAttributes(&attrs, probe_kernel);  // loads the module for `device`
  if (err != cudaSuccess) {
    cudaGetLastError();
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    if (err == cudaErrorUnsupportedPtxVersion)
      throw std::runtime_error("gradcomp: " +
                               cuda_ptx_problem(cuda_driver_version(), CUDART_VERSION, major, minor, cuda_archs()));
    if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction)
      throw std::runtime_error("gradcomp: " + cuda_arch_problem(major, minor, cuda_archs()));
    check(err, "loading kernels");
  }
  if (bit) ready.fetch_or(bit, std::memory_order_acq_rel);
}
}  // namespace cuda_util

void quant_encode_cuda(int bits, int64_t block, DType dtype, DType residual_dtype, const void* bucket,
                       const int64_t* table, int64_t world, int64_t slots, uint8_t* send, Rounding rounding, int device,
                       intptr_t stream) {
  check_args(bits, block, world, slots);
  check_residual_rounding(bits, residual_dtype, rounding);
  use_device(device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const int64_t sb = shard_bytes(slots, block, bits);
  GC_LAUNCH(1, 32, s, zero_headers)(send, world, slots, sb);
  check(cudaGetLastError(), "zero_headers launch");
  const int64_t rows = world * slots;
  if (rows == 0) return;
  with_bits(bits, [&](auto q) {
    with_dtype(dtype, [&](auto d) {
      with_block(block, [&](auto b) {
        constexpr int Bits = decltype(q)::value;
        constexpr DType D = decltype(d)::value;
        constexpr int P = decltype(b)::value;
        GC_LAUNCH(grid_for(rows), kWarpsPerCta * 32, s, encode_kernel<Bits, D, P>)(
            static_cast<const typename Elem<D>::storage*>(bucket), table, rows, world, slots, sb,
            static_cast<int>(block), residual_dtype, rounding, send);
      });
    });
  });
  check(cudaGetLastError(), "encode launch");
}

void quant_reduce_cuda(int bits, int64_t block, DType residual_dtype, const uint8_t* recv, const int64_t* my_rows,
                       int64_t world, int64_t slots, uint8_t* slice, Rounding rounding, int device, intptr_t stream) {
  check_args(bits, block, world, slots);
  check_residual_rounding(bits, residual_dtype, rounding);
  use_device(device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const int64_t sb = shard_bytes(slots, block, bits);
  GC_LAUNCH(1, 32, s, reduce_header)(recv, world, slots, sb, slice);
  check(cudaGetLastError(), "reduce_header launch");
  if (slots == 0) return;
  with_bits(bits, [&](auto q) {
    with_block(block, [&](auto b) {
      constexpr int Bits = decltype(q)::value;
      constexpr int P = decltype(b)::value;
      GC_LAUNCH(grid_for(slots), kWarpsPerCta * 32, s, reduce_kernel<Bits, P>)(
          recv, my_rows, world, slots, sb, static_cast<int>(block), residual_dtype, rounding, slice);
    });
  });
  check(cudaGetLastError(), "reduce launch");
}

void quant_decode_cuda(int bits, int64_t block, DType dtype, const uint8_t* gathered, const int64_t* table,
                       int64_t world, int64_t slots, void* bucket, int device, intptr_t stream) {
  check_args(bits, block, world, slots);
  use_device(device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const int64_t sb = shard_bytes(slots, block, bits);
  const int64_t rows = world * slots;
  if (rows == 0) return;
  with_bits(bits, [&](auto q) {
    with_dtype(dtype, [&](auto d) {
      with_block(block, [&](auto b) {
        constexpr int Bits = decltype(q)::value;
        constexpr DType D = decltype(d)::value;
        constexpr int P = decltype(b)::value;
        GC_LAUNCH(grid_for(rows), kWarpsPerCta * 32, s, decode_kernel<Bits, D, P>)(
            gathered, table, rows, world, slots, sb, static_cast<int>(block),
            static_cast<typename Elem<D>::storage*>(bucket));
      });
    });
  });
  check(cudaGetLastError(), "decode launch");
}

}  // namespace gradcomp
