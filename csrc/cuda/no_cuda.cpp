// Stand-ins for the CUDA backend when the module is built without a CUDA compiler.
#include <stdexcept>

#include "../gradcomp.h"

namespace gradcomp {

namespace {
[[noreturn]] void no_cuda() {
  throw std::runtime_error("gradcomp was built without CUDA: rebuild with a CUDA compiler (GRADCOMP_CUDA=ON)");
}
}  // namespace

bool cuda_compiled() { return false; }
int cuda_device_count() { return 0; }
std::string cuda_archs() { return ""; }
int cuda_runtime_version() { return 0; }
int cuda_driver_version() { return 0; }
std::string cuda_problem() { return "gradcomp was built without CUDA"; }

void quant_encode_cuda(int, int64_t, DType, DType, const void*, const int64_t*, int64_t, int64_t, uint8_t*,
                       codec::Rounding, int, intptr_t) {
  no_cuda();
}
void quant_reduce_cuda(int, int64_t, DType, const uint8_t*, const int64_t*, int64_t, int64_t, uint8_t*, codec::Rounding,
                       int, intptr_t) {
  no_cuda();
}
void quant_decode_cuda(int, int64_t, DType, const uint8_t*, const int64_t*, int64_t, int64_t, void*, int, intptr_t) {
  no_cuda();
}

int64_t topk_workspace_bytes(int64_t, int64_t) { return 0; }
void topk_encode_cuda(DType, DType, bool, const void*, const int64_t*, int64_t, int64_t, int64_t, uint8_t*, void*, int,
                      intptr_t) {
  no_cuda();
}
void topk_decode_cuda(DType, DType, const uint8_t*, const int64_t*, int64_t, int64_t, int64_t, void*, float*, int32_t*,
                      int, intptr_t) {
  no_cuda();
}
void randomk_encode_cuda(DType, const void*, const int64_t*, int64_t, int64_t, uint64_t, uint64_t, float*, int,
                         intptr_t) {
  no_cuda();
}
void randomk_decode_cuda(DType, const float*, const int64_t*, int64_t, int64_t, uint64_t, uint64_t, void*, int,
                         intptr_t) {
  no_cuda();
}

}  // namespace gradcomp
