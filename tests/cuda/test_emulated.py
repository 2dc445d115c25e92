"""The CUDA kernels, run on the CPU through the host emulation of CUDA's execution model
(tests/support/emulator.py, csrc/emu, docs/emulator.md), compared byte for byte with the CPU
backend on fresh random inputs.

What this proves: the CUDA sources' indexing, packing, arithmetic and warp/block logic —
every shuffle's lanes and masks, every barrier, shared memory that starts undefined, vector
accesses that must be aligned (UBSan), every load and store inside its buffer (ASan), the
launch configuration checks and the argument checks of the entry points. What it does not:
the GPU's memory model and data races (a CTA's threads interleave only at barriers, warp
intrinsics and atomics, CTAs run one after another: a plain read-modify-write where an
atomic is needed passes), codec.h's arithmetic (both sides compute it with the host's IEEE
operations; tests/support/reference.py checks it), performance, and the driver paths.
Those need a real GPU: scripts/gpu_check.sh runs tests/cuda/test_cuda.py and compute-sanitizer
there.

The inputs are fresh each run: GRADCOMP_TEST_SEED=N reproduces one (every assertion says
its seed).
"""

from __future__ import annotations

import os
import random
import re

import pytest
import torch
from emulator import CSRC, EmulatedCuda, Emulator, EmulatorCrash, build
from gradcomp import ops
from gradcomp.engine import layout
from harness import (
    SparseBucket,
    assert_same_runs,
    corrupter,
    exchange,
    exchange_results,
    extreme_inputs,
    gen,
    make_residuals,
    randomk_run,
    tied_buckets,
    topk_exchange,
    wide_inputs,
)

pytestmark = [
    pytest.mark.emulated,
    pytest.mark.skipif(not (CSRC / "cuda" / "quant.cu").exists(), reason="needs the source tree (csrc/)"),
]

SEED = int(os.environ.get("GRADCOMP_TEST_SEED", random.SystemRandom().randrange(1 << 30)))
POISON_CPU = 0x5A
BLOCKS = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def emu():
    e = Emulator(os.environ.get("GRADCOMP_EMULATOR_EXE") or build())  # the variable: a mutant's (mutation tests)
    yield EmulatedCuda(e, schedule_seed=SEED)
    e.close()


def _gen(*salt) -> torch.Generator:
    return gen(SEED, *salt)


def _assert_same(cpu: dict, emulated: dict, what) -> None:
    """Equal bytes (NaN payloads included: both backends write the canonical quiet NaN)."""
    assert_same_runs(cpu, emulated, f"{what}, seed {SEED}", nan_bytes=True)


# ---------------------------------------------------------------- block quantizers
def _compare(emu, numels, block, world, dtype, salt, xs=None, *, ef=True, residual_dtype=torch.float32,
             res_misalign=0, **kw):
    """harness.exchange of W simulated ranks from the same inputs and residuals on the CPU
    backend (payloads start poisoned) and the emulated CUDA one; every payload, slice,
    residual and output must be the same bytes. ``res_misalign``: residuals start that many
    bytes past an aligned address (no vector access), on both; ``kw``: bits, rounding,
    ordinals, and ``bucket_misalign`` / ``payload_misalign`` (the emulated side only: the CPU
    has no such path). Returns both runs' results."""
    xs = wide_inputs(numels, world, dtype, _gen(*salt)) if xs is None else xs
    runs = []
    for backend in (None, emu):
        res = make_residuals(numels, world, _gen(*salt, "residuals"), dtype=residual_dtype,
                             misalign=res_misalign) if ef else None
        runs.append(exchange_results(exchange(xs, numels, block, world, res, emu=backend, res_misalign=res_misalign,
                                              poison=POISON_CPU if backend is None else None, **kw)))
    _assert_same(*runs, dict(numels=numels, block=block, world=world, dtype=dtype, residual_dtype=residual_dtype,
                             res_misalign=res_misalign, **kw))
    return runs


def _numels(block):
    """Whole blocks at vector-aligned offsets first (the kernels' vector loads and stores),
    then a partial block, one-element and empty parameters, and a parameter of several
    blocks off the vector alignment whose end is ragged (the scalar paths)."""
    return [block, 4000, 37, 1, 0, 3 * block + 7]


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_codec_block_and_world_matches_cpu(emu, bits, block, world):
    """Round to nearest, float32 residuals; the bucket's dtype rotates through float32,
    float16 and bfloat16 across the grid. World 3 with narrow codes of small blocks makes
    shard sizes no multiple of 16: shards after the first start only 4- or 8-byte aligned."""
    dtype = DTYPES[(bits + BLOCKS.index(block) + world) % 3]
    _compare(emu, _numels(block), block, world, dtype, ("codec", bits, block, world), bits=bits)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("block", [32, 64, 256, 1024, 4096])
