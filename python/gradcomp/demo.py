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
import statistics
import sys
import time
from typing import NamedTuple

from .drivers.digits import load_digits_split, make_model
from .drivers.launch import init_rank, missing_packages, run_ranks, under_torchrun
from .drivers.methods import (
    DEFAULT_METHODS,
    DEMO_KINDS,
    AttachOptions,
    attach,
    hierarchy_missing,
    is_node_method,
    parse_methods,
)

# the per-step methods, then DiLoCo: int8 pseudo-gradients every 20 steps (20 divides the
# default 440 steps, so the final model is the anchor)
DEMO_METHODS = (*DEFAULT_METHODS, "diloco:int8:H=20")

NEEDS = ("gradcomp demo needs tqdm, matplotlib and scikit-learn (for its bundled digits dataset): "
         "pip install 'gradcomp[demo]'")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="gradcomp demo",
                                     description="DDP training on the digits dataset, once per method, side by side")
    add = parser.add_argument
    add("--world", type=int, default=2, help="ranks to spawn (ignored under torchrun); default 2")
    add("--methods", default=",".join(DEMO_METHODS),
        help="comma-separated: allreduce, torch-fp16, torch-powersgd, gradcomp codec specs, "
             "node:<codec spec> (with --ranks-per-node), fsdp[:<codec spec>] and "
             "diloco:<codec spec or fp32>:H=<steps>[:F=<fragments>] "
             f"(default {','.join(DEMO_METHODS)})")
    add("--ranks-per-node", type=int, default=None,
        help="ranks a node, contiguous, for the node:<spec> methods' hierarchical reduction "
             "(the world must be a multiple of it)")
    add("--codec", help="shorthand for --methods allreduce,CODEC")
    add("--epochs", type=int, default=20)
    add("--batch", type=int, default=32, help="batch per rank")
    add("--lr", type=float, default=0.02)
    add("--width", type=int, default=1024, help="hidden width of the MLP (default 1024: 1.1M parameters)")
    add("--bucket-cap-mb", type=float, default=1.0, help="DDP's bucket cap (default 1: several buckets)")
    add("--start-step", type=int, default=0, help="steps of plain all-reduce before compressing")
    add("--powersgd-rank", type=int, default=4, help="matrix_approximation_rank of torch's PowerSGD")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto",
        help="auto: CUDA with NCCL when there is a GPU per rank, else CPU with Gloo")
    add("--seed", type=int, default=0)
    add("--plot", default="gradcomp-demo.png", help="PNG of the loss curves ('' for none)")
    add("--json", help="write the results to this file")
    add("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        if args.codec:
            args.methods = "allreduce" if args.codec == "allreduce" else f"allreduce,{args.codec}"
        args.methods = parse_methods(args.methods, DEMO_KINDS)
    except ValueError as e:
        parser.error(str(e))
    problem = _argument_problem(args)
    if problem:
        parser.error(problem)
    return args


def _argument_problem(args) -> str | None:
    """What is wrong with the parsed arguments beyond their methods, or None."""
    for name in ("world", "epochs", "batch", "width", "powersgd_rank"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1"
    if args.start_step < 0:
        return "--start-step must be >= 0"
    if args.ranks_per_node is not None and args.ranks_per_node < 1:
        return "--ranks-per-node must be >= 1"
    node = [method for method in args.methods if is_node_method(method)]
    if node and args.ranks_per_node is None:
        return f"{', '.join(node)} reduce node by node: give --ranks-per-node"
    if not under_torchrun():  # under torchrun the world is known only there: main checks it
        return _world_problem(args.world, args.ranks_per_node)
    return None


def _world_problem(world: int, ranks_per_node: int | None) -> str | None:
    if ranks_per_node is not None and world % ranks_per_node:
        return f"a world of {world} ranks is not a multiple of --ranks-per-node {ranks_per_node}"
    return None


class _History(NamedTuple):
    """One run's training on this rank: the loss and seconds of every step, the test
    accuracy after every epoch, and the bytes its evaluations sent (an FSDP model gathers its
    weights to evaluate: not the method's traffic)."""

    losses: list
    step_seconds: list
    test_accuracy: list
    steps: int
    evaluation_bytes: list


def _train_one(method: str, args, rank: int, world: int, device, backend: str, data, progress) -> dict:
    """One training run with ``method``; returns its record (loss curve on this rank)."""
    import torch

    torch.manual_seed(args.seed)  # the same initial weights on every rank, for every method
    model = make_model(args.width).to(device)
    options = AttachOptions(backend=backend, device=device, bucket_cap_mb=args.bucket_cap_mb,
                            start_step=args.start_step, powersgd_rank=args.powersgd_rank,
                            ranks_per_node=args.ranks_per_node)
    setup = attach(method, model, lambda parameters: torch.optim.SGD(parameters, lr=args.lr, momentum=0.9),
                   options)
    with setup.method as attached:
        history = _train_epochs(setup, model, args, rank, world, device, data, progress)
        counts = _method_counts(attached, history.steps)
    # the loss curve averaged over ranks (after training: not part of any timed step)
    curve = torch.tensor(history.losses, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(curve)
    return {
        "final_loss": _final_loss(model, data, device),
        "test_accuracy": history.test_accuracy[-1],
        "test_accuracy_per_epoch": history.test_accuracy,
        "bytes_per_step": (counts["bytes_sent"] - sum(history.evaluation_bytes)) / history.steps,
        **_step_times(history),
        "codec_ms_per_step": 1e3 * counts["codec_seconds"] / history.steps,
        "steps": history.steps,
        "loss_curve": (curve / world).tolist(),
        "bucket_cap_mb": setup.bucket_cap_mb,
        "stats": counts["stats"],
        "residual_bytes": counts["residual_bytes"],  # this rank's error-feedback memory at the end
    }


def _train_epochs(setup, model, args, rank: int, world: int, device, data, progress) -> _History:
    """``args.epochs`` epochs of ``setup``'s training; the test accuracy of ``model`` after each."""
    import torch

    x_train, y_train, x_test, y_test = data
    n_train = len(y_train)
    steps_per_epoch = n_train // (args.batch * world)
    history = _History([], [], [], steps_per_epoch * args.epochs, [])
    for epoch in range(args.epochs):
        # one permutation on every rank, each rank takes its own interleaved shard
        order = torch.randperm(n_train, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        mine = order[rank::world]
        for step in range(steps_per_epoch):
            batch = mine[step * args.batch:(step + 1) * args.batch]
            seconds, loss = _timed_step(setup, x_train[batch].to(device), y_train[batch].to(device))
            history.step_seconds.append(seconds)
            history.losses.append(loss)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.3f}", refresh=False)
        done = steps_per_epoch * (epoch + 1)
        before = setup.method.bytes_sent(done)
        with torch.no_grad():
            predicted = model(x_test.to(device)).argmax(1)
            history.test_accuracy.append(float((predicted == y_test.to(device)).float().mean()))
        history.evaluation_bytes.append(setup.method.bytes_sent(done) - before)
    return history


def _timed_step(setup, inputs, targets) -> tuple[float, float]:
    """(seconds, loss) of one training step."""
    import torch.nn as nn

    started = time.perf_counter()
    setup.optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(setup.module(inputs), targets)
    loss.backward()
    setup.optimizer.step()
    setup.method.after_step()  # DiLoCo's outer step every H steps; nothing for the others
    loss_value = loss.item()  # waits for the device: the step is done
    return time.perf_counter() - started, loss_value


def _method_counts(attached, steps: int) -> dict:
    """What the method counted over ``steps`` steps, read while it is still attached."""
    state = attached.state
    residuals = state.residuals.values() if state is not None else ()
    return {
        "bytes_sent": attached.bytes_sent(steps),
        "codec_seconds": attached.codec_seconds(),
        "stats": dict(state.stats) if state is not None else None,
        "residual_bytes": sum(residual.numel() * residual.element_size() for residual in residuals),
    }


def _final_loss(model, data, device) -> float:
    """Cross-entropy of ``model`` on the whole training set."""
    import torch
    import torch.nn as nn

    x_train, y_train = data[0], data[1]
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x_train.to(device)), y_train.to(device)))


