// CPU backend of top-k and random-k (gradcomp.h): per parameter, error feedback fused with
// the selection, and a deterministic decode. Compiled once, without AVX2 variants: its
// passes are bound by memory and by histogram updates, which wider vectors do not change.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <vector>

#include "../gradcomp.h"
#include "parallel.h"

namespace gradcomp {
namespace {

using namespace codec;

// A parameter large enough to split over threads; smaller ones run one per thread.
constexpr int64_t kParallelMin = int64_t{1} << 16;

struct Cand {
  uint32_t index;  // in the parameter
  uint32_t key;    // abs_bits(a)
};

int chunks_for(int64_t n, int threads) { return n >= kParallelMin ? threads : 1; }

// One pass over a parameter, split in `threads` index-ordered chunks. first: compute a and
// store it in the residual. hist0 (if given): digit 0's histogram. Keys >= min_key are
// gathered into cands in index order. Returns the largest key (>= 0x7f800000: non-finite).
template <DType D>
uint32_t scan(const SparseSource<D>& src, int64_t n, int threads, bool first,
              uint32_t* hist0,  // [2048] or null
              uint32_t min_key, std::vector<Cand>* cands) {
  const int chunks = chunks_for(n, threads);
  const int bins = 1 << radix_bits(0);
  std::vector<uint32_t> hists(hist0 ? static_cast<size_t>(chunks) * bins : 0, 0u);
  std::vector<std::vector<Cand>> parts(cands ? chunks : 0);
  std::vector<uint32_t> maxima(chunks, 0u);
  parallel::for_dynamic(chunks, chunks, [&](int64_t c) {
    const int64_t lo = c * n / chunks, hi = (c + 1) * n / chunks;
    uint32_t* h = hist0 ? hists.data() + static_cast<size_t>(c) * bins : nullptr;
    std::vector<Cand>* part = cands ? &parts[c] : nullptr;
    uint32_t m = 0;
    for (int64_t i = lo; i < hi; ++i) {
      float a;
      if (first) {
        a = src.first(i);
        if (src.r) src.r[i] = a;
      } else {
        a = src.again(i);
      }
      const uint32_t key = abs_bits(a);
      m = key > m ? key : m;
      if (h) ++h[key >> radix_shift(0)];
      if (part && key >= min_key) part->push_back({static_cast<uint32_t>(i), key});
    }
    maxima[c] = m;
  });
  if (hist0) {
    for (int b = 0; b < bins; ++b) hist0[b] = 0;
    for (int c = 0; c < chunks; ++c)
      for (int b = 0; b < bins; ++b) hist0[b] += hists[static_cast<size_t>(c) * bins + b];
  }
  if (cands)
    for (auto& p : parts) cands->insert(cands->end(), p.begin(), p.end());
  return *std::max_element(maxima.begin(), maxima.end());
}

// The cut that keeps exactly k of the candidates (k <= their count): radix select of the
// k-th largest key T over the three digits; keep keys > T and the first ties at T.
SparseCut cut_among(const std::vector<Cand>& cands, uint32_t k) {
  uint32_t need = k, prefix = 0;
  uint32_t hist[kRadixMaxBins];
  for (int d = 0; d < kRadixDigits; ++d) {
    const int bins = 1 << radix_bits(d);
    std::fill(hist, hist + bins, 0u);
    for (const Cand& c : cands)
      if (radix_above(c.key, d) == prefix) ++hist[radix_digit(c.key, d)];
    prefix = (prefix << radix_bits(d)) | radix_pick(hist, bins, need);
  }
  return {prefix + 1, prefix, need};
}

// The k selected entries of a parameter, in ascending index order (exact or approximate
// top-k, codec.h). Returns the largest key.
template <DType D>
uint32_t select_topk(const SparseSource<D>& src, int64_t n, int64_t k, bool approx, int threads,
                     std::vector<Cand>& out) {
  std::vector<Cand> cands;
  uint32_t max_key;
  uint32_t fill_below = 0;  // approximate with too few candidates: take lowest-indexed keys below it
  if (!approx) {
    uint32_t hist0[kRadixMaxBins];
    max_key = scan(src, n, threads, true, hist0, 0u, nullptr);
    uint32_t need = static_cast<uint32_t>(k);
    const uint32_t b0 = radix_pick(hist0, 1 << radix_bits(0), need);
    scan(src, n, threads, false, nullptr, b0 << radix_shift(0), &cands);
  } else {
    const int64_t s = approx_sample_size(n);
    std::vector<uint32_t> sample(s);
    for (int64_t j = 0; j < s; ++j) sample[j] = abs_bits(src.first(approx_sample_pos(j, n, s)));
    const int64_t kappa = approx_sample_rank(k, n, s);
    std::nth_element(sample.begin(), sample.begin() + (kappa - 1), sample.end(), std::greater<uint32_t>());
    const uint32_t t0 = sample[kappa - 1];
    max_key = scan(src, n, threads, true, nullptr, t0, &cands);
    if (static_cast<int64_t>(cands.size()) < k) fill_below = t0;
  }
  out.clear();
  out.reserve(k);
  if (fill_below == 0 || static_cast<int64_t>(cands.size()) >= k) {
    const SparseCut cut = cut_among(cands, static_cast<uint32_t>(k));
    uint32_t ties = 0;
    for (const Cand& c : cands)
      if (cut_always(c.key, cut) || (cut_tie(c.key, cut) && ties++ < cut.need)) out.push_back(c);
    return max_key;
  }
  // fewer than k keys >= T0: all of them, then the lowest-indexed keys below T0, merged by index
  std::vector<Cand> fill;
  const int64_t missing = k - static_cast<int64_t>(cands.size());
  for (int64_t i = 0; i < n && static_cast<int64_t>(fill.size()) < missing; ++i) {
    const uint32_t key = abs_bits(src.again(i));
    if (key < fill_below) fill.push_back({static_cast<uint32_t>(i), key});
  }
  std::merge(cands.begin(), cands.end(), fill.begin(), fill.end(), std::back_inserter(out),
             [](const Cand& a, const Cand& b) { return a.index < b.index; });
  return max_key;
}

// One parameter: select, write its pairs, update its residual. Returns whether any of its
// values was non-finite.
template <DType D>
bool encode_row(const void* bucket_v, const SparseRow& row, bool approx, DType wire, int64_t pairs, uint8_t* payload,
                int threads) {
  const auto src = sparse_source<D>(static_cast<const typename Elem<D>::storage*>(bucket_v), row);
  std::vector<Cand> sel;
  const uint32_t max_key = select_topk(src, row.n, row.k, approx, threads, sel);
  auto* idx = reinterpret_cast<int32_t*>(payload + kHeaderBytes) + row.first_pair;
  uint8_t* values = payload + topk_values_offset(pairs) + row.first_pair * sparse_value_bytes(wire);
  for (int64_t j = 0; j < row.k; ++j) {
    const int64_t i = sel[j].index;
    const float a = src.again(i);
    const float v = sparse_wire_round(a, wire);
    idx[j] = static_cast<int32_t>(i);
    sparse_store_value(values, j, wire, v);
    if (src.r) src.r[i] = is_finite(a) ? sub_rn(a, v) : 0.0f;
  }
  const bool non_finite = max_key >= 0x7f800000u;
  if (non_finite && src.r)  // no residual keeps a NaN or Inf
    for (int64_t i = 0; i < row.n; ++i)
      if (!is_finite(src.r[i])) src.r[i] = 0.0f;
  return non_finite;
}

template <DType D>
void topk_encode_t(bool approx, DType wire, const void* bucket, const int64_t* table, int64_t rows, int64_t pairs,
                   uint8_t* payload, int threads) {
  const int64_t bytes = topk_payload_bytes(pairs, sparse_value_bytes(wire));
  std::memset(payload, 0, kHeaderBytes);
  std::memset(payload + kHeaderBytes + 4 * pairs, 0, topk_values_offset(pairs) - kHeaderBytes - 4 * pairs);
  const int64_t values_end = topk_values_offset(pairs) + pairs * sparse_value_bytes(wire);
  std::memset(payload + values_end, 0, bytes - values_end);
  std::vector<int64_t> small, large;
  for (int64_t i = 0; i < rows; ++i) (sparse_row(table, i).n >= kParallelMin ? large : small).push_back(i);
  std::vector<uint8_t> bad(rows, 0);
  const int64_t n_small = static_cast<int64_t>(small.size());
  parallel::for_dynamic(threads, n_small, [&](int64_t s) {
    bad[small[s]] = encode_row<D>(bucket, sparse_row(table, small[s]), approx, wire, pairs, payload, 1);
  });
  for (int64_t i : large) bad[i] = encode_row<D>(bucket, sparse_row(table, i), approx, wire, pairs, payload, threads);
  const uint32_t flag = std::find(bad.begin(), bad.end(), 1) != bad.end() ? 1u : 0u;
  std::memcpy(payload, &flag, 4);
}

// Whether rank r's pairs of a row are valid: indices strictly increasing within [0, n).
bool row_indices_valid(const int32_t* idx,  // [k]
                       int64_t k, int64_t n) {
  int64_t prev = -1;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t i = idx[j];
    if (i <= prev || i >= n) return false;
    prev = i;
  }
  return true;
}

template <DType D>
void fill_rows(void* bucket_v, const int64_t* table, int64_t rows, float v, int threads) {
  auto* bucket = static_cast<typename Elem<D>::storage*>(bucket_v);
  parallel::for_dynamic(threads, rows, [&](int64_t i) {
    const SparseRow row = sparse_row(table, i);
    for (int64_t e = 0; e < row.n; ++e) Elem<D>::store(bucket, row.offset + e, v);
  });
}

template <DType D>
int64_t topk_decode_t(DType wire, const uint8_t* gathered, const int64_t* table, int64_t rows, int64_t pairs,
                      int64_t world, void* bucket_v, int threads) {
  const int64_t bytes = topk_payload_bytes(pairs, sparse_value_bytes(wire));
  uint32_t flags = 0;
  for (int64_t r = 0; r < world; ++r) {
    uint32_t f;
    std::memcpy(&f, gathered + r * bytes, 4);
    flags |= f;
  }
  int64_t rejected = 0;
  parallel::for_dynamic(threads, world * rows, [&](int64_t t) {
    const int64_t r = t / rows;
    const SparseRow row = sparse_row(table, t % rows);
    const auto* idx = reinterpret_cast<const int32_t*>(gathered + r * bytes + kHeaderBytes) + row.first_pair;
    if (!row_indices_valid(idx, row.k, row.n)) parallel::atomic_add(&rejected, 1);
  });
  if (flags != 0 || rejected != 0) {  // non-finite or corrupted: the compressed values become NaN
    fill_rows<D>(bucket_v, table, rows, quiet_nan(), threads);
    return rejected;
  }
  auto* bucket = static_cast<typename Elem<D>::storage*>(bucket_v);
  const float inv_w = inv_world(world);
  parallel::for_dynamic(threads, rows, [&](int64_t i) {
    const SparseRow row = sparse_row(table, i);
    std::vector<float> scratch(D == DType::F32 ? 0 : row.n, 0.0f);
    float* acc = D == DType::F32 ? reinterpret_cast<float*>(bucket) + row.offset : scratch.data();
    if (D == DType::F32) std::fill(acc, acc + row.n, 0.0f);
    for (int64_t r = 0; r < world; ++r) {
      const uint8_t* base = gathered + r * bytes;
      const auto* idx = reinterpret_cast<const int32_t*>(base + kHeaderBytes) + row.first_pair;
      const uint8_t* values = base + topk_values_offset(pairs) + row.first_pair * sparse_value_bytes(wire);
      for (int64_t j = 0; j < row.k; ++j)
        acc[idx[j]] = sparse_accumulate(acc[idx[j]], sparse_load_value(values, j, wire), inv_w);
    }
    if (D != DType::F32)
      for (int64_t e = 0; e < row.n; ++e) Elem<D>::store(bucket, row.offset + e, acc[e]);
  });
  return 0;
}

// Random-k: one fused pass per stratum (a contiguous range): a, its residual, and the value
// at the stratum's drawn index.
template <DType D>
void randomk_encode_t(const void* bucket_v, const int64_t* table, int64_t rows, int64_t pairs, uint64_t seed,
                      uint64_t step, float* payload, int threads) {
  const auto* bucket = static_cast<const typename Elem<D>::storage*>(bucket_v);
  float* values = payload + kRandomKHeader;
  uint32_t bad = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const SparseRow row = sparse_row(table, i);
    const auto src = sparse_source<D>(bucket, row);
    const uint64_t key = randomk_key(seed, step, static_cast<uint64_t>(row.ordinal));
    const int64_t n = row.n, k = row.k;
    parallel::for_static(n >= kParallelMin ? threads : 1, k, [&](int64_t j0, int64_t j1) {
      uint32_t m = 0;
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t lo = j * n / k, hi = (j + 1) * n / k;
        const int64_t pick = randomk_index(key, j, n, k);
        for (int64_t e = lo; e < hi; ++e) {
          const float a = src.first(e);
          m = std::max(m, abs_bits(a));
          if (e == pick) values[row.first_pair + j] = a;
          if (src.r) src.r[e] = (e == pick || !is_finite(a)) ? 0.0f : a;
        }
      }
      if (m >= 0x7f800000u) parallel::atomic_or(&bad, 1u);
    });
  }
  payload[0] = bad ? 1.0f : 0.0f;
  payload[1] = payload[2] = payload[3] = 0.0f;
}