@pytest.mark.parametrize("world", [1, 3])
def test_stochastic_rounding_matches_cpu(emu, bits, block, world):
    """Draws keyed by (seed, step, rank, pass, ordinal, offset): both backends draw alike; a
    new step draws anew."""
    ordinals = [0, 3, 7, 1 << 20, 5, 9]
    sends = []
    for step in (0, 1):
        _, e = _compare(emu, _numels(block), block, world, torch.float32, ("sr", bits, block, world), bits=bits,
                        rounding={"seed": 1234 + SEED % 1000, "step": step}, ordinals=ordinals)
        sends.append(e["sends"])
    assert not all(torch.equal(a, b) for a, b in zip(*sends)), f"seed {SEED}"


@pytest.mark.parametrize("bits,stochastic", [(8, False), (8, True), (4, True), (2, False), (1, False)])
@pytest.mark.parametrize("block", [32, 256, 2048])
@pytest.mark.parametrize("res_misalign", [0, 2])
def test_bf16_residuals_match_cpu(emu, bits, stochastic, block, res_misalign):
    """bfloat16 residuals (rounded to nearest even at every store), with and without vector
    access (2 bytes off: every residual row misaligned)."""
    for dtype in (torch.float32, torch.float16):
        _compare(emu, _numels(block), block, 3, dtype, ("bf16res", bits, block, res_misalign, str(dtype)), bits=bits,
                 residual_dtype=torch.bfloat16, rounding={"seed": 7, "step": 3} if stochastic else None,
                 res_misalign=res_misalign)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [32, 128, 512, 4096])
def test_misaligned_buckets_and_residuals_match_cpu(emu, dtype, block):
    """A bucket and float32 residuals that start off a vector boundary take the scalar paths;
    the values and bytes are the same."""
    elem = torch.empty(0, dtype=dtype).element_size()
    for bits in (8, 1):
        _compare(emu, _numels(block), block, 2, dtype, ("misaligned", str(dtype), block, bits), bits=bits,
                 bucket_misalign=elem, res_misalign=4)
        _compare(emu, [block, 2 * block], block, 2, dtype, ("aligned", str(dtype), block, bits), bits=bits)


@pytest.mark.parametrize("payload_misalign", [16, 48, 208])
def test_payloads_off_a_wide_boundary_match_cpu(emu, payload_misalign):
    """Payloads only 16-byte aligned (a view into a larger buffer: what ops accepts), with
    shards inside them only 4-byte aligned (narrow codes, small blocks, world 3)."""
    for bits in (1, 2, 8):
        _compare(emu, _numels(32), 32, 3, torch.float32, ("payload", payload_misalign, bits), bits=bits,
                 payload_misalign=payload_misalign)


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
@pytest.mark.parametrize("residual_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_matches_cpu_and_poisons_every_output(emu, bits, residual_dtype, bad):
    numels, world = [5000, 700, 1], 3
    g = _gen("nonfinite", bits, str(residual_dtype), bad)
    xs = [torch.randn(sum(numels), generator=g) for _ in range(world)]
    xs[1][int(torch.randint(0, sum(numels), (1,), generator=g))] = bad
    _, e = _compare(emu, numels, 64, world, torch.float32, ("nf",), xs=xs, bits=bits, residual_dtype=residual_dtype)
    assert all(torch.isnan(o).all() for o in e["outs"]), f"seed {SEED}"
    assert all(torch.isfinite(r.float()).all() for rr in e["res_red"] for r in rr), f"seed {SEED}"


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
def test_extreme_magnitudes_match_cpu(emu, bits):
    numels, xs = extreme_inputs(_gen("extreme"))
    for dtype in DTYPES:
        xd = [v.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype) for v in xs]
        for residual_dtype in (torch.float32, torch.bfloat16):
            for stochastic in (False, True) if bits != 1 else (False,):
                _, e = _compare(emu, numels, 256, 2, dtype, ("extreme",), xs=xd, bits=bits,
                                residual_dtype=residual_dtype, rounding={"seed": 99, "step": 0} if stochastic else None)
                assert all(torch.isfinite(r.float()).all() for rr in e["res_red"] for r in rr)


