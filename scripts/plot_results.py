#!/usr/bin/env python3
"""Draws the documentation's figures from the recorded benchmark results in bench/results/.

    python scripts/plot_results.py [--results bench/results] [--out docs/images]
                                   [--demo demo-cpu-w2.json] [--net net-1gbit-w2.json ...]

writes
    demo-loss.png        the training loss of every method of a `gradcomp demo` run, step by
                         step (from --demo, default demo-cpu-w2.json)
    net-step-times.png   the step time of every method of one or more `gradcomp bench net`
                         runs over the shaped link, one panel a run (from --net, default
                         net-1gbit-w2.json), with the run's floor (plain all-reduce over the
                         unshaped link) marked

Only matplotlib is needed (no gradcomp, no torch). The output is deterministic: matplotlib's
default style whatever the local matplotlibrc says, fixed sizes and resolution, and no
software version or date written into the PNGs, so a rerun on the same inputs and the same
matplotlib gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

ROOT = Path(__file__).resolve().parents[1]
DPI = 110
PNG_METADATA = {"Software": None}  # matplotlib writes its version there by default
# Distinct colours and line styles: several methods end on nearly the same curve.
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
STYLES = ("-", "--", "-.", ":")

BASELINES = {"ddp": "plain all-reduce (DDP)", "fsdp": "plain (FSDP2's reduce-scatter)",
             "hsdp": "plain (exact replica all-reduce)"}
NAMED = {"allreduce": "plain all-reduce", "torch-fp16": "torch fp16 hook", "torch-powersgd": "torch PowerSGD hook",
         "fsdp": "FSDP2 plain"}


def label(method: str, mode: str = "ddp") -> str:
    """A reader's name for a method key of the results (the `--methods` spelling)."""
    if method == "plain":
        return BASELINES.get(mode, "plain")
    if method in NAMED:
        return NAMED[method]
    if method.startswith("torch-powersgd:"):
        return f"torch PowerSGD hook, rank {method.split(':', 1)[1]}"
    for prefix, what in (("pipe:", "pipelined"), ("node:", "hierarchical")):
        if method.startswith(prefix):
            return f"gradcomp {method[len(prefix):]}, {what}"
    if method.startswith("fsdp:"):
        return f"FSDP2 + gradcomp {method[5:]}"
    return f"gradcomp {method}"


