// The host emulation's runtime (cuda_runtime.h says the model): fibers for a CTA's threads,
// the scheduler that meets them at barriers and warp intrinsics, streams as queues, and the
// host API the kernels' launchers call.
#include <cxxabi.h>
#include <elf.h>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <random>
#include <vector>

#include "cuda_runtime.h"

#if defined(__SANITIZE_ADDRESS__)
#define GCEMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define GCEMU_ASAN 1
#endif
#endif
#if defined(GCEMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

// ---------------------------------------------------------------- context switch
#if defined(__x86_64__)
// Saves the callee-saved registers, the SSE and x87 control words and the stack pointer in
// *save, and resumes the context whose stack pointer is `to` (System V: the rest is the
// caller's to save). A new context's stack is laid out as this would leave it (new_context).
extern "C" void gcemu_switch(void** save, void* to);
asm(R"(
  .text
  .p2align 4
  .globl gcemu_switch
  .type gcemu_switch, @function
gcemu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size gcemu_switch, .-gcemu_switch

  .p2align 4
  .globl gcemu_fiber_start
  .type gcemu_fiber_start, @function
gcemu_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size gcemu_fiber_start, .-gcemu_fiber_start
)");
extern "C" void gcemu_fiber_start();
#endif

namespace gcemu {

Thread* g_thread = nullptr;
uint3 g_block_idx{0, 0, 0};
dim3 g_block_dim, g_grid_dim;

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;

enum class State { Ready, AtBarrier, AtWarp, Done };

struct Fiber {
  Thread t;
  State state = State::Ready;
  // a warp meeting: what this lane brought, and then what it takes away
  WarpOp op = WarpOp::Sync;
  unsigned mask = 0;
  uint64_t bits = 0;
  int bytes = 0, arg = 0;
  uint64_t result = 0;
  char* stack = nullptr;  // [kStackBytes], lowest address; a guard page below it
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  void* fake_stack = nullptr;  // ASan's, across a switch
};

struct Cta {
  std::vector<Fiber> fibers;
  int count = 0;
  const std::function<void()>* body = nullptr;
  const char* kernel = "";
#if defined(__x86_64__)
  void* sched_sp = nullptr;
#else
  ucontext_t sched_ctx;
#endif
  const void* sched_bottom = nullptr;  // the scheduler's stack, for ASan
  size_t sched_size = 0;
  void* sched_fake = nullptr;
};

Cta g_cta;
cudaError_t g_last_error = cudaSuccess;
int g_device = 0;
std::mt19937_64 g_order_rng(0x6772616463ull);

std::string where() {
  std::string s = std::string("kernel ") + g_cta.kernel + ", block (" + std::to_string(g_block_idx.x) + "," +
                  std::to_string(g_block_idx.y) + "," + std::to_string(g_block_idx.z) + ")";
  if (g_thread)
    s += ", thread (" + std::to_string(g_thread->idx.x) + "," + std::to_string(g_thread->idx.y) + "," +
         std::to_string(g_thread->idx.z) + ") warp " + std::to_string(g_thread->warp) + " lane " +
         std::to_string(g_thread->lane);
  return s;
}

void start_switch(void** fake_save, const void* bottom, size_t size) {
#if defined(GCEMU_ASAN)
  __sanitizer_start_switch_fiber(fake_save, bottom, size);
#else
  (void)fake_save, (void)bottom, (void)size;
#endif
}

void finish_switch(void* fake, const void** bottom_old, size_t* size_old) {
#if defined(GCEMU_ASAN)
  __sanitizer_finish_switch_fiber(fake, bottom_old, size_old);
#else
  (void)fake, (void)bottom_old, (void)size_old;
#endif
}

Fiber& current() { return *reinterpret_cast<Fiber*>(g_thread); }  // Thread is Fiber's first member

// From a fiber back to the scheduler; returns when the scheduler resumes this fiber.
void yield_to_scheduler() {
  Fiber& f = current();
  start_switch(&f.fake_stack, g_cta.sched_bottom, g_cta.sched_size);
#if defined(__x86_64__)
  gcemu_switch(&f.sp, g_cta.sched_sp);
#else
  swapcontext(&f.ctx, &g_cta.sched_ctx);
#endif
  finish_switch(f.fake_stack, nullptr, nullptr);
}

void fiber_main(Fiber* f) {
  finish_switch(nullptr, &g_cta.sched_bottom, &g_cta.sched_size);
  (*g_cta.body)();
  f->state = State::Done;
  start_switch(nullptr, g_cta.sched_bottom, g_cta.sched_size);  // this fiber's stack is done with
#if defined(__x86_64__)
  static void* unused;  // static: no frame of this fiber's is left poisoned for the next one on this stack
  gcemu_switch(&unused, g_cta.sched_sp);
#else
  setcontext(&g_cta.sched_ctx);
#endif
  __builtin_unreachable();
}

#if !defined(__x86_64__)
void fiber_entry_ucontext(unsigned hi, unsigned lo) {
  fiber_main(reinterpret_cast<Fiber*>((static_cast<uintptr_t>(hi) << 32) | lo));
}
#endif

char* new_stack() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* p =
      mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) fail("cannot map a fiber stack");
  mprotect(p, page, PROT_NONE);  // a stack overflow faults instead of writing into the next stack
  return static_cast<char*>(p) + page;
}