@pytest.mark.parametrize("bits", [8, 2])
def test_without_error_feedback_matches_cpu(emu, bits):
    _compare(emu, [3000, 129, 1], 128, 2, torch.float32, ("noef", bits), bits=bits, ef=False)


@pytest.mark.parametrize("bits", [8, 1])
def test_more_ranks_than_a_warp_has_lanes_match_cpu(emu, bits):
    """W = 37: the flag loops stride over ranks by 32 lanes, headers by a block's threads."""
    g = _gen("w37", bits)
    xs = wide_inputs([700, 64, 3], 37, torch.float32, g)
    xs[36][5] = float("nan")
    _, e = _compare(emu, [700, 64, 3], 32, 37, torch.float32, ("w37", bits), xs=xs, bits=bits)
    assert all(torch.isnan(o).all() for o in e["outs"])
    _compare(emu, [700, 64, 3], 32, 37, torch.bfloat16, ("w37b", bits), bits=bits)


def test_topk_with_more_ranks_than_a_warp_has_lanes_matches_cpu(emu):
    kw = dict(decoders=(0, 32))  # every rank encodes; two decode all 33 payloads
    cpu, cpu_rej, _ = _topk_run(None, torch.float32, torch.bfloat16, False, True, 33, ("w33",), **kw)
    emulated, emu_rej, _ = _topk_run(emu, torch.float32, torch.bfloat16, False, True, 33, ("w33",), **kw)
    _assert_same(cpu, emulated, "w33")
    assert cpu_rej == emu_rej == [0, 0]


def test_all_zero_and_empty_buckets_match_cpu(emu):
    """All zeros (scale 0: every code 0); a bucket of only empty parameters (no rows: headers only)."""
    xs = [torch.zeros(700) for _ in range(2)]
    _compare(emu, [500, 200], 64, 2, torch.float32, ("zeros",), xs=xs, bits=4)
    _compare(emu, [0, 0], 64, 3, torch.float32, ("empty",), xs=[torch.zeros(0)] * 3, bits=8)


# ---------------------------------------------------------------- argument checks
def _raw_quant(emu, op, bits, block, world, slots, residual_code=0, stochastic=False):
    table = torch.zeros(max(world * slots, 0), 4, dtype=torch.int64)
    buf = torch.zeros(4096, dtype=torch.uint8)
    bucket = torch.zeros(16)
    if op == "quant_encode":
        args = [bits, block, 0, residual_code, bucket, table, world, slots, buf, 0, 0, 0, int(stochastic), 0, 0]
    elif op == "quant_reduce":
        args = [bits, block, residual_code, buf, table, world, slots, buf, 0, 0, 0, int(stochastic), 0, 0]
    else:
        args = [bits, block, 0, buf, table, world, slots, bucket, 0, 0]
    return emu.call(op, args)


@pytest.mark.parametrize("op", ["quant_encode", "quant_reduce", "quant_decode"])
def test_quant_entry_points_reject_what_they_cannot_do(emu, op):
    """The CUDA entry points check their own arguments (not only ops.py), before any launch."""
    for bits, block, world, slots, match in [(3, 256, 1, 1, "8, 4, 2 or 1 bits"), (8, 48, 1, 1, "power of two"),
                                            (8, 16, 1, 1, "power of two"), (8, 8192, 1, 1, "power of two"),
                                            (8, 256, 0, 1, "world size"), (8, 256, 1, -1, "slot count")]:
        with pytest.raises(ValueError, match=match):
            _raw_quant(emu, op, bits, block, world, slots)
    if op != "quant_decode":
        with pytest.raises(ValueError, match="scaled sign"):
            _raw_quant(emu, op, 1, 256, 1, 1, stochastic=True)
        with pytest.raises(ValueError, match="float32 or bfloat16"):
            _raw_quant(emu, op, 8, 256, 1, 1, residual_code=1)
    with pytest.raises(ValueError, match="dtype"):
        emu.call("quant_decode", [8, 256, 7, torch.zeros(64, dtype=torch.uint8), torch.zeros(1, 4, dtype=torch.int64),
                                  1, 1, torch.zeros(4), 0, 0])


