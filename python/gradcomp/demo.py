"""``gradcomp demo``: the same DDP training once per gradient-exchange method, side by side.

The data is scikit-learn's handwritten digits (1,797 8×8 images, 10 classes), which ship
inside the scikit-learn package: nothing is downloaded. A fixed 80/20 split; each rank
trains on its own shard of the training set, and the held-out 20% gives the accuracy.

Launch:
  * ``gradcomp demo`` spawns ``--world`` ranks itself: Gloo on CPU, or NCCL with one GPU a
    rank when there are that many GPUs (and gradcomp was built with CUDA);
  * under ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR set) every process is
    one rank and nothing is spawned.

Methods ``node:<spec>`` (e.g. ``node:int8``) reduce hierarchically, within each node of
``--ranks-per-node`` contiguous ranks, then across nodes: gradcomp registered with
``ranks_per_node=`` (gradcomp.State's keyword; the world must be a multiple of it).

Methods ``fsdp`` and ``fsdp:<spec>`` shard the MLP with FSDP2 (each Linear a unit) and
reduce with FSDP2's own reduce-scatter or gradcomp's (``gradcomp.fsdp.register``).

Methods ``diloco:<codec>:H=<n>`` (e.g. ``diloco:int8:H=20``, ``diloco:fp32:H=10``) train the
plain MLP with gradcomp.DiLoCo: n steps of each rank's own SGD between compressed outer steps
(``:F=<f>`` streams f fragments). Most of its steps send nothing: the table's mean step, beside
the median, shows its syncs, and its bytes per step are the syncs' bytes over all steps.

Rank 0 shows a tqdm bar per method, then prints a table (final loss on the whole training
set, test accuracy, bytes it sent per step, the ratio to plain all-reduce's bytes, median
step time), writes a PNG of the loss curves and, with ``--json``, the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import sys
import time

from .benchmarks.methods import DEFAULT_METHODS, hierarchy_missing, is_node_method, parse_methods

# the per-step methods, then DiLoCo: int8 pseudo-gradients every 20 steps (20 divides the
# default 440 steps, so the final model is the anchor)
DEMO_METHODS = (*DEFAULT_METHODS, "diloco:int8:H=20")

NEEDS = ("gradcomp demo needs tqdm, matplotlib and scikit-learn (for its bundled digits dataset): "
         "pip install 'gradcomp[demo]'")


def _missing_packages() -> list[str]:
    import importlib.util

    return [m for m in ("tqdm", "matplotlib", "sklearn") if importlib.util.find_spec(m) is None]


def load_digits_split(seed: int = 0):
    """(x_train, y_train, x_test, y_test): the digits scaled to [0, 1], a fixed 80/20 split."""
    import torch
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(y))
    train, test = order[:n_train], order[n_train:]
    return x[train], y[train], x[test], y[test]


def make_model(width: int):
    import torch.nn as nn

    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="gradcomp demo",
                                description="DDP training on the digits dataset, once per method, side by side")
    p.add_argument("--world", type=int, default=2, help="ranks to spawn (ignored under torchrun); default 2")
    p.add_argument("--methods", default=",".join(DEMO_METHODS),
                   help="comma-separated: allreduce, torch-fp16, torch-powersgd, gradcomp codec specs, "
                        "node:<codec spec> (with --ranks-per-node), fsdp[:<codec spec>] and "
                        "diloco:<codec spec or fp32>:H=<steps>[:F=<fragments>] "
                        f"(default {','.join(DEMO_METHODS)})")
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="ranks a node, contiguous, for the node:<spec> methods' hierarchical reduction "
                        "(the world must be a multiple of it)")
    p.add_argument("--codec", help="shorthand for --methods allreduce,CODEC")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=32, help="batch per rank")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--width", type=int, default=1024, help="hidden width of the MLP (default 1024: 1.1M parameters)")
    p.add_argument("--bucket-cap-mb", type=float, default=1.0, help="DDP's bucket cap (default 1: several buckets)")
    p.add_argument("--start-step", type=int, default=0, help="steps of plain all-reduce before compressing")
    p.add_argument("--powersgd-rank", type=int, default=4, help="matrix_approximation_rank of torch's PowerSGD")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA with NCCL when there is a GPU per rank, else CPU with Gloo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="gradcomp-demo.png", help="PNG of the loss curves ('' for none)")
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        if args.codec:
            args.methods = "allreduce" if args.codec == "allreduce" else f"allreduce,{args.codec}"
        args.methods = _parse_with_fsdp(args.methods)
    except ValueError as e:
        p.error(str(e))
    for name in ("world", "epochs", "batch", "width", "powersgd_rank"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.start_step < 0:
        p.error("--start-step must be >= 0")
    if args.ranks_per_node is not None and args.ranks_per_node < 1:
        p.error("--ranks-per-node must be >= 1")
    node = [m for m in args.methods if is_node_method(m)]
    if node and args.ranks_per_node is None:
        p.error(f"{', '.join(node)} reduce node by node: give --ranks-per-node")
    if not _under_torchrun():  # under torchrun the world is known only there: main checks it
        problem = _world_problem(args.world, args.ranks_per_node)
        if problem:
            p.error(problem)
    return args


FSDP_PREFIX = "fsdp:"


def is_fsdp_method(method: str) -> bool:
    return method == "fsdp" or method.startswith(FSDP_PREFIX)


def _parse_with_fsdp(text: str) -> list[str]:
    """parse_methods, plus ``fsdp`` (FSDP2's own reduce-scatter) and ``fsdp:<spec>``
    (gradcomp.fsdp.register with that codec; bench net's parse_fsdp_methods checks it)."""
    from .benchmarks.methods import parse_fsdp_methods

    methods = [m.strip() for m in text.split(",") if m.strip()]
    for m in methods:
        if m.startswith(FSDP_PREFIX):
            try:
                parse_fsdp_methods(m[len(FSDP_PREFIX):])
            except ValueError as e:
                raise ValueError(f"{m!r}: {FSDP_PREFIX} takes a gradcomp codec spec (e.g. {FSDP_PREFIX}int8): "
                                 f"{e}") from e
    others = [m for m in methods if not is_fsdp_method(m)]
    parsed = parse_methods(",".join(others)) if others else []
    if len(set(methods)) != len(methods):
        raise ValueError(f"a method is listed twice: {text}")
    return [m if is_fsdp_method(m) else parsed[others.index(m)] for m in methods]


def _fsdp_method(method: str, model, device, start_step: int):
    """The demo's MLP sharded with FSDP2 (each Linear a unit, then the root), reduced by FSDP's
    own reduce-scatter (``fsdp``) or gradcomp's (``fsdp:<spec>``): benchmarks.methods.FSDPMethod."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from .benchmarks.methods import FSDP_PLAIN, FSDPMethod, fully_shard_layers

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    fully_shard_layers(model, mesh)
    name = method[len(FSDP_PREFIX):] if method.startswith(FSDP_PREFIX) else FSDP_PLAIN
    return FSDPMethod(name, model, mode="fsdp", mesh=mesh, start_step=start_step)


def _world_problem(world: int, ranks_per_node: int | None) -> str | None:
    if ranks_per_node is not None and world % ranks_per_node:
        return f"a world of {world} ranks is not a multiple of --ranks-per-node {ranks_per_node}"
    return None


def _under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def _pick_device(args, world: int, local_rank: int):
    import torch

    import gradcomp

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cuda_ok = gradcomp.cuda_available() and gpus > 0
    if args.device == "cuda" and not cuda_ok:
        raise SystemExit("gradcomp demo: --device cuda, but no CUDA device is usable by torch and gradcomp "
                         "(gradcomp info says why)")
    if args.device == "cpu" or not cuda_ok:
        return torch.device("cpu"), "gloo"
    # every rank must choose alike: NCCL only if each rank on this node gets a GPU
    ranks_here = world if not _under_torchrun() else int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
    if gpus < ranks_here:
        if args.device == "cuda":
            raise SystemExit(f"gradcomp demo: {world} ranks need a GPU each (NCCL refuses two ranks on one GPU); "
                             f"{gpus} visible")
        return torch.device("cpu"), "gloo"
    return torch.device("cuda", local_rank), "nccl"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_one(method: str, args, rank: int, world: int, device, backend: str, data, progress):
    """One training run with ``method``; returns its record (loss curve on this rank)."""
    import torch
    import torch.nn as nn

    from .benchmarks.methods import DiLoCoMethod, Method, bucket_cap_mb, is_diloco_method, make_ddp

    x_train, y_train, x_test, y_test = data
    torch.manual_seed(args.seed)  # the same initial weights on every rank, for every method
    model = make_model(args.width).to(device)
    if is_fsdp_method(method):
        cap = None
        ddp = model
        method_ctx = _fsdp_method(method, model, device, args.start_step)
    elif is_diloco_method(method):  # the plain model: each rank steps alone between syncs
        cap = None
        ddp = model
    else:
        cap = bucket_cap_mb(method, model, backend, args.bucket_cap_mb)
        ddp = make_ddp(model, cap, device_ids=[device.index] if device.type == "cuda" else None)
        method_ctx = Method(method, ddp, start_step=args.start_step, powersgd_rank=args.powersgd_rank,
                            ranks_per_node=args.ranks_per_node)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    if is_diloco_method(method):
        method_ctx = DiLoCoMethod(method, model, opt, ranks_per_node=args.ranks_per_node)
    n = len(y_train)
    steps_per_epoch = n // (args.batch * world)
    losses, step_seconds, test_acc = [], [], []
    with method_ctx as m:
        for epoch in range(args.epochs):
            # one permutation on every rank, each rank takes its own interleaved shard
            order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
            mine = order[rank::world]
            for i in range(steps_per_epoch):
                idx = mine[i * args.batch:(i + 1) * args.batch]
                xb, yb = x_train[idx].to(device), y_train[idx].to(device)
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(ddp(xb), yb)
                loss.backward()
                opt.step()
                m.after_step()  # DiLoCo's outer step every H steps; nothing for the others
                loss_value = loss.item()  # waits for the device: the step is done
                step_seconds.append(time.perf_counter() - t0)
                losses.append(loss_value)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
            with torch.no_grad():
                test_acc.append(float((model(x_test.to(device)).argmax(1) == y_test.to(device)).float().mean()))
        steps = steps_per_epoch * args.epochs
        sent = m.bytes_sent(steps)
        codec_s = m.codec_seconds()
        stats = dict(m.state.stats) if m.state is not None else None
        residual_bytes = (sum(r.numel() * r.element_size() for r in m.state.residuals.values())
                          if m.state is not None else 0)
    # the loss curve averaged over ranks (after training: not part of any timed step)
    curve = torch.tensor(losses, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(curve)
    with torch.no_grad():
        final_loss = float(nn.functional.cross_entropy(model(x_train.to(device)), y_train.to(device)))
    skip = min(len(step_seconds) - 1, max(2, len(step_seconds) // 10))  # DDP's first steps build buckets
    return {
        "final_loss": final_loss,
        "test_accuracy": test_acc[-1],
        "test_accuracy_per_epoch": test_acc,
        "bytes_per_step": sent / steps,
        "step_ms": 1e3 * statistics.median(step_seconds[skip:]),
        "step_ms_mean": 1e3 * statistics.fmean(step_seconds[skip:]),  # DiLoCo's syncs show here, not in the median
        "codec_ms_per_step": 1e3 * codec_s / steps,
        "steps": steps,
        "loss_curve": (curve / world).tolist(),
        "bucket_cap_mb": cap,
        "stats": stats,
        "residual_bytes": residual_bytes,  # this rank's error-feedback memory at the end
    }


def init_rank(args, rank: int, world: int, local_rank: int):
    """This rank's (device, backend), its threads (the ranks share this machine's cores) and
    its process group."""
    import torch
    import torch.distributed as dist

    device, backend = _pick_device(args, world, local_rank)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world)))))
    else:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    return device, backend


def run_rank(args, rank: int, world: int, local_rank: int) -> dict | None:
    """Trains every method on this rank; rank 0 returns the results, the others None."""
    import torch
    import torch.distributed as dist

    device, backend = init_rank(args, rank, world, local_rank)
    try:
        data = load_digits_split(args.seed)
        n_train = len(data[1])
        steps = (n_train // (args.batch * world)) * args.epochs
        if steps == 0:
            raise SystemExit(f"gradcomp demo: {n_train} training samples make no step of {args.batch} × {world}")
        results = {}
        for method in args.methods:
            progress = None
            if rank == 0 and not args.no_progress:
                from tqdm import tqdm

                progress = tqdm(total=steps, desc=f"{method:<14}", unit="step", mininterval=0.5, file=sys.stderr)
            try:
                results[method] = _train_one(method, args, rank, world, device, backend, data, progress)
            finally:
                if progress is not None:
                    progress.close()
        meta = {"world": world, "ranks_per_node": args.ranks_per_node, "backend": backend, "device": str(device),
                "epochs": args.epochs, "batch_per_rank": args.batch, "steps": steps, "width": args.width, "lr": args.lr,
                "parameters": sum(p.numel() for p in make_model(args.width).parameters()),
                "train_samples": n_train, "test_samples": len(data[3]), "torch": torch.__version__}
        return {"meta": meta, "results": results} if rank == 0 else None
    finally:
        dist.destroy_process_group()


def report(out: dict, args) -> None:
    meta, results = out["meta"], out["results"]
    plain = results.get("allreduce", {}).get("bytes_per_step")
    if plain is None:  # no allreduce run: the ratio is against what plain all-reduce would send
        from .collectives import ring_allreduce_bytes

        plain = ring_allreduce_bytes(4 * meta["parameters"], meta["world"])
    for r in results.values():
        r["ratio"] = plain / r["bytes_per_step"] if r["bytes_per_step"] else math.inf
    print(f"\ngradcomp demo: digits, MLP of {meta['parameters']:,} parameters, {meta['world']} ranks "
          f"({meta['backend']}, {meta['device'].split(':')[0]}), {meta['steps']} steps of {meta['batch_per_rank']} "
          "per rank")
    print(f"{'method':<22} {'final loss':>10} {'test acc':>9} {'bytes sent/step':>16} {'ratio':>8} {'step ms':>8}"
          f" {'mean ms':>8} {'residual MB':>11}")
    for method, r in results.items():
        print(f"{method:<22} {r['final_loss']:>10.4f} {r['test_accuracy']:>9.3f} {r['bytes_per_step']:>16,.0f}"
              f" {r['ratio']:>7.1f}x {r['step_ms']:>8.2f} {r.get('step_ms_mean', r['step_ms']):>8.2f}"
              f" {r.get('residual_bytes', 0) / 1e6:>11.2f}")
    print("(final loss: cross-entropy on the whole training set at the end (rank 0's model: for diloco with one "
          "fragment the anchor when the steps are a multiple of H); test acc: the held-out 20%; bytes: what "
          "rank 0 put on the wire per step (fsdp: the gradient reduce-scatter only, not the parameter "
          "all-gathers; diloco: its syncs' bytes over every step); ratio: plain all-reduce's bytes over the method's; "
          "step: median; mean: the mean step, where DiLoCo's syncs show; residual: rank 0's error-feedback memory)")
    if args.plot:
        plot(out, args.plot)
        print(f"loss curves: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"results: {args.json}")


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, r in out["results"].items():
        curve = r["loss_curve"]
        smooth, ema = [], curve[0]
        for v in curve:  # exponential moving average, as loss curves are usually shown
            ema = 0.9 * ema + 0.1 * v
            smooth.append(ema)
        ax_loss.plot(range(1, len(curve) + 1), smooth, label=f"{method} ({r['ratio']:.0f}x fewer bytes)")
        acc = r["test_accuracy_per_epoch"]
        ax_acc.plot(range(1, len(acc) + 1), acc, label=method)
    meta = out["meta"]
    ax_loss.set(xlabel="step", ylabel="training loss (EMA 0.9)", yscale="log",
                title=f"digits, {meta['parameters']:,}-parameter MLP, {meta['world']} ranks")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="held-out accuracy")
    ax_loss.legend(fontsize=8)
    ax_acc.legend(fontsize=8)
    ax_acc.grid(alpha=0.3)
    ax_loss.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _spawned_rank(run, rank: int, world: int, port: int, args, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world))
    out = run(args, rank, world, rank)
    if out is not None:  # a file, not a pipe: a pipe holds 64 KiB, and the parent reads after the join
        with open(result_path, "w") as f:
            json.dump(out, f)


def _join(procs) -> None:
    """Waits for every rank; when one fails, stops the others (they would wait for it in a
    collective until the group's timeout)."""
    from multiprocessing.connection import wait

    running = list(procs)
    while running:
        for sentinel in wait([p.sentinel for p in running]):
            proc = next(p for p in running if p.sentinel == sentinel)
            proc.join()
            running.remove(proc)
            if proc.exitcode != 0:
                for p in running:
                    p.terminate()
                for p in running:
                    p.join()
                return


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = _missing_packages()
    if missing:
        print(f"{NEEDS} (missing: {', '.join(missing)})", file=sys.stderr)
        return 1
    unsupported = hierarchy_missing(args.methods)
    if unsupported:  # before any training, not after the other methods
        print(f"gradcomp demo: {unsupported}", file=sys.stderr)
        return 1
    if _under_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        problem = _world_problem(world, args.ranks_per_node)
        if problem:
            print(f"gradcomp demo: {problem}", file=sys.stderr)
            return 2
        if rank == 0:
            print(f"gradcomp demo under torchrun: {world} ranks, methods {', '.join(args.methods)}", flush=True)
        out = run_rank(args, rank, world, int(os.environ["LOCAL_RANK"]))
        if out is not None:
            report(out, args)
        return 0

    print(f"gradcomp demo: {args.world} ranks, methods {', '.join(args.methods)}", flush=True)
    code, out = spawn_ranks("gradcomp demo", args.world, run_rank, args)
    if out is not None:
        report(out, args)
    return code


def spawn_ranks(prog: str, world: int, run, args) -> tuple[int, dict | None]:
    """Runs ``run(args, rank, world, local_rank)`` (a module-level function) in ``world``
    spawned processes on this machine; returns (exit code, what rank 0's returned, or None
    when a rank failed or the user interrupted)."""
    import tempfile

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix=prog.replace(" ", "-") + "-") as tmp:
        result_path = os.path.join(tmp, "rank0.json")
        procs = [ctx.Process(target=_spawned_rank, args=(run, r, world, port, args, result_path))
                 for r in range(world)]
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
            codes = ", ".join(f"rank {r}: {p.exitcode}" for r, p in enumerate(procs))
            print(f"{prog}: a rank failed ({codes})", file=sys.stderr)
            return 1, None
        with open(result_path) as f:
            return 0, json.load(f)
