"""gradcomp.DiLoCo against a pure-torch reference DiLoCo (tests/support/reference.py: the paper's outer
loop with torch.optim.SGD, the engine's exchange through the reference), over real Gloo
processes: bit for bit over several syncs, exact and compressed, flat and hierarchical,
streaming fragments with a delay; replicas' anchors identical after every step; the
broadcast of rank 0's weights; non-finite pseudo-gradients; exact resume (torch.save and
DCP); clear errors; under torchrun."""

import contextlib
from pathlib import Path

import diloco_worker as dw
import gradcomp
import pytest
import reference as ref
import torch
import torch.nn as nn
from dist_utils import describe, run_ranks, run_torchrun_nodes
from gradcomp.diloco import split_fragments
from harness import assert_bits_equal

WORKER = Path(dw.__file__)  # tests/support/diloco_worker.py: tests/cuda/test_cuda.py uses its model too


def _run(scenario, world, tmp_path, timeout=180, **args):
    res = run_ranks(scenario, world, tmp_path, timeout=timeout, worker=WORKER, **args)
    assert res.ok, describe(res)
    return res.outputs


@contextlib.contextmanager
def _one_thread():
    """The workers' thread count (1): the reference's inner steps then take the same bits."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _reference(a: dict, world: int) -> dict:
    """The reference DiLoCo of a scenario: every replica starts from rank 0's weights."""
    with _one_thread():
        models = [dw.make_model(a["init_seed"]) for _ in range(world)]
        opts = [dw.make_inner(m) for m in models]

        def inner(r, s):
            dw.inner_step(models[r], opts[r], a["seed"], r, s, a.get("nan_at"))

        numels = [p.numel() for p in models[0].parameters()]
        F = a["fragments"]
        delay = a.get("delay")
        delay = (0 if F == 1 else 1) if delay is None else delay
        codec = {None: None, "int8": (256, 8), "int8:block=64": (64, 8), "int4:block=64": (64, 4),
                 "int2:block=64": (64, 2)}[a["codec"]]
        return ref.diloco(models, inner, a["steps"], a["H"], ref.diloco_fragments(numels, F), delay,
                          a.get("outer_lr", 0.7), a.get("outer_momentum", 0.9), a.get("nesterov", True), codec=codec,
                          min_numel=dw.MIN_NUMEL, per_node=a.get("per_node") or 1)


def _check(outs, want, world):
    for r in range(world):
        for i, t in enumerate(outs[r]["initial"]):  # rank 0's weights everywhere
            assert_bits_equal(t, outs[0]["initial"][i], f"rank {r} parameter {i}: not rank 0's initial weights")
    for s, anchors in enumerate(want["anchors"]):
        for r in range(world):
            for i, a in enumerate(anchors):
                assert_bits_equal(outs[r]["anchors"][s][i], a, f"step {s + 1}: rank {r}'s anchor {i}")
    for r in range(world):
        for i, p in enumerate(want["params"][r]):
            assert_bits_equal(outs[r]["params"][i], p, f"rank {r}'s parameter {i} at the end")
        mine = {i: res for (rr, i), res in want["residuals"].items() if rr == r}
        assert sorted(outs[r]["residuals"]) == sorted(mine)
        for i, res in mine.items():
            assert_bits_equal(outs[r]["residuals"][i], res, f"rank {r}'s residual of parameter {i}")