def test_sparse_entry_points_reject_bad_counts(emu):
    t = torch.zeros(1, 8, dtype=torch.int64)
    buf = torch.zeros(64, dtype=torch.uint8)
    x = torch.zeros(4)
    for rows, pairs, tiles in [(-1, 1, 1), (1, -1, 1), (1, 1, -1), (1 << 31, 1, 1), (1, 1, 1 << 31)]:
        with pytest.raises(ValueError, match="sparse rows or tiles|row, pair, tile"):
            emu.call("topk_encode", [0, 0, 0, x, t, rows, tiles, pairs, buf, buf, 0, 0])
    with pytest.raises(ValueError, match="row, pair, tile or world"):
        emu.call("topk_decode", [0, 0, buf, t, 1, 1, 0, x, 0, buf, 0, 0])
    with pytest.raises(ValueError, match="float32 scratch"):
        emu.call("topk_decode", [1, 0, buf, t, 1, 1, 1, x, 0, buf, 0, 0])
    with pytest.raises(ValueError, match="row, pair, tile or world"):
        emu.call("randomk_decode", [0, buf, t, 1, 0, 0, 0, x, 0, 0])


# ---------------------------------------------------------------- top-k and random-k
SPARSE_NUMELS = [1, 100, 4096, 4097, 9000]


def _topk_run(emu, dtype, wire, approx, ef, world, salt, *, ratio=0.01, nan_at=None, **kw):
    """harness.topk_exchange of W ranks' tied buckets, from the same inputs on either backend
    (the CPU's payloads start poisoned); ``kw``: corrupt, decoders. Returns (results, rejected
    counts, the buckets)."""
    buckets = tied_buckets(SPARSE_NUMELS, dtype, world, lambda w: _gen("topk", *salt, w), ef=ef, ratio=ratio,
                           nan_at=nan_at)
    results, rejected = topk_exchange(buckets, wire, approx, emu=emu, poison=POISON_CPU if emu is None else None,
                                      **kw)
    return results, rejected, buckets