template <DType D>
void randomk_decode_t(const float* reduced, const int64_t* table, int64_t rows, int64_t world, uint64_t seed,
                      uint64_t step, void* bucket_v, int threads) {
  if (!(reduced[0] == 0.0f)) {  // some rank was non-finite (a NaN sum counts too)
    fill_rows<D>(bucket_v, table, rows, quiet_nan(), threads);
    return;
  }
  auto* bucket = static_cast<typename Elem<D>::storage*>(bucket_v);
  const float* values = reduced + kRandomKHeader;
  const float inv_w = inv_world(world);
  for (int64_t i = 0; i < rows; ++i) {
    const SparseRow row = sparse_row(table, i);
    const uint64_t key = randomk_key(seed, step, static_cast<uint64_t>(row.ordinal));
    const int64_t n = row.n, k = row.k;
    parallel::for_static(n >= kParallelMin ? threads : 1, k, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t lo = j * n / k, hi = (j + 1) * n / k;
        const int64_t pick = randomk_index(key, j, n, k);
        const float v = sparse_accumulate(0.0f, values[row.first_pair + j], inv_w);
        for (int64_t e = lo; e < hi; ++e) Elem<D>::store(bucket, row.offset + e, e == pick ? v : 0.0f);
      }
    });
  }
}

