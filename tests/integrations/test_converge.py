"""``gradcomp bench converge``: a tiny run through the real command (2 ranks spawned, both
tasks, a gradcomp codec and torch's PowerSGD at rank 1, two seeds), its argument errors,
and the pure pieces: the generated text, the lr schedule, the summary, torch-powersgd:R."""

import json
import math
import os
import re
import site
import subprocess
import sys

import gradcomp
import pytest
import torch
from gradcomp.benchmarks import converge
from gradcomp.drivers import methods

GRADCOMP = [sys.executable, "-m", "gradcomp"]
TINY = ["--world", "2", "--steps", "3", "--eval-every", "2", "--d-model", "16", "--heads", "2", "--layers", "1",
        "--context", "16", "--width", "32", "--batch", "8", "--no-progress"]


def gradcomp_cmd(args, tmp_path, timeout=120):
    # the command and its ranks import the gradcomp these tests import (a source tree on a
    # relative PYTHONPATH included, from tmp_path), not whichever copy is installed
    # (a site-packages folder, on the path anyway, is not put before the standard library)
    root = os.path.dirname(os.path.dirname(os.path.abspath(gradcomp.__file__)))
    paths = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sites = {os.path.abspath(p) for p in (*site.getsitepackages(), site.getusersitepackages())}
    first = [] if root in sites else [root]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*first, *(p for p in paths if p != root)]))
    return subprocess.run([*GRADCOMP, *args], cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env=env)


def test_bench_converge_trains_every_task_and_method_and_reports(tmp_path):
    names = ["allreduce", "int8", "torch-powersgd:1", "powersgd:1"]
    r = gradcomp_cmd(["bench", "converge", *TINY, "--methods", ",".join(names), "--seeds", "0,1",
                      "--freeze-variance", "2", "--json", "c.json", "--plot", "c.png"], tmp_path)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-5000:]}"
    out = json.loads((tmp_path / "c.json").read_text())
    meta = out["meta"]
    assert list(meta["tasks"]) == ["lm", "mlp"] and meta["methods"] == names and meta["seeds"] == [0, 1]
    assert meta["world"] == 2 and meta["backend"] == "gloo" and meta["torch"] == torch.__version__
    assert meta["freeze_variance"] == 2 and "variance frozen after 2 steps" in r.stdout
    assert meta["tasks"]["lm"]["optimizer"] == "AdamW" and meta["tasks"]["mlp"]["optimizer"] == "SGD"
    assert meta["tasks"]["lm"]["parameters"] == sum(p.numel() for p in converge.TinyLM(
        len(converge.ALPHABET), 16, 2, 1, 16).parameters())
    runs = {(r["task"], r["method"], r["seed"]): r for r in out["runs"]}
    assert sorted(runs) == sorted((t, m, s) for t in ("lm", "mlp") for m in names for s in (0, 1))
    for key, run in runs.items():
        assert math.isfinite(run["final_loss"]) and run["final_loss"] > 0, key
        assert run["curve"]["step"] == [0, 2, 3] and run["curve"]["heldout_loss"][-1] == run["final_loss"]
        assert len(run["train_loss"]) == 3 and run["bytes_per_step"] > 0
        assert (run["stats"] is not None) == (key[1] in ("int8", "powersgd:1")), key
    # one seed's initial weights are every method's: the same held-out loss before the first step
    for task in ("lm", "mlp"):
        assert len({runs[task, m, 0]["curve"]["heldout_loss"][0] for m in names}) == 1
        assert runs[task, "allreduce", 0]["final_loss"] != runs[task, "allreduce", 1]["final_loss"]
    rows = {(r["task"], r["method"]): r for r in out["summary"]}
    for task in ("lm", "mlp"):
        assert rows[task, "allreduce"]["diff_pct"] == 0 and rows[task, "allreduce"]["ratio"] == 1
        assert rows[task, "int8"]["bytes_per_step"] < rows[task, "allreduce"]["bytes_per_step"]
        assert out["baseline_spread_pct"][task] > 0
    for (task, method), row in rows.items():  # the table: one row per (task, method)
        assert re.search(rf"^{task}\s+{re.escape(method)}\s+{row['final_loss']:.4f}\s+[+-]\d+\.\d\d%\s+"
                         rf"\d+\.\d{{4}}\s+\d+\.\d{{4}}\s+[\d,]+\s+[\d.]+x\s+[\d.]+$", r.stdout, re.M), r.stdout
    assert re.search(r"^lm: plain all-reduce's seed-to-seed spread \d+\.\d\d%", r.stdout, re.M), r.stdout
    assert re.search(r"^mlp: plain all-reduce's seed-to-seed spread \d+\.\d\d%", r.stdout, re.M), r.stdout
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_converge_refuses_a_bad_method_or_task_before_spawning(tmp_path, monkeypatch, capsys):
    r = gradcomp_cmd(["bench", "converge", "--methods", "allreduce,int9"], tmp_path)
    assert r.returncode == 2 and "'int9' is neither" in r.stderr, r.stderr
    assert not list(tmp_path.iterdir())  # no plot, nothing written
    import torch.multiprocessing as mp

    monkeypatch.setattr(mp, "get_context", lambda *a: pytest.fail("spawned ranks for a bad task"))
    with pytest.raises(SystemExit) as e:
        converge.main(["--tasks", "lm,cnn"])
    assert e.value.code == 2 and "unknown task 'cnn': the tasks are lm, mlp" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--methods", "torch-powersgd:0"], "'torch-powersgd:0': torch-powersgd:R takes a positive integer rank"),
    (["--methods", "int8,int8"], "listed twice"),
    (["--methods", "node:int8"], "bench converge runs a flat world"),
    (["--tasks", ""], "no tasks given"),
    (["--tasks", "mlp,mlp"], "a task is listed twice"),
    (["--seeds", "0,x"], "--seeds takes comma-separated integers"),
    (["--seeds", "1,1"], "--seeds takes distinct integers"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--d-model", "30", "--heads", "4"], "--d-model 30 is not a multiple of --heads 4"),
])
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        converge.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_arguments_add_the_baseline_and_keep_the_order():
    args = converge.parse_args(["--methods", "int8,torch-powersgd:2", "--tasks", "mlp", "--seeds", "3"])
    assert args.methods == ["allreduce", "int8", "torch-powersgd:2"] and args.tasks == ["mlp"] and args.seeds == [3]
    assert converge.parse_args([]).tasks == ["lm", "mlp"] and converge.parse_args([]).seeds == [0, 1]


