"""Starting the ranks of ``gradcomp demo`` and ``gradcomp bench converge`` (and the pieces
``gradcomp bench net`` shares for the ranks it starts in its namespaces).

``run_ranks(prog, args, run_rank, report, what)`` runs ``run_rank(args, rank, world,
local_rank)`` on every rank: under ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK and
MASTER_ADDR set) this process is one rank and nothing is spawned; otherwise ``spawn_ranks``
starts ``args.world`` processes on this machine. Rank 0's result goes to ``report``. Each
rank calls ``init_rank`` first: its device and backend (``pick_device``), its threads and its
process group.
"""

from __future__ import annotations

import json
import os
import socket
import sys

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
# the import names of the packages of the gradcomp[demo] extra
DEMO_PACKAGES = ("tqdm", "matplotlib", "sklearn")


def missing_packages(names=DEMO_PACKAGES) -> list[str]:
    """Those of the modules ``names`` that cannot be imported here, in their order."""
    import importlib.util

    return [name for name in names if importlib.util.find_spec(name) is None]


def under_torchrun() -> bool:
    """Whether this process is one rank of a torchrun launch (its variables are set)."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def environment_rank() -> tuple[int, int, int]:
    """(rank, world, local rank) from the environment torchrun (or bench net) sets."""
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def pick_device(prog: str, choice: str, world: int, local_rank: int):
    """(device, backend) of this rank for ``--device`` ``choice`` ("auto", "cpu" or "cuda"):
    CUDA with NCCL when every rank on this machine gets a GPU, else the CPU with Gloo."""
    import torch

    import gradcomp

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cuda_ok = gradcomp.cuda_available() and gpus > 0
    if choice == "cuda" and not cuda_ok:
        raise SystemExit(f"{prog}: --device cuda, but no CUDA device is usable by torch and gradcomp "
                         "(gradcomp info says why)")
    if choice == "cpu" or not cuda_ok:
        return torch.device("cpu"), "gloo"
    # every rank must choose alike: NCCL only if each rank on this node gets a GPU
    ranks_here = world if not under_torchrun() else int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
    if gpus < ranks_here:
        if choice == "cuda":
            raise SystemExit(f"{prog}: {world} ranks need a GPU each (NCCL refuses two ranks on one GPU); "
                             f"{gpus} visible")
        return torch.device("cpu"), "gloo"
    return torch.device("cuda", local_rank), "nccl"


def init_rank(prog: str, choice: str, rank: int, world: int, local_rank: int):
    """This rank's (device, backend) for ``--device`` ``choice``, its threads (the ranks
    share this machine's cores) and its process group."""
    import torch
    import torch.distributed as dist

    device, backend = pick_device(prog, choice, world, local_rank)
    if device.type == "cpu":
        ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_here))
    else:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    return device, backend


def run_ranks(prog: str, args, run_rank, report, what: str, world_problem=None) -> int:
    """Runs ``run_rank(args, rank, world, local_rank)`` (a module-level function) on every
    rank and ``report(out, args)`` with what rank 0 returned; first prints the world and
    ``what``. Under torchrun this process is one rank, and ``world_problem(world)``, where
    given, may refuse the world (exit status 2); otherwise ``args.world`` ranks are spawned.
    Returns the exit status."""
    if under_torchrun():
        rank, world, local_rank = environment_rank()
        problem = world_problem(world) if world_problem is not None else None
        if problem:
            print(f"{prog}: {problem}", file=sys.stderr)
            return 2
        if rank == 0:
            print(f"{prog} under torchrun: {world} ranks, {what}", flush=True)
        out = run_rank(args, rank, world, local_rank)
        if out is not None:
            report(out, args)
        return 0
    print(f"{prog}: {args.world} ranks, {what}", flush=True)
    code, out = spawn_ranks(prog, args.world, run_rank, args)
    if out is not None:
        report(out, args)
    return code


def spawn_ranks(prog: str, world: int, run_rank, args) -> tuple[int, dict | None]:
    """Runs ``run_rank(args, rank, world, local_rank)`` (a module-level function) in ``world``
    spawned processes on this machine; returns (exit code, what rank 0's returned, or None
    when a rank failed or the user interrupted)."""
    import tempfile

    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix=prog.replace(" ", "-") + "-") as folder:
        result_path = os.path.join(folder, "rank0.json")
        procs = [context.Process(target=_spawned_rank, args=(run_rank, rank, world, port, args, result_path))
                 for rank in range(world)]
        for proc in procs:
            proc.start()
        try:
            _join(procs)
        except KeyboardInterrupt:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.join()
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130, None
        if any(proc.exitcode != 0 for proc in procs) or not os.path.exists(result_path):
            codes = ", ".join(f"rank {rank}: {proc.exitcode}" for rank, proc in enumerate(procs))
            print(f"{prog}: a rank failed ({codes})", file=sys.stderr)
            return 1, None
        with open(result_path) as f:
            return 0, json.load(f)


def free_port() -> int:
    """A TCP port free on this machine now, for the spawned ranks' rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_pythonpath() -> str:
    """PYTHONPATH for ranks started as new programs (bench net's): they import gradcomp from
    where this process did (a source tree run with PYTHONPATH, or from its folder, included),
    not whichever copy is installed; a site-packages folder, on the path anyway, is not put
    before the standard library."""
    import site

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [path for path in os.environ.get("PYTHONPATH", "").split(os.pathsep) if path]
    sites = {os.path.abspath(path) for path in (*site.getsitepackages(), site.getusersitepackages())}
    if root not in sites and (not paths or os.path.abspath(paths[0]) != root):
        paths.insert(0, root)
    return os.pathsep.join(paths)


def _spawned_rank(run_rank, rank: int, world: int, port: int, args, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world))
    out = run_rank(args, rank, world, rank)
    if out is not None:  # a file, not a pipe: a pipe holds 64 KiB, and the parent reads after the join
        with open(result_path, "w") as f:
            json.dump(out, f)


def _join(procs) -> None:
    """Waits for every rank; when one fails, stops the others (they would wait for it in a
    collective until the group's timeout)."""
    from multiprocessing.connection import wait

    running = list(procs)
    while running:
        for sentinel in wait([proc.sentinel for proc in running]):
            proc = next(proc for proc in running if proc.sentinel == sentinel)
            proc.join()
            running.remove(proc)
            if proc.exitcode != 0:
                for other in running:
                    other.terminate()
                for other in running:
                    other.join()
                return
