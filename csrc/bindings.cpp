// The only file that knows Python. Pointers arrive as integers (already validated by
// gradcomp/ops.py); native work runs with the GIL released.
#include <pybind11/pybind11.h>

#include <string>

#include "cpu/isa.h"
#include "cpu/parallel.h"
#include "gradcomp.h"

namespace py = pybind11;
using namespace gradcomp;

namespace {

template <class T>
T* ptr(intptr_t p) {
  return reinterpret_cast<T*>(p);
}

DType to_dtype(int code) {
  if (code < 0 || code > 2) throw std::invalid_argument("gradcomp: bad dtype code " + std::to_string(code));
  return static_cast<DType>(code);
}

// (seed, step, rank, stochastic) from Python: codec.h's Rounding.
codec::Rounding to_rounding(uint64_t seed, uint64_t step, uint32_t rank, bool stochastic) {
  return codec::Rounding{seed, step, rank, stochastic ? 1u : 0u};
}

std::string compiler_name() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
         std::to_string(__GNUC_PATCHLEVEL__);
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "gradcomp's compiled core (torch-free): codecs over raw pointers";
  using release = py::call_guard<py::gil_scoped_release>;

  m.def("build_info", []() {
    py::dict d;
    d["version"] = GRADCOMP_VERSION;
    d["cuda_compiled"] = cuda_compiled();
    d["cuda_version"] = cuda_runtime_version();
    d["cuda_archs"] = cuda_archs();
    // Found at run time, not linked: the runtime torch loaded, "" before torch is imported
    d["openmp_runtime"] = std::string(parallel::runtime_path());
    d["compiler"] = compiler_name();
    d["cpu_isa"] = cpu_isa();
    return d;
  });
  m.def("cpu_isa", []() { return std::string(cpu_isa()); });
  m.def(
      "set_cpu_isa", [](const std::string& name) { return set_cpu_isa(name.c_str()); },
      "Chooses the CPU kernels: 'auto', 'avx2' or 'baseline' (the same bits either way). False, changing "
      "nothing, for a name this build or processor cannot run.");
  m.def("cuda_device_count", &cuda_device_count);
  m.def("cuda_driver_version", &cuda_driver_version, "cudaDriverGetVersion (e.g. 12040); 0 without a driver");
  m.def("cuda_problem", &cuda_problem, "Why the CUDA backend cannot run on this driver, or ''");
  // The messages' logic, for the tests (a real old driver is rarely at hand)
  m.def("_cuda_driver_problem", &cuda_driver_problem);
  m.def("_cuda_ptx_problem", &cuda_ptx_problem);
  m.def("_cuda_arch_problem", &cuda_arch_problem);

  m.def(
      "quant_encode_cpu",
      [](int bits, int64_t block, int dtype, int residual_dtype, intptr_t bucket, intptr_t table, int64_t world,
         int64_t slots, intptr_t send, uint64_t seed, uint64_t step, uint32_t rank, bool stochastic, int threads) {
        quant_encode_cpu(bits, block, to_dtype(dtype), to_dtype(residual_dtype), ptr<const void>(bucket),
                         ptr<const int64_t>(table), world, slots, ptr<uint8_t>(send),
                         to_rounding(seed, step, rank, stochastic), threads);
      },
      release());
  m.def(
      "quant_reduce_cpu",
      [](int bits, int64_t block, int residual_dtype, intptr_t recv, intptr_t my_rows, int64_t world, int64_t slots,
         intptr_t slice, uint64_t seed, uint64_t step, uint32_t rank, bool stochastic, int threads) {
        quant_reduce_cpu(bits, block, to_dtype(residual_dtype), ptr<const uint8_t>(recv), ptr<const int64_t>(my_rows),
                         world, slots, ptr<uint8_t>(slice), to_rounding(seed, step, rank, stochastic), threads);
      },
      release());
  m.def(
      "quant_decode_cpu",
      [](int bits, int64_t block, int dtype, intptr_t gathered, intptr_t table, int64_t world, int64_t slots,
         intptr_t bucket, int threads) {
        quant_decode_cpu(bits, block, to_dtype(dtype), ptr<const uint8_t>(gathered), ptr<const int64_t>(table), world,
                         slots, ptr<void>(bucket), threads);
      },
      release());

  m.def(
      "quant_encode_cuda",
      [](int bits, int64_t block, int dtype, int residual_dtype, intptr_t bucket, intptr_t table, int64_t world,
         int64_t slots, intptr_t send, uint64_t seed, uint64_t step, uint32_t rank, bool stochastic, int device,
         intptr_t stream) {
        quant_encode_cuda(bits, block, to_dtype(dtype), to_dtype(residual_dtype), ptr<const void>(bucket),
                          ptr<const int64_t>(table), world, slots, ptr<uint8_t>(send),
                          to_rounding(seed, step, rank, stochastic), device, stream);
      },
      release());
  m.def(
      "quant_reduce_cuda",
      [](int bits, int64_t block, int residual_dtype, intptr_t recv, intptr_t my_rows, int64_t world, int64_t slots,
         intptr_t slice, uint64_t seed, uint64_t step, uint32_t rank, bool stochastic, int device, intptr_t stream) {
        quant_reduce_cuda(bits, block, to_dtype(residual_dtype), ptr<const uint8_t>(recv), ptr<const int64_t>(my_rows),
                          world, slots, ptr<uint8_t>(slice), to_rounding(seed, step, rank, stochastic), device, stream);
      },
      release());
  m.def(
      "quant_decode_cuda",
      [](int bits, int64_t block, int dtype, intptr_t gathered, intptr_t table, int64_t world, int64_t slots,
         intptr_t bucket, int device, intptr_t stream) {
        quant_decode_cuda(bits, block, to_dtype(dtype), ptr<const uint8_t>(gathered), ptr<const int64_t>(table), world,
                          slots, ptr<void>(bucket), device, stream);
      },
      release());