def _step_times(history: _History) -> dict:
    """The median and mean step in ms, past the first steps (where DDP builds its buckets)."""
    seconds = history.step_seconds
    skip = min(len(seconds) - 1, max(2, len(seconds) // 10))
    return {
        "step_ms": 1e3 * statistics.median(seconds[skip:]),
        "step_ms_mean": 1e3 * statistics.fmean(seconds[skip:]),  # DiLoCo's syncs show here, not in the median
    }


def run_rank(args, rank: int, world: int, local_rank: int) -> dict | None:
    """Trains every method on this rank; rank 0 returns the results, the others None."""
    import torch
    import torch.distributed as dist

    device, backend = init_rank("gradcomp demo", args.device, rank, world, local_rank)
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
        from .engine.collectives import ring_allreduce_bytes

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
          "rank 0 put on the wire per step (fsdp: the gradient reduce-scatter and the parameter all-gathers, "
          "FSDP2's own counted as a ring's; diloco: its syncs' bytes over every step); ratio: plain all-reduce's "
          "bytes over the method's; "
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


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = missing_packages()
    if missing:
        print(f"{NEEDS} (missing: {', '.join(missing)})", file=sys.stderr)
        return 1
    unsupported = hierarchy_missing(args.methods)
    if unsupported:  # before any training, not after the other methods
        print(f"gradcomp demo: {unsupported}", file=sys.stderr)
        return 1
    return run_ranks("gradcomp demo", args, run_rank, report, f"methods {', '.join(args.methods)}",
                     world_problem=lambda world: _world_problem(world, args.ranks_per_node))