void new_context(Fiber& f) {
  if (!f.stack) f.stack = new_stack();
#if defined(__x86_64__)
  // What gcemu_switch pops: control words, r15, r14, r13, r12, rbx, rbp, then the return
  // address; gcemu_fiber_start then calls r13(r12) with the stack 16-byte aligned.
  auto* top = reinterpret_cast<uint64_t*>(f.stack + kStackBytes);
  uint64_t* sp = top - 2 - 8;  // 16-byte aligned once the return address is popped
  uint32_t mxcsr;
  uint16_t fcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fcw));
  sp[0] = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fcw) << 32);
  sp[1] = 0;                                        // r15
  sp[2] = 0;                                        // r14
  sp[3] = reinterpret_cast<uint64_t>(&fiber_main);  // r13
  sp[4] = reinterpret_cast<uint64_t>(&f);           // r12
  sp[5] = 0;                                        // rbx
  sp[6] = 0;                                        // rbp
  sp[7] = reinterpret_cast<uint64_t>(&gcemu_fiber_start);
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  const auto addr = reinterpret_cast<uintptr_t>(&f);
  makecontext(&f.ctx, reinterpret_cast<void (*)()>(&fiber_entry_ucontext), 2, static_cast<unsigned>(addr >> 32),
              static_cast<unsigned>(addr));
#endif
}

void resume(Fiber& f) {
  g_thread = &f.t;
  start_switch(&g_cta.sched_fake, f.stack, kStackBytes);
#if defined(__x86_64__)
  gcemu_switch(&g_cta.sched_sp, f.sp);
#else
  swapcontext(&g_cta.sched_ctx, &f.ctx);
#endif
  finish_switch(g_cta.sched_fake, nullptr, nullptr);
  g_thread = nullptr;
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::ShflXor:
      return "__shfl_xor_sync";
    case WarpOp::ShflUp:
      return "__shfl_up_sync";
    case WarpOp::ShflDown:
      return "__shfl_down_sync";
    case WarpOp::ShflIdx:
      return "__shfl_sync";
    case WarpOp::Ballot:
      return "__ballot_sync";
    case WarpOp::Any:
      return "__any_sync";
    case WarpOp::All:
      return "__all_sync";
    case WarpOp::Sync:
      return "__syncwarp";
  }
  return "?";
}

std::string hex(unsigned v) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", v);
  return b;
}

// Lane `lane` of warp `warp`, or null past the block's last thread.
Fiber* lane_fiber(int warp, int lane) {
  const int i = warp * 32 + lane;
  return i < g_cta.count ? &g_cta.fibers[i] : nullptr;
}

[[noreturn]] void fail_at(Fiber& f, const std::string& what) {
  g_thread = &f.t;
  fail(what);
}

