"""The Hugging Face Trainer integration (tests/integrations/transformers_job.py, in its own processes: 2
CPU ranks under torchrun on Gloo, and one process), and the core's bypass warning (in
process, a one-rank group)."""

import contextlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import gradcomp
import pytest
import torch
import torch.distributed as dist
from dist_utils import free_port
from gradcomp import hooks
from torch.nn.parallel import DistributedDataParallel as DDP

HERE = Path(__file__).parent
JOB = HERE / "transformers_job.py"


def _script(args, cwd, timeout=240):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("WORLD_SIZE", None)
    res = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res.stdout + res.stderr


def _no_timing(stats):
    return {k: v for k, v in stats.items() if k != "codec_seconds"}


def test_trainer_on_two_ranks(tmp_path):
    """One torchrun job, 2 CPU ranks, a tiny GPT-2, several Trainers one after another:
    the hook runs on the DDP model Trainer trains (ratio > 1, in the logs too), the replicas
    stay identical, the weights differ from Trainer's plain all-reduce (so gradcomp's
    gradients are the ones used) while the loss stays close; a second train() reuses the
    registration; resuming from the step-3 checkpoint ends bit for bit on the uninterrupted
    run (weights, step, seed, residuals, stats), and without the gradcomp files it warns and
    differs; gradient accumulation calls the hook once per optimizer step; a compute_loss
    that bypasses the DDP model gets both bypass warnings; a DDP model is refused."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    _script(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(), JOB, tmp_path],
            tmp_path)
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    o = outs[0]
    assert o["world"] == 2
    for name in ("plain", "straight", "resumed", "lost", "accum", "bypass"):
        same = torch.equal(outs[0][name]["params"], outs[1][name]["params"])
        assert same == (name != "bypass"), name  # the bypass reduced nothing: the replicas drift apart
    for name in ("straight", "resumed", "accum"):
        assert o[name]["warnings"] == [], (name, o[name]["warnings"])
        ddp = o[name]["ddp"]
        assert ddp == {"is_wrapped": True, "inner_is_ddp": False, "hooks": [("comm_hook", True)]}, name

    straight, plain = o["straight"], o["plain"]
    st = straight["state"]
    assert st["step"] == 6 and st["stats"]["buckets_compressed"] > 0 and st["stats"]["ratio"] > 3
    logged = [e for e in straight["log"] if "loss" in e]
    assert len(logged) == 6 and all(e["gradcomp/ratio"] > 3 and e["gradcomp/bytes_sent"] > 0 for e in logged)
    assert logged[-1]["gradcomp/bytes_sent"] == st["stats"]["bytes_sent"]
    assert not torch.equal(straight["params"], plain["params"])
    assert float((straight["params"] - plain["params"]).norm() / plain["params"].norm()) < 0.05
    assert abs(straight["loss"] - plain["loss"]) < 0.01

    assert {"gradcomp-rank0.pt", "gradcomp-rank1.pt", "trainer_state.json"} <= set(o["ckpt_files"])
    assert o["saved_step"] == 3
    assert o["again"] == {"warnings": [], "same_ddp": True, "hooks": 1, "step": 12}

    for r in range(2):
        a, b = outs[r]["straight"], outs[r]["resumed"]
        assert b["first_step"] == 4 and torch.equal(a["params"], b["params"])
        sa, sb = a["state"], b["state"]
        assert sa["step"] == sb["step"] == 6 and sa["seed"] == sb["seed"]
        assert _no_timing(sa["stats"]) == _no_timing(sb["stats"])
        assert sa["residuals"].keys() == sb["residuals"].keys() and len(sa["residuals"]) > 0
        assert all(torch.equal(sa["residuals"][k], sb["residuals"][k]) for k in sa["residuals"])

    lost = o["lost"]
    assert len(lost["warnings"]) == 1 and "has no gradcomp state" in lost["warnings"][0]
    assert lost["first_step"] == 1 and lost["state"]["step"] == 3
    assert not torch.equal(lost["params"], straight["params"])

    accum = o["accum"]
    assert accum["state"]["step"] == 3 and accum["state"]["stats"]["ratio"] > 3

    bypass = o["bypass"]["warnings"]
    assert o["bypass"]["state"]["step"] == 0 and len(bypass) == 2, bypass
    assert any("its hook was not called" in w for w in bypass)
    assert any("without that model's forward running" in w for w in bypass)

    assert "already a DistributedDataParallel model" in o["double_wrap"]["init"]
    assert "wraps another DistributedDataParallel model" in o["double_wrap"]["step"]


def test_trainer_in_one_process_warns_once_and_saves_nothing(tmp_path):
    """Without torchrun Trainer trains the bare model: GradcompTrainer registers nothing,
    warns once, writes no gradcomp file and logs no gradcomp numbers. A checkpoint holding
    another rank's gradcomp file but not this rank's is refused. (And ``import gradcomp``
    imported no transformers.)"""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    _script([JOB, tmp_path, "single"], tmp_path)
    o = torch.load(tmp_path / "rank0.pt", weights_only=False)
    warned = o["single"]["warnings"]
    assert len(warned) == 1 and "not a DistributedDataParallel model" in warned[0] and "world size 1" in warned[0]
    assert not o["registered"] and not any(f.startswith("gradcomp") for f in o["ckpt_files"])
    assert not any(k.startswith("gradcomp/") for e in o["single"]["log"] for k in e)
    assert o["gradcomp_alone"]  # import gradcomp (and gradcomp.integrations) imported no transformers
    assert "none for rank 0" in o["partial"] and "gradcomp-rank1.pt" in o["partial"]


# ---------------------------------------------------------------------------- the core's bypass warning
@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))


def test_no_bypass_warning_in_normal_training(one_rank_group):
    """no_sync accumulation, evaluation forwards under no_grad, a step through the bare
    module now and then: the registered DDP model keeps running forward, no warning."""
    model = _model()
    ddp = DDP(model)
    state = gradcomp.register(ddp, "int8", force_compression=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(4):
            for micro in range(4):
                with ddp.no_sync() if micro < 3 else contextlib.nullcontext():
                    ddp(torch.randn(4, 64)).sum().backward()
            with torch.no_grad():
                ddp(torch.randn(4, 64))
            if step % 2:
                model(torch.randn(4, 64)).sum().backward()  # e.g. an auxiliary loss through the bare module
    assert state.step == 4 and not state.front.bypass_watch.warned


@pytest.mark.parametrize("trained", ["bare module", "another DDP"])
def test_bypass_warns_once(one_rank_group, trained):
    """The DDP model gradcomp is registered on never runs forward while its parameters get
    gradients (the bare module, or a second DDP over the same module, is trained): its hook
    is never called, and a warning says so once, at the BYPASS_AFTER-th backward."""
    model = _model()
    ddp = DDP(model)
    state = gradcomp.register(ddp, "int8")
    other = model if trained == "bare module" else DDP(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(hooks.BYPASS_AFTER - 1):
            other(torch.randn(4, 64)).sum().backward()
        assert caught == []
        for _ in range(3):
            other(torch.randn(4, 64)).sum().backward()
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "without that model's forward running" in msgs[0], msgs
    assert state.step == 0


def test_a_state_attached_again_moves_its_watch(one_rank_group):
    """A State registered on a new DDP model (as GradcompTrainer does when Trainer rebuilds
    its wrapper) watches the new one only: the old one falling idle warns nothing."""
    model = _model()
    first = DDP(model)
    state = gradcomp.register(first, "int8")
    first(torch.randn(4, 64)).sum().backward()
    second = DDP(model)
    hooks.attach(second, state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(hooks.BYPASS_AFTER + 1):
            second(torch.randn(4, 64)).sum().backward()
    assert state.step == 1 + hooks.BYPASS_AFTER + 1
