"""FSDP2 and HSDP (gradcomp.fsdp): real processes on Gloo, every reduction held bit for bit
to tests/support/reference.py's pure-torch reduce-scatter and all-reduce, and the engine's
reduce-scatter alone through a loopback among threads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("torch.distributed.fsdp")
from torch.distributed.fsdp import FSDPModule  # noqa: E402

if not hasattr(FSDPModule, "set_custom_reduce_scatter"):
    pytest.skip("this torch has no FSDPModule.set_custom_reduce_scatter (torch < 2.9)", allow_module_level=True)

import reference  # noqa: E402
from dist_utils import describe, run_ranks  # noqa: E402
from gradcomp import codecs  # noqa: E402
from gradcomp.engine.reduce_scatter import Chunked  # noqa: E402
from reduce_scatter_loopback import MIN, engine_reduce_scatter, random_layout, same  # noqa: E402

WORKER = Path(__file__).with_name("fsdp_worker.py")


def run(world, tmp_path, **args):
    res = run_ranks(args.pop("scenario", "train"), world, tmp_path, timeout=args.pop("timeout", 180), worker=WORKER,
                    **args)
    assert res.ok, describe(res)
    return res.outputs


def pieces_of(layout_unit) -> list:
    return [Chunked(**{**d, "real": tuple(d["real"])}) for d in layout_unit]


def check_reduce_scatter(outs, world, *, bits=8, block=256, min_numel=MIN, start_step=0, rounding_seed=None,
                         error_feedback=True):
    """Every recorded reduce-scatter call against the reference, bit for bit; returns the
    worst |output - exact mean| / max|exact mean| over compressed calls."""
    layout, residuals, worst = outs[0]["layout"], {}, 0.0
    for step in sorted(outs[0]["calls"]):
        calls = [outs[r]["calls"][step] for r in range(world)]
        assert len({len(c) for c in calls}) == 1 and calls[0], f"step {step}: ranks made different calls"
        for ci in range(len(calls[0])):
            unit = calls[0][ci][0]
            inputs = [calls[r][ci][1] for r in range(world)]
            rounding = None if rounding_seed is None else {"seed": rounding_seed, "step": step}
            ref = reference.fsdp_reduce_scatter(inputs, pieces_of(layout[unit]), residuals, block, bits, min_numel,
                                                compress=step >= start_step, rounding=rounding,
                                                error_feedback=error_feedback)
            for r in range(world):
                got = calls[r][ci][2]
                assert same(got, ref[r].to(got.dtype)), f"step {step} unit {unit} rank {r}: differs from the reference"
                exact = sum(inputs[i].view(world, -1)[r].float() for i in range(world)) / world
                scale = float(exact.abs().max()) or 1.0
                worst = max(worst, float((got.float() - exact).abs().max()) / scale)
    return worst


def check_grads_are_outputs(outs, world):
    """What FSDP left in each sharded .grad is the recorded output's slice (no other scaling)."""
    for r in range(world):
        for step, calls in outs[r]["calls"].items():
            outputs = {unit: out for unit, _, out in calls}
            grads = outs[r]["grads"][step]
            for unit, pieces in enumerate(outs[r]["layout"]):
                for p in pieces:
                    n = p["real"][r]
                    if n:
                        g = grads[p["key"]].reshape(-1)  # in the parameter's dtype: FSDP casts the output
                        assert same(g, outputs[unit][p["offset"] : p["offset"] + n].to(g.dtype)), \
                            f"rank {r} step {step}: {p['key']}'s gradient is not the reduce-scatter's output"


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_reduce_scatter_is_the_reference_bit_for_bit(tmp_path, world):
    """Including a compressed parameter that never gets a gradient: FSDP reduces its zeros
    (set_reduce_scatter_unused_params), so the layout and its residuals stay put."""
    outs = run(world, tmp_path, codec="int8", steps=3, unused=True, state={"min_numel": MIN})
    worst = check_reduce_scatter(outs, world)
    assert 0 < worst < 0.02, f"int8 should be near the exact mean, worst relative error {worst}"
    check_grads_are_outputs(outs, world)
    s = outs[0]["final"]["stats"]
    assert s["steps"] == 3 and s["buckets_compressed"] == 9 and s["params_compressed"] > 0 and s["params_fallback"] > 0
    assert s["ratio"] > 2.5
    keys = outs[0]["final"]["residuals"].keys()
    assert all("@" in k and not k.endswith("@0") for k in keys), "rank 0 keeps residuals of the rows it sends only"


