"""Top-k and random-k (ops.topk_* / ops.randomk_*) on CPU, held bit for bit to the pure-torch
reference (tests/support/reference.py), plus corrupted payloads, non-finite values, the approximate
variant's recall and the codecs' spec grammar.

A W-rank exchange is simulated in one process: every rank encodes its own bucket (its own
residuals), the payloads are concatenated in rank order as all_gather would, and every rank
decodes the same concatenation.
"""

from __future__ import annotations

import gradcomp
import pytest
import reference as ref
import torch
from gradcomp import codecs, ops
from gradcomp.engine import layout
from harness import SparseBucket as Bucket
from harness import assert_bits_equal, bits_equal, check_sparse_hook_at_world_one, gen

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
WIRES = [torch.float32, torch.float16, torch.bfloat16]
HEADER = 16


def split_payload(payload: torch.Tensor, table: layout.SparseTable, wire: torch.dtype):
    """(flag, [(indices int32, values float32) per row]) of a top-k payload."""
    k_total = table.pairs
    assert payload.numel() == ops.topk_payload_bytes(k_total, wire)
    vals_off = HEADER + -(-4 * k_total // 16) * 16
    flag = int(payload[:4].clone().view(torch.int32)[0])
    assert not payload[4:HEADER].any() and not payload[HEADER + 4 * k_total : vals_off].any()
    idx = payload[HEADER : HEADER + 4 * k_total].clone().view(torch.int32)
    nb = k_total * wire.itemsize
    vals = payload[vals_off : vals_off + nb].clone().view(wire).float()
    assert not payload[vals_off + nb :].any()
    rows = []
    for k, first in table.table[:, [3, 4]].tolist():
        rows.append((idx[first : first + k], vals[first : first + k]))
    return flag, rows


# ------------------------------------------------------------------------------ selection
@pytest.mark.parametrize("n", [1, 2, 100, 4097, 70_001, 300_000])
@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.3, 1.0])
def test_exact_topk_selects_torch_topk_set(n, ratio):
    """Random data without ties: the same set as torch.topk of |a|, in ascending order."""
    g = gen(n, ratio)
    sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    x = (torch.randperm(n, generator=g) + 1).float() * 1e-3 * sign  # distinct magnitudes: no ties
    assert torch.unique(x.abs()).numel() == n
    b = Bucket([n], torch.float32, g, ef=False, ratio=ratio, gap=0)
    b.x.copy_(x)
    payload = ops.topk_encode(b.x, b.table.table, b.table.pairs)
    flag, [(idx, vals)] = split_payload(payload, b.table, torch.float32)
    k = codecs.pairs_for(n, ratio)
    want = torch.topk(x.abs(), k).indices.sort().values
    assert flag == 0
    assert torch.equal(idx.long(), want)
    assert_bits_equal(vals, x[want])


