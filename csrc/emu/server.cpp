// The emulated CUDA backend as a process: reads calls of gradcomp.h's CUDA entry points from
// stdin, runs them on the host emulation, writes the results to stdout (tests/support/emulator.py is
// the other end; docs/emulator.md). Built with AddressSanitizer, which cannot be loaded into
// a plain Python, hence a process of its own.
//
// A call (little-endian):
//   u32 magic 'GCE1' | u32 n, op name [n] | u32 n, i64 args [n] (gradcomp.h's order; pointers
//   as the caller's addresses) | u64 schedule seed | u32 n, buffers [n]: u64 address,
//   u64 bytes, u32 misalignment (the real address mod 256), data [bytes] | u32 n, pointer
//   words [n]: u32 buffer, u64 first word, u64 stride, u64 count (int64 words of a buffer
//   that hold caller addresses: a table's residual column)
// The reply:
//   u32 magic | u32 status (0 ok; 1 std::invalid_argument, 2 another exception) | u32 n, message [n] | i64 return value
//   | u32 n, buffers [n]: u64 bytes, data [bytes] (every buffer, after the call and a device synchronization)
// The caller's addresses stand for the buffers: each is mapped to the buffer that holds it,
// so a table's residual addresses reach the emulator's copies.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "../gradcomp.h"
#include "cuda_runtime.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define GCEMU_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define GCEMU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define GCEMU_POISON(p, n) ((void)(p), (void)(n))
#define GCEMU_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

namespace gcemu {
void set_schedule_seed(uint64_t seed);
size_t shared_bytes();
std::string shared_names();  // the __shared__ variables found (demangled), one a line
int selftest(const std::string& name, int32_t* out);
}  // namespace gcemu

