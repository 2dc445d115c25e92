// What a CUDA build needs of the NVIDIA driver, in words a user can act on. Plain C++ (no
// CUDA headers), compiled in every build, so the CPU tests check the messages too.
#include <string>

#include "../gradcomp.h"

namespace gradcomp {
namespace {

std::string cuda_name(int version) {  // 12090 -> "12.9"
  return std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10);
}

// The oldest Linux driver of each CUDA major release: with it, a build of any minor release
// of that major runs (minor-version compatibility), as long as no PTX must be JIT-compiled.
const char* min_linux_driver(int major) {
  switch (major) {
    case 11:
      return "R450 (450.80.02)";
    case 12:
      return "R525 (525.60.13)";
    case 13:
      return "R580 (580.65.06)";
    default:
      return nullptr;
  }
}

}  // namespace

std::string cuda_driver_problem(int driver_version, int runtime_version) {
  const std::string built = "gradcomp's CUDA backend was built with CUDA " + cuda_name(runtime_version);
  const char* need = min_linux_driver(runtime_version / 1000);
  const std::string needs = std::string(", which needs an NVIDIA driver for CUDA ") +
                            std::to_string(runtime_version / 1000) + ".x" + (need ? std::string(", ") + need : "") +
                            " or newer";
  const std::string fixes =
      ". Update the driver, or install a gradcomp built with an older CUDA (the release wheels use CUDA 12.9, which "
      "runs on R525 and newer), or build gradcomp from source with the CUDA toolkit your driver supports.";
  if (driver_version <= 0)  // most often a machine without a GPU: nothing to update
    return "no NVIDIA driver was found (libcuda.so.1 did not load); " + built + needs +
           " and a GPU. The CPU backend works without either.";
  if (driver_version / 1000 < runtime_version / 1000)
    return "the NVIDIA driver supports CUDA " + cuda_name(driver_version) + "; " + built + needs + fixes;
  return "";
}

std::string cuda_ptx_problem(int driver_version, int runtime_version, int major, int minor, const std::string& archs) {
  return "this GPU (compute capability " + std::to_string(major) + "." + std::to_string(minor) +
         ") has no compiled gradcomp kernels (built for " + (archs.empty() ? "none" : archs) +
         ") and must JIT-compile their PTX, which needs a driver for CUDA " + cuda_name(runtime_version) +
         " or newer; this driver supports CUDA " + cuda_name(driver_version) +
         ". Update the driver, or build gradcomp from source for this GPU (CMAKE_CUDA_ARCHITECTURES).";
}

std::string cuda_arch_problem(int major, int minor, const std::string& archs) {
  return "gradcomp has no kernels for this GPU (compute capability " + std::to_string(major) + "." +
         std::to_string(minor) + "): it was built for " + (archs.empty() ? "none" : archs) +
         ". Build gradcomp from source for this GPU (CMAKE_CUDA_ARCHITECTURES).";
}

}  // namespace gradcomp