def test_text_is_deterministic_and_the_heldout_text_is_another_draw():
    train = converge.generate_text(converge.TRAIN_TEXT_SEED, 20_000)
    assert len(train) == 20_000 and train == converge.generate_text(converge.TRAIN_TEXT_SEED, 20_000)
    held = converge.generate_text(converge.HELDOUT_TEXT_SEED, 20_000)
    assert held != train and held[:200] != train[:200]
    assert set(train) | set(held) <= set(converge.ALPHABET)
    # the held-out lines are the same grammar, mostly not the training lines themselves
    train_lines, held_lines = set(train.splitlines()[:-1]), held.splitlines()[:-1]
    assert sum(line in train_lines for line in held_lines) < len(held_lines) / 2
    assert any(re.fullmatch(r"\d+\+\d+=\d+\.", line) for line in held_lines)
    assert all(int(a) + int(b) == int(c) for a, b, c in re.findall(r"^(\d+)\+(\d+)=(\d+)\.$", train, re.M))
    tokens = converge.encode(train)
    assert tokens.dtype == torch.int64 and "".join(converge.ALPHABET[i] for i in tokens[:300]) == train[:300]
    with pytest.raises(ValueError, match="outside the lm's alphabet"):
        converge.encode("Capital")


def test_default_lm_size_and_schedule():
    model = converge.TinyLM(len(converge.ALPHABET), 128, 4, 2, 64)
    assert 300_000 < sum(p.numel() for p in model.parameters()) < 1_000_000
    logits = model(torch.zeros(2, 64, dtype=torch.int64))
    assert logits.shape == (2, 64, len(converge.ALPHABET))
    factors = [converge.warmup_cosine(s, 100, 10) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1 and factors[-1] == pytest.approx(0.1)
    assert all(a <= b for a, b in zip(factors[:9], factors[1:10]))  # warming up
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))  # then decaying


def test_summary_pairs_each_seed_with_plain_allreduce():
    def run(method, seed, loss, sent):
        return {"task": "lm", "method": method, "seed": seed, "final_loss": loss, "bytes_per_step": sent,
                "step_ms": 10.0}

    out = {"meta": {"tasks": {"lm": {}}, "methods": ["allreduce", "int8"], "seeds": [0, 1]},
           "runs": [run("allreduce", 0, 1.0, 400), run("allreduce", 1, 2.0, 400),
                    run("int8", 0, 1.1, 100), run("int8", 1, 2.0, 100)]}
    rows = converge.summarize(out)
    assert [(r["method"], r["ratio"]) for r in rows] == [("allreduce", 1), ("int8", 4)]
    assert rows[0]["diff_pct"] == 0 and rows[1]["diff_pct"] == pytest.approx(5)  # (+10% + 0%) / 2
    assert rows[1]["final_loss"] == pytest.approx(1.55) and rows[1]["per_seed"] == {0: 1.1, 1: 2.0}
    assert converge.seed_spread([1.0, 2.0]) == pytest.approx(100 / 1.5) and converge.seed_spread([1.0]) is None


