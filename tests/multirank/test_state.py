"""The hook's state in production: checkpoint and bit-identical resume, non-finite values
under GradScaler, failures that surface instead of hanging, every DDP mode, registration
errors. Real processes on Gloo."""

import inspect
import io
import logging
from pathlib import Path

import gradcomp
import pytest
import torch
import torch.distributed as dist
from dist_utils import describe, run_ranks
from harness import assert_bits_equal, rel_err

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(scenario, world, tmp_path, timeout=180, **args):
    res = run_ranks(scenario, world, tmp_path, worker=WORKER, timeout=timeout, **args)
    assert res.ok, describe(res)
    return res.outputs


# ---------------------------------------------------------------------------- resume
@pytest.mark.parametrize("codec", ["int8", "int4:stochastic", "topk:0.05", "randomk:0.1:ef=1"])
def test_resume_is_bit_identical(tmp_path, codec):
    """16 steps straight against 8 steps, save (model, SGD with momentum, gradcomp state,
    each rank its own file), fresh processes, load with weights_only=True, 8 more steps:
    every gradient and the final weights are the same bits. The resumed DDP starts with the
    first-iteration bucket layout again; this holds because every decision is per parameter."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    # two runs draw two seeds: the straight run is given the one the first half drew
    first = _run("resume", 2, tmp_path / "first", codec=codec, start=0, stop=8, save=True, ckpt=str(ckpt))
    straight = _run("resume", 2, tmp_path / "straight", codec=codec, start=0, stop=16,
                    state={"seed": first[0]["seed"]})
    resumed = _run("resume", 2, tmp_path / "second", codec=codec, start=8, stop=16, load=True, ckpt=str(ckpt))
    for r in range(2):
        for s in range(8, 16):
            assert_bits_equal(straight[r]["grads"][s], resumed[r]["grads"][s], f"rank {r} step {s} differs",
                              nan_bytes=True)
        assert_bits_equal(straight[r]["params"], resumed[r]["params"], nan_bytes=True)
        assert resumed[r]["step"] == straight[r]["step"] == 16
        assert resumed[r]["seed"] == straight[r]["seed"] == first[0]["seed"]
        # buckets differ (the resumed run's first iteration has one big bucket), parameters not
        assert resumed[r]["stats"]["params_compressed"] == straight[r]["stats"]["params_compressed"]
    if codec == "int8":
        # the control: the same resume without gradcomp's state (residuals from zero, step 0)
        # takes another path, so the test above can tell a restored state from a lost one
        lost = _run("resume", 2, tmp_path / "lost", codec=codec, start=8, stop=16, load=True, ckpt=str(ckpt),
                    load_gradcomp=False)
        assert not torch.equal(straight[0]["grads"][8], lost[0]["grads"][8])


def test_checkpoint_mismatches_fail_clearly(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _run("resume", 2, tmp_path / "first", codec="int8", start=0, stop=2, save=True, ckpt=str(ckpt))
    # each rank loads the other's file: residuals are per rank
    swapped = _run("resume", 2, tmp_path / "swap", codec="int8", start=2, stop=3, load=True, ckpt=str(ckpt),
                   load_rank_map={"0": 1, "1": 0})
    for r, out in enumerate(swapped):
        assert f"saved by rank {1 - r} and is loaded on rank {r}" in out["load_error"]
    other = _run("resume", 2, tmp_path / "codec", codec="int4", start=2, stop=3, load=True, ckpt=str(ckpt))
    assert "codec: saved 'int8', here 'int4'" in other[0]["load_error"]
    # another world size: refused by default, residuals from zero on request
    grown = _run("resume", 3, tmp_path / "grown", codec="int8", start=2, stop=3, load=True, ckpt=str(ckpt),
                 load_rank_map={"2": 0})
    assert all("saved at world size 2" in o["load_error"] for o in grown)
    reset = _run("resume", 3, tmp_path / "reset", codec="int8", start=2, stop=4, load=True, ckpt=str(ckpt),
                 load_rank_map={"2": 0}, load_kwargs={"on_world_change": "reset"})
    for o in reset:
        assert "load_error" not in o and o["step"] == 4
        assert all(torch.isfinite(g).all() for g in o["grads"].values())
    assert all(torch.equal(reset[0]["grads"][s], reset[2]["grads"][s]) for s in (2, 3))


def test_state_dict_is_weights_only_and_round_trips(tmp_path):
    """Without a process group (no rank recorded yet): tensors and plain types only, and
    loading it restores step, seed, stats and residuals as copies."""
    state = gradcomp.State("int4:block=128", min_numel=64, seed=12345)
    state.step = 7
    state.stats["bytes_sent"] = 99.0
    state.engine.store.replace({0: torch.randn(300), 3: torch.randn(1000)})
    path = tmp_path / "s.pt"
    torch.save(state.state_dict(), path)
    sd = torch.load(path, weights_only=True)
    assert sd["world_size"] is None and set(sd) == {"format", "world_size", "step", "seed", "unranked"}
    mine = torch.load(io.BytesIO(sd["unranked"]), weights_only=True)  # one value: DCP-safe (see test_dcp)
    assert mine["rank"] is None and mine["world_size"] is None
    assert mine["config"]["codec"] == "int4" and mine["config"]["block_size"] == 128
    fresh = gradcomp.State("int4:block=128", min_numel=64)
    fresh.load_state_dict(sd)
    assert fresh.step == 7 and fresh.seed == 12345 and fresh.stats["bytes_sent"] == 99.0
    assert fresh.residuals.keys() == {0, 3}
    for o in (0, 3):
        assert_bits_equal(fresh.residuals[o], state.residuals[o], nan_bytes=True)
        assert fresh.residuals[o].data_ptr() != state.residuals[o].data_ptr()
    with pytest.raises(ValueError, match="min_numel: saved 64, here 1024"):
        gradcomp.State("int4:block=128").load_state_dict(sd)
    with pytest.raises(ValueError, match="seed 12345, this State has seed 1"):
        gradcomp.State("int4:block=128", min_numel=64, seed=1).load_state_dict(sd)
    with pytest.raises(ValueError, match="not a gradcomp State state_dict"):
        fresh.load_state_dict({"step": 3})
    with pytest.raises(ValueError, match="on_world_change"):
        fresh.load_state_dict(sd, on_world_change="ignore")


def test_state_dict_loaded_before_the_process_group_is_checked_at_the_first_hook(tmp_path):
    """Loaded before init_process_group (rank unknown then), the checkpoint's rank and world
    size are checked at the first hook call: another world size fails there, or with
    on_world_change="reset" starts the residuals from zero."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _run("resume", 2, tmp_path / "first", codec="int8", start=0, stop=2, save=True, ckpt=str(ckpt))
    sd = torch.load(ckpt / "rank1.ckpt", weights_only=True)["gradcomp"]
    state = gradcomp.State("int8")
    state.load_state_dict(sd)  # no process group: nothing to check against yet
    assert state._saved_by == (1, 2, "error")
    assert state.step == 2 and len(state.residuals) > 0
    reset = gradcomp.State("int8")
    reset.load_state_dict(sd, on_world_change="reset")

    # now a 1-rank group: the first hook call finds the checkpoint's world size 2
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        for st in (state, reset):
            ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(64, 64))
            ddp.register_comm_hook(st, gradcomp.comm_hook)
            if st is state:
                with pytest.raises(Exception, match="saved at world size 2, the group now has 1 ranks"):
                    ddp(torch.randn(4, 64)).sum().backward()
                assert st.step == 2  # the failing call did not count a step
            else:
                ddp(torch.randn(4, 64)).sum().backward()
                assert st.step == 3 and st.residuals == {} and st._saved_by is None
    finally:
        ddp = None  # DDP before its group (docs/guides/failures.md, "A hang at exit")
        dist.destroy_process_group()