@pytest.mark.parametrize("approx", [False, True], ids=["exact", "approx"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize("ef", [True, False], ids=["ef", "noef"])
def test_topk_encode_matches_reference(approx, dtype, wire, ef):
    """Several parameters (small ones one per thread, large ones split over threads): indices,
    values and residuals bit for bit; gaps untouched."""
    g = gen(approx, dtype, wire, ef)
    b = Bucket([1, 33, 5000, 70_000, 200_003], dtype, g, ef=ef, ratio=0.01, scale=1e3)
    before_x = b.x.clone()
    before_res = [r.clone() if r is not None else None for r in b.residuals]
    payload = ops.topk_encode(b.x, b.table.table, b.table.pairs, approx=approx, value_dtype=wire)
    flag, rows = split_payload(payload, b.table, wire)
    assert flag == 0
    assert torch.equal(b.x, before_x)
    for i, n in enumerate(b.numels):
        idx, vals, res, bad = ref.topk_encode(before_x[b.offsets[i] : b.offsets[i] + n], before_res[i],
                                              codecs.pairs_for(n, 0.01), approx, wire)
        assert not bad
        assert torch.equal(rows[i][0], idx), f"row {i}: indices"
        assert_bits_equal(rows[i][1], vals, f"row {i}: values")
        if ef:
            assert_bits_equal(b.residuals[i], res, f"row {i}: residual")


def test_ties_go_to_the_lowest_indices():
    x = torch.zeros(10_000)
    x[5000:] = 1.0  # 5000 equal largest values
    x[7] = -1.0  # |-1| ties with them and has the lowest index
    for approx in (False, True):
        b = Bucket([10_000], torch.float32, gen(approx), ef=False, ratio=0.01, gap=0)
        b.x.copy_(x)
        _, [(idx, vals)] = split_payload(ops.topk_encode(b.x, b.table.table, b.table.pairs, approx=approx),
                                         b.table, torch.float32)
        assert idx.tolist() == [7] + list(range(5000, 5099))
        assert vals[0] == -1.0 and (vals[1:] == 1.0).all()
    zeros = Bucket([300], torch.float32, gen(0), ef=True, ratio=0.1, gap=0)
    zeros.x.zero_()
    zeros.residuals[0].zero_()
    _, [(idx, vals)] = split_payload(ops.topk_encode(zeros.x, zeros.table.table, zeros.table.pairs), zeros.table,
                                     torch.float32)
    assert idx.tolist() == list(range(30)) and not vals.any()


@pytest.mark.parametrize("approx", [False, True], ids=["exact", "approx"])
def test_non_finite_values_are_selected_first_flagged_and_leave_no_residual(approx):
    g = gen("nan", approx)
    b = Bucket([50_000, 3000], torch.float32, g, ratio=0.001)
    p = b.param(0)
    p[100] = float("nan")
    p[40_000] = float("inf")
    p[20] = -float("inf")
    b.residuals[0][30_000] = float("nan")  # a residual carried in non-finite counts as well
    res_before = [r.clone() for r in b.residuals]
    x_before = b.x.clone()
    payload = ops.topk_encode(b.x, b.table.table, b.table.pairs, approx=approx)
    flag, rows = split_payload(payload, b.table, torch.float32)
    assert flag == 1
    idx, vals = rows[0]
    assert {20, 100, 30_000, 40_000} <= set(idx.tolist())  # NaN and Inf rank above every finite value
    for r in b.residuals:
        assert torch.isfinite(r).all()
    want_idx, want_vals, want_res, bad = ref.topk_encode(x_before[b.offsets[0] : b.offsets[0] + 50_000],
                                                         res_before[0], 50, approx)
    assert bad and torch.equal(idx, want_idx) and bits_equal(vals, want_vals)
    assert_bits_equal(b.residuals[0], want_res)


def test_approx_recall():
    """Gaussian and heavy-tailed gradients: the sampled threshold admits at least k values, so
    the approximate selection is the exact one (recall 1). Spikes the sample misses: exactly
    k pairs still, the reference's choice, and recall at least (admitted) / k."""
    g = gen("recall")
    n, k = 1_000_000, 10_000
    for x in (torch.randn(n, generator=g), torch.distributions.StudentT(2.0).sample((n,))):
        b = Bucket([n], torch.float32, g, ef=False, ratio=0.01, gap=0)
        b.x.copy_(x)
        _, [(idx, _)] = split_payload(ops.topk_encode(b.x, b.table.table, k, approx=True), b.table, torch.float32)
        assert torch.equal(idx.long(), ref.topk_exact(x, k))
    # 3000 spikes between the sample's positions (every 100th value is sampled): the sample sees
    # only the background, its threshold admits ~1.5% of the background plus the spikes
    x = torch.rand(n, generator=g)
    spikes = torch.arange(3000) * 300 + 1
    x[spikes] = 10.0
    b = Bucket([n], torch.float32, g, ef=False, ratio=0.01, gap=0)
    b.x.copy_(x)
    _, [(idx, _)] = split_payload(ops.topk_encode(b.x, b.table.table, k, approx=True), b.table, torch.float32)
    assert idx.numel() == k and torch.equal(idx.long(), ref.topk_approx(x, k))
    exact = set(ref.topk_exact(x, k).tolist())
    assert set(spikes.tolist()) <= set(idx.tolist())
    assert len(exact & set(idx.tolist())) / k >= 0.99


# ------------------------------------------------------------------------------ exchange
def simulate(world, dtype, wire, approx, g, numels=(40, 5000, 70_000), ratio=0.02):
    buckets = [Bucket(list(numels), dtype, g, ratio=ratio) for _ in range(world)]
    res_before = [[r.clone() for r in b.residuals] for b in buckets]
    x_before = [b.x.clone() for b in buckets]
    payloads = [ops.topk_encode(b.x, b.table.table, b.table.pairs, approx=approx, value_dtype=wire)
                for b in buckets]
    gathered = torch.cat(payloads)
    outs = []
    for b in buckets:
        out = b.x.clone()
        assert ops.topk_decode(gathered, b.table.table, b.table.pairs, world, out, value_dtype=wire) == 0
        outs.append(out)
    want = x_before[0].clone()
    for i, n in enumerate(numels):
        o = buckets[0].offsets[i]
        pairs = [ref.topk_encode(x_before[r][o : o + n], res_before[r][i], codecs.pairs_for(n, ratio), approx,
                                 wire)[:2] for r in range(world)]
        want[o : o + n] = ref.sparse_decode(pairs, n).to(dtype)
    return buckets, outs, want


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wire", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_topk_exchange_matches_reference_and_replicas_agree(world, dtype, wire):
    buckets, outs, want = simulate(world, dtype, wire, False, gen(world, dtype, wire))
    gaps = buckets[0].gap_mask()
    for r, out in enumerate(outs):
        assert_bits_equal(out[~gaps], want[~gaps], f"rank {r}")
        assert torch.equal(out[gaps], buckets[r].x[gaps]), f"rank {r} wrote outside the rows"


@pytest.mark.parametrize("codec", ["topk:0.01", "topk:0.01:approx:fp16", "randomk:0.01"])
def test_ddp_sparse_hook_at_world_one_is_the_reference(one_rank_group, codec):
    """The sparse hooks through DDP on Gloo at W = 1, compression forced: every compressed
    gradient is, step by step, the reference's k values of the local gradient plus the
    residual, bit for bit (harness.check_sparse_hook_at_world_one, the check tests/cuda/test_cuda.py
    makes on NCCL)."""
    check_sparse_hook_at_world_one(codec, torch.device("cpu"), steps=3)


def test_topk_decode_non_finite_flag_makes_every_row_nan():
    g = gen("flag")
    buckets = [Bucket([3000, 70_000], torch.float32, g, ratio=0.001) for _ in range(3)]
    buckets[1].param(1)[12_345] = float("nan")  # one rank, one value (picked or not)
    payloads = [ops.topk_encode(b.x, b.table.table, b.table.pairs) for b in buckets]
    gathered = torch.cat(payloads)
    for b in buckets:
        out = b.x.clone()
        assert ops.topk_decode(gathered, b.table.table, b.table.pairs, 3, out) == 0
        gaps = b.gap_mask()
        assert out[~gaps].isnan().all()
        assert torch.equal(out[gaps], b.x[gaps])


def test_a_nan_that_topk_did_not_pick_still_flags_the_bucket():
    """k = 1 and three NaNs: two are not sent, the flag still marks the bucket."""
    b = Bucket([1000], torch.float32, gen("unpicked"), ef=False, ratio=0.001, gap=0)
    b.param(0)[[5, 500, 900]] = float("nan")
    flag, [(idx, vals)] = split_payload(ops.topk_encode(b.x, b.table.table, b.table.pairs), b.table, torch.float32)
    assert idx.tolist() == [5] and vals.isnan().all() and flag == 1


@pytest.mark.parametrize("corruption", ["out_of_range", "negative", "duplicate", "decreasing", "random_bytes"])
def test_corrupted_payloads_are_rejected_without_writing_out_of_bounds(corruption):
    """A payload is another process's input: every rank decodes the same gathered bytes, so
    every rank rejects alike and makes the compressed values NaN; nothing outside the rows
    (the gaps here stand for other parameters) is written, whatever the bytes."""
    g = gen("corrupt", corruption)
    world = 2
    buckets = [Bucket([3000, 50_000], torch.float32, g, ratio=0.01) for _ in range(world)]
    payloads = [ops.topk_encode(b.x, b.table.table, b.table.pairs) for b in buckets]
    k0 = b.table.pairs if (b := buckets[0]) else 0
    idx = payloads[1][HEADER : HEADER + 4 * k0].view(torch.int32)
    first1 = int(buckets[0].table.table[1, 4])
    if corruption == "out_of_range":
        idx[first1 + 3] = 50_000
    elif corruption == "negative":
        idx[0] = -1
    elif corruption == "duplicate":
        idx[first1 + 5] = idx[first1 + 4]
    elif corruption == "decreasing":
        idx[first1 + 5], idx[first1 + 6] = idx[first1 + 6].clone(), idx[first1 + 5].clone()
    else:
        payloads[1].copy_(torch.randint(0, 256, payloads[1].shape, generator=g, dtype=torch.uint8))
    gathered = torch.cat(payloads)
    for b in buckets:
        out = b.x.clone()
        rejected = ops.topk_decode(gathered, b.table.table, b.table.pairs, world, out)
        assert rejected >= 1
        gaps = b.gap_mask()
        assert out[~gaps].isnan().all()
        assert torch.equal(out[gaps], b.x[gaps])


def test_error_feedback_conserves_the_gradient():
    """Over many steps, what was sent plus what the residual holds is what came in: the sum of
    the decoded (W = 1) gradients plus the final residual equals the sum of the inputs."""
    g = gen("ef")
    n, steps = 20_000, 30
    r = torch.zeros(n)
    table = layout.build_sparse_table([layout.Span(0, n, 0, r.data_ptr(), 0)], 0.01)
    sent_sum, in_sum = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for _ in range(steps):
        x = torch.randn(n, generator=g)
        in_sum += x.double()
        payload = ops.topk_encode(x, table.table, table.pairs)
        out = torch.zeros(n)
        ops.topk_decode(payload, table.table, table.pairs, 1, out)
        sent_sum += out.double()
    torch.testing.assert_close(sent_sum + r.double(), in_sum, rtol=0, atol=1e-4)
    assert (sent_sum != 0).sum() > 0.2 * n  # the residual made small values travel eventually


# ------------------------------------------------------------------------------ random-k
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ef", [True, False], ids=["ef", "noef"])
def test_randomk_matches_reference(dtype, ef):
    g = gen("randomk", dtype, ef)
    seed, step = 1234567, 9
    b = Bucket([1, 100, 70_001], dtype, g, ef=ef, ratio=0.05, ordinals=[3, 4, 8])
    x_before, res_before = b.x.clone(), [r.clone() if r is not None else None for r in b.residuals]
    payload = ops.randomk_encode(b.x, b.table.table, b.table.pairs, seed=seed, step=step)
    assert payload[0] == 0 and not payload[1:4].any()
    for i, n in enumerate(b.numels):
        k = codecs.pairs_for(n, 0.05)
        idx = ref.randomk_indices(seed, step, b.ordinals[i], n, k)
        assert torch.equal(idx, idx.unique())  # distinct, ascending
        a = x_before[b.offsets[i] : b.offsets[i] + n].float()
        if ef:
            a = a + res_before[i]
        first = int(b.table.table[i, 4])
        assert_bits_equal(payload[4 + first : 4 + first + k], a[idx], f"row {i}")
        if ef:
            want = a.clone()
            want[idx] = 0
            assert_bits_equal(b.residuals[i], want)
    # decode: every rank sums the same values; value / W at the drawn indices, 0 elsewhere
    out = b.x.clone()
    ops.randomk_decode(payload * 3, b.table.table, 3, out, seed=seed, step=step)
    gaps = b.gap_mask()
    assert torch.equal(out[gaps], b.x[gaps])
    for i, n in enumerate(b.numels):
        k = codecs.pairs_for(n, 0.05)
        idx = ref.randomk_indices(seed, step, b.ordinals[i], n, k)
        first = int(b.table.table[i, 4])
        want = torch.zeros(n)
        want[idx] = (payload[4 + first : 4 + first + k] * 3) * (torch.tensor(1.0) / torch.tensor(3.0))
        assert_bits_equal(out[b.offsets[i] : b.offsets[i] + n], want.to(dtype))


def test_randomk_indices_are_shared_and_keyed():
    n, k = 100_000, 1000
    a = ref.randomk_indices(5, 1, 0, n, k)
    assert torch.equal(a, ref.randomk_indices(5, 1, 0, n, k))
    for other in (ref.randomk_indices(6, 1, 0, n, k), ref.randomk_indices(5, 2, 0, n, k),
                  ref.randomk_indices(5, 1, 1, n, k)):
        assert (a != other).float().mean() > 0.9
    strata = a // (n // k)
    assert torch.equal(strata, torch.arange(k))  # one per stratum
    hist = torch.bincount(torch.cat([ref.randomk_indices(5, s, 0, n, k) for s in range(200)]) % 100, minlength=100)
    assert hist.min() > 0.7 * hist.float().mean()  # uniform within strata


def test_randomk_flags_a_nan_it_did_not_pick():
    b = Bucket([10_000], torch.float32, gen("rk-nan"), ratio=0.01, gap=0)
    idx = set(ref.randomk_indices(1, 0, 0, 10_000, 100).tolist())
    spot = next(i for i in range(10_000) if i not in idx)
    b.param(0)[spot] = float("nan")
    payload = ops.randomk_encode(b.x, b.table.table, b.table.pairs, seed=1, step=0)
    assert payload[0] == 1.0
    assert torch.isfinite(b.residuals[0]).all()
    out = b.x.clone()
    ops.randomk_decode(payload, b.table.table, 2, out, seed=1, step=0)
    assert out.isnan().all()


# ------------------------------------------------------------------------------ validation, specs
def test_pairs_for_rounds_up_decimal_ratios():
    assert codecs.pairs_for(300, 0.01) == 3
    assert codecs.pairs_for(301, 0.01) == 4
    assert codecs.pairs_for(10, 0.001) == 1
    assert codecs.pairs_for(7, 1.0) == 7
    assert codecs.pairs_for(0, 0.5) == 0


def test_bad_tables_and_buffers_raise():
    b = Bucket([100], torch.float32, gen("bad"), ratio=0.1)
    t = b.table.table.clone()
    t[0, 3] = 101  # k > n
    with pytest.raises(ValueError, match="sparse table row 0"):
        ops.topk_encode(b.x, t, b.table.pairs + 91)
    t = b.table.table.clone()
    t[0, 0] = b.numel  # outside the bucket
    with pytest.raises(ValueError, match="sparse table row 0"):
        ops.topk_encode(b.x, t, b.table.pairs)
    with pytest.raises(ValueError, match="pairs"):
        ops.topk_encode(b.x, b.table.table, b.table.pairs + 1)
    with pytest.raises(ValueError, match="elements"):
        ops.topk_decode(torch.zeros(8, dtype=torch.uint8), b.table.table, b.table.pairs, 1, b.x)
    with pytest.raises(TypeError, match="value_dtype"):
        ops.topk_encode(b.x, b.table.table, b.table.pairs, value_dtype=torch.int8)
    with pytest.raises(ValueError, match="seed"):
        ops.randomk_encode(b.x, b.table.table, b.table.pairs, seed=-1, step=0)
    with pytest.raises(ValueError, match="2\\*\\*31"):
        layout.build_sparse_table([layout.Span(0, 1 << 31, 0)], 0.01)


def test_specs_classes_and_configs():
    c = codecs.parse("topk:0.001:approx:fp16")
    assert isinstance(c, gradcomp.TopK) and c.ratio == 0.001 and c.approx and c.value_dtype == torch.float16
    assert c == gradcomp.TopK(0.001, approx=True, value_dtype=torch.float16)
    assert codecs.parse("topk:0.01") == gradcomp.TopK(0.01)
    assert codecs.parse("topk:0.01:ef=0").error_feedback is False
    assert codecs.parse("randomk:0.01") == gradcomp.RandomK(0.01)
    assert eval(repr(c), {"TopK": gradcomp.TopK, "torch": torch}) == c
    assert c.config() == {"codec": "topk", "ratio": 0.001, "approx": True, "value_dtype": "fp16",
                          "error_feedback": True}
    for bad in ("topk", "topk:x", "topk:0", "topk:1.5", "topk:0.01:int8", "randomk:0.01:approx", "randomk:-1"):
        with pytest.raises(ValueError, match="bad codec spec"):
            codecs.parse(bad)
    with pytest.raises(ValueError, match="ratio"):
        gradcomp.TopK(0.0)
    with pytest.raises(ValueError, match="value_dtype"):
        gradcomp.TopK(0.1, value_dtype=torch.int8)
