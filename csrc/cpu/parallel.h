// Threads for the CPU kernels: the OpenMP runtime already in the process (the one torch
// loaded), bound at run time instead of linked. A linked libgomp would be a second OpenMP
// runtime beside torch's wherever torch ships its own under another name (its aarch64
// wheels do), with two thread pools fighting for the same cores; and a wheel would have to
// carry it. Without a runtime in the process (torch not imported, or built without
// OpenMP) the kernels run on the calling thread: slower, the same bits.
//
// Included by quant.cpp, which is compiled once per instruction set: no std:: templates
// here, whose merged copies could mix instruction sets.
#pragma once

#include <cstdint>

namespace gradcomp {
namespace parallel {

// Calls fn(ctx, index, team) once on each of `team` threads (team <= threads; the calling
// thread is index 0), or fn(ctx, 0, 1) on the calling thread when threads <= 1 or no
// runtime is bound. Returns when every call has returned.
void run(int threads, void (*fn)(void* ctx, int index, int team), void* ctx);

// The file of the bound OpenMP runtime, or "" (serial). Binds on first use: the runtime
// libtorch_cpu uses, else a loaded libgomp, libiomp or libomp that exports GOMP_parallel;
// retries while none is found.
const char* runtime_path();

// body(lo, hi) once per thread over a static split of [0, n): thread t of T takes
// [t * n / T, (t + 1) * n / T). Per-thread scratch belongs at the top of body.
template <class Body>
void for_static(int threads, int64_t n, const Body& body) {
  if (n <= 0) return;
  if (threads > n) threads = static_cast<int>(n);
  struct Ctx {
    const Body* body;
    int64_t n;
  } ctx{&body, n};
  run(
      threads,
      [](void* p, int index, int team) {
        auto* c = static_cast<Ctx*>(p);
        const int64_t lo = index * c->n / team, hi = (index + 1) * c->n / team;
        if (lo < hi) (*c->body)(lo, hi);
      },
      &ctx);
}

// body(i) for each i in [0, n), handed out one at a time (for items of uneven cost).
template <class Body>
void for_dynamic(int threads, int64_t n, const Body& body) {
  if (n <= 0) return;
  if (threads > n) threads = static_cast<int>(n);
  struct Ctx {
    const Body* body;
    int64_t n;
    int64_t next;
  } ctx{&body, n, 0};
  run(
      threads,
      [](void* p, int, int) {
        auto* c = static_cast<Ctx*>(p);
        for (int64_t i; (i = __atomic_fetch_add(&c->next, 1, __ATOMIC_RELAXED)) < c->n;) (*c->body)(i);
      },
      &ctx);
}

// *word |= bits, *word += v from any thread (static: one copy per instruction set).
static inline void atomic_or(uint32_t* word, uint32_t bits) { __atomic_fetch_or(word, bits, __ATOMIC_RELAXED); }
static inline void atomic_add(int64_t* word, int64_t v) { __atomic_fetch_add(word, v, __ATOMIC_RELAXED); }

}  // namespace parallel
}  // namespace gradcomp
