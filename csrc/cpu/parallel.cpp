// Binds the CPU kernels' threads to the OpenMP runtime already loaded in the process
// (parallel.h says why it is not linked).
#include "parallel.h"

#include <dlfcn.h>
#include <link.h>

#include <atomic>
#include <cstring>
#include <string>

namespace gradcomp {
namespace parallel {
namespace {

// libgomp's entry point for `#pragma omp parallel` (GCC's ABI; libiomp and libomp export it
// too), and the team queries.
using ParallelFn = void (*)(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);
using IntFn = int (*)();

struct Runtime {
  ParallelFn parallel = nullptr;
  IntFn thread_num = nullptr;
  IntFn num_threads = nullptr;
  std::string path;
};

bool is_openmp_name(const char* path) {
  const char* base = std::strrchr(path, '/');
  base = base ? base + 1 : path;
  for (const char* prefix : {"libgomp", "libiomp", "libomp"})
    if (std::strncmp(base, prefix, std::strlen(prefix)) == 0) return true;
  return false;
}

// The first loaded OpenMP runtime that exports the three entry points; RTLD_NOLOAD: only an
// object already in the process, never a second copy.
int visit(dl_phdr_info* info, size_t, void* out) {
  auto* rt = static_cast<Runtime*>(out);
  const char* path = info->dlpi_name;
  if (!path || !*path || !is_openmp_name(path)) return 0;
  void* handle = dlopen(path, RTLD_LAZY | RTLD_NOLOAD);
  if (!handle) return 0;
  auto parallel = reinterpret_cast<ParallelFn>(dlsym(handle, "GOMP_parallel"));
  auto thread_num = reinterpret_cast<IntFn>(dlsym(handle, "omp_get_thread_num"));
  auto num_threads = reinterpret_cast<IntFn>(dlsym(handle, "omp_get_num_threads"));
  if (!parallel || !thread_num || !num_threads) {
    dlclose(handle);
    return 0;
  }
  // The handle stays open: the runtime must outlive every call through it.
  rt->parallel = parallel;
  rt->thread_num = thread_num;
  rt->num_threads = num_threads;
  rt->path = path;
  return 1;
}

std::atomic<const Runtime*> bound{nullptr};

const Runtime* runtime() {
  if (const Runtime* rt = bound.load(std::memory_order_acquire)) return rt;
  Runtime found;
  dl_iterate_phdr(visit, &found);
  if (!found.parallel) return nullptr;  // look again next call: torch may not be loaded yet
  auto* fresh = new Runtime(found);     // kept for the life of the process
  const Runtime* expected = nullptr;
  if (!bound.compare_exchange_strong(expected, fresh, std::memory_order_acq_rel)) {
    delete fresh;  // another thread bound first (the same runtime)
    return expected;
  }
  return fresh;
}

struct Call {
  void (*fn)(void*, int, int);
  void* ctx;
  const Runtime* rt;
};

void trampoline(void* p) {
  auto* call = static_cast<Call*>(p);
  call->fn(call->ctx, call->rt->thread_num(), call->rt->num_threads());
}

}  // namespace

void run(int threads, void (*fn)(void* ctx, int index, int team), void* ctx) {
  const Runtime* rt = threads > 1 ? runtime() : nullptr;
  if (!rt) {
    fn(ctx, 0, 1);
    return;
  }
  Call call{fn, ctx, rt};
  rt->parallel(trampoline, &call, static_cast<unsigned>(threads), 0);
}

const char* runtime_path() {
  const Runtime* rt = runtime();
  return rt ? rt->path.c_str() : "";
}

}  // namespace parallel
}  // namespace gradcomp