@pytest.mark.skipif("bucket_cap_mb_list" not in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters,
                    reason="this torch's DDP takes no bucket_cap_mb_list (per-bucket caps, newer than 2.3)")
@pytest.mark.parametrize("codec", ["int8", "topk:0.05"])
def test_rebuild_that_keeps_bucket_sizes_moves_no_residual(tmp_path, codec):
    """Equal-sized layers, one per bucket (per-bucket caps apply to DDP's first layout and to
    its rebuild): after the rebuild bucket i has the same size but another parameter. A
    residual keyed by bucket would now be applied to the wrong parameter; ours are keyed by
    parameter, so every gradient equals that of a run with one bucket for everything."""
    steps = 5
    args = {"steps": steps, "permuted": True, "layers": 6, "bias": False, "codec": codec, "style": "recording"}
    per_layer = _run("train", 2, tmp_path / "per_layer", bucket_cap_mb_list=[0.015] * 6, **args)
    one = _run("train", 2, tmp_path / "one", bucket_cap_mb=1.0, **args)
    layout = per_layer[0]["layouts"]
    before = {i: o for s, i, o in layout if s == 0}
    after = {i: o for s, i, o in layout if s == steps - 1}
    assert len(before) == len(after) == 6 and all(len(o) == 1 for o in (*before.values(), *after.values()))
    moved = [i for i in before if before[i] != after[i]]
    assert len(moved) >= 4, (before, after)  # same sizes, other parameters
    for s in range(steps):
        assert torch.equal(per_layer[0]["grads"][s], one[0]["grads"][s]), f"step {s}"
        assert torch.equal(per_layer[0]["grads"][s], per_layer[1]["grads"][s])