// Completes the meetings of warp `warp` whose lanes have all arrived. Returns whether any did.
bool complete_warp(int warp) {
  bool any = false;
  for (int lane = 0; lane < 32; ++lane) {
    Fiber* f = lane_fiber(warp, lane);
    if (!f || f->state != State::AtWarp) continue;
    const unsigned mask = f->mask;
    bool all_here = true;
    for (int j = 0; j < 32; ++j) {
      if (!(mask >> j & 1u)) continue;
      Fiber* g = lane_fiber(warp, j);
      if (!g || g->state == State::Done)
        fail_at(*f, std::string(op_name(f->op)) + " with mask " + hex(mask) + " names lane " + std::to_string(j) +
                        ", which " + (g ? "has exited" : "does not exist in this block"));
      if (g->state != State::AtWarp) {
        all_here = false;
        continue;
      }
      if (g->op != f->op || g->mask != mask || g->bytes != f->bytes)
        fail_at(*f, std::string("lanes of one warp meet at different warp intrinsics: lane ") + std::to_string(lane) +
                        " at " + op_name(f->op) + " (mask " + hex(mask) + ", " + std::to_string(f->bytes) +
                        " bytes), lane " + std::to_string(j) + " at " + op_name(g->op) + " (mask " + hex(g->mask) +
                        ", " + std::to_string(g->bytes) + " bytes)");
    }
    if (!all_here) continue;
    uint64_t votes = 0;
    for (int j = 0; j < 32; ++j)
      if (mask >> j & 1u) votes |= (lane_fiber(warp, j)->bits != 0 ? 1ull : 0ull) << j;
    for (int j = 0; j < 32; ++j) {
      if (!(mask >> j & 1u)) continue;
      Fiber& g = *lane_fiber(warp, j);
      // PTX shfl.sync: the lane or offset is b[4:0]; a source past the warp is the lane itself
      const int b = g.arg & 31;
      int src = -1;
      switch (g.op) {
        case WarpOp::ShflXor:
          src = j ^ b;
          break;
        case WarpOp::ShflUp:
          src = j - b < 0 ? j : j - b;
          break;
        case WarpOp::ShflDown:
          src = j + b > 31 ? j : j + b;
          break;
        case WarpOp::ShflIdx:
          src = b;
          break;
        case WarpOp::Ballot:
          g.result = votes;
          break;
        case WarpOp::Any:
          g.result = votes != 0;
          break;
        case WarpOp::All:
          g.result = votes == mask;
          break;
        case WarpOp::Sync:
          g.result = 0;
          break;
      }
      if (src >= 0) {
        if (!(mask >> src & 1u))
          fail_at(g, std::string(op_name(g.op)) + " reads lane " + std::to_string(src) + ", outside the mask " +
                         hex(mask) + " (its value is undefined)");
        g.result = lane_fiber(warp, src)->bits;
      }
    }
    for (int j = 0; j < 32; ++j)
      if (mask >> j & 1u) lane_fiber(warp, j)->state = State::Ready;
    any = true;
  }
  return any;
}

std::string states() {
  std::string s;
  for (int i = 0; i < g_cta.count && s.size() < 2000; ++i) {
    const Fiber& f = g_cta.fibers[i];
    if (f.state == State::AtWarp)
      s += " thread " + std::to_string(i) + " at " + op_name(f.op) + " mask " + hex(f.mask) + ";";
    else if (f.state == State::AtBarrier)
      s += " thread " + std::to_string(i) + " at __syncthreads;";
  }
  return s;
}

void run_cta(std::vector<int>& order) {
  for (;;) {
    std::shuffle(order.begin(), order.end(), g_order_rng);
    for (int i : order)
      if (g_cta.fibers[i].state == State::Ready) resume(g_cta.fibers[i]);
    int done = 0, at_barrier = 0, ready = 0;
    for (int i = 0; i < g_cta.count; ++i) {
      done += g_cta.fibers[i].state == State::Done;
      at_barrier += g_cta.fibers[i].state == State::AtBarrier;
      ready += g_cta.fibers[i].state == State::Ready;  // yielded at an atomic
    }
    if (done == g_cta.count) return;
    bool progressed = ready > 0;
    for (int w = 0; w * 32 < g_cta.count; ++w) progressed |= complete_warp(w);
    if (progressed) continue;
    if (at_barrier == g_cta.count - done) {
      if (done > 0)
        fail("__syncthreads waits for " + std::to_string(done) + " of the block's " + std::to_string(g_cta.count) +
             " threads, which have exited (a barrier in divergent code):" + states());
      for (int i = 0; i < g_cta.count; ++i) g_cta.fibers[i].state = State::Ready;
      continue;
    }
    fail("deadlock: every thread of the block waits and no barrier or warp meeting can complete:" + states());
  }
}

