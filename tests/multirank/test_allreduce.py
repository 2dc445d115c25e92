"""gradcomp.all_reduce and the engine's exchanges, flat and hierarchical, against the pure-torch
reference (tests/support/reference.py), over real Gloo processes: bit for bit on fresh random
tensors, error feedback, the async form, keys by name, checkpoints (torch.save and DCP), and
clear errors."""

from pathlib import Path

import gradcomp
import pytest
import reference as ref
import torch
from dist_utils import describe, run_ranks, run_torchrun_nodes
from harness import assert_bits_equal

WORKER = Path(__file__).with_name("allreduce_worker.py")
SHAPES = [[300], [33, 40], [5000], [7, 3, 129], [64], [2, 2049]]  # [300] and [64] are below min_numel
MIN_NUMEL = 512


def _run(world, tmp_path, timeout=180, **args):
    res = run_ranks("allreduce", world, tmp_path, worker=WORKER, timeout=timeout, **args)
    assert res.ok, describe(res)
    return res.outputs


def _check_against_reference(outs, world, per_node, block, bits, steps):
    residuals = {}
    for step in range(steps):
        inputs = [outs[r]["inputs"][step] for r in range(world)]
        expect = ref.engine_allreduce(inputs, residuals, block, bits, MIN_NUMEL, per_node)
        for i, e in enumerate(expect):
            got = [outs[r]["outputs"][step][i] for r in range(world)]
            for r in range(1, world):
                assert_bits_equal(got[0], got[r], f"step {step} tensor {i}: rank {r} differs from rank 0")
            if e is None:  # exact lane
                mean = sum(x[i].float() for x in inputs) / world
                tol = 1e-5 if got[0].dtype == torch.float32 else 1e-2
                torch.testing.assert_close(got[0].float(), mean, rtol=tol, atol=tol)
            else:
                e = e.to(got[0].dtype)  # the float32 average, rounded once to the tensor's dtype
                assert_bits_equal(got[0].reshape(-1), e, f"step {step} tensor {i} differs from the reference")
    for r in range(world):
        assert sorted(outs[r]["residuals"]) == sorted(i for (rr, i) in residuals if rr == r)
        for (rr, i), res in residuals.items():
            if rr == r:
                assert_bits_equal(outs[r]["residuals"][i], res, f"rank {r} tensor {i}: residual differs")


@pytest.mark.parametrize(("world", "per_node"), [(1, 1), (2, 1), (2, 2), (3, 1), (3, 3), (4, 1), (4, 2), (4, 4)])
def test_matches_the_reference_flat_and_hierarchical(tmp_path, world, per_node):
    steps = 3
    state = {"min_numel": MIN_NUMEL, "ranks_per_node": per_node, "force_compression": world == 1}
    outs = _run(world, tmp_path, shapes=SHAPES, steps=steps, codec="int8:block=64", state=state, seed=world)
    nodes = world // per_node
    if per_node > 1 and nodes == 1:
        # one node: nothing crosses a slow link, nothing is compressed
        for step in range(steps):
            mean = [sum(outs[r]["inputs"][step][i] for r in range(world)) / world for i in range(len(SHAPES))]
            for r in range(world):
                for i, m in enumerate(mean):
                    torch.testing.assert_close(outs[r]["outputs"][step][i], m, rtol=1e-5, atol=1e-6)
        st = outs[0]["stats"]
        assert st["buckets_compressed"] == 0 and outs[0]["residuals"] == {}
        assert st["bytes_sent_inter_node"] == 0 and st["bytes_sent_intra_node"] == st["bytes_sent"] > 0
        return
    _check_against_reference(outs, world, per_node, 64, 8, steps)
    st = outs[0]["stats"]
    assert st["steps"] == steps and st["buckets_compressed"] == steps
    assert st["bytes_sent_intra_node"] + st["bytes_sent_inter_node"] == st["bytes_sent"]
    if per_node > 1:
        assert st["bytes_sent_intra_node"] > 0
        # residuals are 1/L of the compressed elements (whole blocks: about)
        compressed = sum(torch.Size(s).numel() for s in SHAPES if torch.Size(s).numel() >= MIN_NUMEL)
        held = sum(r.numel() for r in outs[0]["residuals"].values())
        assert abs(held - compressed / per_node) <= 64 * len(SHAPES)