def load(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        sys.exit(f"plot_results.py: {path} not found (--results names the folder of the recorded results)")


def smooth(values: list[float], keep: float = 0.9) -> list[float]:
    """Exponential moving average, as `gradcomp demo` draws its curves."""
    out, ema = [], values[0]
    for v in values:
        ema = keep * ema + (1 - keep) * v
        out.append(ema)
    return out


def plot_demo(data: dict, source: str, path: Path) -> None:
    meta, results = data["meta"], data["results"]
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, (method, r) in enumerate(results.items()):
        curve = r["loss_curve"]
        ratio = "the baseline" if method == "allreduce" else f"{r['ratio']:.1f}x fewer bytes"
        ax.plot(range(1, len(curve) + 1), smooth(curve), color=COLOURS[i % len(COLOURS)],
                linestyle=STYLES[i % len(STYLES)], linewidth=1.4,
                label=f"{label(method)}: {ratio}, final loss {r['final_loss']:.4f}")
    title = (f"gradcomp demo: digits, {meta['parameters']:,}-parameter MLP, {meta['world']} ranks "
             f"({meta['backend']}, {meta['device']}), SGD lr {meta['lr']}")
    sub = f"{source}; torch {meta['torch']}; {meta['steps']} steps of {meta['batch_per_rank']} images a rank"
    ax.set_title(f"{title}\n{sub}", fontsize=10)
    ax.set(xlabel="step", ylabel="training loss (moving average 0.9)", yscale="log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, metadata=PNG_METADATA)
    plt.close(fig)


def _rate(rate: str) -> str:
    """tc's spelling ("1gbit", "500mbit") as a reader's ("1 Gbit/s")."""
    m = re.fullmatch(r"([0-9.]+)([kmg]?)bit", rate.lower())
    return f"{m.group(1)} {m.group(2).upper()}bit/s" if m else rate


def _net_title(meta: dict, source: str) -> str:
    world = meta["world"]
    per_node = meta.get("ranks_per_node", 1)
    ranks = f"{meta['nodes']} nodes x {per_node} ranks" if per_node > 1 else f"{world} ranks"
    mode = {"fsdp": "FSDP2", "hsdp": "HSDP"}.get(meta.get("mode", "ddp"), "DDP")
    link = f"link shaped to {_rate(meta['rate'])} (measured {meta['link_bps_shaped'] / 1e9:.3f} Gbit/s)"
    line1 = f"gradcomp bench net: {mode}, {ranks}, {link}"
    when = meta.get("date", "")[:10] or "undated"
    machine = ", ".join(p for p in (meta.get("cpu"), f"{meta['cpu_count']} cores" if "cpu_count" in meta else "",
                                    f"torch {meta['torch']}" if "torch" in meta else "") if p)
    params = f"{meta['parameters'] / 1e6:.1f} M-parameter MLP" if "parameters" in meta else ""
    line2 = "; ".join(p for p in (when, machine, params, source) if p)
    return f"{line1}\n{line2}"


def plot_net(runs: list[tuple[str, dict]], path: Path) -> None:
    rows = sum(len(data["methods"]) for _, data in runs)
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 1.2 + 0.45 * rows + 1.0 * len(runs)), squeeze=False,
                             height_ratios=[len(data["methods"]) + 2 for _, data in runs])
    for ax, (source, data) in zip(axes[:, 0], runs):
        meta, methods = data["meta"], data["methods"]
        mode = meta.get("mode", "ddp")
        names = list(methods)
        steps = [methods[m]["shaped_step_ms"] for m in names]
        y = range(len(names))
        baseline = meta.get("baseline", "allreduce")
        colours = ["#7f7f7f" if m == baseline or m.startswith("torch-") else "#1f77b4" for m in names]
        ax.barh(y, steps, color=colours, height=0.6)
        ax.set_yticks(list(y), [label(m, mode) for m in names], fontsize=9)
        ax.invert_yaxis()  # the first method on top, as in the tables
        floor = meta.get("floor_ms")
        if floor:
            ax.axvline(floor, color="#d62728", linestyle="--", linewidth=1)
            ax.text(floor, -0.75, f" floor {floor:.0f} ms", color="#d62728", fontsize=8, va="center")
        # Several ranks a node: what crosses between nodes (each node's eth0 counter) is the
        # point; else the bytes a rank is counted to send (gradient reduction only).
        across = meta.get("ranks_per_node", 1) > 1
        for i, m in enumerate(names):
            r = methods[m]
            note = f" {r['shaped_step_ms']:.0f} ms"
            if floor:
                note += f", {r['shaped_step_ms'] / floor:.2f}x floor"
            if across and r.get("inter_node_bytes_per_step") is not None:
                note += f", {r['inter_node_bytes_per_step'] / 1e6:.1f} MB across nodes"
            else:
                note += f", {r['bytes_per_step'] / 1e6:.2f} MB sent"
            ax.text(r["shaped_step_ms"], i, note, va="center", fontsize=8)
        ax.set_xlim(0, max(steps) * 1.6)
        ax.set_ylim(len(names) - 0.5, -1.2)
        ax.set_xlabel("median step time over the shaped link, ms (grey: baselines; floor: the plain baseline's "
                      "step over the unshaped link)", fontsize=8)
        ax.set_title(_net_title(meta, source), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, metadata=PNG_METADATA)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Draw docs/images/*.png from the recorded results in bench/results/.")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results",
                   help="folder of the recorded results (default: bench/results)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "images",
                   help="folder the PNGs go to (default: docs/images)")
    p.add_argument("--demo", default="demo-cpu-w2.json", help="the `gradcomp demo` JSON (default: demo-cpu-w2.json)")
    p.add_argument("--net", nargs="+", default=["net-1gbit-w2.json"],
                   help="one or more `gradcomp bench net` JSONs, one panel each (default: net-1gbit-w2.json)")
    args = p.parse_args(argv)

    matplotlib.rcdefaults()  # matplotlib's own style, not a local matplotlibrc's
    args.out.mkdir(parents=True, exist_ok=True)

    demo_path = args.out / "demo-loss.png"
    plot_demo(load(args.results / args.demo), args.demo, demo_path)
    print(demo_path)

    net_path = args.out / "net-step-times.png"
    plot_net([(name, load(args.results / name)) for name in args.net], net_path)
    print(net_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