CASES = {  # world, codec, fragments, delay, ranks per node, H, steps
    "exact": (2, None, 1, 0, None, 4, 13),
    "int8-w3": (3, "int8:block=64", 1, 0, None, 3, 10),
    "int4-streaming": (2, "int4:block=64", 3, 2, None, 6, 20),
    "int8-node-w4": (4, "int8:block=64", 2, 1, 2, 4, 13),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_reference_bit_for_bit(tmp_path, case):
    world, codec, F, delay, per_node, H, steps = CASES[case]
    a = {"H": H, "codec": codec, "fragments": F, "delay": delay, "per_node": per_node, "init_seed": 3, "seed": 1,
         "steps": steps}
    outs = _run("train", world, tmp_path, **a)
    want = _reference(a, world)
    _check(outs, want, world)
    st = outs[0]["stats"]
    landed = sum(len([s for s in sched if s + delay <= steps]) for sched in outs[0]["schedule"])
    assert st["syncs"] == landed > 2 and st["syncs_skipped"] == 0 and st["inner_steps"] == steps
    assert st["bytes_sent"] > 0
    if codec is not None:
        assert outs[0]["state_stats"]["buckets_compressed"] > 0
        if per_node:
            assert outs[0]["state_stats"]["bytes_sent_intra_node"] > 0


def test_streaming_schedule(one_rank_group):
    """Fragments start at staggered steps, (p + 1) H // F mod H, and land `delay` steps later:
    a fragment's anchor changes at its landing steps and at no other (one rank, compression
    forced, in this process)."""
    a = {"H": 6, "codec": "int8:block=64", "fragments": 3, "delay": 2, "init_seed": 0, "seed": 2, "steps": 20,
         "force": True}
    with _one_thread():
        out = dw.train(a, 0)
    assert out["schedule"] == [[2, 8, 14, 20], [4, 10, 16], [6, 12, 18]]
    assert out["fragments"] == ref.diloco_fragments([p.numel() for p in out["params"]], 3)
    for p, frag in enumerate(out["fragments"]):
        landings = {s + 2 for s in out["schedule"][p] if s + 2 <= 20}
        for s in range(1, 20):
            changed = any(not torch.equal(out["anchors"][s][i], out["anchors"][s - 1][i]) for i in frag)
            assert changed == (s + 1 in landings), f"fragment {p} at step {s + 1}"
    want = _reference(a, 1)
    for s, anchors in enumerate(want["anchors"]):
        for i, t in enumerate(anchors):
            assert_bits_equal(out["anchors"][s][i], t, f"step {s + 1}: anchor {i}")


def test_non_finite_pseudo_gradient_skips_the_outer_step_everywhere(tmp_path):
    a = {"H": 4, "codec": "int8:block=64", "fragments": 1, "delay": 0, "init_seed": 0, "seed": 4, "steps": 12,
         "nan_at": [1, 7]}  # rank 1's weight is NaN after its 8th step: the second sync
    outs = _run("train", 2, tmp_path, **a)
    want = _reference(a, 2)
    assert want["skipped"] == [(8, 0)]
    _check(outs, want, 2)
    for r in range(2):
        assert outs[r]["stats"]["syncs_skipped"] == 1 and outs[r]["stats"]["syncs"] == 2
        assert any("not finite" in w for w in outs[r]["warnings"])
        assert all(torch.isfinite(p).all() for p in outs[r]["params"])  # restarted from the anchor
        assert all(torch.isfinite(res).all() for res in outs[r]["residuals"].values())


@pytest.mark.parametrize("via", ["torch", "dcp"])
def test_exact_resume(tmp_path, via):
    """Stopped while a fragment's sync is in flight, rebuilt from other weights, loaded: the
    rest of the run follows the straight one bit for bit."""
    a = {"H": 4, "codec": "int4:block=64", "fragments": 2, "delay": 1, "init_seed": 0, "seed": 6, "steps": 14,
         "save_at": 6, "via": via}
    outs = _run("resume", 2, tmp_path, **a)
    for r, o in enumerate(outs):
        assert o["in_flight"] == [0]  # fragment 0 (offset 2) was sent at step 6 and lands at step 7
        straight = o["straight"]
        for k, anchors in enumerate(o["anchors"]):
            for i, t in enumerate(anchors):
                assert_bits_equal(t, straight["anchors"][a["save_at"] + k][i], f"rank {r} step {a['save_at'] + k}")
        for i, p in enumerate(o["params"]):
            assert_bits_equal(p, straight["params"][i], f"rank {r} parameter {i}")
        assert sorted(o["residuals"]) == sorted(o["names"][i] for i in o["straight_residuals"])
        for i, res in o["straight_residuals"].items():
            assert_bits_equal(o["residuals"][o["names"][i]], res, f"rank {r} residual {i}")


def test_errors_are_clear_across_ranks(tmp_path):
    outs = _run("errors", 2, tmp_path, timeout=240)
    for r, o in enumerate(outs):
        assert "trainable parameters changed" in o["grown"] and "new: extra" in o["grown"], o["grown"]
        # saved -> here: the checkpoint's 40-wide layer against this model's 48
        assert o["other_model"].startswith("ValueError") and "reshaped: 0.weight [40, 8] -> [48, 8]" in \
            o["other_model"], o["other_model"]
        assert "sync_every: saved 5, here 4" in o["other_config"], o["other_config"]
        assert f"no entry for rank{r}" in o["other_rank"], o["other_rank"]
        assert o["ddp"].startswith("TypeError") and "not a DistributedDataParallel" in o["ddp"]
        assert "ranks disagree on the configuration" in o["disagree"], o["disagree"]
        assert "ranks disagree on the configuration" in o["disagree_lr"], o["disagree_lr"]


def test_under_torchrun_with_ranks_per_node_auto(tmp_path):
    """Two torchrun "nodes" of 2 ranks: "auto" reads LOCAL_WORLD_SIZE and gives the numbers of
    ranks_per_node=2, the same on every rank."""
    run_torchrun_nodes(WORKER, tmp_path)
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(4)]
    for o in outs:
        for s, anchors in enumerate(o["auto"]["anchors"]):
            for i, t in enumerate(anchors):
                assert_bits_equal(t, outs[0]["auto"]["anchors"][s][i], f"step {s + 1} anchor {i}")
                assert_bits_equal(t, o["explicit"]["anchors"][s][i], f"step {s + 1} anchor {i}: auto vs 2")
        assert o["auto"]["state_stats"]["bytes_sent_intra_node"] > 0