# ---------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize(("codec", "world", "value", "bad_param"), [
    ("int8", 3, "nan", 2), ("int8", 2, "inf", 2), ("sign", 2, "nan", 4), ("int4:stochastic", 2, "-inf", 2),
    ("topk:0.05", 2, "nan", 2), ("randomk:0.1", 2, "inf", 2), ("fp16", 2, "nan", 2), ("bf16", 2, "inf", 2),
    ("int2", 2, "nan", 2), ("int8", 2, "nan", 1),  # the last: a bias, below min_numel, in the exact lane
])
def test_nonfinite_on_one_rank_skips_the_step_everywhere(tmp_path, codec, world, value, bad_param):
    """One rank's gradient gets a NaN/Inf at step 2. Every rank's reduced gradient of that
    parameter is non-finite, so GradScaler skips the step on every rank alike; no residual
    keeps a non-finite value; later steps are finite, identical and close to the exact mean."""
    steps, bad_step = 6, 2
    outs = _run("nonfinite", world, tmp_path, codec=codec, steps=steps, bad_step=bad_step, bad_rank=world - 1,
                bad_param=bad_param, value=value)
    for r, o in enumerate(outs):
        assert not o["param_finite"][bad_step][bad_param], f"rank {r} kept a finite gradient"
        assert o["taken"] == [s != bad_step for s in range(steps)], f"rank {r}: {o['taken']}"
        assert o["scale"][bad_step + 1] < o["scale"][bad_step]
        assert all(o["residuals_finite"])
        torch.testing.assert_close(o["grads"][bad_step], outs[0]["grads"][bad_step], rtol=0, atol=0,
                                   equal_nan=True)
        for s in range(steps):
            if s != bad_step:
                assert torch.isfinite(o["grads"][s]).all()
                assert torch.equal(o["grads"][s], outs[0]["grads"][s])
    if codec in ("int8", "fp16", "bf16"):  # the others are further from the exact mean anyway
        for s in range(bad_step + 1, steps):
            assert rel_err(outs[0]["grads"][s], outs[0]["exact"][s]) < 0.06, s
    if outs[0]["n_residuals"] == 0:
        assert codec in ("fp16", "bf16")


# ---------------------------------------------------------------------------- failures
def test_a_peer_that_exits_fails_the_step_clearly(tmp_path):
    res = run_ranks("failure", 2, tmp_path, worker=WORKER, timeout=90, steps=6, bad_rank=1, bad_step=3,
                    how="exit", timeout_s=30)
    assert not res.timed_out, describe(res)
    out = res.outputs[0]
    assert out is not None and out["steps_done"] == 3, describe(res)
    assert "gradcomp: bucket" in out["error"] and "failed" in out["error"]
    assert out["seconds"] < 20  # a closed connection is noticed at once, not at the timeout
    assert "gradcomp: bucket" in res.logs[0] and "Traceback" in res.logs[0]  # logged by the "gradcomp" logger