def test_fsdp2_stochastic_int4_without_error_feedback_and_warm_up(tmp_path):
    """3 ranks (uneven padding), int4 with stochastic rounding and no residual, the first step
    exact (start_step=1); the blocks' down weights sharded on dim 1 (Shard(1): even chunks)."""
    outs = run(3, tmp_path, codec="int4:ef=0:stochastic", steps=3, shard1=True,
               state={"min_numel": MIN, "seed": 77, "start_step": 1})
    check_reduce_scatter(outs, 3, bits=4, start_step=1, rounding_seed=77, error_feedback=False)
    check_grads_are_outputs(outs, 3)
    down = [d for unit in outs[0]["layout"] for d in unit if d["key"].endswith("down.weight")]
    assert down and all(d["real"] == [d["chunk"]] * 3 and d["chunk"] == 37 * 37 for d in down)
    assert outs[0]["final"]["residuals"] == {}


@pytest.mark.parametrize("mp", [{"reduce_dtype": "bf16"}, {"param_dtype": "bf16", "reduce_dtype": "fp32"}])
def test_fsdp2_mixed_precision(tmp_path, mp):
    outs = run(2, tmp_path, codec="int8", steps=2, state={"min_numel": MIN}, **mp)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[mp["reduce_dtype"]]
    assert outs[0]["calls"][0][0][1].dtype == dtype
    check_reduce_scatter(outs, 2)
    check_grads_are_outputs(outs, 2)


def test_fsdp2_gradient_accumulation_reduces_once_a_step(tmp_path):
    outs = run(2, tmp_path, codec="int8", steps=2, accumulate=3, state={"min_numel": MIN})
    for r in range(2):
        assert [len(c) for c in outs[r]["calls"].values()] == [3, 3], "one reduction per unit per step"
    assert outs[0]["final"]["step"] == 2
    check_reduce_scatter(outs, 2)
    check_grads_are_outputs(outs, 2)


def test_fsdp2_non_finite_gradient_makes_nan_everywhere_it_reaches(tmp_path):
    outs = run(2, tmp_path, codec="int8", steps=2, poison={"rank": 1, "step": 1}, state={"min_numel": MIN})
    check_reduce_scatter(outs, 2)
    for r in range(2):
        assert not any(torch.isnan(out).any() for _, _, out in outs[r]["calls"][0])
        assert all(torch.isnan(out).any() for _, _, out in outs[r]["calls"][1]), "rank 1's Inf reaches every shard"
        assert all(torch.isfinite(res).all() for res in outs[r]["final"]["residuals"].values())


