"""Lightning and Accelerate on 2 CPU processes, each job a script in its own processes
(Lightning's default launcher would re-execute pytest itself)."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_utils import free_port

HERE = Path(__file__).parent


def _script(args, tmp_path, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, *map(str, args)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res.stdout + res.stderr


def _ranks(out_dir, world=2):
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def test_lightning_strategy_compresses_on_cpu_and_resumes_exactly(tmp_path):
    """ddp_spawn on CPU (the State is pickled into the workers before any process group
    exists): the hook runs (Lightning's own DDPStrategy registers hooks only on CUDA), the
    replicas stay identical, and resuming from the step-4 checkpoint (each rank reads its
    own gradcomp side file) ends on the same bits as the uninterrupted 8 steps."""
    pytest.importorskip("lightning")
    job = HERE / "lightning_job.py"
    straight, resumed, lost = tmp_path / "straight", tmp_path / "resumed", tmp_path / "lost"
    for d in (straight, resumed, lost):
        d.mkdir()
    _script([job, straight, 8], tmp_path)
    outs = _ranks(straight)
    for o in outs:
        assert o["world"] == 2 and o["step"] == 8 and o["started_at"]["step"] == 0
        st = o["stats"]
        assert st["buckets_compressed"] == 8 and st["params_compressed"] == 16 and st["ratio"] > 3
    assert torch.equal(outs[0]["params"], outs[1]["params"])
    ckpt = straight / "ckpt" / "epoch=0-step=4.ckpt"
    side = [Path(f"{ckpt}.gradcomp-rank{r}.pt") for r in range(2)]
    assert ckpt.exists() and all(s.exists() for s in side)
    sd = [torch.load(s, weights_only=True) for s in side]
    mine = [torch.load(io.BytesIO(d[f"rank{r}"]), weights_only=True) for r, d in enumerate(sd)]
    assert [d["rank"] for d in mine] == [0, 1] and all(d["step"] == 4 for d in mine)

    _script([job, resumed, 8, ckpt], tmp_path)
    back = _ranks(resumed)
    assert all(o["started_at"]["step"] == 4 and o["started_at"]["residuals"] > 0 for o in back)
    for r in range(2):
        assert torch.equal(back[r]["params"], outs[r]["params"])

    for s in side:  # the control: without the side files the residuals restart from zero
        s.unlink()
    log = _script([job, lost, 8, ckpt], tmp_path)
    assert "has no gradcomp state for rank" in log
    assert not torch.equal(_ranks(lost)[0]["params"], outs[0]["params"])


def test_lightning_strategy_rejects_a_second_hook():
    pytest.importorskip("lightning")
    from gradcomp.integrations.lightning import GradcompDDPStrategy

    with pytest.raises(TypeError, match="ddp_comm_hook"):
        GradcompDDPStrategy("int8", ddp_comm_hook=print)
    strategy = GradcompDDPStrategy("int4", state_kwargs={"start_step": 2})
    assert strategy.gradcomp_state.codec.name == "int4" and strategy.gradcomp_state.start_step == 2


def test_accelerate_recipe_under_torchrun(tmp_path):
    """Registering gradcomp on the model accelerator.prepare returned: the hook runs under
    Accelerate's gradient accumulation (no_sync), replicas stay identical."""
    pytest.importorskip("accelerate")
    _script(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
             HERE / "accelerate_job.py", tmp_path], tmp_path)
    outs = _ranks(tmp_path)
    for o in outs:
        assert o["world"] == 2 and o["distributed_type"].endswith("MULTI_CPU")
        assert o["stats"]["steps"] == 4 and o["stats"]["buckets_compressed"] == 4 and o["stats"]["ratio"] > 3
    assert len(outs[0]["grads"]) == 4
    for a, b in zip(outs[0]["grads"], outs[1]["grads"]):
        assert torch.equal(a, b)
    assert torch.equal(outs[0]["params"], outs[1]["params"])
