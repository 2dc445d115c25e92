#!/usr/bin/env bash
# Everything the CUDA backend needs proven, in one call on a CUDA machine: build for its
# architecture against the torch already installed (no index needed), run the GPU tests
# and the CPU suite, run compute-sanitizer on the GPU tests, and run the GPU kernel
# benchmark. Logs and results go to ${OUT:-bench/results/gpu}.
#   usage: scripts/gpu_check.sh [ARCH]      (ARCH defaults to the device's, e.g. 90)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
arch=${1:-$($PY -c 'import torch; c=torch.cuda.get_device_capability(); print(f"{c[0]}{c[1]}")')}
status=0
step() { echo; echo "=== $*"; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
$PY -c 'import torch,sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$OUT/device.txt"

step "build for sm_$arch"
t0=$(date +%s)
$PY -m pip install --no-build-isolation --no-deps --no-index -q \
  -C cmake.define.CMAKE_CUDA_ARCHITECTURES="$arch" -C cmake.define.GRADCOMP_CUDA=ON . >"$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
echo "built in $(( $(date +%s) - t0 )) s"
(cd /tmp && $PY -c 'import gradcomp; print(gradcomp.build_info(), "cuda_available:", gradcomp.cuda_available())') | tee -a "$OUT/device.txt"

step "gradcomp info"
(cd /tmp && $PY -m gradcomp info) | tee "$OUT/info.txt"

step "GPU tests"
$PY -m pytest tests/cuda/test_cuda.py -q -rA 2>&1 | tee "$OUT/test_cuda.log" | tail -15 || status=1

step "compute-sanitizer (memcheck, racecheck) on the GPU payload tests"
for tool in memcheck racecheck; do
  compute-sanitizer --tool $tool --error-exitcode 99 $PY -m pytest tests/cuda/test_cuda.py -q -x -p no:cacheprovider \
    -k "3-256-dtype0 or 4-1024-dtype1 or 4-32-dtype2 or nonfinite or ef_off or topk or randomk" \
    >"$OUT/sanitizer-$tool.log" 2>&1
  rc=$?; echo "$tool: exit $rc ($(grep -c 'ERROR SUMMARY: 0 errors' "$OUT/sanitizer-$tool.log") clean summaries)"
  grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer-$tool.log" | tail -3
  [ $rc -eq 0 ] || status=1
done

step "GPU kernel benchmark"
$PY bench/bench_kernels.py --device cuda --out "$OUT/kernels-cuda.json" 2>&1 | tee "$OUT/bench-cuda.log" || status=1

step "GPU top-k benchmark"
$PY bench/bench_sparse.py --device cuda --out "$OUT/sparse-cuda.json" 2>&1 | tee "$OUT/bench-sparse-cuda.log" || status=1

# (the emulated CUDA tests run in every CI run; here the real GPU has done their work)
step "CPU suite on this machine (fast part)"
$PY -m pytest tests -q -x -p no:cacheprovider --ignore=tests/cuda/test_cuda.py -k "not many_buckets" -m "not slow and not emulated" 2>&1 \
  | tail -5 | tee "$OUT/test_cpu.log" || status=1
exit $status