def test_torch_powersgd_takes_a_rank():
    assert methods.parse_methods("allreduce,torch-powersgd,torch-powersgd:1,torch-powersgd:16") == [
        "allreduce", "torch-powersgd", "torch-powersgd:1", "torch-powersgd:16"]
    assert methods.torch_powersgd_rank("torch-powersgd", 4) == 4
    assert methods.torch_powersgd_rank("torch-powersgd:2", 4) == 2
    assert methods.is_torch_powersgd("torch-powersgd:2") and not methods.is_torch_powersgd("powersgd:2")
    for bad in ("torch-powersgd:0", "torch-powersgd:x", "torch-powersgd:", "torch-powersgd:-1", "torch-powersgd:1.5"):
        with pytest.raises(ValueError, match=rf"'{re.escape(bad)}': torch-powersgd:R takes a positive integer"):
            methods.parse_methods(f"allreduce,{bad}")
    with pytest.raises(ValueError, match="is a DDP method"):
        methods.parse_fsdp_methods("torch-powersgd:2")
    model = torch.nn.Linear(512, 512)  # 1 MiB of fp32: one bucket on Gloo for every torch-powersgd
    whole = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    assert methods.bucket_cap_mb("torch-powersgd:2", model, "gloo", 0.25) > whole
    assert methods.bucket_cap_mb("torch-powersgd", model, "gloo", 0.25) > whole
    assert methods.bucket_cap_mb("torch-powersgd:2", model, "nccl", 0.25) == 0.25
    assert methods.bucket_cap_mb("int8", model, "gloo", 0.25) == 0.25


def test_method_registers_torch_powersgd_at_its_rank(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(methods.dist, "get_world_size", lambda group=None: 4)
    hooks = []
    ddp = SimpleNamespace(process_group=None, module=torch.nn.Linear(8, 8),
                          register_comm_hook=lambda state, hook: hooks.append(state))
    saved = methods.dist.all_reduce
    for name, rank in (("torch-powersgd:1", 1), ("torch-powersgd", 3), ("torch-powersgd:7", 7)):
        with methods.Method(name, ddp, powersgd_rank=3, start_step=5) as m:
            assert m.state is None and methods.dist.all_reduce != saved  # counting while attached
        assert methods.dist.all_reduce == saved
        assert hooks[-1].matrix_approximation_rank == rank and hooks[-1].start_powerSGD_iter == 5


def test_sharded_methods_take_a_gather_and_hpz():
    """'<plain|spec>[+ag:<spec>][+hpz]' under --fsdp and as fsdp:<that> in bench converge;
    HSDP gathers inside the node and takes neither."""
    assert methods.parse_fsdp_methods("plain,int8,int8+ag:int8,plain+ag:int4:block=128,int4+ag:fp16+hpz") == [
        "plain", "int8", "int8+ag:int8", "plain+ag:int4:block=128", "int4+ag:fp16+hpz"]
    assert methods.parse_sharded("int8+ag:int4+hpz") == methods.Sharded("int8", "int4", True)
    assert methods.parse_sharded("plain+ag:int8") == methods.Sharded(None, "int8", False)
    assert methods.parse_methods("allreduce,fsdp,fsdp:int8+ag:int8", methods.DEMO_KINDS)[2] == "fsdp:int8+ag:int8"
    for bad, why in (("int8+ag:topk:0.1", "the parameter all-gather takes a quantizer"),
                     ("int8+ag:int4:stochastic", "drop ':stochastic'"), ("int8+ag:sign", "not the weight"),
                     ("int8+hpz+hpz", "neither ag:<spec> nor hpz"), ("int8+zz", "neither ag:<spec> nor hpz"),
                     ("topk:0.1+ag:int8", "takes no sparsifier")):
        with pytest.raises(ValueError, match=re.escape(why)):
            methods.parse_fsdp_methods(bad)
    with pytest.raises(ValueError, match="under --hsdp FSDP2 gathers inside the node"):
        methods.parse_fsdp_methods("int8+ag:int8", "hsdp")
    assert converge.parse_args(["--methods", "fsdp:int8+ag:int8"]).methods == ["allreduce", "fsdp:int8+ag:int8"]
    with pytest.raises(SystemExit):
        converge.parse_args(["--methods", "fsdp:int8+ag:int8+hpz"])
