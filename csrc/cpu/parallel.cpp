// Binds the CPU kernels' threads to the OpenMP runtime already loaded in the process
// (parallel.h says why it is not linked).
#include "parallel.h"

#include <dlfcn.h>
#include <link.h>

#include <atomic>
#include <cstring>
#include <string>
#include <vector>

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

// The three entry points as `handle` resolves them (the object and what it depends on);
// false, with the handle closed, when one is missing. The handle stays open otherwise: the
// runtime must outlive every call through it.
bool bind(void* handle, Runtime* rt) {
  if (!handle) return false;
  auto parallel = reinterpret_cast<ParallelFn>(dlsym(handle, "GOMP_parallel"));
  auto thread_num = reinterpret_cast<IntFn>(dlsym(handle, "omp_get_thread_num"));
  auto num_threads = reinterpret_cast<IntFn>(dlsym(handle, "omp_get_num_threads"));
  if (!parallel || !thread_num || !num_threads) {
    dlclose(handle);
    return false;
  }
  Dl_info where{};
  rt->parallel = parallel;
  rt->thread_num = thread_num;
  rt->num_threads = num_threads;
  rt->path = dladdr(reinterpret_cast<void*>(parallel), &where) && where.dli_fname ? where.dli_fname : "";
  return true;
}

// Collects the loaded objects named like an OpenMP runtime. Only names: dlopen inside
// dl_iterate_phdr's callback takes the loader's locks in the opposite order to a dlopen on
// another thread, and the two can deadlock.
int collect_openmp_names(dl_phdr_info* info, size_t, void* names /* std::vector<std::string>* */) {
  const char* path = info->dlpi_name;
  if (path && *path && is_openmp_name(path)) static_cast<std::vector<std::string>*>(names)->push_back(path);
  return 0;
}

// Torch's own runtime first: what libtorch_cpu resolves GOMP_parallel to (whatever its file
// is called). Else the first loaded libgomp/libiomp/libomp exporting the entry points.
// RTLD_NOLOAD throughout: only objects already in the process, never a second copy.
bool find_runtime(Runtime* rt) {
  if (bind(dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD), rt)) return true;
  std::vector<std::string> names;
  dl_iterate_phdr(collect_openmp_names, &names);
  for (const std::string& name : names)
    if (bind(dlopen(name.c_str(), RTLD_LAZY | RTLD_NOLOAD), rt)) return true;
  return false;
}

std::atomic<const Runtime*> bound{nullptr};

const Runtime* runtime() {
  if (const Runtime* rt = bound.load(std::memory_order_acquire)) return rt;
  Runtime found;
  if (!find_runtime(&found)) return nullptr;  // look again next call: torch may not be loaded yet
  auto* fresh = new Runtime(found);           // kept for the life of the process
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
