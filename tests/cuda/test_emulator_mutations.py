"""Proof that the emulated tests can fail: each case copies csrc/, plants one deliberate bug
in a copy of a kernel, builds the emulator from the copy and runs the emulated tests that
should notice against it (a pytest of its own). Every mutant must make them fail.

Only the mutated translation unit is compiled again (tests/support/emulator.py caches the others
by content): about 15 s for quant.cu, 5 s for sparse.cu; two mutants build at a time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from emulator import CSRC, ROOT, build

pytestmark = [
    pytest.mark.emulated,
    pytest.mark.skipif(not (CSRC / "cuda" / "quant.cu").exists(), reason="needs the source tree (csrc/)"),
]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # under csrc/
    old: str  # must occur exactly once
    new: str
    select: str  # pytest -k of the emulated tests expected to notice


MUTATIONS = [
    # a lane left out of the warp's absmax tree: the emulator stops at the bad mask
    Mutation("wrong shuffle mask", "cuda/quant.cu",
             "m = absmax_bits_combine(m, __shfl_xor_sync(kFull, m, o));",
             "m = absmax_bits_combine(m, __shfl_xor_sync(0x7fffffffu, m, o));",
             "test_every_codec_block_and_world_matches_cpu"),
    # pass 1 reads one value past a block's valid length (the next parameter's, or past the bucket)
    Mutation("off-by-one valid length", "cuda/quant.cu",
             "    const int64_t valid = len - e;\n    load_elems<D, V>(bucket, off + e, valid, vec_x, a);",
             "    const int64_t valid = len - e + 1;\n    load_elems<D, V>(bucket, off + e, valid, vec_x, a);",
             "test_every_codec_block_and_world_matches_cpu"),
    # round to nearest and stochastic rounding swapped
    Mutation("rounding flipped", "cuda/quant.cu",
             "    if (d.stochastic)\n", "    if (!d.stochastic)\n",
             "test_every_codec_block_and_world_matches_cpu or test_stochastic_rounding_matches_cpu"),
    # pass 1 no longer flags a shard whose block is non-finite
    Mutation("non-finite flag dropped", "cuda/quant.cu",
             "if (!is_finite(bs.scale)) atomicOr(flag, 1u);", "if (!is_finite(bs.scale)) atomicOr(flag, 0u);",
             "test_non_finite_matches_cpu_and_poisons_every_output"),
    # the header zeroed by one 16-byte store, as it once was: a shard after the first starts only
    # 4-byte aligned with narrow codes of small blocks (the misaligned store the first, one-off
    # emulation found; kept here as the case that proves it stays fixed)
    Mutation("16-byte header store", "cuda/quant.cu",
             "  header[0] = header[1] = header[2] = header[3] = 0u;",
             "  (void)header;\n  *reinterpret_cast<uint4*>(shard) = make_uint4(0, 0, 0, 0);",
             "test_every_codec_block_and_world_matches_cpu or test_payloads_off_a_wide_boundary_match_cpu"),
    # the CTA scan of kept counts: one lane too few adds its neighbour
    Mutation("scan off by one lane", "cuda/sparse.cu",
             "    if (lane >= o) {", "    if (lane > o) {",
             "test_topk_matches_cpu or test_topk_ratios_match_cpu"),
    # the approximate sample's histogram is not cleared: it starts with shared memory's garbage
    Mutation("shared memory not cleared", "cuda/sparse.cu",
             "    for (int b = threadIdx.x; b < bins; b += blockDim.x) hist[b] = 0;\n    __syncthreads();\n"
             "    const uint32_t prefix = prefix_s;",
             "    __syncthreads();\n    const uint32_t prefix = prefix_s;",
             "test_topk_matches_cpu and approx"),
    # a CTA adds its histogram into the row's before all its threads have counted
    Mutation("missing barrier", "cuda/sparse.cu",
             "  __syncthreads();\n  for (int b = threadIdx.x; b < bins; b += blockDim.x)\n    if (local[b])",
             "  for (int b = threadIdx.x; b < bins; b += blockDim.x)\n    if (local[b])",
             "test_topk_matches_cpu or test_topk_ratios_match_cpu"),
]


@pytest.fixture(scope="module")
def mutants(tmp_path_factory):
    """Every mutant's executable (or why it could not be made), built two at a time."""
    # folders made here, not in the pool: tmp_path_factory is not thread-safe (two threads
    # at its first call can each make a base folder and one then rejects its own path)
    roots = {m.name: tmp_path_factory.mktemp(m.name.replace(" ", "-")) for m in MUTATIONS}

    def make(m):
        src = roots[m.name] / "csrc"
        shutil.copytree(CSRC, src)
        path = src / m.file
        text = path.read_text()
        if text.count(m.old) != 1:
            return f"the mutation's target is not unique (or gone) in {m.file}: update {m.name!r}"
        path.write_text(text.replace(m.old, m.new))
        return build(src)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip((m.name for m in MUTATIONS), pool.map(make, MUTATIONS)))


@pytest.mark.parametrize("m", MUTATIONS, ids=[m.name.replace(" ", "-") for m in MUTATIONS])
def test_mutant_kernel_fails_the_emulated_tests(m, mutants):
    exe = mutants[m.name]
    assert not isinstance(exe, str), exe
    env = {**os.environ, "GRADCOMP_EMULATOR_EXE": str(exe)}
    r = subprocess.run([sys.executable, "-m", "pytest", "tests/cuda/test_emulated.py", "-x", "-q", "-p",
                        "no:cacheprovider", "-k", m.select], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    tail = (r.stdout + r.stderr)[-3000:]
    caught = r.returncode == 1 and " failed" in r.stdout  # tests failed: not a clean pass, not a broken run
    assert caught, f"the mutant {m.name!r} was not caught (exit {r.returncode}):\n{tail}"
