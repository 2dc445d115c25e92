"""Top-k benchmark: gradcomp's fused top-k encode against torch.topk and against a copy.

For each size N (one float32 parameter of N elements) and ratio (k = ceil(ratio · N)), times
in one run, side by side:

  ours      ops.topk_encode, exact and approximate, with error feedback (a = x + r, the k
            pairs, r = a with the sent entries zeroed) and without (a = x)
  torch     the same with torch ops: torch.topk(|a|, k, sorted=False) plus, with error
            feedback, a = x + r before and r = a; r[idx] = 0 after
  copy      a copy of N float32 (reads N, writes N: 2 "reads-equivalent")

and reports ours / torch speed-ups and reads-equivalent (time / half the copy's time: how
many times ours costs what reading the gradient once does). The approximate variant's
recall against the exact selection is measured on the same data (Gaussian gradients).

    gradcomp bench sparse [--device auto|cpu|cuda] [--sizes 1e6,1e7] [--ratios 0.01,0.001]
                          [--repeat N] [--out sparse-<device>.json]
    (python bench/bench_sparse.py ... in the repository: the same, writing under bench/results/)

Goals (issue 4): CPU ≥ 3× torch.topk at N = 1e7, k = 1%; GPU ≥ 10× torch.topk and ≤ 3
reads-equivalent at N = 6.4e7, k = 1%.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch

import gradcomp
from gradcomp import codecs, ops
from gradcomp.benchmarks.kernels import Timer, cache_bytes, copy_times, device_name, num_sets
from gradcomp.engine import layout


def table_for(n: int, ratio: float, residual: torch.Tensor | None, dev: torch.device):
    t = layout.build_sparse_table([layout.Span(0, n, 0, residual.data_ptr() if residual is not None else 0)], ratio)
    return t, t.table.to(dev)


def recall(x: torch.Tensor, ratio: float) -> float:
    """|approx ∩ exact| / k on x (no error feedback)."""
    n = x.numel()
    t, tdev = table_for(n, ratio, None, x.device)
    k = t.pairs
    sets = []
    for approx in (False, True):
        p = ops.topk_encode(x, tdev, k, approx=approx, tiles=t.tiles)
        sets.append(p[16 : 16 + 4 * k].view(torch.int32).cpu())
    both = torch.isin(sets[1], sets[0]).sum().item()
    return both / k


def bench_one(n: int, ratio: float, dev: torch.device, timer: Timer, cache: int) -> dict:
    k = codecs.pairs_for(n, ratio)
    nsets = num_sets(3 * 4 * n, cache)
    g = torch.Generator().manual_seed(n)
    xs = [torch.randn(n, generator=g).to(dev) for _ in range(nsets)]
    rs = [torch.randn(n, generator=g).mul_(0.01).to(dev) for _ in range(nsets)]
    tables = [table_for(n, ratio, r, dev) for r in rs]
    plain = table_for(n, ratio, None, dev)
    nbytes = ops.topk_payload_bytes(k)
    outs = [torch.empty(nbytes, dtype=torch.uint8, device=dev) for _ in range(nsets)]

    def ours(approx, ef):
        def run(i):
            t, tdev = tables[i] if ef else plain
            ops.topk_encode(xs[i], tdev, k, approx=approx, out=outs[i], check_bounds=False, tiles=t.tiles)
        return run

    def torch_twin(ef):
        def run(i):
            if ef:
                a = xs[i] + rs[i]
                idx = torch.topk(a.abs(), k, sorted=False).indices
                vals = a[idx]
                rs[i].copy_(a)
                rs[i][idx] = 0
            else:
                idx = torch.topk(xs[i].abs(), k, sorted=False).indices
                vals = xs[i][idx]
            return idx, vals
        return run

    med = {}
    for name, fn in [("exact_ef", ours(False, True)), ("approx_ef", ours(True, True)),
                     ("exact", ours(False, False)), ("approx", ours(True, False)),
                     ("torch_ef", torch_twin(True)), ("torch", torch_twin(False))]:
        med[name] = statistics.median(timer(fn, nsets))
    med["copy"] = statistics.median(copy_times(8 * n, dev, timer, cache))
    read_ms = med["copy"] / 2
    row = {"n": n, "ratio": ratio, "k": k, "ms": med,
           "speedup_vs_torch": {v: med["torch_ef" if v.endswith("_ef") else "torch"] / med[v]
                                for v in ("exact_ef", "approx_ef", "exact", "approx")},
           "reads_equivalent": {v: med[v] / read_ms for v in ("exact_ef", "approx_ef", "exact", "approx",
                                                              "torch_ef", "torch")},
           "approx_recall": recall(xs[0], ratio)}
    return row


def main(argv=None, out_dir: str = ".") -> int:
    ap = argparse.ArgumentParser(prog="gradcomp bench sparse", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto (default): cuda when gradcomp's CUDA backend can run here, else cpu")
    ap.add_argument("--sizes", default=None, help="elements, comma-separated (CPU 1e6,1e7; CUDA 1e7,6.4e7)")
    ap.add_argument("--ratios", default="0.01,0.001")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--out", default=None, help=f"JSON output (default: {out_dir}/sparse-<device>.json)")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if gradcomp.cuda_available() else "cpu"
    if args.device == "cuda" and not gradcomp.cuda_available():
        sys.exit("gradcomp bench sparse: --device cuda, but gradcomp's CUDA backend cannot run here (gradcomp info)")
    dev = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    sizes = args.sizes or ("1e6,1e7" if dev.type == "cpu" else "1e7,6.4e7")
    repeat = args.repeat or (7 if dev.type == "cpu" else 30)
    timer = Timer(dev, repeat, 2)
    cache = cache_bytes(dev)
    rows = []
    print(f"top-k encode on {device_name(dev)} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"{'N':>10} {'ratio':>6} | {'exact+ef':>9} {'approx+ef':>9} {'exact':>9} {'approx':>9} | "
          f"{'torch+ef':>9} {'torch':>9} {'copy':>7} | speed-up vs torch (ef: ex/ap, plain: ex/ap) | "
          f"reads-eq ex+ef | recall")
    for n in (int(float(s)) for s in sizes.split(",")):
        for ratio in (float(r) for r in args.ratios.split(",")):
            r = bench_one(n, ratio, dev, timer, cache)
            rows.append(r)
            m, s = r["ms"], r["speedup_vs_torch"]
            print(f"{n:>10} {ratio:>6} | {m['exact_ef']:>9.2f} {m['approx_ef']:>9.2f} {m['exact']:>9.2f} "
                  f"{m['approx']:>9.2f} | {m['torch_ef']:>9.2f} {m['torch']:>9.2f} {m['copy']:>7.2f} | "
                  f"{s['exact_ef']:5.1f}x {s['approx_ef']:5.1f}x {s['exact']:5.1f}x {s['approx']:5.1f}x | "
                  f"{r['reads_equivalent']['exact_ef']:6.1f} | {r['approx_recall']:.4f}", flush=True)
    out = args.out or os.path.join(out_dir, f"sparse-{dev.type}.json")
    with open(out, "w") as f:
        json.dump({"device": device_name(dev), "date": datetime.date.today().isoformat(),
                   "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
