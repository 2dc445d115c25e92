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

#if defined(_OPENMP)
#include <omp.h>
#endif

#ifndef GC_CPU_ISA
#define GC_CPU_ISA isa_baseline
#endif

namespace gradcomp {
namespace GC_CPU_ISA {
namespace {

using namespace codec;

inline float* residual_ptr(const int64_t* row) { return reinterpret_cast<float*>(static_cast<intptr_t>(row[2])); }

inline uint32_t* flag_ptr(uint8_t* shard) { return reinterpret_cast<uint32_t*>(shard); }
inline uint32_t flag_of(const uint8_t* shard) { return *reinterpret_cast<const uint32_t*>(shard); }

// shard: [SB] — zero its header and the padding after its scales.
void zero_unused(uint8_t* shard, int64_t slots) {
  std::memset(shard, 0, kHeaderBytes);
  std::memset(shard + shard_scale_pad_begin(slots), 0, shard_codes_offset(slots) - shard_scale_pad_begin(slots));
}

// Quantize a[0, len) (zero beyond) into codes[0, B); returns the scale. When `residual` is
// set, writes the error of each valid element there, times `gain`, added (`accumulate`,
// pass 2) or stored (pass 1). A non-finite block sends nothing; pass 1 then keeps the old
// residual where a is finite and clears it where not (the step is poisoned or skipped by
// GradScaler anyway); pass 2 leaves the residual as pass 1 wrote it.
// The loops are branch-free over the block so the compiler vectorizes them; every value
// is the same IEEE operation sequence as codec.h's per-value functions.
template <int Bits>
float encode_block(const float* a, int64_t len, int64_t block, int8_t* codes, float* residual, bool accumulate,
                   float gain, bool* nonfinite) {
  uint32_t m = 0;
  for (int64_t i = 0; i < len; ++i) m = absmax_bits_update(m, a[i]);
  const BlockScale bs = block_scale<Bits>(m);
  const float scale = bs.scale, inv = bs.inv;
  if (!scale_usable(bs)) {
    std::memset(codes, 0, block);
    if (!is_finite(scale)) {
      *nonfinite = true;
      if (residual && !accumulate)
        for (int64_t i = 0; i < len; ++i)
          if (!is_finite(a[i])) residual[i] = 0.0f;
    } else if (residual) {  // zero scale: every code is 0, the residual keeps all of a
      for (int64_t i = 0; i < len; ++i)
        residual[i] = accumulate ? add_rn(residual[i], mul_rn(gain, residual_after<Bits>(a[i], 0, scale)))
                                 : residual_after<Bits>(a[i], 0, scale);
    }
    return scale;
  }
  if (residual && accumulate) {
    for (int64_t i = 0; i < len; ++i) {
      const float q = quantize_usable<Bits>(a[i], inv);
      codes[i] = static_cast<int8_t>(static_cast<int>(q));
      residual[i] = add_rn(residual[i], mul_rn(gain, sub_rn(a[i], mul_rn(q, scale))));
    }
  } else if (residual) {
    for (int64_t i = 0; i < len; ++i) {
      const float q = quantize_usable<Bits>(a[i], inv);
      codes[i] = static_cast<int8_t>(static_cast<int>(q));
      residual[i] = sub_rn(a[i], mul_rn(q, scale));
    }
  } else {
    for (int64_t i = 0; i < len; ++i)
      codes[i] = static_cast<int8_t>(static_cast<int>(quantize_usable<Bits>(a[i], inv)));
  }
  std::memset(codes + len, 0, block - len);
  return scale;
}

template <DType D>
void encode_impl(int64_t block, const void* bucket_v, const int64_t* table, int64_t world, int64_t slots, uint8_t* send,
                 int threads) {
  using E = Elem<D>;
  const auto* bucket = static_cast<const typename E::storage*>(bucket_v);
  const int64_t sb = shard_bytes(slots, block, 8);
  for (int64_t r = 0; r < world; ++r) zero_unused(send + r * sb, slots);
  const int64_t rows = world * slots;
#pragma omp parallel num_threads(threads)
  {
    float a[kMaxBlock];
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t slot = i / world, owner = i % world;  // slot-major: the bucket's own order
      const int64_t* t = table + (owner * slots + slot) * kRowWords;
      uint8_t* shard = send + owner * sb;
      float* scales = reinterpret_cast<float*>(shard + shard_scales_offset());
      int8_t* codes = reinterpret_cast<int8_t*>(shard + shard_codes_offset(slots)) + slot * block;
      const int64_t off = t[0], len = t[1];
      float* res = residual_ptr(t);
      if (res) {
        for (int64_t i = 0; i < len; ++i) a[i] = add_rn(E::load(bucket, off + i), res[i]);
      } else {
        for (int64_t i = 0; i < len; ++i) a[i] = E::load(bucket, off + i);
      }
      bool bad = false;
      scales[slot] = encode_block<8>(a, len, block, codes, res, false, 1.0f, &bad);
      if (bad) {
#pragma omp atomic
        *flag_ptr(shard) |= 1u;
      }
    }
  }
}

}  // namespace

void encode(int64_t block, DType dtype, const void* bucket, const int64_t* table, int64_t world, int64_t slots,
            uint8_t* send, int threads) {
  switch (dtype) {
    case DType::F32:
      return encode_impl<DType::F32>(block, bucket, table, world, slots, send, threads);
    case DType::F16:
      return encode_impl<DType::F16>(block, bucket, table, world, slots, send, threads);
    case DType::BF16:
      return encode_impl<DType::BF16>(block, bucket, table, world, slots, send, threads);
  }
}

void reduce(int64_t block, const uint8_t* recv, const int64_t* my_rows, int64_t world, int64_t slots, uint8_t* slice,
            int threads) {
  const int64_t sb = shard_bytes(slots, block, 8);
  const int64_t codes_off = shard_codes_offset(slots);
  uint32_t incoming = 0;
  for (int64_t src = 0; src < world; ++src) incoming |= flag_of(recv + src * sb);
  zero_unused(slice, slots);
  *flag_ptr(slice) = incoming ? 1u : 0u;
  float* out_scales = reinterpret_cast<float*>(slice + shard_scales_offset());
  const float world_f = static_cast<float>(world), inv_w = inv_world(world);
#pragma omp parallel num_threads(threads)
  {
    float a[kMaxBlock];
#pragma omp for schedule(static)
    for (int64_t slot = 0; slot < slots; ++slot) {
      const int64_t* t = my_rows + slot * kRowWords;
      const int64_t len = t[1];
      for (int64_t i = 0; i < block; ++i) a[i] = 0.0f;
      for (int64_t src = 0; src < world; ++src) {  // rank order: the sum is the same everywhere
        const uint8_t* shard = recv + src * sb;
        const float scale = reinterpret_cast<const float*>(shard + shard_scales_offset())[slot];
        const int8_t* codes = reinterpret_cast<const int8_t*>(shard + codes_off) + slot * block;
        for (int64_t i = 0; i < len; ++i) a[i] = add_rn(a[i], dequantize<8>(codes[i], scale));
        // A NaN scale must poison the block even where its codes are 0 (q·NaN is NaN, so it does).
      }
      for (int64_t i = 0; i < len; ++i) a[i] = mul_rn(a[i], inv_w);
      int8_t* codes = reinterpret_cast<int8_t*>(slice + codes_off) + slot * block;
      bool bad = false;
      out_scales[slot] = encode_block<8>(a, len, block, codes, residual_ptr(t), true, world_f, &bad);
      if (bad) {
#pragma omp atomic
        *flag_ptr(slice) |= 1u;
      }
    }
  }
}

namespace {

template <DType D>
void decode_impl(int64_t block, const uint8_t* gathered, const int64_t* table, int64_t world, int64_t slots,
                 void* bucket_v, int threads) {
  using E = Elem<D>;
  auto* bucket = static_cast<typename E::storage*>(bucket_v);
  const int64_t sb = shard_bytes(slots, block, 8);
  const int64_t codes_off = shard_codes_offset(slots);
  uint32_t flagged = 0;
  for (int64_t r = 0; r < world; ++r) flagged |= flag_of(gathered + r * sb);
  const int64_t rows = world * slots;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t slot = i / world, owner = i % world;  // slot-major: the bucket's own order
    const int64_t* t = table + (owner * slots + slot) * kRowWords;
    const uint8_t* shard = gathered + owner * sb;
    const float scale = reinterpret_cast<const float*>(shard + shard_scales_offset())[slot];
    const int8_t* codes = reinterpret_cast<const int8_t*>(shard + codes_off) + slot * block;
    const int64_t off = t[0], len = t[1];
    if (flagged) {
      for (int64_t i = 0; i < len; ++i) E::store(bucket, off + i, quiet_nan());
    } else {
      for (int64_t i = 0; i < len; ++i) E::store(bucket, off + i, dequantize<8>(codes[i], scale));
    }
  }
}

}  // namespace

void decode(int64_t block, DType dtype, const uint8_t* gathered, const int64_t* table, int64_t world, int64_t slots,
            void* bucket, int threads) {
  switch (dtype) {
    case DType::F32:
      return decode_impl<DType::F32>(block, gathered, table, world, slots, bucket, threads);
    case DType::F16:
      return decode_impl<DType::F16>(block, gathered, table, world, slots, bucket, threads);
    case DType::BF16:
      return decode_impl<DType::BF16>(block, gathered, table, world, slots, bucket, threads);
  }
}

}  // namespace GC_CPU_ISA
}  // namespace gradcomp