# ---------------------------------------------------------------- in one process (conftest's one_rank_group)
def test_fragments_split_like_the_reference():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 12, (1,), generator=g))
        numels = torch.randint(1, 5000, (n,), generator=g).tolist()
        if torch.rand(1, generator=g) < 0.3:  # one parameter holding most of the model
            numels[int(torch.randint(0, n, (1,), generator=g))] = 10**6
        for F in range(1, n + 1):
            got = split_fragments(numels, F)
            assert got == ref.diloco_fragments(numels, F)
            assert all(got) and [i for f in got for i in f] == list(range(n))


@pytest.mark.parametrize(("codec", "F", "delay", "outer"), [
    (None, 1, 0, {}), ("int8:block=64", 3, 1, {}), ("int2:block=64", 2, 0, {}),
    ("int8:block=64", 2, 1, {"outer_lr": 1.0, "outer_momentum": 0.0, "nesterov": False}),  # a plain average
    ("int4:block=64", 1, 0, {"outer_lr": 0.5, "outer_momentum": 0.8, "nesterov": False}),  # heavy ball
])
def test_one_rank_matches_the_reference(one_rank_group, codec, F, delay, outer):
    """World size 1, compression forced: the outer step is Lookahead-like, and the codec's
    error feedback still runs; the outer optimizer's variants against torch.optim.SGD's."""
    a = {"H": 5, "codec": codec, "fragments": F, "delay": delay, "init_seed": 2, "seed": 3, "steps": 17, "force": True,
         **outer}
    with _one_thread():
        model, opt, d = dw.build(a, 0)
        for s in range(a["steps"]):
            dw.inner_step(model, opt, a["seed"], 0, s)
            d.step()
    want = _reference(a, 1)
    for i, t in enumerate(want["anchors"][-1]):
        assert_bits_equal(list(d.anchor.values())[i], t, f"anchor {i}")
    for i, (p, w) in enumerate(zip(model.parameters(), want["params"][0])):
        assert_bits_equal(p.detach(), w, f"parameter {i}")
    assert (d.state.stats["buckets_compressed"] > 0) == (codec is not None)


