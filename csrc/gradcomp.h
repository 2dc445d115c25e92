// gradcomp.h — the core API: plain functions over raw pointers, sizes and a stream.
// No framework types cross this boundary; the Python layer validates and allocates.
//
// Shapes (W = world size, S = block slots per shard, B = block size, SB = shard bytes):
//   bucket      [n] elements of DType
//   table       [W * S, 4] int64 rows (codec.h: offset, valid length, residual address,
//               noise word)
//   send / recv [W * SB] uint8: shard r goes to / came from rank r
//   slice       [SB] uint8: this rank's reduced shard
//   gathered    [W * SB] uint8: every rank's reduced shard, in rank order
#pragma once

#include <cstdint>
#include <string>

#include "codec.h"

namespace gradcomp {

// ---- CPU backend (threads: how many threads to use; the caller passes torch's count)
// residual_dtype: F32 or BF16, the element type the table's residual addresses point to.
// rounding: to nearest, or stochastic (codec.h; not for bits 1).

// Pass 1: a = x + residual; per-block scale and codes into each owner's shard; residual = a - sent.
void quant_encode_cpu(int bits, int64_t block, DType dtype, DType residual_dtype,
                      const void* bucket,    // [n] dtype
                      const int64_t* table,  // [W * S, 4]
                      int64_t world, int64_t slots,
                      uint8_t* send,  // [W * SB]
                      codec::Rounding rounding, int threads);

// Pass 2: decode the W shards received for my slots, sum in rank order, multiply by 1/W,
// re-encode; the re-encoding error, times W, is added to my residual (rows' addresses).
void quant_reduce_cpu(int bits, int64_t block, DType residual_dtype,
                      const uint8_t* recv,     // [W * SB]
                      const int64_t* my_rows,  // [S, 4]: the table rows of the slots I own
                      int64_t world, int64_t slots,
                      uint8_t* slice,  // [SB]
                      codec::Rounding rounding, int threads);

// Pass 3: decode every rank's reduced shard into the bucket (NaN everywhere the codec
// wrote if any shard is flagged non-finite).
void quant_decode_cpu(int bits, int64_t block, DType dtype,
                      const uint8_t* gathered,  // [W * SB]
                      const int64_t* table,     // [W * S, 4]
                      int64_t world, int64_t slots,
                      void* bucket,  // [n] dtype
                      int threads);

// ---- Top-k and random-k (codec.h "sparsification"). Shapes (P rows, K pairs = sum of k):
//   table     [P, 8] int64 sparse rows
//   payload   top-k: [topk_payload_bytes(K, wire bytes)] uint8; random-k: [4 + K] float32
//   gathered  [W * topk_payload_bytes] uint8: every rank's top-k payload, in rank order
// wire: the values' type on the wire (F32, F16 or BF16). Residuals are float32.

// Per row: a = x + residual; exactly k pairs (exact or approximate top-k of |a|, ascending
// indices); residual = a minus what was sent, never non-finite.
void topk_encode_cpu(DType dtype, DType wire, bool approx,
                     const void* bucket,    // [n] dtype
                     const int64_t* table,  // [P, 8]
                     int64_t rows, int64_t pairs,
                     uint8_t* payload,  // [topk_payload_bytes]
                     int threads);
// Writes each row's average: rank by rank, pair by pair, value times 1/W added at its index.
// A flagged payload, or one whose indices of a row are not strictly increasing within the
// parameter, makes every row NaN (no write goes through a bad index). Returns the number of
// (rank, row) index lists rejected.
int64_t topk_decode_cpu(DType dtype, DType wire,
                        const uint8_t* gathered,  // [W * payload bytes]
                        const int64_t* table,     // [P, 8]
                        int64_t rows, int64_t pairs, int64_t world,
                        void* bucket,  // [n] dtype
                        int threads);
// Per row: a = x + residual; the values at the k indices every rank draws alike (seed, step,
// ordinal); residual = a with those zeroed.
void randomk_encode_cpu(DType dtype,
                        const void* bucket,    // [n] dtype
                        const int64_t* table,  // [P, 8]
                        int64_t rows, int64_t pairs, uint64_t seed, uint64_t step,
                        float* payload,  // [4 + K]
                        int threads);
// The all-reduced (summed) payload into the bucket: value / W at its index, 0 elsewhere in
// the row; NaN everywhere if the flag sum is not 0.
void randomk_decode_cpu(DType dtype,
                        const float* reduced,  // [4 + K]
                        const int64_t* table,  // [P, 8]
                        int64_t rows, int64_t world, uint64_t seed, uint64_t step,
                        void* bucket,  // [n] dtype
                        int threads);

// ---- CUDA backend (device: CUDA ordinal made current first; stream: a cudaStream_t as an
// integer; every call is asynchronous and checks the launch)
bool cuda_compiled();
int cuda_device_count();     // 0 when no driver or no device
std::string cuda_archs();    // the architectures really compiled, e.g. "75,80,90"
int cuda_runtime_version();  // CUDART_VERSION the backend was built with, 0 if none
int cuda_driver_version();   // what cudaDriverGetVersion says (e.g. 12040), 0 without a driver or CUDA
// Why the CUDA backend cannot run on this machine's driver, or "" (no device is touched).
std::string cuda_problem();
// The messages (cuda/driver.cpp): "" when a driver for CUDA driver_version runs a build made
// with CUDA runtime_version; the reason and the fix otherwise.
std::string cuda_driver_problem(int driver_version, int runtime_version);
std::string cuda_ptx_problem(int driver_version, int runtime_version, int major, int minor, const std::string& archs);
std::string cuda_arch_problem(int major, int minor, const std::string& archs);

void quant_encode_cuda(int bits, int64_t block, DType dtype, DType residual_dtype, const void* bucket,
                       const int64_t* table, int64_t world, int64_t slots, uint8_t* send, codec::Rounding rounding,
                       int device, intptr_t stream);
void quant_reduce_cuda(int bits, int64_t block, DType residual_dtype, const uint8_t* recv, const int64_t* my_rows,
                       int64_t world, int64_t slots, uint8_t* slice, codec::Rounding rounding, int device,
                       intptr_t stream);
void quant_decode_cuda(int bits, int64_t block, DType dtype, const uint8_t* gathered, const int64_t* table,
                       int64_t world, int64_t slots, void* bucket, int device, intptr_t stream);

// Top-k on CUDA needs scratch memory the caller allocates (the caching allocator's):
// topk_workspace_bytes(P, tiles) bytes, tiles = the sum over rows of sparse_tiles(n).
// Decoding a float16 / bfloat16 bucket also needs [n] float32 of scratch (null for float32);
// status is [2] int32 of device memory (no host sync): the count of rejected index lists, and
// 1 if the decode wrote NaN. The table and `tiles` are trusted on CUDA (as residual
// addresses are on both backends): they must come from layout.build_sparse_table.
int64_t topk_workspace_bytes(int64_t rows, int64_t tiles);
void topk_encode_cuda(DType dtype, DType wire, bool approx, const void* bucket, const int64_t* table, int64_t rows,
                      int64_t tiles, int64_t pairs, uint8_t* payload, void* workspace, int device, intptr_t stream);
void topk_decode_cuda(DType dtype, DType wire, const uint8_t* gathered, const int64_t* table, int64_t rows,
                      int64_t pairs, int64_t world, void* bucket, float* scratch, int32_t* status, int device,
                      intptr_t stream);
void randomk_encode_cuda(DType dtype, const void* bucket, const int64_t* table, int64_t rows, int64_t pairs,
                         uint64_t seed, uint64_t step, float* payload, int device, intptr_t stream);
void randomk_decode_cuda(DType dtype, const float* reduced, const int64_t* table, int64_t rows, int64_t world,
                         uint64_t seed, uint64_t step, void* bucket, int device, intptr_t stream);

}  // namespace gradcomp
