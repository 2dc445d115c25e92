// CPU backend of the block quantizer: the three fused passes of gradcomp.h, one block
// (one table row) per loop iteration, blocks spread over threads. The arithmetic is
// codec.h's, shared with the CUDA backend.
//
// This file is compiled once per instruction set (GC_CPU_ISA names the namespace: the
// baseline build, and quant_avx2.cpp with -mavx2); cpu/dispatch.cpp validates arguments
// and picks one at run time. Every value is the same sequence of IEEE operations in each
// (no FMA: -ffp-contract=off), so the choice changes speed, never a bit.
#include <cstdint>
#include <cstring>  // memset: no std:: templates here, whose merged copies could mix instruction sets

#include "../codec.h"
#include "isa.h"
#include "parallel.h"

#ifndef GC_CPU_ISA
#define GC_CPU_ISA isa_baseline
#endif

namespace gradcomp {
namespace GC_CPU_ISA {
namespace {

using namespace codec;

// The residual row of a table row: fp32 or bf16 elements (R), or null without error feedback.
template <DType R>
inline typename Elem<R>::storage* residual_ptr(const int64_t* row) {
  return reinterpret_cast<typename Elem<R>::storage*>(static_cast<intptr_t>(row[2]));
}

// Prefetches [p, p + bytes) for writing. A rank's reduce rows are every W-th block of a
// parameter, so its residual rows are short runs in separate pages, where hardware
// prefetchers (which stop at page boundaries) start cold at every row: prefetching the next
// row hides that.
inline void prefetch_for_write(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 1, 3);
}

// The block's stochastic-rounding draws u[0, len) (codec.h), or null for rounding to nearest.
// A separate loop: integer-only, so it vectorizes.
inline const float* draw_noise(const Rounding& rounding, uint32_t stage, const int64_t* row, int64_t len,
                               float* u /* [B] */) {
  if (!rounding.stochastic) return nullptr;
  const uint64_t word = static_cast<uint64_t>(row[3]);
  const uint64_t key = noise_key(rounding, stage, word);
  for (int64_t i = 0; i < len; ++i) u[i] = noise_uniform(key, word, i);
  return u;
}

inline uint32_t* flag_ptr(uint8_t* shard) { return reinterpret_cast<uint32_t*>(shard); }
inline uint32_t flag_of(const uint8_t* shard) { return *reinterpret_cast<const uint32_t*>(shard); }

// shard: [SB] — zero its header and the padding after its scales.
void zero_unused(uint8_t* shard, int64_t slots) {
  std::memset(shard, 0, kHeaderBytes);
  std::memset(shard + shard_scale_pad_begin(slots), 0, shard_codes_offset(slots) - shard_scale_pad_begin(slots));
}

// Quantize a[0, len) (zero beyond), whose absmax bits the caller folded into `m` while
// writing `a` (one pass fewer), into the block's packed codes[0, B·Bits/8); returns the
// scale. Codes round to nearest, or stochastically with draws u[0, len) when `u` is set.
// When `residual` is set, writes the error of each valid element there, times `gain`,
// added (`accumulate`, pass 2) or stored (pass 1), in the residual's element type R. A
// non-finite block sends nothing; pass 1 then keeps the old residual where a is finite and
// clears it where not (the step is poisoned or skipped by GradScaler anyway); pass 2 leaves
// the residual as pass 1 wrote it. The loops are branch-free over the block so the compiler
// vectorizes them; every value is the same IEEE operation sequence as codec.h's per-value
// functions.
template <int Bits, DType R>
float encode_block(const float* a, uint32_t m, int64_t len, int64_t block, const float* u, uint8_t* codes,
                   typename Elem<R>::storage* residual, bool accumulate, float gain, bool* nonfinite) {
  using ER = Elem<R>;
  BlockScale bs;
  if constexpr (Bits == 1) {
    uint64_t sum = 0;
    if (is_finite(bits_f32(m)) && m != 0) {
      const int E = fixed_exponent(m);
      for (int64_t i = 0; i < len; ++i) sum += abs_fixed(a[i], E);
    }
    bs = sign_scale(m, sum, len);
  } else {
    bs = block_scale<Bits>(m);
  }
  const float scale = bs.scale, inv = bs.inv;
  const int64_t code_bytes = block_code_bytes(block, Bits);
  if (!scale_usable(bs)) {
    std::memset(codes, 0, code_bytes);
    if (!is_finite(scale)) {
      *nonfinite = true;
      if (residual && !accumulate)
        for (int64_t i = 0; i < len; ++i)
          if (!is_finite(a[i])) ER::store(residual, i, 0.0f);
    } else if (residual) {  // zero scale: every code is 0, the residual keeps all of a
      for (int64_t i = 0; i < len; ++i)
        ER::store(residual, i,
                  accumulate ? add_rn(ER::load(residual, i), mul_rn(gain, residual_after<Bits>(a[i], 0, scale)))
                             : residual_after<Bits>(a[i], 0, scale));
    }
    return scale;
  }
  // One loop computes each code and its residual (the block is read once more, not twice);
  // 8-bit codes are written in place, narrower ones go through q and are packed after.
  // `code(i)` is the rounding, chosen once per block so the loop stays branch-free.
  int8_t q_small[Bits == 8 ? 1 : kMaxBlock];
  int8_t* q = Bits == 8 ? reinterpret_cast<int8_t*>(codes) : q_small;
  auto quantize_all = [&](auto code) {
    if (residual && accumulate) {
      for (int64_t i = 0; i < len; ++i) {
        const float qf = code(i);
        q[i] = static_cast<int8_t>(static_cast<int>(qf));
        ER::store(residual, i, add_rn(ER::load(residual, i), mul_rn(gain, sub_rn(a[i], mul_rn(qf, scale)))));
      }
    } else if (residual) {
      for (int64_t i = 0; i < len; ++i) {
        const float qf = code(i);
        q[i] = static_cast<int8_t>(static_cast<int>(qf));
        ER::store(residual, i, sub_rn(a[i], mul_rn(qf, scale)));
      }
    } else {
      for (int64_t i = 0; i < len; ++i) q[i] = static_cast<int8_t>(static_cast<int>(code(i)));
    }
  };
  auto nearest = [&](int64_t i) { return quantize_usable<Bits>(a[i], inv); };
  if constexpr (Bits != 1) {
    if (u)
      quantize_all([&](int64_t i) { return quantize_stochastic_usable<Bits>(a[i], inv, u[i]); });
    else
      quantize_all(nearest);
  } else {
    quantize_all(nearest);
  }
  if constexpr (Bits == 8) {
    std::memset(codes + len, 0, block - len);
  } else {
    for (int64_t i = len; i < block; ++i) q[i] = 0;  // padding: field 0
    constexpr int per = Quant<Bits>::per_byte;
    for (int64_t k = 0; k < code_bytes; ++k) {
      uint32_t byte = 0;
      for (int j = 0; j < per; ++j) byte |= code_field<Bits>(q[k * per + j]) << (j * Bits);
      codes[k] = static_cast<uint8_t>(byte);
    }
  }
  return scale;
}

template <int Bits, DType D, DType R>
void encode_impl(int64_t block, const void* bucket_v, const int64_t* table, int64_t world, int64_t slots, uint8_t* send,
                 const Rounding& rounding, int threads) {
  using E = Elem<D>;
  using ER = Elem<R>;
  const auto* bucket = static_cast<const typename E::storage*>(bucket_v);
  const int64_t sb = shard_bytes(slots, block, Bits);
  const int64_t code_bytes = block_code_bytes(block, Bits);
  for (int64_t r = 0; r < world; ++r) zero_unused(send + r * sb, slots);
  const int64_t rows = world * slots;
  parallel::for_static(threads, rows, [&](int64_t lo, int64_t hi) {
    float a[kMaxBlock], u[kMaxBlock];
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t slot = i / world, owner = i % world;  // slot-major: the bucket's own order
      const int64_t* t = table + (owner * slots + slot) * kRowWords;
      uint8_t* shard = send + owner * sb;
      float* scales = reinterpret_cast<float*>(shard + shard_scales_offset());
      uint8_t* codes = shard + shard_codes_offset(slots) + slot * code_bytes;
      const int64_t off = t[0], len = t[1];
      auto* res = residual_ptr<R>(t);
      uint32_t m = 0;
      if (res) {
        for (int64_t i = 0; i < len; ++i) {
          a[i] = add_rn(E::load(bucket, off + i), ER::load(res, i));
          m = absmax_bits_update(m, a[i]);
        }
      } else {
        for (int64_t i = 0; i < len; ++i) {
          a[i] = E::load(bucket, off + i);
          m = absmax_bits_update(m, a[i]);
        }
      }
      bool bad = false;
      const float* noise = draw_noise(rounding, kStageEncode, t, len, u);
      scales[slot] = encode_block<Bits, R>(a, m, len, block, noise, codes, res, false, 1.0f, &bad);
      if (bad) parallel::atomic_or(flag_ptr(shard), 1u);
    }
  });
}

// The codes of every byte value as floats: unpacking a byte is one copy of 8 / Bits floats
// (32 bytes for signs), which vectorizes where per-field shifts and sign extension do not.
// Built from codec.h's field_code, once per process.
template <int Bits>
struct UnpackTable {
  static constexpr int per = Quant<Bits>::per_byte;
  float codes[256][per];
  UnpackTable() {
    for (uint32_t b = 0; b < 256; ++b)
      for (int j = 0; j < per; ++j)
        codes[b][j] = static_cast<float>(field_code<Bits>((b >> (j * Bits)) & Quant<Bits>::mask));
  }
};

template <int Bits>
const UnpackTable<Bits>& unpack_table() {
  static const UnpackTable<Bits> table;
  return table;
}

// The codes of a packed block's values [0, len) as floats in q (8-bit codes are read in
// place by dequant_at instead). It may write up to 8 / Bits - 1 values past len.
template <int Bits>
inline void unpack_block(const uint8_t* codes, int64_t len, float* q /* [B] */) {
  constexpr int per = Quant<Bits>::per_byte;
  const UnpackTable<Bits>& table = unpack_table<Bits>();
  const int64_t bytes = (len + per - 1) / per;
  for (int64_t k = 0; k < bytes; ++k) std::memcpy(q + k * per, table.codes[codes[k]], sizeof(table.codes[0]));
}

// Value i of a packed block, dequantized: from the int8 codes directly, or from unpacked q.
template <int Bits>
inline float dequant_at(const uint8_t* codes, const float* q, int64_t i, float scale) {
  if constexpr (Bits == 8) {
    return dequantize<8>(static_cast<int8_t>(codes[i]), scale);
  } else {
    return mul_rn(q[i], scale);  // dequantize(): the code (exact as a float) times the scale
  }
}

template <int Bits, DType R>
void reduce_impl(int64_t block, const uint8_t* recv, const int64_t* my_rows, int64_t world, int64_t slots,
                 uint8_t* slice, const Rounding& rounding, int threads) {
  const int64_t sb = shard_bytes(slots, block, Bits);
  const int64_t code_bytes = block_code_bytes(block, Bits);
  const int64_t codes_off = shard_codes_offset(slots);
  uint32_t incoming = 0;
  for (int64_t src = 0; src < world; ++src) incoming |= flag_of(recv + src * sb);
  zero_unused(slice, slots);
  *flag_ptr(slice) = incoming ? 1u : 0u;
  float* out_scales = reinterpret_cast<float*>(slice + shard_scales_offset());
  const float world_f = static_cast<float>(world), inv_w = inv_world(world);
  parallel::for_static(threads, slots, [&](int64_t lo, int64_t hi) {
    float a[kMaxBlock], u[kMaxBlock], q[Bits == 8 ? 1 : kMaxBlock];
    for (int64_t slot = lo; slot < hi; ++slot) {
      const int64_t* t = my_rows + slot * kRowWords;
      const int64_t len = t[1];
      if (slot + 1 < slots) {
        const int64_t* next = t + kRowWords;
        if (auto* r = residual_ptr<R>(next)) prefetch_for_write(r, next[1] * sizeof(*r));
      }
      // Rank order: the sum is the same everywhere. It starts from +0 as the CUDA pass does
      // (0 + d is not d for d = -0). A NaN scale poisons the block even where its codes are 0
      // (q·NaN is NaN).
      for (int64_t src = 0; src < world; ++src) {
        const uint8_t* c = recv + src * sb + codes_off + slot * code_bytes;
        const float sc = reinterpret_cast<const float*>(recv + src * sb + shard_scales_offset())[slot];
        if constexpr (Bits != 8) unpack_block<Bits>(c, len, q);
        if (src == 0) {
          for (int64_t i = 0; i < len; ++i) a[i] = add_rn(0.0f, dequant_at<Bits>(c, q, i, sc));
        } else {
          for (int64_t i = 0; i < len; ++i) a[i] = add_rn(a[i], dequant_at<Bits>(c, q, i, sc));
        }
      }
      uint32_t m = 0;
      for (int64_t i = 0; i < len; ++i) {
        a[i] = mul_rn(a[i], inv_w);
        m = absmax_bits_update(m, a[i]);
      }
      uint8_t* codes = slice + codes_off + slot * code_bytes;
      bool bad = false;
      const float* noise = draw_noise(rounding, kStageReduce, t, len, u);
      out_scales[slot] = encode_block<Bits, R>(a, m, len, block, noise, codes, residual_ptr<R>(t), true, world_f, &bad);
      if (bad) parallel::atomic_or(flag_ptr(slice), 1u);
    }
  });
}

template <int Bits, DType D>
void decode_impl(int64_t block, const uint8_t* gathered, const int64_t* table, int64_t world, int64_t slots,
                 void* bucket_v, int threads) {
  using E = Elem<D>;
  auto* bucket = static_cast<typename E::storage*>(bucket_v);
  const int64_t sb = shard_bytes(slots, block, Bits);
  const int64_t code_bytes = block_code_bytes(block, Bits);
  const int64_t codes_off = shard_codes_offset(slots);
  uint32_t flagged = 0;
  for (int64_t r = 0; r < world; ++r) flagged |= flag_of(gathered + r * sb);
  const int64_t rows = world * slots;
  parallel::for_static(threads, rows, [&](int64_t lo, int64_t hi) {
    float q[Bits == 8 ? 1 : kMaxBlock];
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t slot = i / world, owner = i % world;  // slot-major: the bucket's own order
      const int64_t* t = table + (owner * slots + slot) * kRowWords;
      const uint8_t* shard = gathered + owner * sb;
      const float scale = reinterpret_cast<const float*>(shard + shard_scales_offset())[slot];
      const uint8_t* codes = shard + codes_off + slot * code_bytes;
      const int64_t off = t[0], len = t[1];
      if (flagged) {
        for (int64_t i = 0; i < len; ++i) E::store(bucket, off + i, quiet_nan());
      } else {
        if constexpr (Bits != 8) unpack_block<Bits>(codes, len, q);
        for (int64_t i = 0; i < len; ++i) E::store(bucket, off + i, dequant_at<Bits>(codes, q, i, scale));
      }
    }
  });
}

