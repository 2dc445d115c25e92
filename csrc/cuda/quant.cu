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
  if (bits != 8)
    throw std::invalid_argument("gradcomp: the CUDA backend implements 8-bit codes only so far, got " +
                                std::to_string(bits) + " bits");
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

// Element mapping inside a block: lane l owns V consecutive values per chunk of 32·V,
//   element(k, j) = k·32·V + l·V + j      (k < chunks, j < V),
// so a lane moves its codes as one V-byte word and, when the block is whole and aligned,
// its floats as one 16-byte (fp32) or 8-byte (16-bit) vector.
// Kernels are templated on PerLane = B / 32 for blocks whose values stay in registers
// (B <= 512); PerLane = 0 is the one kernel for larger blocks (B read at run time, values
// read twice — the second read mostly hits L2).
template <int PerLane>
struct Map {
  static constexpr bool kKeep = PerLane > 0;
  static constexpr int V = kKeep && PerLane < 4 ? PerLane : 4;
  static __device__ __forceinline__ int chunks(int B) { return kKeep ? PerLane / V : B / (32 * V); }
};

template <int V>
struct CodeWord;
template <>
struct CodeWord<1> {
  using type = uint8_t;
};
template <>
struct CodeWord<2> {
  using type = uint16_t;
};
template <>
struct CodeWord<4> {
  using type = uint32_t;
};

template <int V>
__device__ __forceinline__ void store_codes(int8_t* codes /* [B] */, int e, const int (&q)[V]) {
  typename CodeWord<V>::type w = 0;
#pragma unroll
  for (int j = 0; j < V; ++j) w |= static_cast<typename CodeWord<V>::type>(static_cast<uint8_t>(q[j])) << (8 * j);
  *reinterpret_cast<typename CodeWord<V>::type*>(codes + e) = w;
}

template <int V>
__device__ __forceinline__ void load_codes(const int8_t* codes /* [B] */, int e, int (&q)[V]) {
  const auto w = *reinterpret_cast<const typename CodeWord<V>::type*>(codes + e);
#pragma unroll
  for (int j = 0; j < V; ++j) q[j] = static_cast<int8_t>(static_cast<uint8_t>(w >> (8 * j)));
}

__device__ __forceinline__ bool aligned(const void* p, int bytes) {
  return (reinterpret_cast<uintptr_t>(p) & static_cast<uintptr_t>(bytes - 1)) == 0;
}