// __shared__ variables are function-local statics of the kernels and device functions, all
// in gradcomp's anonymous namespaces (GCC ignores a section attribute on a template's
// statics, so they cannot be gathered at link time): found once in this executable's symbol
// table by their mangled prefix, then poisoned before every CTA.
constexpr char kSharedPrefix[] = "_ZZN8gradcomp12_GLOBAL__N_1";

struct Range {
  char* p;
  size_t n;
  std::string name;  // mangled
};

int main_program_bias(struct dl_phdr_info* info, size_t, void* out) {
  *static_cast<uintptr_t*>(out) = info->dlpi_addr;
  return 1;  // the first object is the executable
}

std::vector<Range> find_shared() {
  std::vector<Range> found;
  FILE* f = std::fopen("/proc/self/exe", "rb");
  if (!f) fail("cannot read /proc/self/exe for the __shared__ variables");
  std::vector<char> elf;
  char buf[1 << 16];
  for (size_t r; (r = std::fread(buf, 1, sizeof buf, f)) > 0;) elf.insert(elf.end(), buf, buf + r);
  std::fclose(f);
  if (elf.size() < sizeof(Elf64_Ehdr)) fail("bad executable");
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(elf.data());
  const auto* sh = reinterpret_cast<const Elf64_Shdr*>(elf.data() + eh->e_shoff);
  uintptr_t bias = 0;
  dl_iterate_phdr(&main_program_bias, &bias);
  for (int i = 0; i < eh->e_shnum; ++i) {
    if (sh[i].sh_type != SHT_SYMTAB) continue;
    const char* names = elf.data() + sh[sh[i].sh_link].sh_offset;
    const auto* sym = reinterpret_cast<const Elf64_Sym*>(elf.data() + sh[i].sh_offset);
    const size_t count = sh[i].sh_size / sizeof(Elf64_Sym);
    for (size_t k = 0; k < count; ++k) {
      if (ELF64_ST_TYPE(sym[k].st_info) != STT_OBJECT || sym[k].st_size == 0) continue;
      if (std::strncmp(names + sym[k].st_name, kSharedPrefix, sizeof kSharedPrefix - 1) != 0) continue;
      found.push_back({reinterpret_cast<char*>(bias + sym[k].st_value), static_cast<size_t>(sym[k].st_size),
                       names + sym[k].st_name});
    }
  }
  return found;
}

const std::vector<Range>& shared_ranges() {
  static const std::vector<Range> ranges = find_shared();
  return ranges;
}

// 0xFF (a NaN float, an all-ones integer) or 0xA7 (a tiny negative float, a large integer),
// chosen per CTA: no reduction's identity absorbs both.
void poison_shared() {
  const int byte = (g_order_rng() & 1u) ? 0xFF : 0xA7;
  for (const Range& r : shared_ranges()) std::memset(r.p, byte, r.n);
}

// Streams (a handle is only a key; 0 is the legacy default stream, which waits for all
// others and they for it).
std::map<cudaStream_t, std::deque<std::function<void()>>> g_streams;

void drain(cudaStream_t s) {
  auto it = g_streams.find(s);
  if (it == g_streams.end()) return;
  while (!it->second.empty()) {
    auto work = std::move(it->second.front());
    it->second.pop_front();
    work();
  }
}

void drain_all() {
  for (auto& kv : g_streams) drain(kv.first);
}

}  // namespace

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "gradcomp CUDA emulator: %s (%s)\n", what.c_str(), where().c_str());
  std::fflush(stderr);
  std::_Exit(3);
}

uint64_t warp_meet(WarpOp op, unsigned mask, uint64_t bits, int bytes, int arg, int width) {
  if (!g_thread) fail(std::string(op_name(op)) + " called outside a kernel");
  Fiber& f = current();
  if (width != 32) fail(std::string(op_name(op)) + " with width " + std::to_string(width) + ": not emulated");
  if (!(mask >> f.t.lane & 1u))
    fail(std::string(op_name(op)) + " with mask " + hex(mask) + " that lacks the calling lane");
  f.op = op;
  f.mask = mask;
  f.bits = bits;
  f.bytes = bytes;
  f.arg = arg;
  f.state = State::AtWarp;
  yield_to_scheduler();
  return f.result;
}

void maybe_yield() {
  // Half the time: other threads of the block run before this one goes on, so code that
  // assumes an order between a barrier's or meeting's neighbours sees another one.
  if (!g_thread || !(g_order_rng() & 1u)) return;
  current().state = State::Ready;
  yield_to_scheduler();
}