template <int B>
struct BitsTag {
  static constexpr int value = B;
};
template <DType D>
struct DTypeTag {
  static constexpr DType value = D;
};

// Calls f(BitsTag<bits>) for a bits value check_args accepted.
template <class F>
void with_bits(int bits, F&& f) {
  switch (bits) {
    case 8:
      return f(BitsTag<8>{});
    case 4:
      return f(BitsTag<4>{});
    case 2:
      return f(BitsTag<2>{});
    default:
      return f(BitsTag<1>{});
  }
}

// Calls f(DTypeTag<dtype>).
template <class F>
void with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::F32:
      return f(DTypeTag<DType::F32>{});
    case DType::F16:
      return f(DTypeTag<DType::F16>{});
    case DType::BF16:
      return f(DTypeTag<DType::BF16>{});
  }
}

// Calls f(DTypeTag<residual dtype>) for F32 or BF16 (what check_args accepts).
template <class F>
void with_residual(DType residual, F&& f) {
  if (residual == DType::BF16) return f(DTypeTag<DType::BF16>{});
  return f(DTypeTag<DType::F32>{});
}

}  // namespace

void encode(int bits, int64_t block, DType dtype, DType residual, const void* bucket, const int64_t* table,
            int64_t world, int64_t slots, uint8_t* send, const Rounding& rounding, int threads) {
  with_bits(bits, [&](auto b) {
    with_dtype(dtype, [&](auto d) {
      with_residual(residual, [&](auto r) {
        encode_impl<decltype(b)::value, decltype(d)::value, decltype(r)::value>(block, bucket, table, world, slots,
                                                                                send, rounding, threads);
      });
    });
  });
}

void reduce(int bits, int64_t block, DType residual, const uint8_t* recv, const int64_t* my_rows, int64_t world,
            int64_t slots, uint8_t* slice, const Rounding& rounding, int threads) {
  with_bits(bits, [&](auto b) {
    with_residual(residual, [&](auto r) {
      reduce_impl<decltype(b)::value, decltype(r)::value>(block, recv, my_rows, world, slots, slice, rounding, threads);
    });
  });
}

void decode(int bits, int64_t block, DType dtype, const uint8_t* gathered, const int64_t* table, int64_t world,
            int64_t slots, void* bucket, int threads) {
  with_bits(bits, [&](auto b) {
    with_dtype(dtype, [&](auto d) {
      decode_impl<decltype(b)::value, decltype(d)::value>(block, gathered, table, world, slots, bucket, threads);
    });
  });
}

}  // namespace GC_CPU_ISA
}  // namespace gradcomp