  // ---- top-k and random-k (wire: the values' dtype code)
  m.def(
      "topk_encode_cpu",
      [](int dtype, int wire, bool approx, intptr_t bucket, intptr_t table, int64_t rows, int64_t pairs,
         intptr_t payload, int threads) {
        topk_encode_cpu(to_dtype(dtype), to_dtype(wire), approx, ptr<const void>(bucket), ptr<const int64_t>(table),
                        rows, pairs, ptr<uint8_t>(payload), threads);
      },
      release());
  m.def(
      "topk_decode_cpu",
      [](int dtype, int wire, intptr_t gathered, intptr_t table, int64_t rows, int64_t pairs, int64_t world,
         intptr_t bucket, int threads) {
        return topk_decode_cpu(to_dtype(dtype), to_dtype(wire), ptr<const uint8_t>(gathered), ptr<const int64_t>(table),
                               rows, pairs, world, ptr<void>(bucket), threads);
      },
      release());
  m.def(
      "randomk_encode_cpu",
      [](int dtype, intptr_t bucket, intptr_t table, int64_t rows, int64_t pairs, uint64_t seed, uint64_t step,
         intptr_t payload, int threads) {
        randomk_encode_cpu(to_dtype(dtype), ptr<const void>(bucket), ptr<const int64_t>(table), rows, pairs, seed, step,
                           ptr<float>(payload), threads);
      },
      release());
  m.def(
      "randomk_decode_cpu",
      [](int dtype, intptr_t reduced, intptr_t table, int64_t rows, int64_t world, uint64_t seed, uint64_t step,
         intptr_t bucket, int threads) {
        randomk_decode_cpu(to_dtype(dtype), ptr<const float>(reduced), ptr<const int64_t>(table), rows, world, seed,
                           step, ptr<void>(bucket), threads);
      },
      release());
  m.def("topk_workspace_bytes", &topk_workspace_bytes);
  m.def(
      "topk_encode_cuda",
      [](int dtype, int wire, bool approx, intptr_t bucket, intptr_t table, int64_t rows, int64_t tiles, int64_t pairs,
         intptr_t payload, intptr_t workspace, int device, intptr_t stream) {
        topk_encode_cuda(to_dtype(dtype), to_dtype(wire), approx, ptr<const void>(bucket), ptr<const int64_t>(table),
                         rows, tiles, pairs, ptr<uint8_t>(payload), ptr<void>(workspace), device, stream);
      },
      release());
  m.def(
      "topk_decode_cuda",
      [](int dtype, int wire, intptr_t gathered, intptr_t table, int64_t rows, int64_t pairs, int64_t world,
         intptr_t bucket, intptr_t scratch, intptr_t status, int device, intptr_t stream) {
        topk_decode_cuda(to_dtype(dtype), to_dtype(wire), ptr<const uint8_t>(gathered), ptr<const int64_t>(table), rows,
                         pairs, world, ptr<void>(bucket), ptr<float>(scratch), ptr<int32_t>(status), device, stream);
      },
      release());
  m.def(
      "randomk_encode_cuda",
      [](int dtype, intptr_t bucket, intptr_t table, int64_t rows, int64_t pairs, uint64_t seed, uint64_t step,
         intptr_t payload, int device, intptr_t stream) {
        randomk_encode_cuda(to_dtype(dtype), ptr<const void>(bucket), ptr<const int64_t>(table), rows, pairs, seed,
                            step, ptr<float>(payload), device, stream);
      },
      release());
  m.def(
      "randomk_decode_cuda",
      [](int dtype, intptr_t reduced, intptr_t table, int64_t rows, int64_t world, uint64_t seed, uint64_t step,
         intptr_t bucket, int device, intptr_t stream) {
        randomk_decode_cuda(to_dtype(dtype), ptr<const float>(reduced), ptr<const int64_t>(table), rows, world, seed,
                            step, ptr<void>(bucket), device, stream);
      },
      release());
  m.def("topk_payload_bytes",
        [](int64_t pairs, int value_bytes) { return codec::topk_payload_bytes(pairs, value_bytes); });

  m.def("shard_bytes", [](int64_t slots, int64_t block, int bits) { return codec::shard_bytes(slots, block, bits); });

  // The format's constants, for Python to use rather than copy (ops.py, layout.py).
  py::dict constants;
  constants["row_words"] = codec::kRowWords;
  constants["sparse_row_words"] = codec::kSparseRowWords;
  constants["sparse_tile"] = codec::kSparseTile;
  constants["noise_offset_bits"] = codec::kNoiseOffsetBits;
  constants["randomk_header"] = codec::kRandomKHeader;
  constants["shard_header_bytes"] = codec::kHeaderBytes;
  constants["min_block"] = codec::kMinBlock;
  constants["max_block"] = codec::kMaxBlock;
  constants["payload_align"] = codec::kPayloadAlign;
  m.attr("constants") = constants;
}