@pytest.mark.parametrize("approx", [False, True], ids=["exact", "approx"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wire", DTYPES)
def test_topk_matches_cpu(emu, approx, dtype, wire):
    """Exact and approximate top-k, float32/float16/bfloat16 buckets and wire values; world 3
    for float32 values, 1 otherwise."""
    world = 3 if wire == torch.float32 else 1
    salt = (approx, str(dtype), str(wire))
    cpu, _, _ = _topk_run(None, dtype, wire, approx, True, world, salt)
    emulated, _, _ = _topk_run(emu, dtype, wire, approx, True, world, salt)
    _assert_same(cpu, emulated, salt)


def test_topk_many_tiles_matches_cpu(emu):
    """A parameter of 18 tiles: the per-tile counts and their scan across the whole row."""
    for approx in (False, True):
        results = []
        for backend in (None, emu):
            b = SparseBucket([70_001, 5], torch.float32, _gen("tiles", approx), scale=10.0)
            t = b.refresh(backend)
            payload = (ops if backend is None else backend).topk_encode(b.x, t.table, t.pairs, approx=approx)
            if backend is not None:
                backend.clear()
            results.append({"payload": [payload], "res": [[r.clone() for r in b.residuals]]})
        _assert_same(results[0], results[1], approx)


def test_topk_approx_fallback_matches_cpu(emu):
    """Approximate top-k when fewer than k values reach the sampled threshold T0 (large
    values sit exactly at the sampled positions): every value >= T0, then the lowest-indexed
    ones below it."""
    n, ratio = 20_000, 0.01
    k = layout.pairs_for(n, ratio)
    s = min(max(n // 100, 4096), n)
    share = -(-k * s // n)
    kappa = min(share + share // 2 + 1, s)
    results = []
    for backend in (None, emu):
        b = SparseBucket([n], torch.float32, _gen("fallback"), ef=False)
        x = torch.randn(n, generator=_gen("fallback-x")) * 1e-3
        sampled = torch.arange(s) * n // s
        x[sampled] = 1.0 + torch.rand(s, generator=_gen("fallback-s"))
        b.param(0).copy_(x)
        t0 = torch.sort(x[sampled].abs(), descending=True).values[kappa - 1]
        assert int((x.abs() >= t0).sum()) < k  # the case under test: the fallback cut
        t = b.refresh(backend)
        payload = (ops if backend is None else backend).topk_encode(b.x, t.table, t.pairs, approx=True)
        if backend is not None:
            backend.clear()
        results.append({"payload": [payload]})
    _assert_same(results[0], results[1], "fallback")


@pytest.mark.parametrize("ratio", [0.001, 0.3, 1.0])
def test_topk_ratios_match_cpu(emu, ratio):
    cpu, _, _ = _topk_run(None, torch.float32, torch.float32, False, True, 2, ("ratio", ratio), ratio=ratio)
    emulated, _, _ = _topk_run(emu, torch.float32, torch.float32, False, True, 2, ("ratio", ratio), ratio=ratio)
    _assert_same(cpu, emulated, ratio)


@pytest.mark.parametrize("approx", [False, True], ids=["exact", "approx"])
def test_topk_non_finite_and_no_error_feedback_match_cpu(emu, approx):
    for ef in (True, False):
        salt = ("nf", approx, ef)
        cpu, _, _ = _topk_run(None, torch.float32, torch.float32, approx, ef, 2, salt, nan_at=1234)
        emulated, _, buckets = _topk_run(emu, torch.float32, torch.float32, approx, ef, 2, salt, nan_at=1234)
        _assert_same(cpu, emulated, salt)
        for out, b in zip(emulated["outs"], buckets):  # every row NaN, the gaps between them untouched
            assert all(torch.isnan(out[o:o + n]).all() for o, n in zip(b.offsets, b.numels))
            assert torch.equal(out[:b.offsets[0]], b.x[:b.offsets[0]])
        assert all(torch.isfinite(r).all() for rr in emulated["residuals"] for r in rr)


@pytest.mark.parametrize("corruption", ["out_of_range", "negative", "duplicate", "random_bytes"])
def test_topk_rejects_corrupted_payloads_like_cpu(emu, corruption):
    """The decode's validation: a rank's index list that leaves its parameter or is not
    strictly increasing is counted and poisons the decode, the same on both backends."""
    cpu, cpu_rej, _ = _topk_run(None, torch.float32, torch.float32, False, True, 2, ("c",),
                                corrupt=corrupter(corruption, _gen("bytes")))
    emulated, emu_rej, _ = _topk_run(emu, torch.float32, torch.float32, False, True, 2, ("c",),
                                     corrupt=corrupter(corruption, _gen("bytes")))
    assert cpu_rej[0] >= 1 and emu_rej == cpu_rej, (cpu_rej, emu_rej, SEED)
    _assert_same({"outs": cpu["outs"]}, {"outs": emulated["outs"]}, corruption)
    assert all(torch.isnan(b[7:8]).all() for b in emulated["outs"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_randomk_matches_cpu(emu, dtype):
    results = []
    for backend in (None, emu):
        b = SparseBucket([1, 1000, 9001], dtype, _gen("randomk", str(dtype)))
        b.param(1)[17] = float("inf")
        results.append(randomk_run(b, emu=backend))  # the flagged decode, then the finite path
    _assert_same(results[0], results[1], dtype)


# ---------------------------------------------------------------- the emulator itself
def _declared_shared_names() -> set[str]:
    """The variables the kernel sources declare __shared__."""
    names = set()
    for path in (CSRC / "cuda").glob("*.cu"):
        for decl in re.findall(r"__shared__\s+[\w:]+\s+([^;]+);", path.read_text()):
            names |= {re.sub(r"\[.*", "", d).strip() for d in decl.split(",")}
    return names


def test_emulator_poisons_exactly_the_kernels_shared_memory(emu):
    """What the emulator takes for shared memory (and poisons before every CTA) is every
    __shared__ variable of the kernel sources, and nothing else."""
    _, text = emu.call("shared_names", [])
    found = [line for line in text.splitlines() if line]
    kernels = [n for n in found if "::shared_kernel(int*)::" not in n]  # the emulator's self-test's
    assert len(kernels) == len(found) - 1
    assert {n.rsplit("::", 1)[1] for n in kernels} == _declared_shared_names()
    assert all(n.startswith("gradcomp::(anonymous namespace)::") for n in found)
    # one copy per instantiation: the top-k histograms of every bucket dtype
    assert sum(n.endswith("::hist") for n in found) == 3 * 3


def _selftest(emu, name, out):
    emu.call("selftest:" + name, [out])
    return out


def test_warp_intrinsics_follow_cuda(emu):
    out = _selftest(emu, "shuffles", torch.full((64, 16), -1, dtype=torch.int32))
    t = torch.arange(64)
    lane = t % 32
    warp0 = t - lane
    assert torch.equal(out[:, 0], (warp0 + (lane ^ 5)) * 10)
    assert torch.equal(out[:, 1], torch.where(lane >= 3, t - 3, t) * 10)
    assert torch.equal(out[:, 2], torch.where(lane + 7 < 32, t + 7, t) * 10)
    assert torch.equal(out[:, 3], (warp0 + 9) * 10)
    ballot = sum(1 << i for i in range(0, 32, 3))
    assert (out[:, 4].to(torch.int64) & 0xFFFFFFFF).eq(ballot).all()
    assert torch.equal(out[:, 5], (t >= 32).int())  # lane 8 of warp 1 is thread 40
    assert out[:, 6].eq(0).all() and out[:, 9].eq(1).all()
    assert torch.equal(out[:, 7], t ^ 1)
    even = sum(1 << i for i in range(0, 16, 2))
    assert torch.equal(out[:, 8].to(torch.int64) & 0xFFFFFFFF, torch.where(lane < 16, even, even << 16))
    assert torch.equal(out[:, 10], (lane < 16).int())  # lane 3 is in the lower half only
    assert torch.equal(out[:, 11], warp0 + (lane ^ 5))
    assert torch.equal(out[:, 12], torch.where(lane >= 1, t - 1, t))
    assert torch.equal(out[:, 13], torch.where(lane == 0, t + 31, t))
    assert torch.equal(out[:, 14], warp0 + 8)
    assert out[:, 15].eq(1).all()  # a 64-bit shuffle comes back whole


def test_shared_memory_starts_poisoned_and_barriers_order(emu):
    for _ in range(4):  # the poison is chosen per CTA: NaN-and-all-ones, or 0xA7 bytes
        out = _selftest(emu, "shared", torch.full((2, 128, 2), -1, dtype=torch.int32))
        for cta in range(2):
            first = int(out[cta, 0, 0])
            assert first in (-1, -0x58585859) and (out[cta, :, 0] == first).all()
        t = torch.arange(128)
        assert torch.equal(out[0, :, 1], (t + 1) % 128) and torch.equal(out[1, :, 1], 1000 + (t + 1) % 128)


def test_atomics_launch_checks_and_stream_order(emu):
    counter = _selftest(emu, "atomics", torch.zeros(2 + 7 * 96, dtype=torch.int32))
    assert counter[:2].tolist() == [7 * 96, 7 * 96 - 1]
    assert sorted(counter[2:].tolist()) == list(range(7 * 96))  # each thread saw its own old value
    launch = _selftest(emu, "launch_config", torch.zeros(4, dtype=torch.int32))
    assert launch.tolist() == [0, 9, 0, 9]  # not run; cudaErrorInvalidConfiguration, then cleared
    streams = _selftest(emu, "streams", torch.full((2,), -1, dtype=torch.int32))
    assert streams.tolist() == [110, -1]


def test_writes_before_a_buffer_and_into_table_addresses_are_reported(emu):
    """ASan cannot poison the bytes before a buffer that starts inside an 8-byte granule: a
    canary there catches a write; a kernel that writes a table's address word fails the call."""
    out = torch.zeros(64, dtype=torch.int32)
    with pytest.raises(EmulatorCrash, match="wrote 4 bytes before buffer"):
        emu.call("selftest:write_before", [out], misalign={id(out): 4})
    target = torch.zeros(16)
    row = torch.zeros(1, 4, dtype=torch.int64)
    emu.place(target)
    row[0, 2] = emu.addr(target)
    with pytest.raises(RuntimeError, match="wrote into address word 2"):
        emu.call("selftest:write_table_word", [row], tables=[(row, 4)])
    emu.clear()


@pytest.mark.parametrize("name,message", [
    ("divergent_barrier", "__syncthreads waits for 32 of the block's 64 threads"),
    ("mask_without_caller", "lacks the calling lane"),
    ("read_outside_mask", "outside the mask"),
    ("different_intrinsics", "different warp intrinsics"),
    ("deadlock", "deadlock"),
    ("partial_warp", "does not exist in this block"),
    ("misaligned_vector", "misaligned address"),
    ("out_of_bounds", "heap-buffer-overflow"),
])
def test_misuse_ends_the_process_with_the_reason(emu, name, message):
    with pytest.raises(EmulatorCrash, match=message):
        _selftest(emu, name, torch.zeros(64, dtype=torch.int32))
    _, text = emu.call("info", [])  # a new process takes over
    assert "compiled=1" in text