// V values of a bucket from element i on, converted to float; zero past len.
template <DType D, int V>
__device__ __forceinline__ void load_bucket(const typename Elem<D>::storage* p /* [n] */, int64_t i, int64_t valid,
                                            bool vec, float (&v)[V]) {
  using E = Elem<D>;
  if (V == 4 && vec) {
    if constexpr (D == DType::F32) {
      const float4 f = *reinterpret_cast<const float4*>(p + i);
      v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3 % V] = f.w;
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
__device__ __forceinline__ void store_bucket(typename Elem<D>::storage* p /* [n] */, int64_t i, int64_t valid, bool vec,
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

template <int V>
__device__ __forceinline__ void load_f32(const float* p /* [B] */, int64_t i, int64_t valid, bool vec, float (&v)[V]) {
  if (V == 4 && vec) {
    const float4 f = *reinterpret_cast<const float4*>(p + i);
    v[0] = f.x, v[1 % V] = f.y, v[2 % V] = f.z, v[3 % V] = f.w;
    return;
  }
#pragma unroll
  for (int j = 0; j < V; ++j) v[j] = j < valid ? p[i + j] : 0.0f;
}

template <int V>
__device__ __forceinline__ void store_f32(float* p /* [B] */, int64_t i, int64_t valid, bool vec, const float (&v)[V]) {
  if (V == 4 && vec) {
    *reinterpret_cast<float4*>(p + i) = make_float4(v[0], v[1 % V], v[2 % V], v[3 % V]);
    return;
  }
#pragma unroll
  for (int j = 0; j < V; ++j)
    if (j < valid) p[i + j] = v[j];
}

// First pass over one block, shared by passes 1 and 2: `values(k, a)` yields chunk k's
// values; they are kept in `keep` when they fit in registers. Returns the block's scale
// from the warp's NaN-propagating absmax; lane 0 stores it at `scale_out` and flags the
// shard at `flag` when it is non-finite.
template <int PerLane, class Values>
__device__ __forceinline__ BlockScale scan_block(Values&& values, int chunks, int lane,
                                                 float (&keep)[Map<PerLane>::kKeep ? PerLane : 1], float* scale_out,
                                                 unsigned* flag) {
  using M = Map<PerLane>;
  constexpr int V = M::V;
  uint32_t m = 0;
#pragma unroll
  for (int k = 0; k < chunks; ++k) {
    float a[V];
    values(k, a);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (M::kKeep) keep[(k * V + j) % (M::kKeep ? PerLane : 1)] = a[j];
      m = absmax_bits_update(m, a[j]);
    }
  }
  m = warp_absmax(m);
  const BlockScale bs = block_scale<8>(m);
  if (lane == 0) {
    *scale_out = bs.scale;
    if (!is_finite(bs.scale)) atomicOr(flag, 1u);
  }
  return bs;
}

// Chunk k's values again in the second loop: from registers, or recomputed.
template <int PerLane, class Values>
__device__ __forceinline__ void revisit(Values&& values, int k, const float (&keep)[Map<PerLane>::kKeep ? PerLane : 1],
                                        float (&a)[Map<PerLane>::V]) {
  using M = Map<PerLane>;
  if (M::kKeep) {
#pragma unroll
    for (int j = 0; j < M::V; ++j) a[j] = keep[(k * M::V + j) % (M::kKeep ? PerLane : 1)];
  } else {
    values(k, a);
  }
}

// Pass 1. One warp per row of the table.
template <DType D, int PerLane>
__global__ void encode_kernel(const typename Elem<D>::storage* __restrict__ bucket,  // [n]
                              const int64_t* __restrict__ table,                     // [W * S, 3]
                              int64_t rows, int64_t world, int64_t slots, int64_t sb, int B,
                              uint8_t* __restrict__ send) {  // [W * SB]
  using M = Map<PerLane>;
  constexpr int V = M::V;
  // Warps walk the table slot-major (slot, then owner): for parameters laid out one after
  // another that is the bucket's own order, so neighbouring warps read neighbouring memory.
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / 32;
  if (w >= rows) return;
  const int64_t slot = w / world, owner = w % world, row = owner * slots + slot;
  const int lane = threadIdx.x % 32;
  const int64_t* t = table + row * kRowWords;
  const int64_t off = t[0], len = t[1];
  float* res = residual_ptr(t);
  uint8_t* shard = send + owner * sb;
  int8_t* codes = reinterpret_cast<int8_t*>(shard + shard_codes_offset(slots)) + slot * B;
  const int chunks = M::chunks(B);
  const bool whole = len == B;
  const bool vec_x = whole && aligned(bucket + off, D == DType::F32 ? 16 : 8);
  const bool vec_r = whole && aligned(res, 16);

  auto load_a = [&](int k, float (&a)[V]) {
    const int e = k * 32 * V + lane * V;
    const int64_t valid = len - e;
    load_bucket<D, V>(bucket, off + e, valid, vec_x, a);
    if (res) {
      float r[V];
      load_f32<V>(res, e, valid, vec_r, r);
#pragma unroll
      for (int j = 0; j < V; ++j) a[j] = add_rn(a[j], r[j]);  // padding: 0 + 0
    }
  };

  float keep[M::kKeep ? PerLane : 1];
  const BlockScale bs =
      scan_block<PerLane>(load_a, chunks, lane, keep, reinterpret_cast<float*>(shard + shard_scales_offset()) + slot,
                          reinterpret_cast<unsigned*>(shard));
  const float scale = bs.scale;
  const bool finite = is_finite(scale);
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
      q[j] = j < valid ? quantize<8>(a[j], bs) : 0;
      r[j] = residual_after<8>(a[j], q[j], scale);  // stored only for a finite block
    }
    store_codes<V>(codes, e, q);
    if (res) {
      if (finite) {
        store_f32<V>(res, e, valid, vec_r, r);
      } else {  // a non-finite block keeps the old residual where a is finite, clears it where not
#pragma unroll
        for (int j = 0; j < V; ++j)
          if (j < valid && !is_finite(a[j])) res[e + j] = 0.0f;
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
template <int PerLane>
__global__ void reduce_kernel(const uint8_t* __restrict__ recv,     // [W * SB]
                              const int64_t* __restrict__ my_rows,  // [S, 3]
                              int64_t world, int64_t slots, int64_t sb, int B,
                              uint8_t* __restrict__ slice) {  // [SB]
  using M = Map<PerLane>;
  constexpr int V = M::V;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / 32;
  if (slot >= slots) return;
  const int lane = threadIdx.x % 32;
  const int64_t* t = my_rows + slot * kRowWords;
  const int64_t len = t[1];
  float* res = residual_ptr(t);
  const int64_t codes_off = shard_codes_offset(slots);
  const float world_f = static_cast<float>(world), inv_w = inv_world(world);
  const int chunks = M::chunks(B);
  const bool vec_r = len == B && aligned(res, 16);

  auto mean_at = [&](int k, float (&a)[V]) {  // sum in rank order, then · 1/W
#pragma unroll
    for (int j = 0; j < V; ++j) a[j] = 0.0f;
    const int e = k * 32 * V + lane * V;
    for (int64_t src = 0; src < world; ++src) {
      const uint8_t* shard = recv + src * sb;
      const float scale = reinterpret_cast<const float*>(shard + shard_scales_offset())[slot];
      int q[V];
      load_codes<V>(reinterpret_cast<const int8_t*>(shard + codes_off) + slot * B, e, q);
#pragma unroll
      for (int j = 0; j < V; ++j) a[j] = add_rn(a[j], dequantize<8>(q[j], scale));
    }
#pragma unroll
    for (int j = 0; j < V; ++j) a[j] = e + j < len ? mul_rn(a[j], inv_w) : 0.0f;
  };

  float keep[M::kKeep ? PerLane : 1];
  const BlockScale bs =
      scan_block<PerLane>(mean_at, chunks, lane, keep, reinterpret_cast<float*>(slice + shard_scales_offset()) + slot,
                          reinterpret_cast<unsigned*>(slice));
  const float scale = bs.scale;
  const bool finite = is_finite(scale);
  int8_t* codes = reinterpret_cast<int8_t*>(slice + codes_off) + slot * B;
#pragma unroll
  for (int k = 0; k < chunks; ++k) {
    const int e = k * 32 * V + lane * V;
    const int64_t valid = len - e;
    float a[V];
    revisit<PerLane>(mean_at, k, keep, a);
    int q[V];
#pragma unroll
    for (int j = 0; j < V; ++j) q[j] = j < valid ? quantize<8>(a[j], bs) : 0;
    store_codes<V>(codes, e, q);
    if (res && finite) {
      float r[V];
      load_f32<V>(res, e, valid, vec_r, r);
#pragma unroll
      for (int j = 0; j < V; ++j) r[j] = add_rn(r[j], mul_rn(world_f, residual_after<8>(a[j], q[j], scale)));
      store_f32<V>(res, e, valid, vec_r, r);
    }
  }
}

// Pass 3. One warp per row of the table.
template <DType D, int PerLane>
__global__ void decode_kernel(const uint8_t* __restrict__ gathered,  // [W * SB]
                              const int64_t* __restrict__ table,     // [W * S, 3]
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
  const int8_t* codes = reinterpret_cast<const int8_t*>(shard + shard_codes_offset(slots)) + slot * B;
  const bool vec = len == B && aligned(bucket + off, D == DType::F32 ? 16 : 8);
  const int chunks = M::chunks(B);
#pragma unroll 4
  for (int k = 0; k < chunks; ++k) {
    const int e = k * 32 * V + lane * V;
    int q[V];
    load_codes<V>(codes, e, q);
    float v[V];
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = flagged ? quiet_nan() : dequantize<8>(q[j], scale);
    store_bucket<D, V>(bucket, off + e, len - e, vec, v);
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

// Makes `device` current for the launch. The caller (python/gradcomp/ops.py) wraps the call
// in torch's device guard, which restores the previous device the way torch does (without
// creating a context on a device that has none), so this is a no-op in practice.
void use_device(int device) {
  int now = -1;
  check(cudaGetDevice(&now), "get device");
  if (now != device) check(cudaSetDevice(device), "set device");
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
  use_device(device);
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
  use_device(device);
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
  use_device(device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const int64_t sb = shard_bytes(slots, block, bits);
  const int64_t rows = world * slots;
  if (rows == 0) return;
  with_dtype(dtype, [&](auto d) {
    with_block(block, [&](auto b) {
      constexpr DType D = decltype(d)::value;
      constexpr int P = decltype(b)::value;
      decode_kernel<D, P><<<grid_for(rows), kWarpsPerCta * 32, 0, s>>>(gathered, table, rows, world, slots, sb,
                                                                       static_cast<int>(block),
                                                                       static_cast<typename Elem<D>::storage*>(bucket));
    });
  });
  check(cudaGetLastError(), "decode launch");
}

}  // namespace gradcomp