def test_a_stalled_peer_fails_at_the_timeout_not_later(tmp_path):
    # the peer stalls 20 s; the group's timeout is 4 s: rank 0 must fail well before the peer wakes
    res = run_ranks("failure", 2, tmp_path, worker=WORKER, timeout=90, steps=6, bad_rank=1, bad_step=2,
                    how="stall", stall_s=20, timeout_s=4)
    assert not res.timed_out, describe(res)
    out = res.outputs[0]
    assert out is not None and out["steps_done"] == 2, describe(res)
    assert "gradcomp: bucket" in out["error"] and "failed" in out["error"]
    assert 3 < out["seconds"] < 15


# ---------------------------------------------------------------------------- DDP modes
@pytest.mark.parametrize(("mode", "args"), [
    ("no_sync accumulation", {"accumulate": 3}),
    ("static_graph", {"static_graph": True, "permuted": True}),
    ("gradient_as_bucket_view", {"grad_view": True}),
    ("no_sync with gradient_as_bucket_view", {"accumulate": 2, "grad_view": True}),
    ("static_graph with gradient_as_bucket_view", {"static_graph": True, "grad_view": True}),
])
def test_ddp_modes(tmp_path, mode, args):
    """(static_graph with no_sync is left out: torch 2.13's DDP fails that combination on its
    own, with no hook registered, at an internal assert in the reducer.)"""
    steps, world = 5, 2
    outs = _run("train", world, tmp_path, steps=steps, layers=4, **args)
    for s in range(steps):
        assert torch.equal(outs[0]["grads"][s], outs[1]["grads"][s]), f"{mode}: replicas drifted at step {s}"
        assert rel_err(outs[0]["grads"][s], outs[0]["exact"][s]) < 0.03, f"{mode}: step {s}"
    st = outs[0]["stats"]
    assert st["steps"] == steps and st["buckets_compressed"] > 0


def test_subgroups_two_ddps_side_by_side(tmp_path):
    """4 ranks, two DDP models on the subgroups {0, 1} and {2, 3}: each averages over its own
    subgroup (compared with an exact all-reduce over that subgroup)."""
    steps = 4
    outs = _run("train", 4, tmp_path, steps=steps, layers=4, subgroups=[[0, 1], [2, 3]])
    for s in range(steps):
        for a, b in ((0, 1), (2, 3)):
            assert torch.equal(outs[a]["grads"][s], outs[b]["grads"][s])
            assert rel_err(outs[a]["grads"][s], outs[a]["exact"][s]) < 0.03
        assert not torch.equal(outs[0]["grads"][s], outs[2]["grads"][s])
    assert all(o["stats"]["buckets_compressed"] > 0 for o in outs)


def test_config_mismatch_in_start_step_fails_on_every_rank(tmp_path):
    """Checked at the first hook call, not the first compressed step (which these ranks would
    reach at different steps)."""
    res = run_ranks("train", 2, tmp_path, worker=WORKER, timeout=60, steps=3,
                    state_per_rank={"1": {"start_step": 2}})
    assert not res.timed_out and all(rc != 0 for rc in res.returncodes), describe(res)
    for log in res.logs:
        assert "ranks disagree on the State configuration" in log


# ---------------------------------------------------------------------------- registration (conftest's one_rank_group)
def test_registration_errors_and_log(one_rank_group, caplog):
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(64, 64))
    with caplog.at_level(logging.INFO, logger="gradcomp"):
        state = gradcomp.register(ddp, "int4")
    assert any("Int4" in r.getMessage() and "1 ranks" in r.getMessage() for r in caplog.records)
    assert state.codec == gradcomp.Int4()
    with pytest.raises(RuntimeError, match="already has a communication hook"):
        gradcomp.register(ddp, "int8")
    other = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="valid specs.*int8"):
        gradcomp.register(other, "int3")
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        gradcomp.register(torch.nn.Linear(4, 4), "int8")


