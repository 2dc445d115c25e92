"""The ``gradcomp`` command: demo (spawned and under torchrun), info, bench kernels and
bench net (real network namespaces, where the tests run as root), and the torchrun example.
Each runs as a real subprocess, the way a user runs it."""

import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "train_ddp.py")
GRADCOMP = [sys.executable, "-m", "gradcomp"]


def run(cmd, tmp_path, timeout=600, env=None):
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, **(env or {})))
    assert r.returncode == 0, f"{cmd} exited {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-5000:]}"
    return r


def torchrun(nproc: int, *args: str):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def test_info_names_version_build_and_backends(tmp_path):
    import gradcomp

    out = run([*GRADCOMP, "info"], tmp_path).stdout
    assert f"gradcomp {gradcomp.__version__}" in out
    for key, value in gradcomp.build_info().items():
        assert f"  {key}: {value}" in out
    assert f"torch {torch.__version__}" in out
    assert "gradcomp CPU backend: yes" in out
    assert f"gradcomp CUDA backend: {'yes' if gradcomp.cuda_available() else 'no ('}" in out
    assert "torch.distributed gloo: yes" in out
    assert f"CUDA devices visible to torch: {torch.cuda.device_count()}" in out


def test_usage_and_bad_input(tmp_path):
    r = subprocess.run([*GRADCOMP], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "gradcomp demo" in r.stdout and "gradcomp bench net" in r.stdout
    r = subprocess.run([*GRADCOMP, "demo", "--methods", "allreduce,int9"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "'int9' is neither" in r.stderr
    r = subprocess.run([*GRADCOMP, "bench", "net", "--rate", "fast"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "rate 'fast'" in r.stderr
    r = subprocess.run([*GRADCOMP, "bench", "nope"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "kernels|sparse|net" in r.stdout


def test_parse_methods_takes_node_specs():
    from gradcomp.drivers.methods import codec_spec, is_node_method, parse_methods

    assert parse_methods("allreduce, node:int8,int8,node:topk:0.01") == ["allreduce", "node:int8", "int8",
                                                                        "node:topk:0.01"]
    assert is_node_method("node:int8") and not is_node_method("int8") and not is_node_method("allreduce")
    assert codec_spec("node:int8:block=512") == "int8:block=512" and codec_spec("int4") == "int4"
    for bad in ("node:int9", "node:", "node:allreduce", "node:torch-fp16"):
        with pytest.raises(ValueError, match=rf"'{re.escape(bad)}': node: takes a gradcomp codec spec"):
            parse_methods(bad)
    with pytest.raises(ValueError, match="listed twice"):
        parse_methods("node:int8,node:int8")


def test_parse_methods_takes_diloco_specs():
    from gradcomp.drivers.methods import is_diloco_method, parse_diloco, parse_methods

    assert parse_methods("allreduce,diloco:int8:H=20,diloco:fp32:H=10:F=2") == [
        "allreduce", "diloco:int8:H=20", "diloco:fp32:H=10:F=2"]
    assert is_diloco_method("diloco:int8:H=20") and not is_diloco_method("int8")
    assert parse_diloco("diloco:int4:block=64:H=50:F=2:delay=3") == {
        "codec": "int4:block=64", "sync_every": 50, "fragments": 2, "delay": 3}
    assert parse_diloco("diloco:H=10:fp32") == {"codec": None, "sync_every": 10, "fragments": 1, "delay": None}
    assert parse_diloco("diloco:int8:H=10:lr=1:momentum=0:nesterov=0") == {
        "codec": "int8", "sync_every": 10, "fragments": 1, "delay": None, "outer_lr": 1.0, "outer_momentum": 0.0,
        "nesterov": False}
    for bad, why in (("diloco:int8", "needs H="), ("diloco:int8:H=0", "needs H="), ("diloco:H=5", "needs a codec"),
                     ("diloco:int9:H=5", "takes a gradcomp codec spec or fp32"), ("diloco:int8:H=x", "not a non-neg"),
                     ("diloco:int8:H=2:H=3", "given twice"), ("diloco:powersgd:2:H=4", "takes no powersgd"),
                     ("diloco:int8:H=4:F=0", "F= .fragments. must be at least 1"),
                     ("diloco:int8:H=4:lr=fast", "lr='fast' is not a number")):
        with pytest.raises(ValueError, match=why):
            parse_methods(bad)


def _fake_ddp(monkeypatch, world=4):
    """Enough of a DDP model for Method to attach a gradcomp method (register is replaced)."""
    from types import SimpleNamespace

    from gradcomp.drivers import methods

    monkeypatch.setattr(methods.dist, "get_world_size", lambda group=None: world)
    return SimpleNamespace(process_group=None, module=torch.nn.Linear(8, 8))


def test_node_method_registers_gradcomp_with_ranks_per_node(monkeypatch):
    """node:<spec> is gradcomp.register(ddp, spec, ranks_per_node=L); the hierarchy is
    State's, so a State with the keyword is stood in here."""
    import gradcomp
    from gradcomp.drivers.methods import Method, hierarchy_missing

    class StateWithHierarchy:
        def __init__(self, codec="int8", process_group=None, *, start_step=0, ranks_per_node=None):
            pass

    calls = []
    monkeypatch.setattr(gradcomp, "State", StateWithHierarchy)
    monkeypatch.setattr(gradcomp, "register", lambda ddp, codec, **kw: calls.append((ddp, codec, kw)) or "state")
    ddp = _fake_ddp(monkeypatch)
    assert hierarchy_missing(["allreduce", "node:int8"]) is None
    with Method("node:int8:block=512", ddp, start_step=3, ranks_per_node=2) as m:
        assert m.state == "state"
    assert calls == [(ddp, "int8:block=512", {"start_step": 3, "ranks_per_node": 2})]
    with Method("int8", ddp, ranks_per_node=2):  # flat gradcomp: no ranks_per_node
        pass
    assert calls[-1] == (ddp, "int8", {"start_step": 0})
    with pytest.raises(ValueError, match="needs the topology's ranks per node"):
        Method("node:int8", ddp)


def test_node_method_without_hierarchy_in_state_fails_clearly(monkeypatch):
    import inspect

    import gradcomp
    from gradcomp.drivers.methods import Method, hierarchy_missing

    class FlatState:  # State as it was before ranks_per_node=
        def __init__(self, codec="int8", process_group=None, *, start_step=0):
            pass

    monkeypatch.setattr(gradcomp, "State", FlatState)
    monkeypatch.setattr(gradcomp, "register", lambda *a, **kw: pytest.fail("registered without the hierarchy"))
    assert hierarchy_missing(["allreduce", "int8"]) is None
    assert "no ranks_per_node= keyword" in hierarchy_missing(["int8", "node:int8"])
    with pytest.raises(TypeError, match="node:int8: this gradcomp's State takes no ranks_per_node= keyword"):
        Method("node:int8", _fake_ddp(monkeypatch), ranks_per_node=2)
    monkeypatch.undo()
    if "ranks_per_node" not in inspect.signature(gradcomp.State).parameters:  # this checkout's own State
        assert hierarchy_missing(["node:int8"]) is not None


def test_demo_ranks_per_node_arguments(monkeypatch, capsys):
    from gradcomp import demo

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    args = demo.parse_args(["--world", "4", "--ranks-per-node", "2", "--methods", "allreduce,node:int8"])
    assert args.ranks_per_node == 2 and args.methods == ["allreduce", "node:int8"]
    assert demo.parse_args(["--methods", "int8"]).ranks_per_node is None
    for argv, message in ((["--methods", "allreduce,node:int8"], "node:int8 reduce node by node: give --ranks-per-"),
                          (["--world", "3", "--ranks-per-node", "2"], "not a multiple of --ranks-per-node 2"),
                          (["--ranks-per-node", "0"], "--ranks-per-node must be >= 1"),
                          (["--methods", "node:int9", "--ranks-per-node", "2"], "'node:int9': node: takes")):
        with pytest.raises(SystemExit) as e:
            demo.parse_args(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err, argv


def _demo_results(path):
    with open(path) as f:
        out = json.load(f)
    return out["meta"], out["results"]


def test_demo_trains_every_kind_of_method_and_reports(tmp_path):
    methods = "allreduce,torch-fp16,torch-powersgd,int8,topk:0.01,diloco:int8:H=11"
    r = run([*GRADCOMP, "demo", "--methods", methods, "--epochs", "3", "--json", "d.json", "--plot", "d.png"],
            tmp_path)
    meta, res = _demo_results(tmp_path / "d.json")
    assert list(res) == methods.split(",")
    assert meta["world"] == 2 and meta["backend"] == "gloo" and meta["steps"] == 3 * (1437 // 64)
    # the table: one row a method, with its ratio
    for m in res:
        assert re.search(rf"^{re.escape(m)}\s+\d+\.\d{{4}}\s+\d\.\d{{3}}\s+[\d,]+\s+[\d.]+x", r.stdout, re.M), r.stdout
    # tqdm's bars went to stderr, one per method, to the end
    for m in res:
        assert re.search(rf"{re.escape(m)}\s*:\s*100%.*\b{meta['steps']}/{meta['steps']}\b", r.stderr), r.stderr[-2000:]

    assert meta["parameters"] == sum(p.numel() for p in torch.nn.Sequential(
        torch.nn.Linear(64, 1024), torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 10)).parameters())
    # int8 (from gradcomp's own byte count): 1 byte a value plus a 4-byte scale a 256-block
    # (and a tiny exact lane), against the ring all-reduce of fp32: between 3.8x and 4x
    assert 3.8 < res["int8"]["ratio"] < 4.0
    assert res["torch-powersgd"]["ratio"] > 10 and res["topk:0.01"]["ratio"] > 10
    # DiLoCo: int8's bytes once every 11 steps; its syncs cost time, seen in the mean step
    assert 11 * 3.8 < res["diloco:int8:H=11"]["ratio"] < 11 * 4.0
    assert res["diloco:int8:H=11"]["stats"]["buckets_compressed"] == meta["steps"] // 11
    plain = res["allreduce"]
    for m, v in res.items():
        assert len(v["loss_curve"]) == meta["steps"]
        first, last = sum(v["loss_curve"][:5]) / 5, sum(v["loss_curve"][-5:]) / 5
        assert last < first / 2, (m, first, last)
    for m in ("torch-fp16", "int8"):  # near-lossless methods train like plain all-reduce
        assert abs(res[m]["final_loss"] - plain["final_loss"]) < 0.05 * plain["final_loss"], (m, res[m], plain)
        assert abs(res[m]["test_accuracy"] - plain["test_accuracy"]) < 0.03
    assert plain["test_accuracy"] > 0.85
    png = (tmp_path / "d.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_demo_under_torchrun_is_the_same_training(tmp_path):
    """Under torchrun each process is a rank (nothing spawned) and trains exactly what the
    spawned demo trains."""
    args = ["demo", "--methods", "allreduce,int8", "--epochs", "2", "--plot", "", "--no-progress"]
    r = run(torchrun(2, "--no-python", "gradcomp", *args, "--json", "t.json"), tmp_path)
    assert "under torchrun: 2 ranks" in r.stdout
    run([*GRADCOMP, *args, "--json", "s.json"], tmp_path)
    meta_t, res_t = _demo_results(tmp_path / "t.json")
    meta_s, res_s = _demo_results(tmp_path / "s.json")
    assert meta_t["world"] == 2
    for m in ("allreduce", "int8"):
        assert res_t[m]["loss_curve"] == pytest.approx(res_s[m]["loss_curve"], rel=1e-5)
        assert res_t[m]["bytes_per_step"] == res_s[m]["bytes_per_step"]


def test_example_trains_under_torchrun_with_one_gradcomp_line(tmp_path):
    with open(EXAMPLE) as f:
        source = f.read()
    assert [line.strip() for line in source.splitlines() if "gradcomp." in line and not line.lstrip().startswith(
        ("#", '"', "'"))] == ['gradcomp.register(model, args.codec)  # the one gradcomp line: compress DDP\'s '
                              'gradient exchange']
    r = run(torchrun(2, EXAMPLE, "--epochs", "3", "--save", "m.pt"), tmp_path)
    losses = [float(v) for v in re.findall(r"^epoch \d+: loss ([\d.]+)$", r.stdout, re.M)]
    assert len(losses) == 3 and losses[2] < losses[0] / 2, r.stdout
    assert "[rank 0] gradcomp hook: Int8" in r.stderr and "[rank 1] gradcomp hook: Int8" in r.stderr
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert state["0.weight"].shape == (1024, 128) and torch.isfinite(state["4.weight"]).all()


def test_bench_kernels_writes_a_table_and_json(tmp_path):
    r = run([*GRADCOMP, "bench", "kernels", "--device", "cpu", "--sizes", "2e4", "--codecs", "int8,sign",
             "--repeat", "2", "--warmup", "1", "--out", "k.json"], tmp_path)
    rows = json.loads((tmp_path / "k.json").read_text())["results"]
    assert sorted((r["codec"], r["pass"]) for r in rows) == sorted(
        (c, p) for c in ("int8", "sign") for p in ("encode", "reduce", "decode"))
    assert all(r["ms"] > 0 and r["N"] == 20000 for r in rows)
    assert all(r["agrees_with_torch_ops"] for r in rows if r["codec"] == "int8")
    assert "encode" in r.stdout and "% copy" in r.stdout


# ---- bench net -----------------------------------------------------------------------


def test_bench_net_without_root_says_so_and_does_nothing(monkeypatch, capsys):
    from gradcomp.benchmarks import net

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(net.Namespaces, "create", lambda self: pytest.fail("created namespaces without root"))
    assert net.main(["--world", "2"]) == 1
    assert "needs root" in capsys.readouterr().err


def test_bench_net_topology_arguments(capsys):
    from gradcomp.benchmarks import net

    def topology(*argv):
        a = net.parse_args(list(argv))
        return a.world, a.nodes, a.ranks_per_node, net.topology_name(a)

    assert topology() == (2, 2, 1, "w2")  # today's default: 2 nodes of one rank
    assert topology("--world", "4") == (4, 4, 1, "w4")
    assert topology("--nodes", "2", "--ranks-per-node", "2") == (4, 2, 2, "n2x2")
    assert topology("--nodes", "3", "--ranks-per-node", "2", "--world", "6") == (6, 3, 2, "n3x2")
    assert topology("--world", "6", "--ranks-per-node", "3") == (6, 2, 3, "n2x3")
    assert topology("--nodes", "3") == (3, 3, 1, "w3")
    assert net.parse_args(["--methods", "allreduce,node:int8"]).methods == ["allreduce", "node:int8"]
    for argv, message in ((["--nodes", "2", "--ranks-per-node", "2", "--world", "3"],
                           "--world 3 is not --nodes × --ranks-per-node = 2 × 2 = 4"),
                          (["--nodes", "2", "--world", "4"], "--world 4 is not --nodes × --ranks-per-node = 2 × 1"),
                          (["--ranks-per-node", "0"], "--ranks-per-node must be >= 1"),
                          (["--nodes", "2", "--ranks-per-node", "-1"], "--ranks-per-node must be >= 1"),
                          (["--nodes", "1", "--ranks-per-node", "4"], "--nodes must be >= 2"),
                          (["--world", "5", "--ranks-per-node", "2"], "not a multiple of --ranks-per-node 2"),
                          (["--world", "2", "--ranks-per-node", "2"], "is one node"),
                          (["--nodes", "201"], "--nodes (or --world) must be <= 200"),
                          (["--nodes", "101", "--ranks-per-node", "2"], "must be <= 200"),
                          (["--methods", "allreduce,node:int9"], "'node:int9': node: takes a gradcomp codec spec")):
        with pytest.raises(SystemExit) as e:
            net.parse_args(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err, argv


def test_bench_net_node_methods_need_the_hierarchy_before_anything_is_done(monkeypatch, capsys):
    import gradcomp
    from gradcomp.benchmarks import net

    class FlatState:
        def __init__(self, codec="int8", process_group=None, *, start_step=0):
            pass

    monkeypatch.setattr(gradcomp, "State", FlatState)
    monkeypatch.setattr(net.Namespaces, "create", lambda self: pytest.fail("created namespaces"))
    assert net.main(["--nodes", "2", "--ranks-per-node", "2", "--methods", "allreduce,node:int8"]) == 1
    err = capsys.readouterr().err
    assert "node:int8: this gradcomp's State takes no ranks_per_node= keyword" in err and "nothing was done" in err


def test_parse_rate():
    from gradcomp.benchmarks.net import parse_rate

    assert parse_rate("1gbit") == 1e9
    assert parse_rate("100mbit") == 1e8
    assert parse_rate("2.5Gbit") == 2.5e9
    assert parse_rate("125mbps") == 1e9
    for bad in ("1 gigabit", "fast", "", "-1gbit"):
        with pytest.raises(ValueError, match="rate"):
            parse_rate(bad)


_FAKE_RANK = """
import faulthandler, json, os, signal, sys, time
faulthandler.register(signal.SIGUSR1, all_threads=True)  # as bench net's ranks do
role, result = sys.argv[1], sys.argv[2]

def stuck_in_teardown():
    time.sleep(600)

if role == "writes":  # rank 0: the result, whole, then out
    with open(result + ".part", "w") as f:
        json.dump({"methods": {"allreduce": {"step_ms": 12.5}}}, f)
    os.replace(result + ".part", result)
    sys.exit(0)
elif role == "fails":
    sys.exit(3)
print("ready", file=sys.stderr, flush=True)
stuck_in_teardown()
"""


@contextlib.contextmanager
def _fake_ranks(folder, *roles):
    """Processes that play bench net's ranks for its parent's wait, in a new ``folder``:
    ``writes`` writes the phase's result and exits, ``stuck`` hangs (as in a deadlocked
    teardown), ``fails`` exits 3. Yields (processes, log paths, result path); kills them after."""
    folder.mkdir()
    result = str(folder / "shaped0.json")
    logs = [str(folder / f"rank{r}.log") for r in range(len(roles))]
    procs = []
    try:
        for role, log in zip(roles, logs):
            with open(log, "w") as f:
                procs.append(subprocess.Popen([sys.executable, "-c", _FAKE_RANK, role, result], stdout=f, stderr=f))
        yield procs, logs, result
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _wait_ready(logs, n):
    deadline = time.monotonic() + 30
    while sum("ready" in pathlib.Path(log).read_text() for log in logs) < n:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_bench_net_ranks_stuck_after_the_result_are_killed_and_the_result_stands(tmp_path, capsys):
    """A rank that hangs once rank 0 has written the phase's result (Gloo's teardown can)
    costs the grace period, not the phase's timeout: its stacks reach the warning and the
    result is returned. Without a result, the timeout's error carries the stacks too; a
    rank that fails is an error at once."""
    from gradcomp.benchmarks import net

    with _fake_ranks(tmp_path / "a", "writes", "stuck") as (procs, logs, result):
        _wait_ready(logs[1:], 1)
        t0 = time.monotonic()
        out = net._wait_for_ranks(procs, logs, result, "shaped", timeout=120, grace=1.0)
        assert time.monotonic() - t0 < 20
        assert out == {"methods": {"allreduce": {"step_ms": 12.5}}}
        err = capsys.readouterr().err
        assert "rank(s) 1 had not exited 1 s after the results were written" in err
        assert "stuck_in_teardown" in err  # rank 1's Python stack, from its faulthandler
        assert procs[0].poll() == 0 and procs[1].poll() is None  # the caller kills what is left

    with _fake_ranks(tmp_path / "b", "stuck", "stuck") as (procs, logs, result):
        _wait_ready(logs, 2)
        with pytest.raises(TimeoutError, match="shaped phase took over 2 s") as e:
            net._wait_for_ranks(procs, logs, result, "shaped", timeout=2, grace=1.0)
        assert "stuck_in_teardown" in str(e.value)

    with _fake_ranks(tmp_path / "c", "stuck", "fails") as (procs, logs, result):
        with pytest.raises(RuntimeError, match="shaped phase: rank 1 exited with 3"):
            net._wait_for_ranks(procs, logs, result, "shaped", timeout=60, grace=1.0)


def _can_make_namespaces() -> bool:
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        return False
    name = f"gctest{os.getpid()}"
    ok = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ok


needs_netns = pytest.mark.skipif(not _can_make_namespaces(), reason="needs root, iproute2 and network namespaces")


def _namespaces_of(pid: int) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"gcnet{pid}-")]


@needs_netns
def test_bench_net_shapes_the_link_and_times_methods(tmp_path):
    cmd = [*GRADCOMP, "bench", "net", "--rate", "200mbit", "--params", "4e5", "--steps", "3", "--warmup", "3",
           "--methods", "allreduce,int8,torch-fp16,diloco:int8:H=3", "--out", "n.json"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out + err
    assert _namespaces_of(proc.pid) == []
    res = json.loads((tmp_path / "n.json").read_text())
    meta, methods = res["meta"], res["methods"]
    # tbf really limits the link (a little under the setting: TCP/IP headers ride in the rate)
    assert 0.7 * 200e6 < meta["link_bps_shaped"] < 1.05 * 200e6, meta
    assert meta["link_bps_unshaped"] > 2 * 200e6
    assert list(methods) == ["allreduce", "int8", "torch-fp16", "diloco:int8:H=3"]
    # the bytes each method is said to send are what rank 0's interface really sent (plus
    # headers, counted once per GSO packet on veth, and ACKs: well under the tolerance)
    ratios = {name: m["eth0_tx_bytes_per_step"] / m["bytes_per_step"] for name, m in methods.items()}
    assert all(0.97 < r < 1.1 for r in ratios.values()), ratios
    params = meta["parameters"]  # ring at W = 2: 2(W-1)/W of 4 bytes a value
    assert 0.97 * 4 * params < methods["allreduce"]["eth0_tx_bytes_per_step"] < 1.1 * 4 * params
    assert 3.8 < methods["allreduce"]["bytes_per_step"] / methods["int8"]["bytes_per_step"] < 4.0
    # DiLoCo syncs every 3 steps: a third of int8's bytes a step, and one sample a period of 3 steps
    assert 2.9 < methods["int8"]["bytes_per_step"] / methods["diloco:int8:H=3"]["bytes_per_step"] < 3.1
    for name, m in methods.items():
        samples = 1 if name.startswith("diloco:") else 3
        assert m["shaped_step_ms"] > 0 and m["unshaped_step_ms"] > 0 and len(m["shaped_steps_ms"]) == 2 * samples
        assert len(m["unshaped_round_medians_ms"]) == 2  # two rounds of each link, 3 steps each
    # 1.6 MB a step over 200 Mbit/s is at least 64 ms of wire on top of the compute
    assert methods["allreduce"]["shaped_step_ms"] > methods["allreduce"]["unshaped_step_ms"] + 30
    printed = re.search(r"measured ([\d.]+) Gbit/s", out)
    assert printed and float(printed.group(1)) == pytest.approx(meta["link_bps_shaped"] / 1e9, abs=1e-3), out


@needs_netns
def test_bench_net_nodes_of_several_ranks_count_the_bytes_between_nodes(tmp_path):
    """2 nodes × 2 ranks: a node's ranks share its namespace and eth0 address, talk to each
    other over its loopback (unshaped) and to the other node over the shaped link."""
    cmd = [*GRADCOMP, "bench", "net", "--nodes", "2", "--ranks-per-node", "2", "--rate", "200mbit", "--params", "4e5",
           "--steps", "3", "--warmup", "3", "--rounds", "1", "--no-unshaped", "--methods", "allreduce,int8"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    assert _namespaces_of(proc.pid) == []
    res = json.loads((tmp_path / "net-200mbit-n2x2.json").read_text())  # the default name names the topology
    meta, methods = res["meta"], res["methods"]
    assert (meta["world"], meta["nodes"], meta["ranks_per_node"]) == (4, 2, 2)
    # the link measured runs between the nodes (rank 2 to rank 0), through the shaping
    assert 0.7 * 200e6 < meta["link_bps_shaped"] < 1.05 * 200e6, meta
    assert list(methods) == ["allreduce", "int8"]
    grads = 4 * meta["parameters"]
    assert methods["allreduce"]["bytes_per_step"] == pytest.approx(2 * 3 / 4 * grads)  # rank 0's ring share
    for name, m in methods.items():
        sent = m["bytes_per_step"]  # what one rank sent, counted (to its own node and to the other)
        assert len(m["node_tx_bytes_per_step"]) == 2 and m["eth0_tx_bytes_per_step"] == m["node_tx_bytes_per_step"][0]
        assert m["inter_node_bytes_per_step"] == pytest.approx(statistics.fmean(m["node_tx_bytes_per_step"]))
        assert m["inter_node_bytes_per_rank_per_step"] == pytest.approx(m["inter_node_bytes_per_step"] / 2)
        for eth0, lo in zip(m["node_tx_bytes_per_step"], m["node_lo_tx_bytes_per_step"]):
            # no more than its 2 ranks sent in all (plus headers)...
            assert 0 < eth0 < 1.1 * 2 * sent, (name, m)
            # ...and every byte they sent left either by eth0 (to the other node) or by lo
            assert 0.97 < (eth0 + lo) / (2 * sent) < 1.1, (name, m)
    for eth0 in methods["allreduce"]["node_tx_bytes_per_step"]:
        # the other node's sum depends on all of this node's gradient bytes: at least those cross
        assert eth0 >= grads, methods["allreduce"]
    assert methods["int8"]["inter_node_bytes_per_step"] < methods["allreduce"]["inter_node_bytes_per_step"]
    assert "4 ranks (2 nodes × 2 ranks)" in out
    assert re.search(r"^method\s.*\bMB sent\s+node MB\s+MB/rank\s+wire ms", out, re.M), out
    for name, m in methods.items():
        sent, inter = m["bytes_per_step"] / 1e6, m["inter_node_bytes_per_step"] / 1e6
        row = rf"^{re.escape(name)}\s+\d+(\s+-){{3}}\s+{sent:.2f}\s+{inter:.2f}\s+{inter / 2:.2f}\s"
        assert re.search(row, out, re.M), out


@needs_netns
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_bench_net_removes_its_namespaces_when_interrupted(tmp_path, sig):
    cmd = [*GRADCOMP, "bench", "net", "--rate", "50mbit", "--params", "4e5", "--steps", "50", "--methods", "allreduce",
           "--out", "n.json"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(_namespaces_of(proc.pid)) < 3 or len(_workers(proc.pid)) < 2:  # 3 namespaces, both ranks running
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        workers = _workers(proc.pid)
        time.sleep(1.0)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # reaped and its pipes closed: a leaked Popen fails a later test's teardown
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, out + err
    assert "interrupted; namespaces removed" in err
    assert _namespaces_of(proc.pid) == []
    assert not (tmp_path / "n.json").exists()
    # no rank process is left behind
    time.sleep(0.5)
    assert not set(workers) & set(_workers()), workers


@needs_netns
def test_bench_net_killed_outright_takes_its_ranks_along_and_the_next_run_removes_its_namespaces(tmp_path):
    cmd = [*GRADCOMP, "bench", "net", "--rate", "50mbit", "--params", "4e5", "--steps", "50", "--methods", "allreduce",
           "--out", "n.json"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(_namespaces_of(proc.pid)) < 3 or len(_workers(proc.pid)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    workers = _workers(proc.pid)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while set(workers) & set(_workers()):  # PR_SET_PDEATHSIG: the ranks get SIGKILL too
        assert time.monotonic() < deadline, "ranks outlived their killed parent"
        time.sleep(0.05)
    assert len(_namespaces_of(proc.pid)) == 3  # nothing could clean up after SIGKILL
    r = subprocess.run([*GRADCOMP, "bench", "net", "--rate", "fast"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2  # a bad option: stops before touching anything
    assert len(_namespaces_of(proc.pid)) == 3
    r = subprocess.run([*GRADCOMP, "bench", "net", "--params", "4e5", "--steps", "1", "--warmup", "3", "--rounds", "1",
                        "--no-unshaped", "--methods", "allreduce", "--out", "n2.json"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "removed namespaces left by an earlier killed run" in r.stdout
    assert _namespaces_of(proc.pid) == []


def _workers(parent: int | None = None) -> list[int]:
    """Pids of running `gradcomp bench net` ranks; with `parent`, only that process's children
    (another test run on the machine may have ranks of its own)."""
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if b"gradcomp.benchmarks.net" in args and b"--worker" in args and parent in (None, ppid):
                pids.append(int(pid))
    return pids


def test_demo_fsdp_methods_train_like_fsdp_and_count_their_memory(tmp_path, capsys):
    """``fsdp`` (FSDP2's own reduce-scatter) and ``fsdp:<spec>`` (gradcomp.fsdp.register): int8
    trains like FSDP2 plain with about a quarter of its reduce-scatter bytes, and keeps a
    residual of (W - 1)/W of the unsharded fp32 gradient; with ``+ag:int8`` its gathers too
    send about a quarter of FSDP2's; a bad spec is refused by name. Bytes count the
    reduce-scatter and the two gathers (FSDP2's own as a ring's: a third each)."""
    from gradcomp import demo

    with pytest.raises(SystemExit):
        demo.parse_args(["--methods", "fsdp,fsdp:int9"])
    assert "'fsdp:int9': fsdp: takes a gradcomp codec spec" in capsys.readouterr().err
    run([*GRADCOMP, "demo", "--methods", "fsdp,fsdp:int8,fsdp:int8+ag:int8", "--epochs", "3", "--json", "f.json",
         "--plot", "", "--no-progress"], tmp_path)
    meta, res = _demo_results(tmp_path / "f.json")
    plain, int8, both = res["fsdp"], res["fsdp:int8"], res["fsdp:int8+ag:int8"]
    third = plain["bytes_per_step"] / 3  # each of the reduce-scatter and the two gathers
    assert 3.8 < third / (int8["bytes_per_step"] - 2 * third) < 4.0
    assert 3.8 < plain["bytes_per_step"] / both["bytes_per_step"] < 4.0
    assert abs(both["final_loss"] - plain["final_loss"]) < 0.05 * plain["final_loss"]
    assert abs(int8["final_loss"] - plain["final_loss"]) < 0.05 * plain["final_loss"]
    assert plain["residual_bytes"] == 0 and plain["test_accuracy"] > 0.85
    # every parameter of the MLP but the biases and the 10-row head's bias is compressed
    assert 0.99 * 2 * meta["parameters"] < int8["residual_bytes"] <= 4 * meta["parameters"] / 2


def test_bench_net_fsdp_and_hsdp_arguments(capsys):
    from gradcomp.benchmarks import net

    a = net.parse_args(["--fsdp"])
    assert (a.mode, a.methods, a.world, net.output_name(a)) == ("fsdp", ["plain", "int8", "int4"], 2,
                                                                "net-1gbit-fsdp-w2.json")
    a = net.parse_args(["--hsdp", "--nodes", "2", "--ranks-per-node", "2", "--methods", "plain,int8"])
    assert (a.mode, a.methods, a.world, net.output_name(a)) == ("hsdp", ["plain", "int8"], 4,
                                                                "net-1gbit-hsdp-n2x2.json")
    a = net.parse_args([])
    assert a.mode == "ddp" and a.methods[0] == "allreduce" and net.output_name(a) == "net-1gbit-w2.json"
    for argv, message in ((["--fsdp", "--hsdp"], "not allowed with"),
                          (["--hsdp", "--nodes", "2"], "--hsdp needs --nodes N and --ranks-per-node L"),
                          (["--hsdp", "--nodes", "2", "--ranks-per-node", "1"], "--ranks-per-node >= 2"),
                          (["--fsdp", "--methods", "allreduce"], "'allreduce' is a DDP method"),
                          (["--hsdp", "--world", "4", "--ranks-per-node", "2", "--methods", "node:int8"],
                           "'node:int8' is a DDP method"),
                          (["--fsdp", "--methods", "topk:0.01"], "takes no sparsifier"),
                          (["--fsdp", "--methods", "int9"], "'int9' is neither 'plain' nor a gradcomp codec")):
        with pytest.raises(SystemExit) as e:
            net.parse_args(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err, argv