void syncthreads() {
  if (!g_thread) fail("__syncthreads called outside a kernel");
  current().state = State::AtBarrier;
  yield_to_scheduler();
}

void set_last_error(cudaError_t e) { g_last_error = e; }

bool valid_launch(dim3 grid, dim3 block) {
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  return grid.x >= 1 && grid.x <= 0x7fffffffu && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 && grid.z <= 65535 &&
         block.x >= 1 && block.x <= 1024 && block.y >= 1 && block.y <= 1024 && block.z >= 1 && block.z <= 64 &&
         threads <= kMaxThreads;
}

void enqueue(cudaStream_t stream, std::function<void()> work) {
  if (stream == nullptr) {
    for (auto& kv : g_streams)
      if (kv.first != nullptr) drain(kv.first);
  } else {
    drain(nullptr);
  }
  g_streams[stream].push_back(std::move(work));
}

void run_grid(const char* name, dim3 grid, dim3 block, const std::function<void()>& body) {
  if (g_thread) fail("a launch from inside a kernel (dynamic parallelism) is not emulated");
  const uint64_t ctas = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  if (ctas > (uint64_t{1} << 24)) fail("a grid of " + std::to_string(ctas) + " CTAs is too large to emulate");
  const int threads = static_cast<int>(block.x * block.y * block.z);
  g_cta.kernel = name;
  g_cta.body = &body;
  g_cta.count = threads;
  if (static_cast<int>(g_cta.fibers.size()) < threads) g_cta.fibers.resize(threads);
  g_grid_dim = grid;
  g_block_dim = block;
  // CTAs in a shuffled order, a CTA's threads resumed in a new shuffled order at every round
  // (between two synchronization points): results must not depend on either (a GPU
  // promises neither).
  std::vector<uint64_t> cta_order(ctas);
  for (uint64_t i = 0; i < ctas; ++i) cta_order[i] = i;
  std::shuffle(cta_order.begin(), cta_order.end(), g_order_rng);
  std::vector<int> thread_order(threads);
  for (int i = 0; i < threads; ++i) thread_order[i] = i;
  for (uint64_t c : cta_order) {
    g_block_idx = {static_cast<unsigned>(c % grid.x), static_cast<unsigned>(c / grid.x % grid.y),
                   static_cast<unsigned>(c / grid.x / grid.y)};
    poison_shared();
    for (int i = 0; i < threads; ++i) {
      Fiber& f = g_cta.fibers[i];
      f.t.idx = {static_cast<unsigned>(i % block.x), static_cast<unsigned>(i / block.x % block.y),
                 static_cast<unsigned>(i / block.x / block.y)};
      f.t.warp = i / 32;
      f.t.lane = i % 32;
      f.state = State::Ready;
      new_context(f);
    }
    run_cta(thread_order);
  }
  g_cta.body = nullptr;
}

void set_schedule_seed(uint64_t seed) { g_order_rng.seed(seed); }

size_t shared_bytes() {
  size_t n = 0;
  for (const Range& r : shared_ranges()) n += r.n;
  return n;
}

std::string shared_names() {
  std::string out;
  for (const Range& r : shared_ranges()) {
    int status = 0;
    char* d = abi::__cxa_demangle(r.name.c_str(), nullptr, nullptr, &status);
    out += (status == 0 && d ? d : r.name) + "\n";
    std::free(d);
  }
  return out;
}

}  // namespace gcemu

// ---------------------------------------------------------------- host API
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal";
    default:
      return "emulated CUDA error";
  }
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = gcemu::g_last_error;
  gcemu::g_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return gcemu::g_last_error; }

cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* d) {
  *d = gcemu::g_device;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) {
  if (d != 0) return gcemu::g_last_error = cudaErrorInvalidDevice;
  gcemu::g_device = d;
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrComputeCapabilityMajor ? 9 : 0;
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t stream) {
  gcemu::enqueue(stream, [p, value, bytes] { std::memset(p, value, bytes); });
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, int, cudaStream_t stream) {
  gcemu::enqueue(stream, [dst, src, bytes] { std::memmove(dst, src, bytes); });
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  if (stream == nullptr)
    gcemu::drain_all();
  else {
    gcemu::drain(nullptr);
    gcemu::drain(stream);
  }
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() {
  gcemu::drain_all();
  return cudaSuccess;
}