def test_fallback_logged_once(one_rank_group, caplog):
    """A parameter reduced exactly is logged once, not at every step; stats count each time."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    state = gradcomp.register(ddp, "int8", force_compression=True)
    with caplog.at_level(logging.INFO, logger="gradcomp"):
        for _ in range(3):
            ddp(torch.randn(4, 64)).sum().backward()
    msgs = [r.getMessage() for r in caplog.records if "reduced exactly" in r.getMessage()]
    assert len(msgs) == 1 and "min_numel=1024" in msgs[0]
    assert state.stats["params_fallback"] == 3 * 3 and state.stats["params_compressed"] == 3


# ---------------------------------------------------------------------------- DCP
@pytest.mark.parametrize(("world", "stateful"), [(2, False), (3, True)])
def test_dcp_checkpoint_round_trips_every_field_and_resumes_bit_for_bit(tmp_path, world, stateful):
    """torch.distributed.checkpoint writes a value found under one key on every rank from one
    rank only: the State's per-rank entry sits under a key that carries the rank. Saved at
    step 8 of 16 (the State's state_dict, or the State itself as a DCP Stateful), loaded by
    fresh processes: every field is this rank's own, and steps 8-15 are the straight run's."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    common = {"codec": "int4:stochastic", "stateful": stateful, "state": {"seed": 4242}}
    first = _run("dcp", world, tmp_path / "first", start=0, stop=8, save=True, ckpt=str(ckpt), naive=True, **common)
    straight = _run("dcp", world, tmp_path / "straight", start=0, stop=16, **common)
    resumed = _run("dcp", world, tmp_path / "second", start=8, stop=16, load=True, ckpt=str(ckpt), **common)
    for r in range(world):
        saved, loaded = first[r]["final"], resumed[r]["loaded"]
        assert saved["rank"] == r and saved["step"] == 8 and saved["residuals"]
        for k in ("rank", "world_size", "step", "seed", "stats", "config"):
            assert loaded[k] == saved[k], f"rank {r}: {k} did not round-trip"
        assert loaded["residuals"].keys() == saved["residuals"].keys()
        for o, res in saved["residuals"].items():
            assert_bits_equal(loaded["residuals"][o], res, f"rank {r}: residual {o} is not its own", nan_bytes=True)
        for s in range(8, 16):
            assert_bits_equal(straight[r]["grads"][s], resumed[r]["grads"][s], f"rank {r} step {s} differs",
                              nan_bytes=True)
        assert_bits_equal(straight[r]["params"], resumed[r]["params"], nan_bytes=True)
    # the control: a per-rank dict under plain keys comes back from one rank only
    naive = [first[r]["naive"] for r in range(world)]
    assert any(n["loaded"]["rank"] != n["saved"]["rank"] or n["loaded"]["step"] != n["saved"]["step"] for n in naive)
    residuals_of = [n["saved"]["residuals"] for n in naive]
    assert not all(torch.equal(residuals_of[0][o], residuals_of[r][o]) for r in range(world) for o in residuals_of[0])
    assert all(torch.equal(n["loaded"]["residuals"][o], naive[0]["loaded"]["residuals"][o])
               for n in naive for o in residuals_of[0])


def test_dcp_checkpoint_of_another_world_size_fails_clearly(tmp_path):
    """3 ranks load a 2-rank DCP checkpoint (allowing the missing key): rank 2 has no entry,
    and says so instead of starting silently from nothing; ranks 0 and 1 see the world size."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _run("dcp", 2, tmp_path / "first", codec="int8", start=0, stop=2, save=True, ckpt=str(ckpt))
    res = run_ranks("dcp", 3, tmp_path / "grown", worker=WORKER, codec="int8", start=2, stop=3, load=True,
                    ckpt=str(ckpt), partial=True)
    assert not res.ok
    assert "saved at world size 2 and holds no entry for rank2" in res.logs[2]
    assert "saved at world size 2, the group now has 3 ranks" in res.logs[0]