@pytest.mark.parametrize(("world", "codec", "chunk"), [(2, "int8:block=64", 640), (3, "int4:block=64", 100),
                                                  (4, "sign:block=64", 3000)])
def test_pipelined_chunks_match_the_reference(tmp_path, world, codec, chunk):
    """chunk_numel cuts the exchange into chunks of whole blocks, pipelined: the same numbers
    as one exchange, residuals included (the reference knows no chunks)."""
    bits = {"int8": 8, "int4": 4, "sign": 1}[codec.split(":")[0]]
    state = {"min_numel": MIN_NUMEL, "ranks_per_node": 1, "chunk_numel": chunk}
    outs = _run(world, tmp_path, shapes=SHAPES, steps=3, codec=codec, state=state, seed=11)
    _check_against_reference(outs, world, 1, 64, bits, 3)
    whole = _run(world, tmp_path / "whole", shapes=SHAPES, steps=3, codec=codec, seed=11,
                 state={"min_numel": MIN_NUMEL, "ranks_per_node": 1})
    assert outs[0]["stats"]["bytes_sent"] > whole[0]["stats"]["bytes_sent"]  # shard headers: a set a chunk


@pytest.mark.parametrize("per_node", [1, 2])
def test_16bit_tensors_match_the_reference(tmp_path, per_node):
    """fp16 and bf16 tensors beside fp32 ones (a buffer a dtype): decoded in float32 and
    rounded once to the tensor's dtype, flat and across nodes."""
    dtypes = ["float16", "float32", "bfloat16", "float16", "float32", "bfloat16"]
    outs = _run(4, tmp_path, shapes=SHAPES, dtypes=dtypes, steps=2, codec="int8:block=64", seed=8,
                state={"min_numel": MIN_NUMEL, "ranks_per_node": per_node})
    _check_against_reference(outs, 4, per_node, 64, 8, 2)
    assert outs[0]["stats"]["buckets_compressed"] == 2 * 3  # three dtypes: three buffers a call


def test_float64_tensors_are_averaged_exactly_in_rank_order(tmp_path):
    """No codec takes float64: the exact lane averages it in float64, (x0/W + x1/W) + x2/W."""
    outs = _run(3, tmp_path, shapes=[[5000], [7, 9]], dtypes=["float64", "float64"], steps=2, codec="int8")
    for step in range(2):
        for i in range(2):
            xs = [outs[r]["inputs"][step][i] for r in range(3)]
            expect = (xs[0] / 3 + xs[1] / 3) + xs[2] / 3
            for r in range(3):
                assert outs[r]["outputs"][step][i].dtype == torch.float64
                assert_bits_equal(outs[r]["outputs"][step][i], expect)


@pytest.mark.parametrize("codec", ["int4:block=128", "sign:block=32"])
def test_low_bit_hierarchical_matches_the_reference(tmp_path, codec):
    block, bits = int(codec.split("=")[1]), {"int4": 4, "sign": 1}[codec.split(":")[0]]
    outs = _run(4, tmp_path, shapes=SHAPES, steps=3, codec=codec, state={"min_numel": MIN_NUMEL, "ranks_per_node": 2})
    _check_against_reference(outs, 4, 2, block, bits, 3)


def test_hierarchy_sends_fewer_bytes_across_nodes(tmp_path):
    """2 nodes x 2 ranks: of flat int8's bytes, 2 of each rank's 3 peers are across the node
    boundary; hierarchical int8 sends each node's sum once, a quarter of the model a rank:
    half of flat's cross-node bytes."""
    shapes = [[64, 1024]] * 4
    flat = _run(4, tmp_path / "flat", shapes=shapes, steps=2, codec="int8", state={"ranks_per_node": 1})
    hier = _run(4, tmp_path / "hier", shapes=shapes, steps=2, codec="int8", state={"ranks_per_node": 2})
    f, h = flat[0]["stats"], hier[0]["stats"]
    flat_across = f["bytes_sent_inter_node"] * 2 / 3  # with ranks_per_node=1 every byte counts as inter-node
    assert h["bytes_sent_inter_node"] == pytest.approx(flat_across / 2, rel=0.01)
    assert h["bytes_sent_intra_node"] > 0 and f["bytes_sent_intra_node"] == 0
    for step in range(2):
        true = sum(hier[r]["inputs"][step][0] for r in range(4)) / 4
        assert float((hier[0]["outputs"][step][0] - true).norm() / true.norm()) < 0.02