def test_hsdp_2x2_replica_all_reduce_is_the_reference_and_replicas_match(tmp_path):
    """FSDP2 inside each 2-rank "node" (exact, FSDP's own), gradcomp across the 2 nodes: the
    replica all-reduce of each shard is gradcomp's compressed all-reduce (reference:
    compressed_mean with the engine's block owners; the exact lane x/R summed in rank order)."""
    world, L = 4, 2
    outs = run(world, tmp_path, codec="int8", steps=3, per_node=L, state={"min_numel": MIN})
    N = world // L
    residuals, compared = {}, 0
    for step in range(3):
        calls = [outs[r]["calls"][step] for r in range(world)]
        for ci in range(len(calls[0])):
            unit = calls[0][ci][0]
            for s in range(L):
                ranks = [n * L + s for n in range(N)]
                first_blocks = outs[s]["first_blocks"]
                off = 0
                for d in outs[s]["layout"][unit]:
                    for key, n in ((d["key"], d["real"][s]), (d["key"] + "#pad", d["chunk"] - d["real"][s])):
                        if n == 0 and key.endswith("#pad"):
                            continue
                        xs = [calls[r][ci][1][off : off + n] for r in ranks]
                        fb = first_blocks[key]
                        if fb is None:
                            ref = xs[0] / N
                            for x in xs[1:]:
                                ref = ref + x / N
                        else:
                            res = [residuals.get((r, key), torch.zeros(n)) for r in ranks]
                            ref, after = reference.compressed_mean(xs, res, 256, (fb + torch.arange(-(-n // 256))) % N)
                            residuals.update({(r, key): a for r, a in zip(ranks, after)})
                            compared += 1
                        for r in ranks:
                            assert same(calls[r][ci][2][off : off + n], ref), f"step {step} rank {r} {key}"
                        off += n
    assert compared > 0
    for s in range(L):  # replicas hold the same shards, bit for bit
        for step in range(3):
            for k, g in outs[s]["grads"][step].items():
                assert same(g, outs[s + L]["grads"][step][k]), f"{k}: replicas {s} and {s + L} differ at step {step}"
        for k, p in outs[s]["params"].items():
            assert same(p, outs[s + L]["params"][k])
    st = outs[0]["final"]["stats"]
    assert st["bytes_sent_inter_node"] == st["bytes_sent"] > 0 and st["ratio"] > 2
    for r in range(world):  # the residuals: the compressed pieces of this rank's shard, no more
        s = r % L
        compressed = sum(d["real"][s] for unit in outs[r]["layout"] for d in unit
                         if outs[r]["first_blocks"][d["key"]] is not None)
        held = sum(t.numel() for t in outs[r]["final"]["residuals"].values())
        shard = sum(d["chunk"] for unit in outs[r]["layout"] for d in unit)
        assert held == compressed and 0 < held <= shard


def test_hsdp_2x2_bf16_reduce_dtype(tmp_path):
    """HSDP with FSDP reducing in bf16: gradcomp's all-reduce takes the bf16 shard; replicas
    stay bit-identical and the result is the replicas' mean within int8's error."""
    world, L = 4, 2
    outs = run(world, tmp_path, codec="int8", steps=2, per_node=L, reduce_dtype="bf16", state={"min_numel": MIN})
    worst = 0.0
    for step in range(2):
        for ci, (unit, before, after) in enumerate(outs[0]["calls"][step]):
            assert before.dtype == after.dtype == torch.bfloat16
            for s in range(L):
                mine, other = outs[s]["calls"][step][ci], outs[s + L]["calls"][step][ci]
                assert same(mine[2], other[2]), f"step {step} unit {unit}: replicas of shard {s} differ"
                mean = (mine[1].float() + other[1].float()) / 2
                worst = max(worst, float((mine[2].float() - mean).abs().max() / mean.abs().max()))
    assert 0 < worst < 0.03, worst


# torch.save at 2 ranks and DCP under HSDP at 2 x 2 in the default suite; the other two are
# slow-marked (three jobs each: CI's time budget), run with -m slow.
@pytest.mark.parametrize("how,world,per_node", [("torch", 2, None),
                                                pytest.param("dcp", 2, None, marks=pytest.mark.slow),
                                                pytest.param("dcp", 4, None, marks=pytest.mark.slow),
                                                ("dcp", 4, 2)])
def test_fsdp_resume_is_bit_for_bit(tmp_path, how, world, per_node):
    """Saved at step 3 of 6 (model, optimizer and gradcomp state: per-rank torch.save files, or
    one DCP checkpoint with the FSDPState as a Stateful), loaded by fresh processes: steps 3-5
    are the straight run's, bit for bit, and the state is this rank's own."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    common = {"codec": "int4:stochastic", "state": {"min_numel": MIN, "seed": 5}, "per_node": per_node}
    first = run(world, tmp_path / "first", start=0, stop=3, save=how, ckpt=str(ckpt), **common)
    straight = run(world, tmp_path / "straight", start=0, stop=6, **common)
    resumed = run(world, tmp_path / "second", start=3, stop=6, load=how, ckpt=str(ckpt), **common)
    for r in range(world):
        saved, loaded = first[r]["final"], resumed[r]["loaded"]
        assert saved["residuals"] and saved["step"] == 3
        for k in ("rank", "world_size", "step", "seed", "stats", "config"):
            assert loaded[k] == saved[k], f"rank {r}: {k} did not round-trip"
        assert loaded["residuals"].keys() == saved["residuals"].keys()
        assert all(same(loaded["residuals"][k], v) for k, v in saved["residuals"].items()), f"rank {r}: residuals"
        for step in range(3, 6):
            for k, g in straight[r]["grads"][step].items():
                assert same(g, resumed[r]["grads"][step][k]), f"rank {r} step {step} {k} differs"
        for k, p in straight[r]["params"].items():
            assert same(p, resumed[r]["params"][k])


def test_fsdp_errors_are_clear(tmp_path):
    outs = run(2, tmp_path, scenario="errors")
    msgs = outs[0]
    expect = {
        "not_sharded": "holds no FSDPModule",
        "topk": "topk chooses its values per whole parameter",
        "ranks_per_node": "ranks_per_node is a DDP option",
        "twice": "already registered",
        "native_hsdp": "torch's native HSDP",
        "layout_changed": "parameters requiring grad changed",
        "avg": "takes SUM only",
        "old_torch": "which torch",
        "chunk_numel": "chunk_numel applies to HSDP's replica all-reduce only",
        "replicas_hold_other_shards": "replicate_group must join the ranks that hold the same shard",
        "divide_factor": "with divide factor 2.0",
        "gather_topk": "the parameter all-gather takes a quantizer",
        "gather_stochastic": "drop ':stochastic'",
        "gather_sign": "a scaled sign of every weight is not the weight",
        "nothing": "compress nothing",
        "gather_only_hsdp": "the replica all-reduce is gradcomp's",
        "gather_only_start_step": "start_step and chunk_numel apply to the reduction",
        "gather_codec_changed": "all_gather: saved",
    }
    for name, text in expect.items():
        assert msgs[name] is not None and text in msgs[name], f"{name}: {msgs[name]}"


# ---------------------------------------------------------------- the engine's reduce-scatter alone
# (ranks as threads: tests/support/reduce_scatter_loopback.py)
@pytest.mark.parametrize("codec,bits,ef,stochastic", [("int8", 8, True, False), ("int2", 2, True, False),
                                                      ("sign", 1, True, False), ("int4:ef=0:stochastic", 4, False,
                                                                                 True),
                                                      ("int8:residual=bf16", 8, True, False),
                                                      ("fp16", 0, False, False), ("bf16", 0, False, False)])
@pytest.mark.parametrize("world", [2, 3])
def test_engine_reduce_scatter_loopback_is_the_reference(world, codec, bits, ef, stochastic):
    gen = torch.Generator().manual_seed(world * 100 + bits)
    pieces, shard = random_layout(world, gen)
    steps = [0, 1, 2]
    inputs = []
    for _ in steps:
        per_rank = []
        for _r in range(world):
            x = torch.zeros(world, shard)
            for p in pieces:
                for j in range(world):
                    x[j, p.offset : p.offset + p.real[j]] = torch.randn(p.real[j], generator=gen)
            per_rank.append(x.reshape(-1))
        inputs.append(per_rank)
    inputs[2][1][5] = float("inf")  # step 2: rank 1 sends rank 0 a non-finite value
    got = engine_reduce_scatter(inputs, pieces, codec, steps)
    spec = codecs.parse(codec)
    residuals = {}
    for si, step in enumerate(steps):
        ref = reference.fsdp_reduce_scatter(inputs[si], pieces, residuals, 256, bits, MIN,
                                            rounding={"seed": 3, "step": step} if stochastic else None,
                                            error_feedback=ef, wire=getattr(spec, "wire_dtype", None),
                                            residual_dtype=getattr(spec, "residual_dtype", torch.float32))
        for r in range(world):
            assert same(got[si][r], ref[r]), f"step {step} rank {r}"
    assert not torch.isfinite(got[2][0]).all() and torch.isfinite(got[1][0]).all()


@pytest.mark.parametrize("codec", ["int2", "sign"])
def test_engine_reduce_scatter_error_feedback_tracks_the_running_mean(codec):
    """With error feedback nothing is lost, only late: after T steps, W · (sum of rank j's
    outputs) plus what the other ranks still hold for row j (their residuals) is the sum of
    every input row j, up to float32 rounding; without it the gap is far larger."""
    world, steps, bits = 3, 8, 2 if codec == "int2" else 1
    gen = torch.Generator().manual_seed(5)
    pieces, shard = random_layout(world, gen)
    bias = torch.randn(world * shard, generator=gen)  # a persistent direction, as gradients have
    inputs = [[bias + 0.3 * torch.randn(world * shard, generator=gen) for _ in range(world)] for _ in range(steps)]
    for x in (x for per in inputs for x in per):  # FSDP pads with zeros
        for j in range(world):
            for p in pieces:
                x.view(world, shard)[j, p.offset + p.real[j] : p.offset + p.chunk] = 0
    gap = {}
    for ef in (True, False):
        residuals: dict = {}
        ref = [reference.fsdp_reduce_scatter(inputs[t], pieces, residuals, 256, bits, MIN, error_feedback=ef)
               for t in range(steps)]
        got = engine_reduce_scatter(inputs, pieces, codec if ef else f"{codec}:ef=0", list(range(steps)))
        assert all(same(got[t][r], ref[t][r]) for t in range(steps) for r in range(world))
        worst = 0.0
        for j in range(world):
            total = sum(inputs[t][i].view(world, shard)[j] for t in range(steps) for i in range(world))
            held = torch.zeros(shard)  # what the other ranks have not sent rank j yet
            for (_, key, row), r in residuals.items():
                if row == j:
                    p = next(p for p in pieces if p.key == key)
                    held[p.offset : p.offset + p.real[j]] += r.float()
            sent = world * sum(got[t][j] for t in range(steps))
            worst = max(worst, float((sent + held - total).abs().max() / total.abs().max()))
        gap[ef] = worst
    assert gap[True] < 1e-5, gap
    assert gap[False] > 1000 * gap[True], gap


# ---------------------------------------------------------------- the parameter all-gather
def pieces_of_gather(out, unit) -> list:
    return [Chunked(**{**d, "real": tuple(d["real"])}) for d in out["gathered"][unit]]


def near_exact(exact: torch.Tensor, got: torch.Tensor, bits: int, wire, world: int) -> None:
    """Without the layout: every gathered value is its exact weight up to half a code step of
    the largest weight of its row (a block's scale is at most that row's), plus the rounding to
    the gather's dtype; padding, which FSDP fills with zeros, stays zero."""
    if wire is not None or not torch.isfinite(exact).all():
        return
    for row, out in zip(exact.view(world, -1).float(), got.view(world, -1).float()):
        step = float(row.abs().max()) / reference.qmax_of(bits)
        bound = step / 2 * 1.0001 + row.abs() * (2.0**-8 if got.dtype == torch.bfloat16 else 0.0)
        assert ((out - row).abs() <= bound).all(), f"a gathered weight is off by {float((out - row).abs().max())}"


def check_gathers(outs, world, *, bits=8, block=256, min_numel=MIN, wire=None, group_size=None):
    """Every recorded compressed gather against the reference, bit for bit, the same output on
    every rank of its group (the world, or under HSDP each node's ``group_size`` ranks);
    gathers over a smaller group (hpZ) exact. Returns the number compared."""
    size_of_group = group_size or world
    groups = [list(range(g, g + size_of_group)) for g in range(0, world, size_of_group)]
    compared = 0
    for step in sorted(outs[0]["gathers"]):
        calls = [outs[r]["gathers"][step] for r in range(world)]
        assert len({len(c) for c in calls}) == 1 and calls[0], f"step {step}: ranks made different gathers"
        for ci in range(len(calls[0])):
            unit, size = calls[0][ci][0], calls[0][ci][1]
            if size != size_of_group:  # hpZ: backward's gather inside the node, exact
                for r in range(world):
                    first = r - r % size
                    inner = torch.cat([calls[i][ci][2] for i in range(first, first + size)])
                    assert same(calls[r][ci][3], inner), f"step {step}: rank {r}'s inner gather is not exact"
                continue
            for ranks in groups:
                inputs = [calls[r][ci][2] for r in ranks]
                if inputs[0].dtype == torch.uint8:  # parameters of several dtypes: gathered as bytes, exactly
                    for r in ranks:
                        assert same(calls[r][ci][3], torch.cat(inputs)), f"step {step}: rank {r}'s byte gather"
                    continue
                ref = reference.fsdp_all_gather(inputs, pieces_of_gather(outs[ranks[0]], unit), block, bits,
                                                min_numel, wire)
                for r in ranks:
                    assert same(calls[r][ci][3], ref), f"step {step} gather {ci} (unit {unit}) rank {r}: differs"
                near_exact(torch.cat(inputs), ref, bits, wire, len(ranks))
                compared += 1
    return compared


@pytest.mark.parametrize("world", [2, 3, 4])
def test_fsdp2_all_gather_is_the_reference_bit_for_bit(tmp_path, world):
    """int8 reduce-scatter and int8 gathers: every forward's and backward's gather of every unit
    is the pure-torch reference, bit for bit and the same on every rank (the owner of a row
    decodes it too), the reduce-scatter as before; the sharded weights stay exact."""
    outs = run(world, tmp_path, codec="int8", all_gather="int8", steps=3, unused=True, state={"min_numel": MIN})
    # a step: each block gathers in forward and again in backward, the root (not resharded
    # after forward: FSDP's default for the root) once
    assert check_gathers(outs, world) == 3 * (2 * 2 + 1)
    check_reduce_scatter(outs, world)
    s = outs[0]["final"]["stats"]
    assert s["all_gather_bytes_sent"] > 0 and s["all_gather_bytes_uncompressed"] / s["all_gather_bytes_sent"] > 2.5
    total = (s["bytes_uncompressed"] + s["all_gather_bytes_uncompressed"]) / (s["bytes_sent"] +
                                                                            s["all_gather_bytes_sent"])
    assert s["total_ratio"] == pytest.approx(total) and s["total_ratio"] > 2.5
    assert outs[0]["final"]["config"]["all_gather"]["codec"] == "int8"


def same_runs(a, b, world, what):
    for r in range(world):
        assert a[r]["loss"] == b[r]["loss"], f"{what}: rank {r}'s losses differ"
        for step, grads in a[r]["grads"].items():
            for k, g in grads.items():
                assert same(g, b[r]["grads"][step][k]), f"{what}: rank {r} step {step} {k}'s gradient differs"
        for k, p in a[r]["params"].items():
            assert same(p, b[r]["params"][k]), f"{what}: rank {r}'s {k} differs"


def test_fsdp2_gathers_train_as_the_reference_whatever_resharding_hpz_included(tmp_path):
    """4 ranks, int4 gathers only (FSDP's own reduce-scatter): the run equals the same run with
    the pure-torch reference gather step by step, bit for bit; and reshard_after_forward=True
    (backward gathers compressed again, from the same shards), False (backward keeps forward's
    weights) and 2 (hpZ: backward's gather inside each pair of ranks, exact, of the weights
    forward decoded) train identically: backward always uses forward's weights."""
    world = 4
    common = {"all_gather": "int4", "steps": 3, "state": {"min_numel": MIN}}
    runs = {reshard: run(world, tmp_path / f"r{reshard}", reshard=reshard, **common) for reshard in (True, False, 2)}
    ref = run(world, tmp_path / "ref", reshard=2, reference_gather=True, **common)
    same_runs(runs[2], ref, world, "hpZ against the reference gather")
    check_gathers(runs[2], world, bits=4)
    for reshard in (True, False):
        same_runs(runs[reshard], runs[2], world, f"reshard_after_forward={reshard} against 2")
    inner = [c for c in runs[2][0]["gathers"][0] if c[1] == 2]
    assert len(inner) == 2, "each block's backward gathers inside its pair of ranks"
    assert len(runs[False][0]["gathers"][0]) == 3, "without resharding, forward's gathers only"
    assert runs[2][0]["final"]["config"]["reduce_scatter"] == "fsdp"
    stats = runs[2][0]["final"]["stats"]
    assert stats["bytes_sent"] == 0 < stats["all_gather_bytes_sent"] and stats["codec_seconds"] > 0


def test_fsdp2_gathers_bf16_params(tmp_path):
    """MixedPrecisionPolicy(param_dtype=bf16): FSDP gathers bf16; decoded to bf16, the
    reference's rounding of the float32 dequantized values."""
    outs = run(2, tmp_path, codec="int8", all_gather="int8", steps=2, param_dtype="bf16", reduce_dtype="fp32",
               state={"min_numel": MIN})
    assert outs[0]["gathers"][0][0][2].dtype == torch.bfloat16
    assert check_gathers(outs, 2) > 0
    check_reduce_scatter(outs, 2)


@pytest.mark.parametrize("frozen", ["fp32", "fp64"])
def test_fsdp2_gathers_uneven_shard1_and_frozen_parameters(tmp_path, frozen):
    """3 ranks (uneven dim-0 shards), the blocks' down weights sharded on dim 1, and a frozen
    parameter in block 0: of the others' dtype it is gathered (compressed) like the rest; of
    another dtype FSDP gathers that unit as bytes, which stays exact."""
    outs = run(3, tmp_path, codec="int8", all_gather="int8", steps=2, shard1=True, frozen=frozen,
               state={"min_numel": MIN})
    assert check_gathers(outs, 3) > 0
    check_reduce_scatter(outs, 3)
    dtypes = {c[2].dtype for c in outs[0]["gathers"][0]}
    assert dtypes == ({torch.float32} if frozen == "fp32" else {torch.float32, torch.uint8})
    keys = [d["key"] for unit in outs[0]["gathered"] for d in unit]
    assert "blocks.0.frozen" in keys and "blocks.0.frozen" not in [d["key"] for u in outs[0]["layout"] for d in u]


def test_fsdp2_non_finite_weight_arrives_non_finite(tmp_path):
    """An Inf in one rank's shard at step 1: its unit's compressed weights decode to NaN on
    every rank (the reference's rule), never to finite values; step 0 is finite."""
    outs = run(2, tmp_path, all_gather="int8", steps=2, poison_weight={"rank": 1, "step": 1},
               state={"min_numel": MIN})
    check_gathers(outs, 2)
    for r in range(2):
        assert all(torch.isfinite(c[3]).all() for c in outs[r]["gathers"][0])
        poisoned = [c for c in outs[r]["gathers"][1] if not torch.isfinite(c[3]).all()]
        assert poisoned and all(torch.isnan(c[3]).any() for c in poisoned)


def test_hsdp_2x2_gathers_inside_the_node_compressed(tmp_path):
    """HSDP with all_gather: each node's gather (over its shard group) is the reference of its
    two ranks' rows; the replica all-reduce as before; replicas stay bit-identical."""
    world, L = 4, 2
    outs = run(world, tmp_path, codec="int8", all_gather="int8", steps=2, per_node=L, state={"min_numel": MIN})
    assert check_gathers(outs, world, group_size=L) == 2 * 2 * (2 * 2 + 1)  # per node: 2 steps, 5 gathers
    for s in range(L):
        for k, p in outs[s]["params"].items():
            assert same(p, outs[s + L]["params"][k]), f"{k}: replicas {s} and {s + L} differ"
    s = outs[0]["final"]["stats"]
    total = (s["bytes_uncompressed"] + s["all_gather_bytes_uncompressed"]) / (s["bytes_sent"] +
                                                                            s["all_gather_bytes_sent"])
    assert s["all_gather_bytes_sent"] > 0 and s["total_ratio"] == pytest.approx(total)


def test_fsdp2_async_unshard_decodes_on_wait(tmp_path):
    """model.unshard(async_op=True): the gather returns a dist.Work, decoded when FSDP waits on
    it; the run is the synchronous run, bit for bit."""
    common = {"codec": "int8", "all_gather": "int8", "steps": 2, "state": {"min_numel": MIN}}
    outs = run(2, tmp_path / "async", async_unshard=True, **common)
    assert any(c[4] for c in outs[0]["gathers"][0]), "the root's gather ran asynchronously"
    check_gathers(outs, 2)
    same_runs(outs, run(2, tmp_path / "sync", **common), 2, "async unshard against sync")