namespace {

constexpr uint32_t kMagic = 0x31454347u;  // "GCE1"

bool read_all(void* p, size_t n) {
  auto* b = static_cast<char*>(p);
  while (n) {
    const ssize_t r = ::read(0, b, n);
    if (r <= 0) return false;
    b += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

void write_all(const void* p, size_t n) {
  auto* b = static_cast<const char*>(p);
  while (n) {
    const ssize_t w = ::write(1, b, n);
    if (w <= 0) std::_Exit(4);
    b += w;
    n -= static_cast<size_t>(w);
  }
}

template <class T>
T get() {
  T v;
  if (!read_all(&v, sizeof v)) std::_Exit(0);  // the caller hung up
  return v;
}

template <class T>
void put(T v) {
  write_all(&v, sizeof v);
}

// A buffer at the caller's address `addr`, held at a real address with the same residue mod
// 256, in an allocation that ends where it ends (ASan reports any access past it). The bytes
// before it are poisoned where ASan can (whole 8-byte granules) and hold a canary checked
// after the call, so a write before the buffer is reported too; a read up to 7 bytes before a
// buffer that does not start 8-byte aligned goes unseen.
constexpr char kCanary = static_cast<char>(0xC3);
struct Buffer {
  uint64_t addr = 0, bytes = 0;
  uint32_t misalign = 0;
  char* alloc = nullptr;
  char* data = nullptr;
};

struct Call {
  std::string op;
  std::vector<int64_t> args;
  std::vector<Buffer> bufs;
  struct Words {
    uint32_t buf;
    uint64_t first, stride, count;
  };
  std::vector<Words> words;

  // The real address of the caller's address `a` (0 stays null).
  int64_t real(int64_t a) const {
    if (a == 0) return 0;
    const auto u = static_cast<uint64_t>(a);
    for (const Buffer& b : bufs)
      if (u >= b.addr && u <= b.addr + b.bytes) return reinterpret_cast<int64_t>(b.data + (u - b.addr));
    throw std::invalid_argument("emulator: address " + std::to_string(u) + " is in no buffer of the call");
  }
  template <class T = void>
  T* ptr(size_t i) const {
    return reinterpret_cast<T*>(real(args.at(i)));
  }
  int64_t i(size_t k) const { return args.at(k); }
  gradcomp::DType dt(size_t k) const { return static_cast<gradcomp::DType>(args.at(k)); }
  gradcomp::codec::Rounding rounding(size_t k) const {
    return {static_cast<uint64_t>(i(k)), static_cast<uint64_t>(i(k + 1)), static_cast<uint32_t>(i(k + 2)),
            i(k + 3) ? 1u : 0u};
  }
  intptr_t stream(size_t k) const { return static_cast<intptr_t>(i(k)); }
};

std::string info() {
  return "compiled=" + std::to_string(gradcomp::cuda_compiled()) + ";archs=" + gradcomp::cuda_archs() +
         ";runtime=" + std::to_string(gradcomp::cuda_runtime_version()) +
         ";driver=" + std::to_string(gradcomp::cuda_driver_version()) +
         ";devices=" + std::to_string(gradcomp::cuda_device_count()) +
         ";shared_bytes=" + std::to_string(gcemu::shared_bytes()) + ";problem=" + gradcomp::cuda_problem();
}

// Runs the call; returns the entry point's value (0 for void ones), or a message in `text`.
int64_t dispatch(const Call& c, std::string& text) {
  using namespace gradcomp;
  const std::string& op = c.op;
  if (op == "info") {
    text = info();
    return 0;
  }
  if (op == "shared_names") {
    text = gcemu::shared_names();
    return 0;
  }
  if (op == "quant_encode") {
    quant_encode_cuda(static_cast<int>(c.i(0)), c.i(1), c.dt(2), c.dt(3), c.ptr(4), c.ptr<const int64_t>(5), c.i(6),
                      c.i(7), c.ptr<uint8_t>(8), c.rounding(9), static_cast<int>(c.i(13)), c.stream(14));
    return 0;
  }
  if (op == "quant_reduce") {
    quant_reduce_cuda(static_cast<int>(c.i(0)), c.i(1), c.dt(2), c.ptr<const uint8_t>(3), c.ptr<const int64_t>(4),
                      c.i(5), c.i(6), c.ptr<uint8_t>(7), c.rounding(8), static_cast<int>(c.i(12)), c.stream(13));
    return 0;
  }
  if (op == "quant_decode") {
    quant_decode_cuda(static_cast<int>(c.i(0)), c.i(1), c.dt(2), c.ptr<const uint8_t>(3), c.ptr<const int64_t>(4),
                      c.i(5), c.i(6), c.ptr(7), static_cast<int>(c.i(8)), c.stream(9));
    return 0;
  }
  if (op.rfind("selftest:", 0) == 0) return gcemu::selftest(op.substr(9), c.ptr<int32_t>(0));
  if (op == "topk_workspace_bytes") return topk_workspace_bytes(c.i(0), c.i(1));
  if (op == "topk_encode") {
    topk_encode_cuda(c.dt(0), c.dt(1), c.i(2) != 0, c.ptr(3), c.ptr<const int64_t>(4), c.i(5), c.i(6), c.i(7),
                     c.ptr<uint8_t>(8), c.ptr(9), static_cast<int>(c.i(10)), c.stream(11));
    return 0;
  }
  if (op == "topk_decode") {
    topk_decode_cuda(c.dt(0), c.dt(1), c.ptr<const uint8_t>(2), c.ptr<const int64_t>(3), c.i(4), c.i(5), c.i(6),
                     c.ptr(7), c.ptr<float>(8), c.ptr<int32_t>(9), static_cast<int>(c.i(10)), c.stream(11));
    return 0;
  }
  if (op == "randomk_encode") {
    randomk_encode_cuda(c.dt(0), c.ptr(1), c.ptr<const int64_t>(2), c.i(3), c.i(4), static_cast<uint64_t>(c.i(5)),
                        static_cast<uint64_t>(c.i(6)), c.ptr<float>(7), static_cast<int>(c.i(8)), c.stream(9));
    return 0;
  }
  if (op == "randomk_decode") {
    randomk_decode_cuda(c.dt(0), c.ptr<const float>(1), c.ptr<const int64_t>(2), c.i(3), c.i(4),
                        static_cast<uint64_t>(c.i(5)), static_cast<uint64_t>(c.i(6)), c.ptr(7),
                        static_cast<int>(c.i(8)), c.stream(9));
    return 0;
  }
  throw std::invalid_argument("emulator: unknown op '" + op + "'");
}

}  // namespace

int main() {
  for (;;) {
    if (get<uint32_t>() != kMagic) {
      std::fprintf(stderr, "gradcomp CUDA emulator: bad request\n");
      return 2;
    }
    Call c;
    c.op.resize(get<uint32_t>());
    if (!c.op.empty() && !read_all(&c.op[0], c.op.size())) return 0;
    c.args.resize(get<uint32_t>());
    if (!c.args.empty() && !read_all(c.args.data(), 8 * c.args.size())) return 0;
    gcemu::set_schedule_seed(get<uint64_t>());
    c.bufs.resize(get<uint32_t>());
    for (Buffer& b : c.bufs) {
      b.addr = get<uint64_t>();
      b.bytes = get<uint64_t>();
      b.misalign = get<uint32_t>() % 256;
      void* p = nullptr;
      const size_t total = b.misalign + b.bytes;
      if (posix_memalign(&p, 256, total ? total : 1) != 0) return 5;
      b.alloc = static_cast<char*>(p);
      b.data = b.alloc + b.misalign;
      std::memset(b.alloc, kCanary, b.misalign);
      if (b.bytes && !read_all(b.data, b.bytes)) return 0;
      GCEMU_POISON(b.alloc, b.misalign);
      if (!b.bytes) GCEMU_POISON(b.alloc, total ? total : 1);
    }
    c.words.resize(get<uint32_t>());
    for (Call::Words& w : c.words) {
      w.buf = get<uint32_t>();
      w.first = get<uint64_t>();
      w.stride = get<uint64_t>();
      w.count = get<uint64_t>();
    }
    uint32_t status = 0;
    std::string text;
    int64_t ret = 0;
    std::vector<std::vector<int64_t>> saved;  // the caller's addresses, restored before the reply
    try {
      for (const Call::Words& w : c.words) {
        if (w.buf >= c.bufs.size()) throw std::invalid_argument("emulator: pointer words of no buffer");
        const Buffer& b = c.bufs[w.buf];
        if (w.count && (w.first + (w.count - 1) * w.stride + 1) * 8 > b.bytes)
          throw std::invalid_argument("emulator: pointer words past their buffer");
        auto* words = reinterpret_cast<int64_t*>(b.data);
        saved.emplace_back();
        for (uint64_t k = 0; k < w.count; ++k) {
          int64_t& v = words[w.first + k * w.stride];
          saved.back().push_back(v);
          v = c.real(v);
        }
      }
      ret = dispatch(c, text);
    } catch (const std::invalid_argument& e) {
      status = 1;
      text = e.what();
    } catch (const std::exception& e) {
      status = 2;
      text = e.what();
    }
    cudaDeviceSynchronize();  // whatever was queued runs before its buffers go
    for (size_t k = 0; k < saved.size(); ++k) {
      const Call::Words& w = c.words[k];
      auto* words = reinterpret_cast<int64_t*>(c.bufs[w.buf].data);
      for (uint64_t j = 0; j < saved[k].size(); ++j) {
        int64_t& v = words[w.first + j * w.stride];
        if (status == 0 && v != c.real(saved[k][j])) {
          status = 2;
          text = "emulator: the call wrote into address word " + std::to_string(w.first + j * w.stride) +
                 " of buffer " + std::to_string(w.buf);
        }
        v = saved[k][j];
      }
    }
    for (size_t k = 0; k < c.bufs.size(); ++k) {
      const Buffer& b = c.bufs[k];
      GCEMU_UNPOISON(b.alloc, b.misalign);
      for (uint32_t i = 0; i < b.misalign; ++i)
        if (b.alloc[i] != kCanary) {
          std::fprintf(stderr, "gradcomp CUDA emulator: %s wrote %u bytes before buffer %zu\n", c.op.c_str(),
                       b.misalign - i, k);
          std::_Exit(3);
        }
    }
    put<uint32_t>(kMagic);
    put<uint32_t>(status);
    put<uint32_t>(static_cast<uint32_t>(text.size()));
    write_all(text.data(), text.size());
    put<int64_t>(ret);
    put<uint32_t>(static_cast<uint32_t>(c.bufs.size()));
    for (Buffer& b : c.bufs) {
      put<uint64_t>(b.bytes);
      write_all(b.data, b.bytes);
      GCEMU_UNPOISON(b.alloc, b.misalign + b.bytes ? b.misalign + b.bytes : 1);
      std::free(b.alloc);
    }
  }
}
