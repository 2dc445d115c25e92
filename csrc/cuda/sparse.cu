// CUDA backend of top-k and random-k (gradcomp.h). The selection is codec.h's: like the CPU
// twin (cpu/sparse.cpp) it finds each parameter's cut (the k-th largest key, or the sampled
// threshold, and how many ties to take in index order), so both write the same pairs.
//
// Work is split in tiles of kSparseTile elements of one parameter, one CTA each (a tile finds
// its parameter by binary search over the rows' first tiles); steps made once per parameter
// (choosing a histogram bin, scanning its tiles' counts) run one CTA per parameter. Top-k:
//   [approx: sample -> T0]  ef_hist (a = x + r, residual = a, digit-0 histogram)
//   pick 0, digit_hist 1, pick 1, digit_hist 2, pick 2 -> the cut
//   count (per tile) -> scan (per parameter) -> compact (pairs in index order, residuals)
#include <cuda_runtime.h>

#include <stdexcept>

#include "../gradcomp.h"
#include "common.cuh"

namespace gradcomp {
namespace {

using namespace codec;
using cuda_util::check;
using cuda_util::use_device;
using cuda_util::with_dtype;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPerThread = static_cast<int>(kSparseTile / kThreads);  // 16 consecutive elements
constexpr unsigned kFullMask = 0xffffffffu;
constexpr unsigned kRowSpread = 32;  // CTAs per row for the grid-stride kernels

// Per-row words of the workspace.
enum : int {
  kPrefix = 0,   // the key bits chosen so far
  kNeed = 1,     // keys still needed inside the current prefix
  kAboveT0 = 2,  // approximate: keys >= T0
  kT0 = 3,       // approximate: the sampled threshold
  kUpper = 4,    // the cut (codec.h SparseCut)
  kTieLo = 5,
  kCutNeed = 6,
  kMaxKey = 7,  // the largest key (>= 0x7f800000: non-finite)
  kDone = 8,    // approximate with too few keys >= T0: the cut is set, skip the digits
  kStateWords = 16
};

// The last row whose first tile is <= tile.
__device__ int64_t row_of_tile(const int64_t* table /* [P, 8] */, int64_t rows, int64_t tile) {
  int64_t lo = 0, hi = rows - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (table[mid * kSparseRowWords + 6] <= tile)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// A tile-grid CTA's place: its row and its [lo, hi) of the row's elements.
struct Tile {
  int64_t index;
  int64_t row_index;
  SparseRow row;
  int64_t lo;
  int64_t hi;
};

__device__ Tile this_tile(const int64_t* table /* [P, 8] */, int64_t rows) {
  const int64_t tile = blockIdx.x;
  const int64_t ri = row_of_tile(table, rows, tile);
  const SparseRow row = sparse_row(table, ri);
  const int64_t lo = (tile - row.first_tile) * kSparseTile;
  return {tile, ri, row, lo, lo + kSparseTile < row.n ? lo + kSparseTile : row.n};
}

__device__ __forceinline__ uint32_t warp_sum_u32(uint32_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ uint32_t warp_max_u32(uint32_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint32_t w = __shfl_xor_sync(kFullMask, v, o);
    v = w > v ? w : v;
  }
  return v;
}

// Exclusive prefix sums of two counts over the CTA's threads, in thread order.
__device__ void block_exclusive_scan2(uint32_t& a, uint32_t& b) {
  __shared__ uint32_t warp_a[kWarps], warp_b[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint32_t ia = a, ib = b;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t ta = __shfl_up_sync(kFullMask, ia, o), tb = __shfl_up_sync(kFullMask, ib, o);
    if (lane >= o) {
      ia += ta;
      ib += tb;
    }
  }
  if (lane == 31) {
    warp_a[warp] = ia;
    warp_b[warp] = ib;
  }
  __syncthreads();
  uint32_t oa = 0, ob = 0;
  for (int w = 0; w < warp; ++w) {
    oa += warp_a[w];
    ob += warp_b[w];
  }
  a = oa + ia - a;
  b = ob + ib - b;
}

// Adds a CTA's shared histogram into the row's global one (only the bins it touched).
__device__ void flush_hist(const uint32_t* local /* [bins] */, uint32_t* global /* [bins] */, int bins) {
  __syncthreads();
  for (int b = threadIdx.x; b < bins; b += blockDim.x)
    if (local[b]) atomicAdd(global + b, local[b]);
}

// ---------------------------------------------------------------- top-k encode
// Approximate: T0, the key of rank kappa in the row's strided sample (radix select in shared
// memory over the sample, read before ef_hist stores a in the residual).
template <DType D>
__global__ void sample_kernel(const typename Elem<D>::storage* bucket /* [n] */, const int64_t* table /* [P, 8] */,
                              uint32_t* state /* [P, 16] */) {
  __shared__ uint32_t hist[kRadixMaxBins];
  __shared__ uint32_t prefix_s, need_s;
  const SparseRow row = sparse_row(table, blockIdx.x);
  const auto src = sparse_source<D>(bucket, row);
  const int64_t s = approx_sample_size(row.n);
  if (threadIdx.x == 0) {
    prefix_s = 0;
    need_s = static_cast<uint32_t>(approx_sample_rank(row.k, row.n, s));
  }
  for (int d = 0; d < kRadixDigits; ++d) {
    const int bins = 1 << radix_bits(d);
    for (int b = threadIdx.x; b < bins; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    const uint32_t prefix = prefix_s;
    for (int64_t j = threadIdx.x; j < s; j += blockDim.x) {
      const uint32_t key = abs_bits(src.first(approx_sample_pos(j, row.n, s)));
      if (radix_above(key, d) == prefix) atomicAdd(&hist[radix_digit(key, d)], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      uint32_t need = need_s;
      const uint32_t b = radix_pick(hist, bins, need);
      need_s = need;
      prefix_s = (prefix << radix_bits(d)) | b;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) state[static_cast<int64_t>(blockIdx.x) * kStateWords + kT0] = prefix_s;
}

// Pass 1, one CTA per tile: a = x + r stored in the residual, the digit-0 histogram, the
// largest key and (approximate) the count of keys >= T0.
template <DType D>
__global__ void ef_hist_kernel(const typename Elem<D>::storage* bucket /* [n] */, const int64_t* table /* [P, 8] */,
                               int64_t rows, bool approx, uint32_t* hist_all /* [P, 2048] */,
                               uint32_t* state /* [P, 16] */) {
  __shared__ uint32_t hist[kRadixMaxBins];
  const Tile t = this_tile(table, rows);
  const auto src = sparse_source<D>(bucket, t.row);
  uint32_t* st = state + t.row_index * kStateWords;
  const uint32_t t0 = approx ? st[kT0] : 0u;
  for (int b = threadIdx.x; b < kRadixMaxBins; b += blockDim.x) hist[b] = 0;
  __syncthreads();
  uint32_t m = 0, above = 0;
  for (int64_t i = t.lo + threadIdx.x; i < t.hi; i += blockDim.x) {
    const float a = src.first(i);
    if (src.r) src.r[i] = a;
    const uint32_t key = abs_bits(a);
    m = key > m ? key : m;
    above += key >= t0 ? 1u : 0u;
    atomicAdd(&hist[key >> radix_shift(0)], 1u);
  }
  m = warp_max_u32(m);
  above = warp_sum_u32(above);
  if ((threadIdx.x & 31) == 0) {
    atomicMax(st + kMaxKey, m);
    if (approx) atomicAdd(st + kAboveT0, above);
  }
  flush_hist(hist, hist_all + t.row_index * kRadixMaxBins, kRadixMaxBins);
}

// One CTA per row: choose digit d's bin (codec.h radix_pick), then clear the histogram for the
// next digit. Approximate rows with fewer than k keys >= T0 take the fallback cut instead.
__global__ void pick_kernel(const int64_t* table /* [P, 8] */, int d, bool approx, uint32_t* hist_all /* [P, 2048] */,
                            uint32_t* state /* [P, 16] */) {
  const SparseRow row = sparse_row(table, blockIdx.x);
  uint32_t* st = state + static_cast<int64_t>(blockIdx.x) * kStateWords;
  uint32_t* hist = hist_all + static_cast<int64_t>(blockIdx.x) * kRadixMaxBins;
  if (threadIdx.x == 0) {
    const uint32_t k = static_cast<uint32_t>(row.k);
    if (d == 0) {
      st[kPrefix] = 0;
      st[kNeed] = k;
      if (approx && st[kAboveT0] < k) {
        st[kDone] = 1;
        st[kUpper] = st[kT0];
        st[kTieLo] = 0;
        st[kCutNeed] = k - st[kAboveT0];
      }
    }
    if (!st[kDone]) {
      uint32_t need = st[kNeed];
      const uint32_t b = radix_pick(hist, 1 << radix_bits(d), need);
      st[kNeed] = need;
      st[kPrefix] = (st[kPrefix] << radix_bits(d)) | b;
      if (d == kRadixDigits - 1) {
        st[kUpper] = st[kPrefix] + 1;
        st[kTieLo] = st[kPrefix];
        st[kCutNeed] = need;
      }
    }
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kRadixMaxBins; b += blockDim.x) hist[b] = 0;
}

// Digits 1 and 2, one CTA per tile: the histogram of keys under the chosen prefix.
template <DType D>
__global__ void digit_hist_kernel(const typename Elem<D>::storage* bucket /* [n] */, const int64_t* table /* [P, 8] */,
                                  int64_t rows, int d, uint32_t* hist_all /* [P, 2048] */,
                                  const uint32_t* state /* [P, 16] */) {
  __shared__ uint32_t hist[kRadixMaxBins];
  const Tile t = this_tile(table, rows);
  const uint32_t* st = state + t.row_index * kStateWords;
  if (st[kDone]) return;  // the whole CTA: before any barrier
  const auto src = sparse_source<D>(bucket, t.row);
  const int bins = 1 << radix_bits(d);
  const uint32_t prefix = st[kPrefix];
  for (int b = threadIdx.x; b < bins; b += blockDim.x) hist[b] = 0;
  __syncthreads();
  for (int64_t i = t.lo + threadIdx.x; i < t.hi; i += blockDim.x) {
    const uint32_t key = abs_bits(src.again(i));
    if (radix_above(key, d) == prefix) atomicAdd(&hist[radix_digit(key, d)], 1u);
  }
  flush_hist(hist, hist_all + t.row_index * kRadixMaxBins, bins);
}

__device__ __forceinline__ SparseCut cut_of(const uint32_t* st /* [16] */) {
  return {st[kUpper], st[kTieLo], st[kCutNeed]};
}

// Per tile: how many keys the cut always keeps and how many are ties.
template <DType D>
__global__ void count_kernel(const typename Elem<D>::storage* bucket /* [n] */, const int64_t* table /* [P, 8] */,
                             int64_t rows, const uint32_t* state /* [P, 16] */, uint32_t* tile_counts /* [T, 2] */) {
  __shared__ uint32_t warp_always[kWarps], warp_ties[kWarps];
  const Tile t = this_tile(table, rows);
  const auto src = sparse_source<D>(bucket, t.row);
  const SparseCut cut = cut_of(state + t.row_index * kStateWords);
  uint32_t always = 0, ties = 0;
  for (int64_t i = t.lo + threadIdx.x; i < t.hi; i += blockDim.x) {
    const uint32_t key = abs_bits(src.again(i));
    always += cut_always(key, cut) ? 1u : 0u;
    ties += cut_tie(key, cut) ? 1u : 0u;
  }
  always = warp_sum_u32(always);
  ties = warp_sum_u32(ties);
  if ((threadIdx.x & 31) == 0) {
    warp_always[threadIdx.x >> 5] = always;
    warp_ties[threadIdx.x >> 5] = ties;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t a = 0, ties_sum = 0;
    for (int w = 0; w < kWarps; ++w) {
      a += warp_always[w];
      ties_sum += warp_ties[w];
    }
    tile_counts[2 * t.index] = a;
    tile_counts[2 * t.index + 1] = ties_sum;
  }
}

// One thread per row: exclusive sums of its tiles' counts, in tile order.
__global__ void scan_kernel(const int64_t* table /* [P, 8] */, int64_t rows, const uint32_t* tile_counts /* [T, 2] */,
                            uint32_t* tile_offsets /* [T, 2] */) {
  const int64_t ri = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ri >= rows) return;
  const SparseRow row = sparse_row(table, ri);
  uint32_t always = 0, ties = 0;
  const int64_t tiles = sparse_tiles(row.n);
  for (int64_t t = row.first_tile; t < row.first_tile + tiles; ++t) {
    tile_offsets[2 * t] = always;
    tile_offsets[2 * t + 1] = ties;
    always += tile_counts[2 * t];
    ties += tile_counts[2 * t + 1];
  }
}

// Per tile: each thread takes kPerThread consecutive elements, so the CTA's scan of the
// counts puts every kept element at its place in index order: the tile's offsets, plus the
// keys kept by earlier threads (ties counted against the row's need).
template <DType D>
__global__ void compact_kernel(const typename Elem<D>::storage* bucket /* [n] */, const int64_t* table /* [P, 8] */,
                               int64_t rows, int64_t pairs, DType wire, const uint32_t* state /* [P, 16] */,
                               const uint32_t* tile_offsets /* [T, 2] */, uint8_t* payload /* [bytes] */) {
  const Tile t = this_tile(table, rows);
  const SparseRow& row = t.row;
  const auto src = sparse_source<D>(bucket, row);
  const SparseCut cut = cut_of(state + t.row_index * kStateWords);
  const int64_t base = t.lo + static_cast<int64_t>(threadIdx.x) * kPerThread;
  const int64_t end = base + kPerThread < t.hi ? base + kPerThread : t.hi;
  uint32_t keys[kPerThread];
  uint32_t always = 0, ties = 0;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int64_t i = base + j;
    keys[j] = i < end ? abs_bits(src.again(i)) : 0u;
    if (i < end) {
      always += cut_always(keys[j], cut) ? 1u : 0u;
      ties += cut_tie(keys[j], cut) ? 1u : 0u;
    }
  }
  block_exclusive_scan2(always, ties);
  uint32_t ties_before = tile_offsets[2 * t.index + 1] + ties;
  int64_t pos = row.first_pair + tile_offsets[2 * t.index] + always + (ties_before < cut.need ? ties_before : cut.need);
  auto* idx_out = reinterpret_cast<int32_t*>(payload + kHeaderBytes);
  uint8_t* values = payload + topk_values_offset(pairs);
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int64_t i = base + j;
    if (i >= end) break;
    const uint32_t key = keys[j];
    bool keep = cut_always(key, cut);
    if (cut_tie(key, cut)) {
      keep = ties_before < cut.need;
      ++ties_before;
    }
    if (keep) {
      const float a = src.again(i);
      const float v = sparse_wire_round(a, wire);
      idx_out[pos] = static_cast<int32_t>(i);
      sparse_store_value(values, pos, wire, v);
      if (src.r) src.r[i] = is_finite(a) ? sub_rn(a, v) : 0.0f;
      ++pos;
    } else if (src.r && key >= 0x7f800000u) {
      src.r[i] = 0.0f;  // no residual keeps a NaN or Inf
    }
  }
}

// The header (flag: any row's largest key non-finite) and the zero padding.
__global__ void topk_header_kernel(int64_t rows, int64_t pairs, int wire_bytes, const uint32_t* state /* [P, 16] */,
                                   uint8_t* payload /* [bytes] */) {
  __shared__ uint32_t flag;
  if (threadIdx.x == 0) flag = 0;
  __syncthreads();
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x)
    if (state[r * kStateWords + kMaxKey] >= 0x7f800000u) atomicOr(&flag, 1u);
  __syncthreads();
  if (threadIdx.x < 4) reinterpret_cast<uint32_t*>(payload)[threadIdx.x] = threadIdx.x == 0 ? flag : 0u;
  for (int64_t b = kHeaderBytes + 4 * pairs + threadIdx.x; b < topk_values_offset(pairs); b += blockDim.x)
    payload[b] = 0;
  const int64_t end = topk_payload_bytes(pairs, wire_bytes);
  for (int64_t b = topk_values_offset(pairs) + pairs * wire_bytes + threadIdx.x; b < end; b += blockDim.x)
    payload[b] = 0;
}

// ---------------------------------------------------------------- top-k decode
// Per (row, rank): the index list must be strictly increasing within [0, n). status[0]
// counts the lists rejected; status[1] becomes 1 (poison) for a rejected list.
__global__ void validate_kernel(const uint8_t* gathered /* [W * bytes] */, const int64_t* table /* [P, 8] */,
                                int64_t world, int64_t bytes, int32_t* status /* [2] */) {
  __shared__ int bad;
  const SparseRow row = sparse_row(table, blockIdx.x);
  for (int64_t r = blockIdx.y; r < world; r += gridDim.y) {
    if (threadIdx.x == 0) bad = 0;
    __syncthreads();
    const auto* idx = reinterpret_cast<const int32_t*>(gathered + r * bytes + kHeaderBytes) + row.first_pair;
    for (int64_t j = threadIdx.x; j < row.k; j += blockDim.x) {
      const int64_t i = idx[j];
      if (i < 0 || i >= row.n || (j > 0 && static_cast<int64_t>(idx[j - 1]) >= i)) bad = 1;
    }
    __syncthreads();
    if (threadIdx.x == 0 && bad) {
      atomicAdd(status, 1);
      atomicOr(status + 1, 1);
    }
    __syncthreads();  // `bad` is reset for the next rank only after thread 0 read it
  }
}

// Any rank's non-finite flag poisons the decode too (once, not in every later CTA).
__global__ void flags_kernel(const uint8_t* gathered /* [W * bytes] */, int64_t world, int64_t bytes,
                             int32_t* status /* [2] */) {
  for (int64_t r = threadIdx.x; r < world; r += blockDim.x)
    if (*reinterpret_cast<const uint32_t*>(gathered + r * bytes) != 0u) atomicOr(status + 1, 1);
}

__device__ __forceinline__ bool poisoned(const int32_t* status /* [2] */) { return status[1] != 0; }

// Rows of the accumulator (the float32 bucket itself, or the scratch) set to 0, or NaN.
__global__ void fill_kernel(const int64_t* table /* [P, 8] */, const int32_t* status /* [2] */, float* acc /* [n] */) {
  const bool nan = poisoned(status);
  const SparseRow row = sparse_row(table, blockIdx.x);
  const float v = nan ? quiet_nan() : 0.0f;
  for (int64_t e = blockIdx.y * blockDim.x + threadIdx.x; e < row.n; e += gridDim.y * blockDim.x)
    acc[row.offset + e] = v;
}

// One rank's pairs added (its indices are distinct, so no two threads touch one element;
// ranks go one launch after another: the sum's order is the rank order).
__global__ void scatter_kernel(const uint8_t* gathered /* [W * bytes] */, const int64_t* table /* [P, 8] */,
                               int64_t bytes, int64_t pairs, int64_t rank, DType wire, float inv_w,
                               const int32_t* status /* [2] */, float* acc /* [n] */) {
  if (poisoned(status)) return;
  const SparseRow row = sparse_row(table, blockIdx.x);
  const uint8_t* base = gathered + rank * bytes;
  const auto* idx = reinterpret_cast<const int32_t*>(base + kHeaderBytes) + row.first_pair;
  const uint8_t* values = base + topk_values_offset(pairs) + row.first_pair * sparse_value_bytes(wire);
  for (int64_t j = blockIdx.y * blockDim.x + threadIdx.x; j < row.k; j += gridDim.y * blockDim.x) {
    float* p = acc + row.offset + idx[j];
    *p = sparse_accumulate(*p, sparse_load_value(values, j, wire), inv_w);
  }
}

template <DType D>
__global__ void convert_kernel(const int64_t* table /* [P, 8] */, const float* acc /* [n] */,
                               typename Elem<D>::storage* bucket /* [n] */) {
  const SparseRow row = sparse_row(table, blockIdx.x);
  for (int64_t e = blockIdx.y * blockDim.x + threadIdx.x; e < row.n; e += gridDim.y * blockDim.x)
    Elem<D>::store(bucket, row.offset + e, acc[row.offset + e]);
}

// ---------------------------------------------------------------- random-k
template <DType D>
__global__ void randomk_encode_kernel(const typename Elem<D>::storage* bucket /* [n] */,
                                      const int64_t* table /* [P, 8] */, uint64_t seed, uint64_t step,
                                      float* payload /* [4 + K] */) {
  const SparseRow row = sparse_row(table, blockIdx.x);
  const auto src = sparse_source<D>(bucket, row);
  const uint64_t key = randomk_key(seed, step, static_cast<uint64_t>(row.ordinal));
  for (int64_t j = blockIdx.y * blockDim.x + threadIdx.x; j < row.k; j += gridDim.y * blockDim.x) {
    const int64_t lo = j * row.n / row.k, hi = (j + 1) * row.n / row.k;
    const int64_t pick = randomk_index(key, j, row.n, row.k);
    uint32_t m = 0;
    for (int64_t e = lo; e < hi; ++e) {
      const float a = src.first(e);
      const uint32_t b = abs_bits(a);
      m = b > m ? b : m;
      if (e == pick) payload[kRandomKHeader + row.first_pair + j] = a;
      if (src.r) src.r[e] = (e == pick || !is_finite(a)) ? 0.0f : a;
    }
    if (m >= 0x7f800000u) atomicExch(reinterpret_cast<unsigned*>(payload), f32_bits(1.0f));
  }
}

template <DType D>
__global__ void randomk_decode_kernel(const float* reduced /* [4 + K] */, const int64_t* table /* [P, 8] */,
                                      int64_t world, uint64_t seed, uint64_t step,
                                      typename Elem<D>::storage* bucket /* [n] */) {
  const bool nan = !(reduced[0] == 0.0f);
  const float inv_w = inv_world(world);
  const SparseRow row = sparse_row(table, blockIdx.x);
  const uint64_t key = randomk_key(seed, step, static_cast<uint64_t>(row.ordinal));
  for (int64_t j = blockIdx.y * blockDim.x + threadIdx.x; j < row.k; j += gridDim.y * blockDim.x) {
    const int64_t lo = j * row.n / row.k, hi = (j + 1) * row.n / row.k;
    const int64_t pick = randomk_index(key, j, row.n, row.k);
    const float v = nan ? quiet_nan() : sparse_accumulate(0.0f, reduced[kRandomKHeader + row.first_pair + j], inv_w);
    for (int64_t e = lo; e < hi; ++e) Elem<D>::store(bucket, row.offset + e, nan || e == pick ? v : 0.0f);
  }
}

void check_sparse(int64_t rows, int64_t pairs, int64_t world = 1, int64_t tiles = 0) {
  if (rows < 0 || pairs < 0 || world < 1 || tiles < 0)
    throw std::invalid_argument("gradcomp: bad row, pair, tile or world count");
  if (rows > 0x7fffffff || tiles > 0x7fffffff)
    throw std::invalid_argument("gradcomp: too many sparse rows or tiles for one launch");
}

dim3 row_grid(int64_t rows) { return dim3(static_cast<unsigned>(rows), kRowSpread); }

}  // namespace

int64_t topk_workspace_bytes(int64_t rows, int64_t tiles) {
  return 4 * (rows * (kRadixMaxBins + kStateWords) + tiles * 4);
}

void topk_encode_cuda(DType dtype, DType wire, bool approx, const void* bucket, const int64_t* table, int64_t rows,
                      int64_t tiles, int64_t pairs, uint8_t* payload, void* workspace, int device, intptr_t stream) {
  check_sparse(rows, pairs, 1, tiles);
  use_device(device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  auto* hist = static_cast<uint32_t*>(workspace);
  uint32_t* state = hist + rows * kRadixMaxBins;
  uint32_t* tile_counts = state + rows * kStateWords;
  uint32_t* tile_offsets = tile_counts + 2 * tiles;
  if (rows > 0) check(cudaMemsetAsync(workspace, 0, topk_workspace_bytes(rows, tiles), s), "workspace memset");
  with_dtype(dtype, [&](auto d) {
    constexpr DType D = decltype(d)::value;
    const auto* x = static_cast<const typename Elem<D>::storage*>(bucket);
    const auto nrows = static_cast<unsigned>(rows);
    const auto ntiles = static_cast<unsigned>(tiles);
    if (rows > 0 && tiles > 0) {
      if (approx) GC_LAUNCH(nrows, kThreads, s, sample_kernel<D>)(x, table, state);
      GC_LAUNCH(ntiles, kThreads, s, ef_hist_kernel<D>)(x, table, rows, approx, hist, state);
      GC_LAUNCH(nrows, kThreads, s, pick_kernel)(table, 0, approx, hist, state);
      for (int dgt = 1; dgt < kRadixDigits; ++dgt) {
        GC_LAUNCH(ntiles, kThreads, s, digit_hist_kernel<D>)(x, table, rows, dgt, hist, state);
        GC_LAUNCH(nrows, kThreads, s, pick_kernel)(table, dgt, approx, hist, state);
      }
      GC_LAUNCH(ntiles, kThreads, s, count_kernel<D>)(x, table, rows, state, tile_counts);
      GC_LAUNCH((nrows + 127) / 128, 128, s, scan_kernel)(table, rows, tile_counts, tile_offsets);
      GC_LAUNCH(ntiles, kThreads, s, compact_kernel<D>)(x, table, rows, pairs, wire, state, tile_offsets, payload);
    }
    GC_LAUNCH(1, kThreads, s, topk_header_kernel)(rows, pairs, sparse_value_bytes(wire), state, payload);
  });
  check(cudaGetLastError(), "top-k encode launch");
}

void topk_decode_cuda(DType dtype, DType wire, const uint8_t* gathered, const int64_t* table, int64_t rows,
                      int64_t pairs, int64_t world, void* bucket, float* scratch, int32_t* status, int device,
                      intptr_t stream) {
  check_sparse(rows, pairs, world);
  if (dtype != DType::F32 && scratch == nullptr)
    throw std::invalid_argument("gradcomp: decoding a 16-bit bucket needs float32 scratch");
  use_device(device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  check(cudaMemsetAsync(status, 0, 2 * sizeof(int32_t), s), "status memset");
  if (rows == 0) return;
  const int64_t bytes = topk_payload_bytes(pairs, sparse_value_bytes(wire));
  float* acc = dtype == DType::F32 ? static_cast<float*>(bucket) : scratch;
  const auto ranks_y = static_cast<unsigned>(world < 65535 ? world : 65535);
  GC_LAUNCH(dim3(static_cast<unsigned>(rows), ranks_y), kThreads, s, validate_kernel)(gathered, table, world, bytes,
                                                                                      status);
  GC_LAUNCH(1, kThreads, s, flags_kernel)(gathered, world, bytes, status);
  check(cudaGetLastError(), "top-k decode validation launch");  // nothing writes unless validation ran
  GC_LAUNCH(row_grid(rows), kThreads, s, fill_kernel)(table, status, acc);
  const float inv_w = inv_world(world);
  for (int64_t r = 0; r < world; ++r)
    GC_LAUNCH(row_grid(rows), kThreads, s, scatter_kernel)(gathered, table, bytes, pairs, r, wire, inv_w, status, acc);
  if (dtype != DType::F32) {
    with_dtype(dtype, [&](auto d) {
      constexpr DType D = decltype(d)::value;
      GC_LAUNCH(row_grid(rows), kThreads, s, convert_kernel<D>)(table, acc,
                                                                static_cast<typename Elem<D>::storage*>(bucket));
    });
  }
  check(cudaGetLastError(), "top-k decode launch");
}

void randomk_encode_cuda(DType dtype, const void* bucket, const int64_t* table, int64_t rows, int64_t pairs,
                         uint64_t seed, uint64_t step, float* payload, int device, intptr_t stream) {
  check_sparse(rows, pairs);
  use_device(device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  check(cudaMemsetAsync(payload, 0, kRandomKHeader * sizeof(float), s), "header memset");
  if (rows == 0) return;
  with_dtype(dtype, [&](auto d) {
    constexpr DType D = decltype(d)::value;
    GC_LAUNCH(row_grid(rows), kThreads, s, randomk_encode_kernel<D>)(
        static_cast<const typename Elem<D>::storage*>(bucket), table, seed, step, payload);
  });
  check(cudaGetLastError(), "random-k encode launch");
}

void randomk_decode_cuda(DType dtype, const float* reduced, const int64_t* table, int64_t rows, int64_t world,
                         uint64_t seed, uint64_t step, void* bucket, int device, intptr_t stream) {
  check_sparse(rows, 0, world);
  use_device(device);
  if (rows == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  with_dtype(dtype, [&](auto d) {
    constexpr DType D = decltype(d)::value;
    GC_LAUNCH(row_grid(rows), kThreads, s, randomk_decode_kernel<D>)(reduced, table, world, seed, step,
                                                                     static_cast<typename Elem<D>::storage*>(bucket));
  });
  check(cudaGetLastError(), "random-k decode launch");
}

}  // namespace gradcomp
