"""The three int8 passes (ops.quant_encode / quant_reduce / quant_decode) on CPU, held bit for
bit to the pure-torch reference (tests/support/reference.py).

The main tool is a W-rank compressed all-reduce simulated in one process (harness.exchange):
every rank builds its block table (same layout, its own residual addresses), encodes its
bucket, receives shard ``w`` of every rank's payload, reduces its slots, and all ranks decode
the concatenation of the W reduced slices.
"""

from __future__ import annotations

import types

import pytest
import torch
from gradcomp import ops
from gradcomp.engine import layout
from harness import assert_bits_equal, bits_equal, bits_of, clone_residuals, exchange, gen, make_residuals
from reference import (
    block_quantize,
    compressed_allreduce,
    compressed_mean,
    encode_ef,
    noise,
    pack_codes,
    unpack_codes,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKS = [32, 256, 4096]
WORLDS = [1, 2, 3, 4]
BITS = [8, 4, 2, 1]
BIT_IDS = ["int8", "int4", "int2", "sign"]
HEADER = 16


# ------------------------------------------------------------------------------ helpers
def split_shard(shard: torch.Tensor, slots: int, block: int, bits: int = 8):
    """A [SB] uint8 shard → (flag word, the 12 other header bytes, scales [S], scale padding
    bytes, codes: [S, B] int8 for 8 bits, else the packed [S, B·bits/8] uint8)."""
    assert shard.numel() == ops.shard_bytes(slots, block, bits)
    codes_off = HEADER + -(-4 * slots // 16) * 16
    flag = int(shard[:4].clone().view(torch.int32)[0])
    scales = shard[HEADER : HEADER + 4 * slots].clone().view(torch.float32)
    codes = shard[codes_off:].clone()
    codes = codes.view(torch.int8).view(slots, block) if bits == 8 else codes.view(slots, block * bits // 8)
    return flag, shard[4:HEADER], scales, shard[HEADER + 4 * slots : codes_off], codes


def param_slices(numels, block, world):
    """(offset, numel, owners [nb]) of each parameter of a contiguous bucket."""
    out, off, first = [], 0, 0
    for n in numels:
        nb = layout.num_blocks(n, block)
        out.append((off, n, (first + torch.arange(nb)) % world))
        off += n
        first += nb
    return out


def row_index(table: torch.Tensor) -> dict:
    """Element offset of a block → its table row (padding rows excluded)."""
    return {int(o): i for i, (o, ln) in enumerate(table[:, :2].tolist()) if ln > 0}


def by_blocks(xs, residuals, block, owners, bits=8, rounding=None):
    """One parameter's compressed all-reduce assembled block by block, in pure torch, from the
    reference's codec pieces (encode_ef, block_quantize, noise) and the rules of docs/design.md:
    each rank encodes its gradient plus residual, the owner of block j sums the W decoded
    blocks in rank order, multiplies by fl(1/W), re-encodes (drawing its own stage-2 noise)
    and adds W times that error to its residual unless the block is non-finite; a non-finite
    block makes the whole output NaN. Returns (output [n] float32, each rank's residual after
    the reduce, the reduced blocks' non-finite flags [nb]). It is written apart from
    reference.compressed_allreduce, which assembles the same pieces over whole parameters, so
    that a slip in either assembly shows as a difference between the two."""
    world, n, nb = len(xs), xs[0].numel(), owners.numel()
    inv_w = torch.tensor(1.0) / torch.tensor(float(world))
    draws = [[None] * world, [None] * world]
    if rounding is not None:
        key = (rounding["seed"], rounding["step"])
        draws = [[noise(*key, r, stage, rounding["ordinal"], nb, block) for r in range(world)] for stage in (1, 2)]
    stage1 = [encode_ef(x, r, block, bits, d) for x, r, d in zip(xs, residuals, draws[0])]
    res = [s[2].clone() if s[2] is not None else None for s in stage1]
    out = torch.empty(n)
    flags = []
    for j in range(nb):
        lo, hi = j * block, min(n, (j + 1) * block)
        total = torch.zeros(hi - lo)
        for scales, codes, _, _ in stage1:  # rank order
            total = total + codes[j, : hi - lo].float() * scales[j]
        mean = total * inv_w
        o = int(owners[j])
        d = draws[1][o][j : j + 1] if rounding is not None else None
        scales, codes, _, bad = block_quantize(mean, block, bits, d)
        sent = codes[0, : hi - lo].float() * scales[0]
        out[lo:hi] = sent
        flags.append(bool(bad[0]))
        if res[o] is not None and not bad[0]:
            res[o][lo:hi] = (res[o][lo:hi].float() + torch.tensor(float(world)) * (mean - sent)).to(res[o].dtype)
    if any(flags):
        out.fill_(float("nan"))
    return out, res, torch.tensor(flags, dtype=torch.bool)


def check_against_reference(ex, xs, residuals_before, numels, block, world, dtype, bits=8, rounding=None):
    """Everything bit for bit: payloads, slices, residuals after each pass, decoded output.

    The pieces (stage-1 and reduced scales and codes, the residuals after encode) are
    reference.compressed_allreduce's; its output and residuals after the reduce are first
    checked against ``by_blocks``, assembled independently. One bucket-level fact the
    reference's per-parameter model lacks is added here: the non-finite flag covers the whole
    bucket (a non-finite block in any parameter makes every compressed element NaN)."""
    rows = row_index(ex.tables[0].table)
    S = ex.slots
    for w in range(world):  # every rank decodes the same bits
        assert_bits_equal(ex.outs[w], ex.outs[0], f"rank {w} output vs rank 0")
    send_parts = [[split_shard(ex.sends[w][o * ex.sb : (o + 1) * ex.sb], S, block, bits) for o in range(world)]
                  for w in range(world)]
    slice_parts = [split_shard(s, S, block, bits) for s in ex.slices]

    def wire(codes):  # the reference's codes as the payload carries them
        return codes if bits == 8 else pack_codes(codes[None], bits)[0]

    params = [p for p in enumerate(param_slices(numels, block, world)) if p[1][1] > 0]
    expected = {}
    for p, (off, n, owners) in params:
        xs_p = [x[off : off + n] for x in xs]
        res_p = [rr[p] for rr in residuals_before] if residuals_before is not None else [None] * world
        rnd = None if rounding is None else {**rounding, "ordinal": p}
        orc = compressed_allreduce(xs_p, res_p, block, owners, bits, rnd)
        out_b, res_b, flags_b = by_blocks(xs_p, res_p, block, owners, bits, rnd)
        assert torch.equal(orc.nonfinite2, flags_b), f"param {p}: reduced blocks' non-finite flags"
        assert_bits_equal(orc.out, out_b, f"param {p}: the reference's output against by_blocks")
        if residuals_before is not None:
            for w in range(world):
                assert_bits_equal(orc.res_after[w], res_b[w], f"param {p}: the reference's rank {w} residual "
                                  "against by_blocks")
        expected[p] = orc
    flagged = any(bool(orc.nonfinite2.any()) for orc in expected.values())
    for o in range(world):
        want_flag = any(bool(expected[p].nonfinite2[owners == o].any()) for p, (_, _, owners) in params)
        assert slice_parts[o][0] == int(want_flag), f"flag of rank {o}'s reduced slice"
    for p, (off, n, owners) in params:
        orc = expected[p]
        want_out = torch.full_like(orc.out, float("nan")) if flagged else orc.out
        for w in range(world):
            assert_bits_equal(ex.outs[w][off : off + n], want_out.to(dtype), f"param {p} output on rank {w}")
            if residuals_before is not None:
                assert_bits_equal(ex.res_enc[w][p], orc.stage1[w][2], f"param {p} residual of rank {w} after encode")
                assert_bits_equal(ex.res_red[w][p], orc.res_after[w], f"param {p} residual of rank {w} after reduce")
        for j in range(owners.numel()):
            row = rows[off + j * block]
            o, s = divmod(row, S)
            assert o == int(owners[j])
            ln = min(block, n - j * block)
            for w in range(world):
                _, _, scales, _, codes = send_parts[w][o]
                assert_bits_equal(scales[s], orc.stage1[w][0][j], f"param {p} block {j} scale from rank {w}")
                assert torch.equal(codes[s], wire(orc.stage1[w][1][j])), f"param {p} block {j} codes from rank {w}"
                assert not codes[s, -(-ln * bits // 8) :].any()  # bytes holding padding only
            _, _, scales, _, codes = slice_parts[o]
            assert_bits_equal(scales[s], orc.scales2[j], f"param {p} block {j} reduced scale")
            assert torch.equal(codes[s], wire(orc.codes2[j])), f"param {p} block {j} reduced codes"


def test_bit_comparison_tells_signed_zeros_and_nans_apart():
    """harness.bits_equal, which every bit-for-bit claim here rests on: -0.0 is not +0.0
    (torch.equal takes them for equal), NaNs compare by position (and by payload with
    nan_bytes), dtypes and shapes must match."""
    for dtype in DTYPES:
        pos, neg = torch.zeros(3, dtype=dtype), torch.tensor([0.0, -0.0, 0.0], dtype=dtype)
        assert torch.equal(pos, neg) and not bits_equal(pos, neg) and bits_equal(neg, neg.clone())
        nan = torch.tensor([1.0, float("nan"), 2.0], dtype=dtype)
        other_nan = nan.clone()
        bits_of(other_nan)[1] = bits_of(other_nan)[1] ^ 1  # another NaN payload
        assert other_nan[1].isnan() and bits_equal(nan, other_nan) and not bits_equal(nan, other_nan, nan_bytes=True)
        assert not bits_equal(nan, torch.tensor([1.0, 3.0, 2.0], dtype=dtype))
    assert not bits_equal(torch.zeros(2), torch.zeros(2, dtype=torch.float64))
    assert not bits_equal(torch.zeros(2), torch.zeros(1, 2))
    with pytest.raises(AssertionError, match="1 of 3 elements differ; first at flat index 1"):
        assert_bits_equal(torch.zeros(3), torch.tensor([0.0, -0.0, 0.0]), "zeros")


# ------------------------------------------------------------------------------ bit-exactness
@pytest.mark.parametrize("bits", BITS, ids=BIT_IDS)
@pytest.mark.parametrize("ef", [True, False], ids=["ef", "no_ef"])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("world", WORLDS)
def test_matches_reference(world, dtype, block, ef, bits):
    # sizes: several blocks plus a tail, one element, exactly one block, one short of two
    # blocks, an empty parameter, a short one; 9 blocks in all (not a multiple of 2, 3 or 4)
    numels = [3 * block + 7, 1, block, 2 * block - 1, 0, 13]
    mags = [1.0, 3.0, 1e-3, 100.0, 1.0, 1e4]
    g = gen("reference", world, str(dtype), block, ef, bits)
    xs = [torch.cat([torch.randn(n, generator=g) * m for n, m in zip(numels, mags)]).to(dtype)
          for _ in range(world)]
    residuals = make_residuals(numels, world, g) if ef else None
    before = clone_residuals(residuals)
    ex = exchange(xs, numels, block, world, residuals, bits)
    check_against_reference(ex, xs, before, numels, block, world, dtype, bits)
    assert torch.isfinite(ex.outs[0]).all()


@pytest.mark.parametrize("bits", [8, 4, 2], ids=["int8", "int4", "int2"])
@pytest.mark.parametrize("ef", [True, False], ids=["ef", "no_ef"])
@pytest.mark.parametrize("block", [32, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("world", WORLDS)
def test_stochastic_rounding_matches_reference(world, dtype, block, ef, bits):
    numels = [3 * block + 7, 1, 0, 2 * block - 1, 13]
    g = gen("stochastic", world, str(dtype), block, ef, bits)
    xs = [(torch.randn(sum(numels), generator=g) * 3).to(dtype) for _ in range(world)]
    residuals = make_residuals(numels, world, g) if ef else None
    before = clone_residuals(residuals)
    seed = int(torch.randint(0, 1 << 62, (1,), generator=g)) * 2 + 1
    rounding = {"seed": seed, "step": 1 << 40 | 17}
    ex = exchange(xs, numels, block, world, residuals, bits, rounding)
    check_against_reference(ex, xs, before, numels, block, world, dtype, bits, rounding)
    # the draws matter: rounding to nearest gives other codes
    near = exchange(xs, numels, block, world, clone_residuals(before), bits)
    assert not torch.equal(near.sends[0], ex.sends[0])


@pytest.mark.parametrize(("bits", "stochastic"), [(8, False), (4, False), (2, False), (1, False), (8, True),
                                                (4, True), (2, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("world", WORLDS)
def test_bf16_residuals_match_reference(world, dtype, stochastic, bits):
    block = 64
    numels = [3 * block + 7, 1, 2 * block - 1, 13]
    g = gen("bf16-residual", world, str(dtype), stochastic, bits)
    xs = [(torch.randn(sum(numels), generator=g) * 2).to(dtype) for _ in range(world)]
    residuals = [[r.to(torch.bfloat16) for r in rr] for rr in make_residuals(numels, world, g, scale=0.1)]
    before = clone_residuals(residuals)
    rounding = {"seed": 12345, "step": 3} if stochastic else None
    ex = exchange(xs, numels, block, world, residuals, bits, rounding)
    check_against_reference(ex, xs, before, numels, block, world, dtype, bits, rounding)
    assert all(r.dtype == torch.bfloat16 for rr in residuals for r in rr)
    # the bf16 residuals really were read and written: a float32 run from the same values differs
    f32 = [[r.float() for r in rr] for rr in before]
    ex32 = exchange(xs, numels, block, world, f32, bits, rounding)
    assert torch.equal(ex32.sends[0], ex.sends[0])  # the same values in: the same codes out
    assert any(not torch.equal(a.float(), b) for a, b in zip(residuals[0], f32[0]))


def _encode_decode(x, block, bits, **rounding):
    """One rank's stage-1 codes of x (one parameter, no error feedback), decoded: [n] float32."""
    table = layout.build_table(layout.contiguous_spans([x.numel()], block), block, 1)
    send = ops.quant_encode(x, table.table, 1, table.slots, block, bits=bits, **rounding)
    return ops.quant_decode(send, table.table, 1, table.slots, block, torch.empty_like(x), bits=bits)


@pytest.mark.parametrize("bits", [8, 4, 2], ids=["int8", "int4", "int2"])
def test_stochastic_rounding_is_unbiased(bits):
    """Mean of many draws → the value itself, within a 6-sigma bound per element (sigma from
    the Bernoulli variance frac·(1 - frac)·scale² / N), where rounding to nearest is off by a
    third of a step: the test would catch a biased rounding."""
    block, draws = 256, 1500
    qmax = (1 << (bits - 1)) - 1
    g = gen("unbiased", bits)
    x = torch.rand(4 * block, generator=g) * 2 - 1
    x[::block] = 1.0  # each block's absmax is 1: scale 1/qmax, inv exactly qmax
    x[1::block] = (torch.floor(x[1::block] * qmax) + 1 / 3) / qmax  # a third of a step above a code
    x[2::block] = 0.5 * 2.0 / qmax if qmax > 1 else 0.5  # exactly between two codes
    total = torch.zeros_like(x, dtype=torch.float64)
    for step in range(draws):
        total += _encode_decode(x, block, bits, stochastic=True, seed=99, step=step).double()
    mean = total / draws
    scale = 1.0 / qmax
    v = x.double() * qmax
    frac = v - torch.floor(v)
    sigma = scale * torch.sqrt(frac * (1 - frac) / draws)
    err = (mean - x.double()).abs()
    bound = 6 * sigma + 2.0**-22 * scale
    assert (err <= bound).all(), f"{int((err > bound).sum())} elements biased; worst {float((err - bound).max())}"
    near = _encode_decode(x, block, bits).double()
    assert ((near - x.double()).abs() > bound)[1::block].all()  # nearest is biased where the test looks
    # every draw is one of the two neighbouring codes
    one = _encode_decode(x, block, bits, stochastic=True, seed=99, step=7)
    scale32 = torch.tensor(1.0) / qmax
    q = torch.round(one / scale32)
    assert torch.equal(q * scale32, one) and ((q.double() - v).abs() < 1).all()


def test_stochastic_draws_depend_on_seed_step_and_rank_only():
    block, bits = 256, 4
    g = gen("draw-keys")
    x = torch.randn(5 * block, generator=g)
    base = _encode_decode(x, block, bits, stochastic=True, seed=5, step=2, rank=0)
    assert torch.equal(base, _encode_decode(x, block, bits, stochastic=True, seed=5, step=2, rank=0))  # reproducible
    for other in ({"seed": 6, "step": 2, "rank": 0}, {"seed": 5, "step": 3, "rank": 0},
                  {"seed": 5, "step": 2, "rank": 1}):
        assert not torch.equal(base, _encode_decode(x, block, bits, stochastic=True, **other)), other
    # ranks draw independently: their rounding errors are uncorrelated
    errs = [_encode_decode(x, block, bits, stochastic=True, seed=5, step=2, rank=r) - x for r in (0, 1)]
    corr = torch.corrcoef(torch.stack(errs))[0, 1]
    assert abs(float(corr)) < 0.06, f"rank 0 and rank 1 rounding errors correlate: {float(corr)}"


def test_stochastic_full_pipeline_is_unbiased():
    """Through encode, reduce (a second stochastic rounding by the owner) and decode at W=2:
    the mean over steps approaches the true mean of the two ranks' values."""
    block, bits, world, steps = 64, 2, 2, 400
    g = gen("pipeline-unbiased")
    numels = [4 * block]
    xs = [torch.randn(numels[0], generator=g) for _ in range(world)]
    total = torch.zeros(numels[0], dtype=torch.float64)
    for step in range(steps):
        total += exchange(xs, numels, block, world, None, bits, {"seed": 3, "step": step}).outs[0].double()
    mean = total / steps
    true = (xs[0].double() + xs[1].double()) / 2
    # per element, each rounding moves by at most one step (absmax of a block of the sum of
    # two ranks, over qmax = 1); the variance of a mean of `steps` draws is below step² / steps
    step_size = max(float(x.abs().max()) for x in xs) * 2
    sigma = step_size / steps**0.5
    assert float((mean - true).abs().max()) < 5 * sigma
    near = exchange(xs, numels, block, world, None, bits).outs[0].double()
    assert float((near - true).abs().mean()) > 3 * float((mean - true).abs().mean())


@pytest.mark.parametrize("world", WORLDS)
def test_empty_parameter_list(world):
    block = 256
    xs = [torch.randn(0, generator=gen("empty", world)) for _ in range(world)]
    ex = exchange(xs, [], block, world, [[] for _ in range(world)])
    assert ex.slots == 0 and ex.sb == HEADER
    for w in range(world):
        assert ex.sends[w].numel() == world * HEADER and not ex.sends[w].any()
        assert ex.slices[w].numel() == HEADER and not ex.slices[w].any()
        assert ex.outs[w].numel() == 0
    # an empty table leaves a bucket of uncompressed elements alone
    table = layout.build_table([], block, world)
    bucket = torch.randn(5, generator=gen("empty-bucket", world))
    keep = bucket.clone()
    ops.quant_decode(torch.zeros(world * HEADER, dtype=torch.uint8), table.table, world, 0, block, bucket)
    assert_bits_equal(bucket, keep, "bucket after an empty table's decode")


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_element_parameter(world, dtype):
    block = 32
    g = gen("one", world, str(dtype))
    xs = [(torch.randn(1, generator=g) * 5).to(dtype) for _ in range(world)]
    residuals = make_residuals([1], world, g)
    before = clone_residuals(residuals)
    ex = exchange(xs, [1], block, world, residuals)
    assert ex.slots == 1
    check_against_reference(ex, xs, before, [1], block, world, dtype)
    # a lone value is its block's absmax: it goes through stage 1 exactly (code ±127)
    for w in range(world):
        *_, codes = split_shard(ex.sends[w][: ex.sb], 1, block)
        assert abs(int(codes[0, 0])) == 127 and not codes[0, 1:].any()


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ef", [True, False], ids=["ef", "no_ef"])
def test_all_zeros(world, dtype, ef):
    block = 32
    numels = [100, 1, 64]
    xs = [torch.zeros(165, dtype=dtype) for _ in range(world)]
    residuals = [[torch.zeros(n) for n in numels] for _ in range(world)] if ef else None
    before = clone_residuals(residuals)
    ex = exchange(xs, numels, block, world, residuals)
    check_against_reference(ex, xs, before, numels, block, world, dtype)
    for w in range(world):
        assert not ex.sends[w].any(), "zeros must encode to an all-zero payload"
        assert not ex.slices[w].any()
        assert not bits_of(ex.outs[w]).any(), "output must be exactly +0"
        if ef:
            assert all(not bits_of(r).any() for r in ex.res_red[w])


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_huge_magnitudes(world, dtype):
    # |x| <= 1e38: a sum of up to 3 ranks (< 3.4e38) stays finite, so must the mean
    block = 256
    numels = [1000, 300, 1]
    g = gen("huge", world, str(dtype))
    xs = []
    for _ in range(world):
        x = (torch.rand(1301, generator=g) * 2 - 1) * 1e38
        x[::97] = 1e38 * torch.sign(torch.randn(x[::97].shape, generator=g))
        xs.append(x.to(dtype))
    residuals = [[torch.zeros(n) for n in numels] for _ in range(world)]
    before = clone_residuals(residuals)
    ex = exchange(xs, numels, block, world, residuals)
    check_against_reference(ex, xs, before, numels, block, world, dtype)
    assert torch.isfinite(ex.outs[0]).all(), "finite huge inputs overflowed"
    for w in range(world):
        assert all(torch.isfinite(r).all() for r in ex.res_red[w])
    exact = torch.stack([x.double() for x in xs]).mean(0)
    rel = float((ex.outs[0].double() - exact).abs().max() / exact.abs().max())
    assert rel < 4 / 127


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_huge_four_ranks_matches_reference(dtype):
    # a 4-rank sum of values up to 1e38 can overflow before the division by W; whatever
    # happens must be what the reference does
    world, block = 4, 256
    numels = [700, 5]
    g = gen("huge4", str(dtype))
    xs = [((torch.rand(705, generator=g) * 2 - 1) * 1e38).to(dtype) for _ in range(world)]
    residuals = [[torch.zeros(n) for n in numels] for _ in range(world)]
    before = clone_residuals(residuals)
    ex = exchange(xs, numels, block, world, residuals)
    check_against_reference(ex, xs, before, numels, block, world, dtype)


def test_float_max_stays_finite():
    # The largest finite float is a legal gradient value. Its block's scale is
    # fl(FLT_MAX / 127) and 127 * scale rounds past FLT_MAX: the dequantized value must not
    # become Inf (that would poison the residual with -Inf and turn a finite input into NaN).
    fmax = torch.finfo(torch.float32).max
    block = 32
    x = torch.tensor([fmax, 1.0, -fmax / 3, 0.5])
    residuals = [[torch.zeros(4)]]
    ex = exchange([x], [4], block, 1, residuals)
    assert torch.isfinite(residuals[0][0]).all(), f"residual after a FLT_MAX input: {residuals[0][0].tolist()}"
    assert torch.isfinite(ex.outs[0]).all(), f"decoded FLT_MAX input: {ex.outs[0].tolist()}"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tiny_and_subnormal_magnitudes(world, dtype):
    # 1e-36: normal scale; 4e-37 / 1e-37: qmax/absmax still finite, scale subnormal;
    # 1e-38, 1e-40, 1e-45: qmax/absmax overflows, scale 0, codes 0, error feedback keeps all
    block = 32
    mags = [1e-36, 4e-37, 1e-37, 1e-38, 1e-40, 1e-45]
    numels = [70, 40, 33, 64, 50, 10]
    g = gen("tiny", world, str(dtype))
    xs = [torch.cat([torch.randn(n, generator=g).clamp(-1, 1) * m for n, m in zip(numels, mags)]).to(dtype)
          for _ in range(world)]
    residuals = [[torch.zeros(n) for n in numels] for _ in range(world)]
    before = clone_residuals(residuals)
    ex = exchange(xs, numels, block, world, residuals)
    check_against_reference(ex, xs, before, numels, block, world, dtype)
    for p, (off, n, _) in enumerate(param_slices(numels, block, world)):
        if mags[p] > 1e-38:
            continue
        assert not bits_of(ex.outs[0][off : off + n]).any(), f"param {p}: underflowed blocks must decode to +0"
        for w in range(world):  # nothing was sent: the residual holds the whole value
            a = xs[w][off : off + n].float() + before[w][p]
            assert_bits_equal(ex.res_enc[w][p], a, f"param {p} residual of rank {w} after encode")
            assert_bits_equal(ex.res_red[w][p], a, f"param {p} residual of rank {w} after reduce")


def test_subnormal_residual_accumulates_until_sent():
    # error feedback keeps a value too small to quantize and sends it once it has grown
    block, n = 32, 32
    x = torch.full((n,), 1e-38)
    x[::2] = -1e-38
    res = [[torch.zeros(n)]]
    total = torch.zeros(n, dtype=torch.float64)
    for step in range(1, 81):
        out = exchange([x], [n], block, 1, res).outs[0]
        total += out.double()
        # running sum of outputs + residual == running sum of inputs (float tolerance)
        assert torch.allclose(total + res[0][0].double(), step * x.double(), rtol=1e-5, atol=1e-44)
    assert total.abs().min() > 0, "the accumulated tiny value was never sent"


# ------------------------------------------------------------------------------ non-finite
@pytest.mark.parametrize("ef", [True, False], ids=["ef", "no_ef"])
@pytest.mark.parametrize("kind", ["nan", "-nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("world", WORLDS)
def test_nonfinite_flags_whole_bucket(world, dtype, kind, ef):
    block = 32
    numels = [5 * block + 3, 1, 2 * block]
    n = sum(numels)
    g = gen("nonfinite", world, str(dtype), kind, ef)
    xs = [torch.randn(n, generator=g).to(dtype) for _ in range(world)]
    bad_rank = world - 1
    bad_block = 2  # of parameter 0: a middle block; the bad value sits mid-block, a larger
    bad_elem = bad_block * block + block // 2  # finite value after it (fmaxf would drop the NaN)
    if kind == "-nan":  # a NaN with the sign bit set, written as bits
        neg_nan = {torch.float32: -0x400000, torch.float16: -0x200, torch.bfloat16: -0x40}[dtype]
        bits_of(xs[bad_rank])[bad_elem] = neg_nan
        assert xs[bad_rank][bad_elem].isnan() and bits_of(xs[bad_rank])[bad_elem] < 0
    else:
        xs[bad_rank][bad_elem] = {"nan": float("nan"), "inf": float("inf"), "-inf": -float("inf")}[kind]
    xs[bad_rank][bad_elem + 3] = 50.0
    residuals = make_residuals(numels, world, g) if ef else None
    before = clone_residuals(residuals)
    ex = exchange(xs, numels, block, world, residuals)
    S, sb = ex.slots, ex.sb
    owner = bad_block % world

    for w in range(world):
        assert ex.outs[w].isnan().all(), f"rank {w}: {int((~ex.outs[w].isnan()).sum())} elements not NaN"
    for w in range(world):
        for o in range(world):
            flag, rest, *_ = split_shard(ex.sends[w][o * sb : (o + 1) * sb], S, block)
            assert flag == int(w == bad_rank and o == owner), f"flag of shard {o} sent by rank {w}"
            assert not rest.any()
        flag, rest, *_ = split_shard(ex.slices[w], S, block)
        assert flag == int(w == owner), f"flag of rank {w}'s reduced slice"
        assert not rest.any()
    if not ef:
        return
    for snap in (ex.res_enc, ex.res_red):
        for w in range(world):
            for p, r in enumerate(snap[w]):
                assert torch.isfinite(r).all(), f"rank {w} param {p}: non-finite residual"
    # the poisoned block on the bad rank keeps its old residual, cleared where a is not finite
    sl = slice(bad_block * block, (bad_block + 1) * block)
    old = before[bad_rank][0][sl]
    a = xs[bad_rank][sl].float() + old
    want = torch.where(torch.isfinite(a), old, torch.zeros_like(old))
    assert_bits_equal(ex.res_enc[bad_rank][0][sl], want, "poisoned block's residual after encode")
    assert_bits_equal(ex.res_red[bad_rank][0][sl], want, "poisoned block's residual after reduce")
    # every residual, bit for bit (reference pieces; finite blocks keep their normal update)
    for p, (off, cnt, owners) in enumerate(param_slices(numels, block, world)):
        orc = compressed_allreduce([x[off : off + cnt] for x in xs], [rr[p] for rr in before], block, owners)
        assert orc.nonfinite2.tolist() == [p == 0 and j == bad_block for j in range(owners.numel())]
        for w in range(world):
            assert_bits_equal(ex.res_enc[w][p], orc.stage1[w][2], f"param {p} residual of rank {w} after encode")
            assert_bits_equal(ex.res_red[w][p], orc.res_after[w], f"param {p} residual of rank {w} after reduce")


def test_nonfinite_outside_the_table_is_ignored():
    # elements no span names (an uncompressed lane) are neither read nor written
    block, world = 32, 2
    spans = [layout.Span(3, 100, 0), layout.Span(110, 50, 4)]
    table = layout.build_table(spans, block, world)
    S, sb = table.slots, table.shard_bytes()
    g = gen("gaps")
    xs = [torch.randn(170, generator=g) for _ in range(world)]
    gaps = torch.ones(170, dtype=torch.bool)
    gaps[3:103] = False
    gaps[110:160] = False
    for x in xs:
        x[gaps] = float("nan")
    sends = [ops.quant_encode(x, table.table, world, S, block) for x in xs]
    recvs = [torch.cat([s[w * sb : (w + 1) * sb] for s in sends]) for w in range(world)]
    gathered = torch.cat([ops.quant_reduce(recvs[w], table.rows_of(w), world, S, block) for w in range(world)])
    for w in range(world):
        assert split_shard(gathered[w * sb : (w + 1) * sb], S, block)[0] == 0
    out = torch.randn(170, generator=g)
    keep = out.clone()
    ops.quant_decode(gathered, table.table, world, S, block, out)
    assert_bits_equal(out[gaps], keep[gaps], "decode wrote outside the table")
    for off, n in ((3, 100), (110, 50)):
        owners = torch.tensor([0, 1, 0, 1]) if off == 3 else torch.tensor([0, 1])
        mean, _ = compressed_mean([x[off : off + n] for x in xs], [None] * world, block, owners)
        assert_bits_equal(out[off : off + n], mean, f"span at {off}")


# ------------------------------------------------------------------------------ payload format
@pytest.mark.parametrize("block", ops.BLOCK_SIZES)
def test_shard_bytes_formula(block):
    for slots in (0, 1, 2, 3, 4, 5, 7, 8, 100, 1001):
        want = 16 + -(-4 * slots // 16) * 16 + slots * block
        assert ops.shard_bytes(slots, block) == want, (slots, block)
        numels = [block * slots]
        if slots:
            assert layout.build_table(layout.contiguous_spans(numels, block), block, 1).shard_bytes() == want


@pytest.mark.parametrize("world", WORLDS)
def test_payload_size_depends_on_sizes_only(world):
    block = 256
    numels = [1000, 1, 513]
    g = gen("size", world)
    datasets = [
        [torch.randn(1514, generator=g) for _ in range(world)],
        [torch.randn(1514, generator=g) * 1e30 for _ in range(world)],
        [torch.zeros(1514) for _ in range(world)],
        [torch.full((1514,), float("nan")) for _ in range(world)],
    ]
    sizes = set()
    for xs in datasets:
        ex = exchange(xs, numels, block, world, make_residuals(numels, world, g))
        sizes.add((tuple(s.numel() for s in ex.sends), tuple(s.numel() for s in ex.slices)))
    assert len(sizes) == 1
    ((send_sizes, slice_sizes),) = sizes
    nb = 4 + 1 + 3
    slots = -(-nb // world)
    sb = 16 + -(-4 * slots // 16) * 16 + slots * block
    assert send_sizes == (world * sb,) * world and slice_sizes == (sb,) * world


@pytest.mark.parametrize("nonfinite", [False, True], ids=["finite", "nan"])
@pytest.mark.parametrize("block", [32, 256])
def test_unused_bytes_and_padding_slots_are_zero(block, nonfinite):
    # 4 blocks over 3 ranks: owners 0, 1, 2, 0 -> 2 slots; ranks 1 and 2 have a padding slot,
    # 8 bytes of scales padded to 16, and the last block is short (3 missing values)
    world = 3
    n = 4 * block - 3
    table = layout.build_table(layout.contiguous_spans([n], block), block, world)
    S, sb = table.slots, table.shard_bytes()
    assert S == 2
    assert table.table[2:, 1].tolist() == [block, 0, block, 0]  # rank 1's and rank 2's padding rows
    x = torch.randn(n, generator=gen("padding", block, nonfinite)) * 3
    if nonfinite:
        x[5] = float("nan")
    send = torch.full((world * sb,), 0xAB, dtype=torch.uint8)  # garbage: every byte must be written
    assert ops.quant_encode(x, table.table, world, S, block, out=send) is send
    for o in range(world):
        flag, rest, scales, scale_pad, codes = split_shard(send[o * sb : (o + 1) * sb], S, block)
        assert flag == int(nonfinite and o == 0)
        assert not rest.any() and not scale_pad.any() and scale_pad.numel() == 8
        if o > 0:
            assert bits_of(scales[1]).item() == 0 and not codes[1].any(), f"padding slot of shard {o}"
    _, _, _, _, codes0 = split_shard(send[:sb], S, block)
    assert not codes0[1, block - 3 :].any(), "codes past the end of the short last block"
    for w in range(world):
        recv = torch.cat([send[w * sb : (w + 1) * sb]] * world)
        out = torch.full((sb,), 0xCD, dtype=torch.uint8)
        assert ops.quant_reduce(recv, table.rows_of(w), world, S, block, out=out) is out
        flag, rest, scales, scale_pad, codes = split_shard(out, S, block)
        assert flag == int(nonfinite and w == 0)
        assert not rest.any() and not scale_pad.any()
        if w > 0:
            assert bits_of(scales[1]).item() == 0 and not codes[1].any(), f"padding slot of slice {w}"
        else:
            assert not codes[1, block - 3 :].any()


def test_results_do_not_depend_on_thread_count():
    block, world = 32, 2
    numels = [5000, 77]
    g = gen("threads")
    xs = [torch.randn(5077, generator=g) for _ in range(world)]
    xs[1][4000] = float("nan")
    res0 = make_residuals(numels, world, g)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 4):
            torch.set_num_threads(t)
            res = clone_residuals(res0)
            ex = exchange(xs, numels, block, world, res)
            results.append((ex.sends, ex.slices, res))
    finally:
        torch.set_num_threads(threads)
    for sends, slices, res in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(sends, results[0][0]))
        assert all(torch.equal(a, b) for a, b in zip(slices, results[0][1]))
        assert all(bits_equal(a, b) for ra, rb in zip(res, results[0][2]) for a, b in zip(ra, rb))


# ------------------------------------------------------------------------------ errors
@pytest.fixture
def args():
    block, world = 32, 2
    table = layout.build_table(layout.contiguous_spans([100], block), block, world)
    S, sb = table.slots, table.shard_bytes()
    return types.SimpleNamespace(block=block, world=world, S=S, sb=sb, table=table.table, rows=table.rows_of(0),
                                 bucket=torch.randn(100), payload=torch.zeros(world * sb, dtype=torch.uint8))


def _enc(a, **kw):
    p = dict(bucket=a.bucket, table=a.table, world=a.world, slots=a.S, block=a.block)
    p.update(kw)
    return lambda: ops.quant_encode(**p)


def _red(a, **kw):
    p = dict(recv=a.payload, my_rows=a.rows, world=a.world, slots=a.S, block=a.block)
    p.update(kw)
    return lambda: ops.quant_reduce(**p)


def _dec(a, **kw):
    p = dict(gathered=a.payload, table=a.table, world=a.world, slots=a.S, block=a.block, bucket=a.bucket)
    p.update(kw)
    return lambda: ops.quant_decode(**p)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same bytes, starting one byte past a 16-byte boundary."""
    m = torch.zeros(t.numel() + 1, dtype=t.dtype)[1:]
    m.copy_(t)
    return m


def _edited(table: torch.Tensor, row: int, col: int, value: int) -> torch.Tensor:
    t = table.clone()
    t[row, col] = value
    return t


BAD_CALLS = {
    "encode out misaligned": (ValueError, lambda a: _enc(a, out=_misaligned(a.payload))),
    "reduce recv misaligned": (ValueError, lambda a: _red(a, recv=_misaligned(a.payload))),
    "reduce out misaligned": (ValueError, lambda a: _red(a, out=_misaligned(torch.zeros(a.sb, dtype=torch.uint8)))),
    "decode gathered misaligned": (ValueError, lambda a: _dec(a, gathered=_misaligned(a.payload))),
    "encode row past the bucket": (ValueError, lambda a: _enc(a, table=_edited(a.table, 1, 0, 90))),
    "encode negative offset": (ValueError, lambda a: _enc(a, table=_edited(a.table, 0, 0, -1))),
    "encode length over the block": (ValueError, lambda a: _enc(a, table=_edited(a.table, 0, 1, 33))),
    "encode negative length": (ValueError, lambda a: _enc(a, table=_edited(a.table, 2, 1, -5))),
    "decode row past the bucket": (ValueError, lambda a: _dec(a, table=_edited(a.table, 0, 0, 10**12))),
    "reduce length over the block": (ValueError, lambda a: _red(a, my_rows=_edited(a.rows, 0, 1, 64))),
    "encode float64 bucket": (TypeError, lambda a: _enc(a, bucket=a.bucket.double())),
    "encode int32 bucket": (TypeError, lambda a: _enc(a, bucket=torch.zeros(100, dtype=torch.int32))),
    "encode list bucket": (TypeError, lambda a: _enc(a, bucket=[0.0] * 100)),
    "encode int32 table": (TypeError, lambda a: _enc(a, table=a.table.int())),
    "encode non-contiguous bucket": (ValueError, lambda a: _enc(a, bucket=torch.randn(200)[::2])),
    "encode 2-D bucket": (ValueError, lambda a: _enc(a, bucket=a.bucket.view(10, 10))),
    "encode short table": (ValueError, lambda a: _enc(a, table=a.table[:-1].contiguous())),
    "encode transposed table": (ValueError, lambda a: _enc(a, table=a.table.t().contiguous())),
    "encode non-contiguous table": (ValueError, lambda a: _enc(a, table=a.table.t().contiguous().t())),
    "encode table for another world": (ValueError, lambda a: _enc(a, world=3)),
    "encode out too small": (ValueError, lambda a: _enc(a, out=a.payload[:-1])),
    "encode out too large": (ValueError, lambda a: _enc(a, out=torch.zeros(a.world * a.sb + 16, dtype=torch.uint8))),
    "encode out float": (TypeError, lambda a: _enc(a, out=torch.zeros(a.world * a.sb // 4))),
    "encode block 48": (ValueError, lambda a: _enc(a, block=48)),
    "encode block 16": (ValueError, lambda a: _enc(a, block=16)),
    "encode block 8192": (ValueError, lambda a: _enc(a, block=8192)),
    "encode bits 3": (ValueError, lambda a: _enc(a, bits=3)),
    "reduce recv too small": (ValueError, lambda a: _red(a, recv=a.payload[:-1])),
    "reduce float recv": (TypeError, lambda a: _red(a, recv=torch.zeros(a.world * a.sb // 4))),
    "reduce whole table as rows": (ValueError, lambda a: _red(a, my_rows=a.table)),
    "reduce int32 rows": (TypeError, lambda a: _red(a, my_rows=a.rows.int())),
    "reduce out wrong size": (ValueError, lambda a: _red(a, out=torch.zeros(a.sb - 1, dtype=torch.uint8))),
    "reduce block 48": (ValueError, lambda a: _red(a, block=48)),
    "reduce block 8192": (ValueError, lambda a: _red(a, block=8192)),
    "reduce bits 16": (ValueError, lambda a: _red(a, bits=16)),
    "decode float64 bucket": (TypeError, lambda a: _dec(a, bucket=a.bucket.double())),
    "decode 2-D bucket": (ValueError, lambda a: _dec(a, bucket=a.bucket.view(10, 10))),
    "decode non-contiguous bucket": (ValueError, lambda a: _dec(a, bucket=torch.randn(200)[::2])),
    "decode gathered too large": (ValueError, lambda a: _dec(a, gathered=torch.zeros(a.world * a.sb + 1,
                                                                                     dtype=torch.uint8))),
    "decode int32 table": (TypeError, lambda a: _dec(a, table=a.table.int())),
    "decode short table": (ValueError, lambda a: _dec(a, table=a.table[1:].contiguous())),
    "decode block 16": (ValueError, lambda a: _dec(a, block=16)),
    "decode bits 16": (ValueError, lambda a: _dec(a, bits=16)),
    "encode float16 residuals": (TypeError, lambda a: _enc(a, residual_dtype=torch.float16)),
    "reduce float64 residuals": (TypeError, lambda a: _red(a, residual_dtype=torch.float64)),
    "encode stochastic sign": (ValueError, lambda a: _enc(a, bits=1, stochastic=True)),
    "reduce stochastic sign": (ValueError, lambda a: _red(a, bits=1, stochastic=True)),
    "encode negative seed": (ValueError, lambda a: _enc(a, stochastic=True, seed=-1)),
    "encode seed past 64 bits": (ValueError, lambda a: _enc(a, stochastic=True, seed=1 << 64)),
    "encode float step": (ValueError, lambda a: _enc(a, stochastic=True, step=1.5)),
    "reduce rank past 32 bits": (ValueError, lambda a: _red(a, stochastic=True, rank=1 << 32)),
    "encode 3-word table": (ValueError, lambda a: _enc(a, table=a.table[:, :3].contiguous())),
    # wrong device ("meta" stands in for a device other than the bucket's on a CPU-only machine)
    "encode bucket on another device": (ValueError, lambda a: _enc(a, bucket=a.bucket.to("meta"))),
    "encode table on another device": (ValueError, lambda a: _enc(a, table=a.table.to("meta"))),
    "reduce rows on another device": (ValueError, lambda a: _red(a, my_rows=a.rows.to("meta"))),
    "decode gathered on another device": (ValueError, lambda a: _dec(a, gathered=a.payload.to("meta"))),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_raise_clear_errors(args, case):
    exc, make = BAD_CALLS[case]
    before = args.bucket.clone()
    with pytest.raises(exc, match="gradcomp"):
        make(args)()
    assert torch.equal(args.bucket, before)


# ------------------------------------------------------------------------------ error feedback
def _ef_run(world, steps, ef, seed_key):
    block = 256
    numels = [1500, 700, 1]
    n = sum(numels)
    g = gen(*seed_key)
    grads = [torch.randn(n, generator=g) * (1 + 9 * torch.rand(n, generator=g)) for _ in range(world)]
    res = [[torch.zeros(k) for k in numels] for _ in range(world)] if ef else None
    exact = torch.stack([x.double() for x in grads]).mean(0)
    total = torch.zeros(n, dtype=torch.float64)
    G = max(float(x.abs().max()) for x in grads)
    history = []
    for step in range(1, steps + 1):
        ex = exchange(grads, numels, block, world, res)
        for w in range(1, world):
            assert torch.equal(ex.outs[w], ex.outs[0])
        total += ex.outs[0].double()
        drift = total - step * exact
        history.append((step, drift, None if res is None else torch.cat([torch.cat(r) for r in res])))
    return G, history


@pytest.mark.parametrize("world", [2, 4])
def test_error_feedback_keeps_running_sum_on_track(world):
    steps = 200
    G, history = _ef_run(world, steps, True, ("ef", world))
    # |residual| <= E: stage 1 leaves <= absmax/254, stage 2 adds W * <= absmax/254, on values
    # bounded by G + E; the drift -(1/W) sum_r e_r is then <= 2 (G + E) / 254 (+ rounding)
    E = (1 + world) * G / (254 - 1 - world)
    bound = 2 * (G + E) / 254 * 1.01
    eps = torch.finfo(torch.float32).eps
    norms = []
    for step, drift, res_flat in history:
        ident = -res_flat.double().view(world, -1).sum(0) / world
        tol = step * 2 * eps * G
        err = float((drift - ident).abs().max())
        assert err <= tol, f"step {step}: running-sum identity off by {err} (tol {tol})"
        assert float(drift.abs().max()) <= bound, f"step {step}: drift {float(drift.abs().max())} > {bound}"
        assert float(res_flat.abs().max()) <= E * 1.01
        norms.append(float(drift.norm()))
    # no growth: the last 50 steps drift no more than the first 50 (give or take)
    assert max(norms[-50:]) <= 1.5 * max(norms[:50])


def test_without_error_feedback_drift_grows():
    # the same loop without error feedback repeats the same bias every step: the bound above fails
    world, steps = 2, 200
    G, history = _ef_run(world, steps, False, ("no-ef", world))
    E = (1 + world) * G / (254 - 1 - world)
    bound = 2 * (G + E) / 254 * 1.01
    first, last = history[0][1], history[-1][1]
    assert torch.allclose(last, steps * first, rtol=1e-6, atol=1e-9)
    assert float(last.abs().max()) > 10 * bound


# ------------------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("block", [32, 256])
@pytest.mark.parametrize("world", WORLDS)
def test_accuracy_against_exact_mean(world, block):
    # per element: stage 1 errs by <= scale_r / 2 = absmax_r / 254 on each rank (so the average
    # by <= mean_r absmax_r / 254); stage 2 by <= absmax(stage-1 mean) / 254
    numels = [20000, 333, 1]
    n = sum(numels)
    g = gen("accuracy", world, block)
    xs = [torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g)) for _ in range(world)]
    ex = exchange(xs, numels, block, world, None)
    got = ex.outs[0].double()
    exact = torch.stack([x.double() for x in xs]).mean(0)
    rel_max = 0.0
    for off, cnt, _ in param_slices(numels, block, world):
        nb = layout.num_blocks(cnt, block)

        def absmax_blocks(v, cnt=cnt, nb=nb):
            padded = torch.zeros(nb * block, dtype=torch.float64)
            padded[:cnt] = v.abs()
            return padded.view(nb, block).amax(1)

        e1 = sum(absmax_blocks(x[off : off + cnt].double()) for x in xs) / world / 254
        e2 = (absmax_blocks(exact[off : off + cnt]) + e1) / 254
        bound = ((e1 + e2) * (1 + 1e-5) + 1e-30).repeat_interleave(block)[:cnt]
        err = (got[off : off + cnt] - exact[off : off + cnt]).abs()
        assert (err <= bound).all(), f"error {float((err / bound).max())} x the bound"
        rel_max = max(rel_max, float((err / bound).max()))
    assert rel_max > 0.05  # the bound is not vacuous: errors come within reach of it


# ------------------------------------------------------------------------------ instruction sets
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("bits", "stochastic", "rdtype"), [(8, False, torch.float32), (4, True, torch.float32),
                                                          (2, False, torch.bfloat16), (1, False, torch.float32),
                                                          (8, True, torch.bfloat16)])
def test_cpu_instruction_sets_give_the_same_bytes(dtype, bits, stochastic, rdtype):
    """The CPU kernels are built per instruction set and chosen at run time; each must
    produce the same payloads, residuals and outputs (and so the reference's)."""
    from gradcomp import _C

    isas = [isa for isa in ("baseline", "avx2") if _C.set_cpu_isa(isa)]
    _C.set_cpu_isa("auto")
    assert "baseline" in isas
    world, block, numels = 3, 256, [1000, 1, 256, 4097, 30_000]
    g = gen("isa", str(dtype), bits, stochastic, str(rdtype))
    xs = [(torch.randn(sum(numels), generator=g) * 10).to(dtype) for _ in range(world)]
    res0 = [[r.to(rdtype) for r in rr] for rr in make_residuals(numels, world, g, scale=0.5)]
    rounding = {"seed": 77, "step": 5} if stochastic else None
    runs = []
    try:
        for isa in isas:
            assert _C.set_cpu_isa(isa) and _C.cpu_isa() == isa
            residuals = clone_residuals(res0)
            ex = exchange(xs, numels, block, world, residuals, bits, rounding)
            runs.append((ex, residuals))
    finally:
        _C.set_cpu_isa("auto")
    for ex, residuals in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(ex.sends, runs[0][0].sends))
        assert all(torch.equal(a, b) for a, b in zip(ex.slices, runs[0][0].slices))
        assert all(bits_equal(a, b) for a, b in zip(ex.outs, runs[0][0].outs))
        assert all(bits_equal(a, b) for ra, rb in zip(residuals, runs[0][1]) for a, b in zip(ra, rb))
    assert not _C.set_cpu_isa("sse9")


# ------------------------------------------------------------------------------ low-bit codes
@pytest.mark.parametrize("bits", [4, 2, 1], ids=["int4", "int2", "sign"])
def test_packing_round_trips(bits):
    g = gen("pack", bits)
    lo, hi = (-1, 2) if bits == 1 else (-(1 << (bits - 1)) + 1, 1 << (bits - 1))
    codes = torch.randint(lo, hi, (7, 64), generator=g, dtype=torch.int8)
    if bits == 1:
        codes[codes == 0] = 1
    packed = pack_codes(codes, bits)
    assert packed.shape == (7, 64 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("bits", [4, 2, 1], ids=["int4", "int2", "sign"])
@pytest.mark.parametrize("world", [1, 3])
def test_low_bit_every_length_and_offset(bits, world):
    # parameters of every length from 1 to 2 blocks + 1, back to back, so blocks start at
    # every offset of a code byte and end at every position in it
    block = 32
    numels = list(range(1, 2 * block + 2))
    g = gen("lengths", bits, world)
    n = sum(numels)
    xs = [torch.randn(n, generator=g) for _ in range(world)]
    residuals = make_residuals(numels, world, g)
    before = clone_residuals(residuals)
    ex = exchange(xs, numels, block, world, residuals, bits)
    check_against_reference(ex, xs, before, numels, block, world, torch.float32, bits)


def test_sign_scale_is_the_mean_absolute_value():
    g = gen("sign-mean")
    for length in (1, 3, 31, 32, 200, 256):
        for mag in (1e-30, 1.0, 1e30):
            a = torch.randn(length, generator=g) * mag * (1 + 10 * torch.rand(length, generator=g))
            scales, codes, deq, _ = block_quantize(a, 256, bits=1)
            want = a.double().abs().mean()
            assert abs(float(scales[0]) - float(want)) <= 2 * 2**-23 * float(want)
            assert torch.equal(codes[0, :length], torch.where(a < 0, -1, 1).to(torch.int8))
            # and the kernel agrees with the reference bit for bit
            ex = exchange([a], [length], 256, 1, None, bits=1)
            *_, kernel_scales, _, _ = split_shard(ex.sends[0], ex.slots, 256, 1)
            assert_bits_equal(kernel_scales[:1], scales, f"sign scale, length {length}, magnitude {mag}")


@pytest.mark.parametrize("bits", [4, 2, 1], ids=["int4", "int2", "sign"])
def test_low_bit_error_feedback_running_mean_converges(bits):
    # A fixed gradient per rank: with error feedback the residual stays bounded, so the
    # running mean of what every rank receives converges to the exact mean like 1/T. (The
    # scaled sign's residual takes a few hundred steps to level off, larger than int4's.)
    world, block = 2, 64
    numels = [1000, 300]
    g = gen("ef-low", bits)
    xs = [torch.randn(1300, generator=g) * (1 + 5 * torch.rand(1300, generator=g)) for _ in range(world)]
    exact = torch.stack([x.double() for x in xs]).mean(0)
    residuals = [[torch.zeros(k) for k in numels] for _ in range(world)]
    total = torch.zeros(1300, dtype=torch.float64)
    err, res_norm = {}, {}
    for t in range(1, 401):
        total += exchange(xs, numels, block, world, residuals, bits).outs[0].double()
        if t in (100, 200, 400):
            err[t] = float((total / t - exact).norm() / exact.norm())
            res_norm[t] = float(sum(r.double().norm() for rr in residuals for r in rr))
    assert res_norm[400] < 1.25 * res_norm[200], res_norm  # bounded, not growing with T
    assert err[400] < err[100] / 2.5, err
    assert err[400] < 0.05, err