def test_constructor_errors(one_rank_group):
    model = dw.make_model(0)
    opt = dw.make_inner(model)
    with pytest.raises(ValueError, match="sync_every must be a positive int"):
        gradcomp.DiLoCo(model, opt, sync_every=0)
    with pytest.raises(ValueError, match=r"fragments must be in \[1, 6\]"):
        gradcomp.DiLoCo(model, opt, sync_every=10, fragments=7)
    with pytest.raises(ValueError, match="sync_every=2 is below fragments=3"):
        gradcomp.DiLoCo(model, opt, sync_every=2, fragments=3)
    with pytest.raises(ValueError, match=r"delay must be an int in \[0, sync_every=4\)"):
        gradcomp.DiLoCo(model, opt, sync_every=4, delay=4)
    with pytest.raises(ValueError, match="outer_momentum must be below 1"):
        gradcomp.DiLoCo(model, opt, sync_every=4, outer_momentum=1.0)
    with pytest.raises(ValueError, match="nesterov=True needs outer_momentum > 0"):
        gradcomp.DiLoCo(model, opt, sync_every=4, outer_momentum=0.0)
    with pytest.raises(ValueError, match="powersgd is not a codec for pseudo-gradients"):
        gradcomp.DiLoCo(model, opt, sync_every=4, codec="powersgd:2")
    with pytest.raises(ValueError, match="bad codec spec"):
        gradcomp.DiLoCo(model, opt, sync_every=4, codec="int9")
    with pytest.raises(ValueError, match=r"fragment names \['nope'\] are not trainable"):
        gradcomp.DiLoCo(model, opt, sync_every=4, fragments=[["nope"]])
    with pytest.raises(ValueError, match="are in no fragment"):
        gradcomp.DiLoCo(model, opt, sync_every=4, fragments=[["0.weight"]])
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        gradcomp.DiLoCo(opt, opt, sync_every=4)
    with pytest.raises(ValueError, match="no trainable parameters"):
        gradcomp.DiLoCo(nn.ReLU(), opt, sync_every=4)
    with pytest.warns(UserWarning, match="does not hold 2 trainable"):
        gradcomp.DiLoCo(model, torch.optim.SGD(list(model.parameters())[2:], lr=0.1), sync_every=4)
    named = gradcomp.DiLoCo(model, opt, sync_every=4, fragments=[["0.weight", "2.bias"],
                                                                ["0.bias", "2.weight", "4.weight", "4.bias"]])
    assert named.fragments == [[0, 3], [1, 2, 4, 5]] and named.delay == 1
    with pytest.raises(ValueError, match="not a DiLoCo state_dict"):
        named.load_state_dict({"format": "gradcomp.State/2"})


def test_one_rank_resume_without_momentum(one_rank_group):
    """A plain-average DiLoCo (no momentum buffers) checkpointed mid-sync and resumed in one
    process follows the straight run bit for bit."""
    import io

    a = {"H": 4, "codec": "int8:block=64", "fragments": 2, "delay": 1, "init_seed": 1, "seed": 5, "force": True,
         "outer_lr": 1.0, "outer_momentum": 0.0, "nesterov": False}
    with _one_thread():
        model, opt, d = dw.build(a, 0)
        assert d.momentum == {}
        for s in range(11):
            dw.inner_step(model, opt, a["seed"], 0, s)
            d.step()
        straight = [p.detach().clone() for p in model.parameters()]
        model, opt, d = dw.build(a, 0)
        for s in range(6):  # fragment 0 (offset 2) is in flight after step 6
            dw.inner_step(model, opt, a["seed"], 0, s)
            d.step()
        blob = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "diloco": d.state_dict()}, blob)
        blob.seek(0)
        ckpt = torch.load(blob, weights_only=True)
        model, opt, d = dw.build(a, 0, seed=77)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        d.load_state_dict(ckpt["diloco"])
        for s in range(6, 11):
            dw.inner_step(model, opt, a["seed"], 0, s)
            d.step()
    for i, (p, w) in enumerate(zip(model.parameters(), straight)):
        assert_bits_equal(p.detach(), w, f"parameter {i}")
