#!/usr/bin/env bash
# cibuildwheel's before-all, inside a manylinux_2_28 container (AlmaLinux 8, x86_64 or
# aarch64): installs the parts of the CUDA toolkit gradcomp builds with (nvcc, the runtime's
# static library and headers, CCCL) from NVIDIA's RHEL 8 repository, and GCC 14 as nvcc's
# host compiler (CUDA 12.9 accepts GCC up to 14; the image's default toolset may be newer).
# Usage: install_cuda_manylinux.sh [CUDA version, default 12.9]
set -euo pipefail
version=${1:-12.9}
case "$(uname -m)" in
  x86_64) repo=x86_64 ;;
  aarch64) repo=sbsa ;;  # server ARM (Grace, Graviton, Ampere); not Jetson
  *) echo "install_cuda_manylinux.sh: no CUDA repository for $(uname -m)" >&2; exit 1 ;;
esac
dnf install -y dnf-plugins-core
dnf config-manager --add-repo "https://developer.download.nvidia.com/compute/cuda/repos/rhel8/$repo/cuda-rhel8.repo"
v=${version/./-}
dnf install -y "cuda-nvcc-$v" "cuda-cudart-devel-$v" "cuda-cccl-$v" gcc-toolset-14-gcc-c++
"/usr/local/cuda-$version/bin/nvcc" --version
/opt/rh/gcc-toolset-14/root/usr/bin/g++ --version | head -n 1
