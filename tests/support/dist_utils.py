"""Runs a worker's scenario (tests/multirank/ddp_worker.py, allreduce_worker.py, fsdp_worker.py,
tests/support/diloco_worker.py, ...: the caller names the file) in W real processes on Gloo,
with a hard wall-clock kill, so a hang fails (or is observed) instead of blocking the suite.
run_ranks's ranks get this folder on PYTHONPATH, so a worker imports worker_main and the other
shared modules by name wherever it lives."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SUPPORT = Path(__file__).resolve().parent


def with_support_on_pythonpath(env: dict) -> dict:
    """``env`` with this folder first on PYTHONPATH (what was there kept after it)."""
    rest = env.get("PYTHONPATH", "")
    return dict(env, PYTHONPATH=os.pathsep.join([str(SUPPORT), rest]) if rest else str(SUPPORT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunResult:
    returncodes: list  # None for a rank that was killed at the deadline
    timed_out: bool
    outputs: list  # rank -> dict (or None)
    logs: list  # rank -> combined stdout/stderr text

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(rc == 0 for rc in self.returncodes)


def run_ranks(scenario: str, world: int, tmp_path, timeout: float = 120.0, *, worker: Path, **args) -> RunResult:
    port = free_port()
    procs, logs = [], []
    out_dir = Path(tmp_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    for rank in range(world):
        env = dict(with_support_on_pythonpath(os.environ), RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        log = open(out_dir / f"rank{rank}.log", "w+")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(worker), scenario, str(out_dir), json.dumps(args)],
                                      env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + timeout
    timed_out = False
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    if timed_out:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
    returncodes = [p.returncode if not (timed_out and p.returncode is not None and p.returncode < 0) else None
                   for p in procs]
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    outputs = []
    for rank in range(world):
        f = out_dir / f"rank{rank}.pt"
        outputs.append(torch.load(f, weights_only=False) if f.exists() else None)
    return RunResult(returncodes, timed_out, outputs, texts)


def describe(res: RunResult) -> str:
    tails = "\n".join(f"--- rank {r} (rc={rc}) ---\n{log[-3000:]}" for r, (rc, log) in
                      enumerate(zip(res.returncodes, res.logs)))
    return f"timed_out={res.timed_out}\n{tails}"


def run_torchrun_nodes(job: Path, out_dir, nodes: int = 2, per_node: int = 2, timeout: float = 240) -> None:
    """``job out_dir`` under torchrun as ``nodes`` "nodes" of ``per_node`` ranks on this
    machine (one torchrun a node, --node-rank n); asserts that every one succeeded."""
    port = free_port()
    procs = []
    for node in range(nodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node",
               str(per_node), "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
               str(job), str(out_dir)]
        procs.append(subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