#define GC_SPARSE_BY_DTYPE(dtype, fn, ...) \
  switch (dtype) {                         \
    case DType::F32:                       \
      return fn<DType::F32>(__VA_ARGS__);  \
    case DType::F16:                       \
      return fn<DType::F16>(__VA_ARGS__);  \
    default:                               \
      return fn<DType::BF16>(__VA_ARGS__); \
  }

void check_sparse(int64_t rows, int64_t pairs, int64_t world = 1) {
  if (rows < 0 || pairs < 0 || world < 1) throw std::invalid_argument("gradcomp: bad row, pair or world count");
}

}  // namespace

void topk_encode_cpu(DType dtype, DType wire, bool approx, const void* bucket, const int64_t* table, int64_t rows,
                     int64_t pairs, uint8_t* payload, int threads) {
  check_sparse(rows, pairs);
  GC_SPARSE_BY_DTYPE(dtype, topk_encode_t, approx, wire, bucket, table, rows, pairs, payload, std::max(threads, 1));
}

int64_t topk_decode_cpu(DType dtype, DType wire, const uint8_t* gathered, const int64_t* table, int64_t rows,
                        int64_t pairs, int64_t world, void* bucket, int threads) {
  check_sparse(rows, pairs, world);
  GC_SPARSE_BY_DTYPE(dtype, topk_decode_t, wire, gathered, table, rows, pairs, world, bucket, std::max(threads, 1));
}

void randomk_encode_cpu(DType dtype, const void* bucket, const int64_t* table, int64_t rows, int64_t pairs,
                        uint64_t seed, uint64_t step, float* payload, int threads) {
  check_sparse(rows, pairs);
  GC_SPARSE_BY_DTYPE(dtype, randomk_encode_t, bucket, table, rows, pairs, seed, step, payload, std::max(threads, 1));
}

void randomk_decode_cpu(DType dtype, const float* reduced, const int64_t* table, int64_t rows, int64_t world,
                        uint64_t seed, uint64_t step, void* bucket, int threads) {
  check_sparse(rows, 0, world);
  GC_SPARSE_BY_DTYPE(dtype, randomk_decode_t, reduced, table, rows, world, seed, step, bucket, std::max(threads, 1));
}

}  // namespace gradcomp
