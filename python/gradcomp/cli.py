"""The ``gradcomp`` command.

    gradcomp demo [--world 2] [--steps 200] [--codec int8] [--start-step 0] [--baseline]
        a short DDP training on CPU ranks over Gloo with gradcomp's hook: prints the loss,
        the bytes each rank sent and the compression ratio (and, with --baseline, the same
        training with plain all-reduce for comparison)
    gradcomp info
        version, how the core was built, torch, CUDA devices
"""

import argparse
import json
import os
import socket
import sys
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _demo_rank(rank: int, world: int, port: int, args, results) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    import gradcomp

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # A teacher network labels random inputs; every rank trains on its own shard of them.
        g = torch.Generator().manual_seed(0)
        teacher = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 10))
        for p in teacher.parameters():
            p.data = torch.randn(p.shape, generator=g)
        x_all = torch.randn(8192, 64, generator=g)
        with torch.no_grad():
            y_all = teacher(x_all).argmax(1)
        x, y = x_all[rank::world], y_all[rank::world]

        out = {}
        for method in (["allreduce"] if args.baseline else []) + [args.codec]:
            torch.manual_seed(1)
            model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
            ddp = DDP(model, bucket_cap_mb=1)
            state = None if method == "allreduce" else gradcomp.register(ddp, method, start_step=args.start_step)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
            bs = 64
            # what a ring all-reduce of every gradient puts on the wire per rank and step
            plain_bytes = 2 * (world - 1) / world * sum(p.numel() * p.element_size() for p in model.parameters())
            t0 = time.perf_counter()
            losses = []
            for step in range(args.steps):
                i = (step * bs) % (x.shape[0] - bs)
                opt.zero_grad()
                loss = nn.functional.cross_entropy(ddp(x[i : i + bs]), y[i : i + bs])
                loss.backward()
                opt.step()
                losses.append(loss.item())
                if rank == 0 and (step + 1) % max(1, args.steps // 5) == 0:
                    sent = state.stats["bytes_sent"] / (step + 1) if state else plain_bytes
                    print(f"  [{method}] step {step + 1:4d}  loss {sum(losses[-20:]) / len(losses[-20:]):.4f}"
                          f"  bytes sent/step {sent:,.0f}", flush=True)
            with torch.no_grad():
                acc = float((model(x_all).argmax(1) == y_all).float().mean())
            out[method] = {
                "final_loss": sum(losses[-20:]) / len(losses[-20:]),
                "accuracy": acc,
                "seconds": time.perf_counter() - t0,
                "bytes_per_step": state.stats["bytes_sent"] / args.steps if state else plain_bytes,
                "ratio": state.stats["ratio"] if state else 1.0,
                "stats": dict(state.stats) if state else None,
            }
        if rank == 0:
            results.put(out)
    finally:
        dist.destroy_process_group()


def demo(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gradcomp demo", description="DDP training on CPU ranks with gradcomp")
    p.add_argument("--world", type=int, default=2, help="number of CPU ranks (processes)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--codec", default="int8", help='codec spec, e.g. "int8" or "int8:block=512"')
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also train with plain all-reduce for comparison (default: on)")
    p.add_argument("--start-step", type=int, default=0, help="steps of plain all-reduce before compressing")
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args(argv)
    if args.world < 1:
        p.error("--world must be >= 1")
    import torch.multiprocessing as mp

    from . import codecs

    codecs.parse(args.codec)  # a bad spec fails here, before any process starts
    print(f"gradcomp demo: {args.world} CPU ranks over Gloo, {args.steps} steps, codec {args.codec}", flush=True)
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_demo_rank, args=(r, args.world, port, args, results)) for r in range(args.world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode != 0 for proc in procs) or results.empty():
        print("gradcomp demo: a rank failed", file=sys.stderr)
        return 1
    out = results.get()
    print()
    print(f"{'method':<12} {'final loss':>10} {'accuracy':>9} {'bytes sent/step':>16} {'ratio':>7} {'seconds':>8}")
    for method, r in out.items():
        print(f"{method:<12} {r['final_loss']:>10.4f} {r['accuracy']:>9.3f} {r['bytes_per_step']:>16,.0f}"
              f" {r['ratio']:>6.2f}x {r['seconds']:>8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def info(argv=None) -> int:
    import torch

    import gradcomp

    print(f"gradcomp {gradcomp.__version__}")
    for k, v in gradcomp.build_info().items():
        print(f"  {k}: {v}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"CUDA usable by gradcomp: {gradcomp.cuda_available()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"  cuda:{i} {torch.cuda.get_device_name(i)}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"demo": demo, "info": info}
    if not argv or argv[0] not in commands:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