def test_cast_codec_hierarchical(tmp_path):
    """fp16 across nodes: the node's float32 sum of x / L, divided by N, in fp16, summed by
    Gloo across the two nodes, gathered in the node."""
    outs = _run(4, tmp_path, shapes=SHAPES, steps=2, codec="fp16", state={"ranks_per_node": 2})
    for step in range(2):
        xs = [outs[r]["inputs"][step] for r in range(4)]
        for i in range(len(SHAPES)):
            node = [(xs[2 * m][i] / 2 + xs[2 * m + 1][i] / 2) / 2 for m in range(2)]
            expect = (node[0].half() + node[1].half()).float()
            for r in range(4):
                assert_bits_equal(outs[r]["outputs"][step][i], expect)
    assert outs[0]["stats"]["bytes_sent_intra_node"] > 0


def test_error_feedback_running_mean_tracks_the_true_mean(tmp_path):
    """Sign sends a scaled sign a block: each step's average is far off, but with error
    feedback what was not sent is sent later, so the running sum of the outputs follows the
    running sum of the true means: its relative error falls as the steps go (about as 1/t),
    where without error feedback it stays."""
    steps, shapes = 40, [[4096]]
    errs = {}
    for codec in ("sign:block=64", "sign:block=64:ef=0"):
        outs = _run(3, tmp_path / codec.replace(":", "_"), shapes=shapes, steps=steps, codec=codec, drift=1.0,
                    state={"ranks_per_node": 1})
        for upto in (steps // 2, steps):
            true = sum(sum(outs[r]["inputs"][s][0] for r in range(3)) / 3 for s in range(upto))
            sent = sum(outs[0]["outputs"][s][0] for s in range(upto))
            errs[codec, upto] = float((sent - true).norm() / true.norm())
    assert errs["sign:block=64", steps] < 0.7 * errs["sign:block=64", steps // 2]
    assert errs["sign:block=64", steps] < 0.15
    assert errs["sign:block=64:ef=0", steps] > 4 * errs["sign:block=64", steps]
    assert errs["sign:block=64:ef=0", steps] > 0.8 * errs["sign:block=64:ef=0", steps // 2]


def test_async_form_and_keys_by_name(tmp_path):
    """A dict, async: the same numbers as a list, sync; residuals keyed by name."""
    names = [f"layer{i}.weight" for i in range(len(SHAPES))]
    common = {"shapes": SHAPES, "steps": 3, "codec": "int4", "state": {"min_numel": MIN_NUMEL}, "seed": 5}
    by_list = _run(3, tmp_path / "list", **common)
    by_name = _run(3, tmp_path / "dict", names=names, **{"async": True}, **common)
    for r in range(3):
        for s in range(3):
            for a, b in zip(by_list[r]["outputs"][s], by_name[r]["outputs"][s]):
                assert_bits_equal(a, b, nan_bytes=True)
        assert sorted(by_name[r]["residuals"]) == sorted(names[i] for i in by_list[r]["residuals"])
        for i, res in by_list[r]["residuals"].items():
            assert_bits_equal(by_name[r]["residuals"][names[i]], res, nan_bytes=True)


@pytest.mark.parametrize(("world", "per_node", "dcp"), [(2, 1, False), (3, 1, True), (4, 2, True)])
def test_checkpoint_round_trip_resumes_bit_for_bit(tmp_path, world, per_node, dcp):
    """Save after 3 of 6 steps (torch.save per rank, or DCP), load into a fresh State: every
    field comes back as this rank saved it, and steps 3-5 are those of the straight run."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    common = {"shapes": SHAPES, "steps": 6, "codec": "int4:stochastic",
              "state": {"min_numel": MIN_NUMEL, "ranks_per_node": per_node, "seed": 99}}
    straight = _run(world, tmp_path / "straight", **common)
    resumed = _run(world, tmp_path / "resumed", save_at=3, ckpt=str(ckpt), dcp=dcp, **common)
    for r in range(world):
        saved, loaded = resumed[r]["saved"], resumed[r]["loaded"]
        assert saved["rank"] == r and loaded.keys() == saved.keys()
        for k in ("rank", "world_size", "step", "seed", "stats", "config"):
            assert loaded[k] == saved[k], f"rank {r}: {k} did not round-trip"
        assert saved["residuals"].keys() == loaded["residuals"].keys() and saved["residuals"]
        for key, res in saved["residuals"].items():
            assert_bits_equal(loaded["residuals"][key], res, nan_bytes=True)
        for s in range(6):
            for a, b in zip(straight[r]["outputs"][s], resumed[r]["outputs"][s]):
                assert_bits_equal(a, b, f"rank {r} step {s} differs after the resume", nan_bytes=True)


def test_ranks_per_node_errors(tmp_path):
    res = run_ranks("allreduce", 3, tmp_path / "odd", worker=WORKER, shapes=[[4096]], steps=1, codec="int8",
                    expect_error=True, state={"ranks_per_node": 2})
    assert res.ok, describe(res)
    assert all("ranks_per_node=2 does not divide the group's 3 ranks" in o["error"] for o in res.outputs)
    # "auto" with nodes that are not contiguous: ranks 0 and 2 on one node, 1 and 3 on the other
    env = {str(r): {"LOCAL_WORLD_SIZE": "2", "GROUP_RANK": str(r % 2), "LOCAL_RANK": str(r // 2)} for r in range(4)}
    res = run_ranks("allreduce", 4, tmp_path / "mixed", worker=WORKER, shapes=[[4096]], steps=1, codec="int8",
                    expect_error=True, state={"ranks_per_node": "auto"}, env_per_rank=env)
    assert res.ok, describe(res)
    assert all("not contiguous" in o["error"] or "contiguous nodes" in o["error"] for o in res.outputs)
    # nodes of different sizes: the ranks compare the L they resolved before making any group
    env = {str(r): {"LOCAL_WORLD_SIZE": "2" if r < 2 else "4", "GROUP_RANK": "0", "LOCAL_RANK": str(r)}
           for r in range(4)}
    res = run_ranks("allreduce", 4, tmp_path / "sizes", worker=WORKER, timeout=90, shapes=[[4096]], steps=1,
                    codec="int8", expect_error=True, state={"ranks_per_node": "auto"}, env_per_rank=env)
    assert res.ok, describe(res)
    assert all("ranks disagree on ranks_per_node: resolved to [2, 2, 4, 4]" in o["error"] for o in res.outputs)
    res = run_ranks("allreduce", 2, tmp_path / "noenv", worker=WORKER, shapes=[[4096]], steps=1, codec="int8",
                    expect_error=True, state={"ranks_per_node": "auto"})
    assert res.ok, describe(res)
    assert all("LOCAL_WORLD_SIZE" in o["error"] for o in res.outputs)
    with pytest.raises(ValueError, match="does not run hierarchically"):
        gradcomp.State("topk:0.01", ranks_per_node=2)
    for bad in (0, -1, 1.5, "two", True):
        with pytest.raises(ValueError, match="ranks_per_node"):
            gradcomp.State("int8", ranks_per_node=bad)
    with pytest.raises(ValueError, match="intra_node"):
        gradcomp.State("int8", intra_node="fp8")


def test_ranks_per_node_auto_under_torchrun(tmp_path):
    """Two torchrun "nodes" of 2 ranks on this machine: "auto" reads LOCAL_WORLD_SIZE, checks
    the nodes, and gives the same numbers as ranks_per_node=2."""
    run_torchrun_nodes(Path(__file__).with_name("allreduce_job.py"), tmp_path)
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(4)]
    for r, o in enumerate(outs):
        assert o["per_node"] == 2 and o["node"] == r // 2 and o["local"] == r % 2
        for a, b in zip(o["auto"], outs[0]["auto"]):
            assert_bits_equal(a, b, nan_bytes=True)
        for a, b in zip(o["auto"], o["explicit"]):
            assert_bits_equal(a, b, nan_bytes=True)
    assert outs[0]["stats"]["bytes_sent_intra_node"] > 0


# ---------------------------------------------------------------- errors, in one process (conftest's one_rank_group)
def test_errors_are_clear(one_rank_group):
    state = gradcomp.State("int8")
    xs = [torch.randn(2000), torch.randn(3, 5)]
    gradcomp.all_reduce(xs, state)
    with pytest.raises(ValueError, match="first call had 2 tensors, this one has 3"):
        gradcomp.all_reduce(xs + [torch.randn(4)], state)
    with pytest.raises(ValueError, match=r"tensor 1 was \[3, 5\] float32 at the first call, now \[5, 3\]"):
        gradcomp.all_reduce([xs[0], torch.randn(5, 3)], state)
    with pytest.raises(ValueError, match="now \\[2000\\] float16"):
        gradcomp.all_reduce([xs[0].half(), xs[1]], state)
    with pytest.raises(TypeError, match="only floating-point"):
        gradcomp.all_reduce([torch.arange(4)], gradcomp.State("int8"))
    with pytest.raises(ValueError, match="several devices"):
        gradcomp.all_reduce([torch.randn(4), torch.randn(4, device="meta")], gradcomp.State("int8"))
    with pytest.raises(TypeError, match="not a tensor"):
        gradcomp.all_reduce([torch.randn(4), 3.0], gradcomp.State("int8"))
    with pytest.raises(TypeError, match="list or a dict"):
        gradcomp.all_reduce(torch.randn(4), gradcomp.State("int8"))
    with pytest.raises(TypeError, match="keys must be str"):
        gradcomp.all_reduce({1: torch.randn(4)}, gradcomp.State("int8"))
    with pytest.raises(TypeError, match="gradcomp.State"):
        gradcomp.all_reduce([torch.randn(4)], "int8")
    with pytest.raises(RuntimeError, match="requires grad"):
        gradcomp.all_reduce([torch.nn.Parameter(torch.randn(4))], gradcomp.State("int8"))
    named = gradcomp.State("int8")
    gradcomp.all_reduce({"a": torch.randn(4), "b": torch.randn(4)}, named)
    with pytest.raises(ValueError, match="key 'a' where this one has 'b'"):
        gradcomp.all_reduce({"b": torch.randn(4), "a": torch.randn(4)}, named)
    # one State, one front end
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 8))
    ddp_state = gradcomp.register(ddp, "int8")
    ddp(torch.randn(2, 8)).sum().backward()
    with pytest.raises(RuntimeError, match="already serves 'ddp'"):
        gradcomp.all_reduce([torch.randn(4)], ddp_state)


def test_world_of_one_and_empty_lists(one_rank_group):
    """At world size 1 nothing moves unless forced; an empty list is a step that does nothing."""
    xs = [torch.randn(3000), torch.randn(10)]
    before = [x.clone() for x in xs]
    state = gradcomp.State("int8")
    assert gradcomp.all_reduce(xs, state) is xs
    assert all(torch.equal(a, b) for a, b in zip(xs, before)) and state.step == 1
    forced = gradcomp.State("int8", force_compression=True, min_numel=1000)
    handle = gradcomp.all_reduce(xs, forced, async_op=True)
    assert handle.wait() is xs
    assert torch.equal(xs[1], before[1])  # exact lane: x / 1
    assert not torch.equal(xs[0], before[0]) and float((xs[0] - before[0]).norm() / before[0].norm()) < 0.02
    assert forced.stats["buckets_compressed"] == 1 and len(forced.residuals) == 1
    empty = gradcomp.State("int8")
    assert gradcomp.all_reduce([], empty) == [] and empty.step == 1
    # input tensors of a dtype group are unpacked in place, views and non-contiguous ones too
    base = torch.randn(40, 50)
    view = base.t()
    gradcomp.all_reduce([view], gradcomp.State("int8", force_compression=True))
    assert view.data_ptr() == base.data_ptr()
