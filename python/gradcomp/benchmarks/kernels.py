"""Kernel benchmark of gradcomp's three fused passes, against a copy and against torch ops.

For each codec and bucket size N (one float32 parameter of N elements, error feedback on),
times

  encode  ops.quant_encode   a = x + r; block absmax, scale, round to codes (int8, packed
                             int4/int2, or signs) into the owner's shard; residual
                             r = a - q·scale written back
  reduce  ops.quant_reduce   one rank's pass 2 at world size W: decode the W shards received
                             for its slots, sum in rank order, / W, re-encode into its slice,
                             W × the re-encoding error added to its residual
  decode  ops.quant_decode   all W reduced shards into a float32 bucket

and, in the same run, (a) a plain copy moving the same number of bytes (CPU: uint8
``dst.copy_(src)``, CUDA: a device-to-device copy) and (b), for int8, the same algorithm
written with plain torch ops (the other codecs are compared with the copy only). Bytes
moved per element of each pass are counted from what the kernel must read and write (see
BYTES below: they depend on the code width and the residual's dtype); GB/s = bytes moved /
median time.

    gradcomp bench kernels [--device auto|cpu|cuda] [--sizes 1e6,3e6,1e7,3e7] [--block 256]
                           [--world 4] [--codecs int8,int4,...] [--repeat N]
                           [--out kernels-<device>.json]
    (python bench/bench_kernels.py ... in the repository: the same, writing under bench/results/)

Inputs are rotated over several sets (at least 2, enough that the sets together exceed
twice the last-level cache), so a pass does not find its inputs in cache from the previous
repeat. CPU times are wall clock (the ops are synchronous); CUDA times come from CUDA
events around each call, with the calls queued behind a ``torch.cuda._sleep`` so that the
GPU runs them back to back and host-side launch overhead is not measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

import gradcomp
from gradcomp import ops
from gradcomp.engine import layout

HEADER = 16  # codec.h kHeaderBytes
QMAX = 127.0
RANK = 0  # the rank whose pass 2 is timed (rank 0 owns the most blocks when they do not divide evenly)

# Bytes each pass moves per element (B = block size, W = world size, c = bits/8 bytes of code,
# R = residual element bytes: 4 for float32, 2 for bfloat16), as the kernel has to:
BYTES = {
    "encode": ("read x (4) + read residual (R) + write residual (R) + write code (c) + write scale (4/B)",
               lambda B, W, c, R: 4 + 2 * R + c + 4 / B),
    "reduce": ("per element of my slice: read W codes (W·c) + read W scales (4W/B) + write code (c) "
               "+ write scale (4/B) + read+write residual (2R)",
               lambda B, W, c, R: W * c + 4 * W / B + c + 4 / B + 2 * R),
    "decode": ("read code (c) + read scale (4/B) + write float32 (4)",
               lambda B, W, c, R: c + 4 / B + 4),
}
PASSES = ("encode", "reduce", "decode")
DEFAULT_CODECS = "int8,int4,int2,sign,int4:stochastic,int8:residual=bf16"

GOALS = {
    "cpu": "each pass >= 5x the torch-op version and >= 50% of copy bandwidth",
    "cuda": "each pass >= 90% of a device-to-device copy's bandwidth for N >= 1e7",
}


# ------------------------------------------------------------------------------ environment
def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_bytes(dev: torch.device) -> int:
    """Last-level cache size: what the rotating input sets must exceed."""
    if dev.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or 50 << 20)
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            try:
                with open(os.path.join(base, idx, "size")) as f:
                    s = f.read().strip()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:].upper(), 1)
            best = max(best, int(s.rstrip("KMGkmg")) * mult)
    except (OSError, ValueError):
        pass
    return best or 32 << 20


def cpu_snapshot():
    """(busy jiffies of the whole machine, total jiffies, this process's CPU jiffies), or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    t = os.times()
    return sum(v) - v[3] - v[4], sum(v), (t.user + t.system) * os.sysconf("SC_CLK_TCK")


def other_load(before, after) -> float | None:
    """Share of the machine's CPU time used by other processes (or stolen) between two snapshots."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    others = (after[0] - before[0]) - (after[2] - before[2])
    return max(0.0, others / (after[1] - before[1]))


def num_sets(footprint: int, cache: int) -> int:
    return max(2, min(16, math.ceil(2 * cache / max(footprint, 1))))


# ------------------------------------------------------------------------------ timing
class Timer:
    def __init__(self, dev: torch.device, repeat: int, warmup: int):
        self.dev, self.repeat, self.warmup = dev, repeat, max(warmup, 1)
        self.cycles_per_ms = None
        if dev.type == "cuda" and hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(1000)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            cycles = 20_000_000
            s.record()
            torch.cuda._sleep(cycles)
            e.record()
            e.synchronize()
            self.cycles_per_ms = cycles / max(s.elapsed_time(e), 1e-3)

    def __call__(self, fn, nsets: int) -> list[float]:
        """Per-call times in ms of fn(k), k rotating over nsets input sets. The warm-up
        touches every set at least once (no first-touch page faults in the timed calls)."""
        warmup = max(self.warmup, nsets)
        if self.dev.type == "cpu":
            for i in range(warmup):
                fn(i % nsets)
            times = []
            for i in range(self.repeat):
                t0 = time.perf_counter()
                fn(i % nsets)
                times.append((time.perf_counter() - t0) * 1e3)
            return times
        for i in range(warmup):
            fn(i % nsets)
        torch.cuda.synchronize()
        # host time to queue one call (what the GPU would otherwise wait for between calls)
        probe = 3
        t0 = time.perf_counter()
        for i in range(probe):
            fn(i % nsets)
        host_ms = (time.perf_counter() - t0) * 1e3 / probe
        torch.cuda.synchronize()
        times, chunk, i = [], 10, 0  # chunks keep the launch queue short of its limit
        while i < self.repeat:
            k = min(chunk, self.repeat - i)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(k)]
            if self.cycles_per_ms:
                torch.cuda._sleep(int(self.cycles_per_ms * min(1.5 * host_ms * k + 0.5, 2000.0)))
            for j, (s, e) in enumerate(events):
                s.record()
                fn((i + j) % nsets)
                e.record()
            torch.cuda.synchronize()
            times += [s.elapsed_time(e) for s, e in events]
            i += k
        return times


def copy_times(nbytes: float, dev: torch.device, timer: Timer, cache: int) -> list[float]:
    """A copy of nbytes/2 bytes, which moves nbytes (read + write)."""
    half = max(1, int(round(nbytes / 2)))
    nsets = num_sets(2 * half, cache)
    src = [torch.ones(half, dtype=torch.uint8, device=dev) for _ in range(nsets)]
    dst = [torch.zeros(half, dtype=torch.uint8, device=dev) for _ in range(nsets)]
    return timer(lambda k: dst[k].copy_(src[k]), nsets)


# ------------------------------------------------------------------------------ payload views
def codes_offset(slots: int) -> int:
    return HEADER + -(-4 * slots // 16) * 16


def shard_views(buf: torch.Tensor, shards: int, slots: int, block: int):
    """(scales [shards, S] float32, codes [shards, S, B] int8) views of a payload."""
    sb = ops.shard_bytes(slots, block)
    co = codes_offset(slots)
    assert sb == co + slots * block
    sh = buf.view(shards, sb)
    scales = sh[:, HEADER:HEADER + 4 * slots].view(torch.float32)
    codes = sh[:, co:co + slots * block].view(torch.int8).unflatten(1, (slots, block))
    return scales, codes


# ------------------------------------------------------------------------------ torch-op versions
# The same algorithm as the kernels, in idiomatic torch ops (tests/support/reference.py's math:
# scale = absmax / qmax, code = round_half_even(a * (qmax / absmax)) clamped), writing into
# the same payload layout. They leave out the non-finite handling (header flags, NaN
# scales), which only makes them faster. If the codec's math changes, the bitwise check
# (agrees_with_torch_ops) says so.
def block_scales(absmax, qmax):
    """(scale, inverse) of blocks from their absmax; 0, 0 where qmax / absmax overflows."""
    inv = qmax / absmax
    usable = torch.isfinite(inv)
    return torch.where(usable, absmax / qmax, 0.0), torch.where(usable, inv, 0.0)


def torch_encode(x, r, W, S, B, qmax, scales_v, codes_v):
    """x, r: [S*W*B] float32 (zero past N); block s*W + w goes to rank w, slot s."""
    a = x + r
    blocks = a.view(S, W, B)
    scale, inv = block_scales(blocks.abs().amax(dim=2), qmax)  # [S, W]
    q = torch.round(blocks * inv.unsqueeze(2)).clamp_(-QMAX, QMAX)
    codes_v.copy_(q.transpose(0, 1))  # float -> int8, into the owners' shards
    scales_v.copy_(scale.t())
    torch.sub(blocks, q * scale.unsqueeze(2), out=r.view(S, W, B))


def torch_reduce(recv_scales, recv_codes, r_mine, W, qmax, world_t, out_scales, out_codes):
    """recv_*: [W, S(, B)] views of the received shards; r_mine: [S, B] view of my residual."""
    s = recv_codes[0] * recv_scales[0].unsqueeze(1)
    for w in range(1, W):  # rank order
        s += recv_codes[w] * recv_scales[w].unsqueeze(1)
    mean = s * (1.0 / world_t)
    scale, inv = block_scales(mean.abs().amax(dim=1), qmax)
    q = torch.round(mean * inv.unsqueeze(1)).clamp_(-QMAX, QMAX)
    out_codes.copy_(q)
    out_scales.copy_(scale)
    r_mine += world_t * (mean - q * scale.unsqueeze(1))


def torch_decode(scales_v, codes_v, y, W, S, B):
    torch.mul(codes_v, scales_v.unsqueeze(2), out=y.view(S, W, B).transpose(0, 1))


# ------------------------------------------------------------------------------ one size
def bench_size(N: int, B: int, W: int, dev: torch.device, timer: Timer, cache: int,
               check: bool, codec) -> list[dict]:
    """Rows of one size for one codec (a gradcomp BlockQuantizer; its block size is B)."""
    bits, rdtype = codec.bits, codec.residual_dtype
    c, R = bits / 8, rdtype.itemsize
    rounding = {"bits": bits, "residual_dtype": rdtype, "stochastic": codec.stochastic, "seed": 1}
    # the torch-op twin (and the bitwise check) exist for int8, nearest, float32 residuals
    twin = bits == 8 and not codec.stochastic and rdtype == torch.float32
    nb = -(-N // B)
    S = -(-nb // W)
    Np = S * W * B  # padded length for the torch-op versions (views of whole blocks)
    sb = ops.shard_bytes(S, B, bits)
    qmax = torch.full((), QMAX, device=dev)  # a device tensor: true division on CUDA too
    world_t = torch.full((), float(W), device=dev)

    def table_for(residual: torch.Tensor | None) -> layout.BlockTable:
        addrs = [residual.data_ptr()] if residual is not None else None
        return layout.build_table(layout.contiguous_spans([N], B, addrs), B, W, R)

    noef = table_for(None)
    assert noef.slots == S
    slice_elems = int(noef.rows_of(RANK)[:, 1].sum())
    elems = {"encode": N, "reduce": slice_elems, "decode": N}
    footprint = {p: BYTES[p][1](B, W, c, R) * elems[p] for p in PASSES}
    nsets = num_sets(int(min(footprint.values())), cache)
    noef_table = noef.table.to(dev)

    def rand(n, scale=1.0, dtype=torch.float32):
        t = torch.zeros(Np, device=dev, dtype=dtype)
        t[:n] = torch.randn(n, device=dev) * scale
        return t

    sets = []
    for _ in range(nsets):
        st = {"x": rand(N), "r": rand(N, 0.01, rdtype), "r_red": rand(N, 0.01, rdtype),
              "y": torch.zeros(Np, device=dev)}
        st["xN"], st["yN"] = st["x"][:N], st["y"][:N]
        st["tbl_keep"] = table_for(st["r"])
        st["table"] = st["tbl_keep"].table.to(dev)
        st["rows_keep"] = table_for(st["r_red"])
        st["my_rows"] = st["rows_keep"].rows_of(RANK).to(dev)
        st["send"] = torch.zeros(W * sb, dtype=torch.uint8, device=dev)
        st["send_t"] = torch.zeros(W * sb, dtype=torch.uint8, device=dev)
        ops.quant_encode(st["xN"], st["table"], W, S, B, out=st["send"], **rounding)  # a valid payload to decode
        # What rank RANK receives: its shard of W other ranks' payloads (their residuals do not
        # change the codes' layout, so the senders encode without error feedback).
        parts = []
        for src in range(W):
            xs = torch.randn(N, device=dev) * (1.0 + 0.25 * src)
            parts.append(ops.quant_encode(xs, noef_table, W, S, B, **rounding)[RANK * sb:(RANK + 1) * sb])
        st["recv"] = torch.cat(parts)
        del parts, xs
        st["slice"] = torch.zeros(sb, dtype=torch.uint8, device=dev)
        st["slice_t"] = torch.zeros(sb, dtype=torch.uint8, device=dev)
        if twin:
            st["send_t_v"] = shard_views(st["send_t"], W, S, B)
            st["send_v"] = shard_views(st["send"], W, S, B)
            st["recv_v"] = shard_views(st["recv"], W, S, B)
            st["slice_t_v"] = tuple(v[0] for v in shard_views(st["slice_t"], 1, S, B))
            st["r_mine"] = st["r_red"].view(S, W, B)[:, RANK]
        sets.append(st)

    ours = {
        "encode": lambda k: ops.quant_encode(sets[k]["xN"], sets[k]["table"], W, S, B, out=sets[k]["send"],
                                             step=k, **rounding),
        "reduce": lambda k: ops.quant_reduce(sets[k]["recv"], sets[k]["my_rows"], W, S, B,
                                             out=sets[k]["slice"], step=k, **rounding),
        "decode": lambda k: ops.quant_decode(sets[k]["send"], sets[k]["table"], W, S, B, sets[k]["yN"], bits=bits),
    }
    theirs = {
        "encode": lambda k: torch_encode(sets[k]["x"], sets[k]["r"], W, S, B, qmax, *sets[k]["send_t_v"]),
        "reduce": lambda k: torch_reduce(*sets[k]["recv_v"], sets[k]["r_mine"], W, qmax, world_t,
                                         *sets[k]["slice_t_v"]),
        "decode": lambda k: torch_decode(*sets[k]["send_v"], sets[k]["y"], W, S, B),
    }

    agree = check_agreement(sets[0], N, B, W, S, sb, dev, qmax, world_t, table_for) if check and twin else {}

    rows = []
    for p in PASSES:
        nbytes = BYTES[p][1](B, W, c, R) * elems[p]
        snap = cpu_snapshot()
        t_ours = timer(ours[p], nsets)
        t_copy = copy_times(nbytes, dev, timer, cache)
        t_torch = timer(theirs[p], nsets) if twin else []
        load = other_load(snap, cpu_snapshot())
        ms, copy_ms = statistics.median(t_ours), statistics.median(t_copy)
        torch_ms = statistics.median(t_torch) if twin else None
        gbps = nbytes / (ms * 1e-3) / 1e9
        copy_gbps = nbytes / (copy_ms * 1e-3) / 1e9
        rows.append({
            "codec": codec_name(codec), "N": N, "pass": p, "elements": elems[p],
            "bytes_per_elem": BYTES[p][1](B, W, c, R), "bytes": nbytes,
            "sets": nsets, "ms": ms, "gbps": gbps, "copy_ms": copy_ms, "copy_gbps": copy_gbps,
            "pct_of_copy": 100.0 * gbps / copy_gbps, "torch_ms": torch_ms,
            "speedup": torch_ms / ms if twin else None,
            "agrees_with_torch_ops": agree.get(p),
            # CPU share other processes used while this row was measured (host side)
            "other_cpu_load": load,
            # others used > 15% of the CPU, or a median over 1.5x its fastest call
            "noisy": (dev.type == "cpu" and load is not None and load > 0.15)
            or any(statistics.median(t) > max(1.5 * min(t), 0.02) for t in (t_ours, t_copy, t_torch) if t),
            "times_ms": t_ours, "copy_times_ms": t_copy, "torch_times_ms": t_torch,
        })
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def check_agreement(st, N, B, W, S, sb, dev, qmax, world_t, table_for) -> dict:
    """Runs both versions once on copies of the same inputs; True where every code, scale,
    residual and decoded value has the same bits (they should: the same IEEE ops)."""
    out = {}
    # encode
    r_a, r_b = st["r"].clone(), st["r"].clone()
    tbl = table_for(r_a)
    send_a = torch.zeros(W * sb, dtype=torch.uint8, device=dev)
    send_b = torch.zeros(W * sb, dtype=torch.uint8, device=dev)
    ops.quant_encode(st["xN"], tbl.table.to(dev), W, S, B, out=send_a)
    torch_encode(st["x"], r_b, W, S, B, qmax, *shard_views(send_b, W, S, B))
    out["encode"] = _same(shard_views(send_a, W, S, B), shard_views(send_b, W, S, B)) and _same(r_a, r_b)
    # reduce
    r_a, r_b = st["r_red"].clone(), st["r_red"].clone()
    tbl = table_for(r_a)
    sl_a = torch.zeros(sb, dtype=torch.uint8, device=dev)
    sl_b = torch.zeros(sb, dtype=torch.uint8, device=dev)
    ops.quant_reduce(st["recv"], tbl.rows_of(RANK).to(dev), W, S, B, out=sl_a)
    torch_reduce(*st["recv_v"], r_b.view(S, W, B)[:, RANK], W, qmax, world_t,
                 *(v[0] for v in shard_views(sl_b, 1, S, B)))
    out["reduce"] = _same(shard_views(sl_a, 1, S, B), shard_views(sl_b, 1, S, B)) and _same(r_a, r_b)
    # decode
    y_a = torch.zeros(st["y"].numel(), device=dev)
    y_b = torch.zeros(st["y"].numel(), device=dev)
    ops.quant_decode(st["send"], st["table"], W, S, B, y_a[:N])
    torch_decode(*shard_views(st["send"], W, S, B), y_b, W, S, B)
    out["decode"] = _same(y_a, y_b)
    del tbl
    return out


def _same(a, b) -> bool:
    if isinstance(a, tuple):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    if a.dtype == torch.float32:
        a, b = a.view(torch.int32), b.view(torch.int32)
    return bool(torch.equal(a, b))


# ------------------------------------------------------------------------------ main
def fmt_n(n: int) -> str:
    m, e = f"{n:.1e}".split("e")
    return f"{m}e{int(e)}"


def codec_name(codec) -> str:
    """The spec naming a benchmarked codec (without the block size, a column of its own)."""
    name = codec.name + (":stochastic" if codec.stochastic else "")
    return name + (":residual=bf16" if codec.residual_dtype == torch.bfloat16 else "")


def goal_check(rows, dev_type: str) -> list[str]:
    """The goal's verdict per row: CPU rows without a torch twin are held to the copy half."""
    lines = []
    for r in rows:
        if dev_type == "cpu":
            ok = (r["speedup"] is None or r["speedup"] >= 5) and r["pct_of_copy"] >= 50
            vs = f"speed-up {r['speedup']:.1f}x, " if r["speedup"] is not None else ""
            lines.append(f"{r['codec']} {fmt_n(r['N'])} {r['pass']}: {'meets' if ok else 'MISSES'} "
                         f"({vs}{r['pct_of_copy']:.0f}% of copy)")
            r["meets_goal"] = ok
        else:
            if r["N"] < 1e7:
                r["meets_goal"] = None
                continue
            ok = r["pct_of_copy"] >= 90
            lines.append(f"{r['codec']} {fmt_n(r['N'])} {r['pass']}: {'meets' if ok else 'MISSES'} "
                         f"({r['pct_of_copy']:.0f}% of copy)")
            r["meets_goal"] = ok
    return lines


def main(argv=None, out_dir: str = ".") -> int:
    ap = argparse.ArgumentParser(prog="gradcomp bench kernels", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto (default): cuda when gradcomp's CUDA backend can run here, else cpu")
    ap.add_argument("--sizes", default="1e6,3e6,1e7,3e7", help="bucket sizes in elements, comma-separated")
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--codecs", default=DEFAULT_CODECS,
                    help=f"comma-separated block-codec specs (default {DEFAULT_CODECS}); --block sets the block")
    ap.add_argument("--repeat", type=int, default=None,
                    help="timed calls per measurement (default: cpu 20, cuda 50)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-check", action="store_true",
                    help="skip the bitwise agreement check against torch ops")
    ap.add_argument("--out", default=None, help=f"JSON output (default: {out_dir}/kernels-<device>.json)")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if gradcomp.cuda_available() else "cpu"

    sizes = [int(float(s)) for s in args.sizes.split(",") if s.strip()]
    codecs = []
    for spec in args.codecs.split(","):
        c = gradcomp.codecs.parse(f"{spec.strip()}:block={args.block}")
        if not isinstance(c, gradcomp.codecs.BlockQuantizer):
            sys.exit(f"gradcomp bench kernels: {spec!r} is not a block codec")
        codecs.append(c)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("gradcomp bench kernels: --device cuda, but torch sees no CUDA device")
        if not gradcomp.cuda_available():
            sys.exit("gradcomp bench kernels: --device cuda, but gradcomp was built without CUDA "
                     "(or cannot see the device)")
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    repeat = args.repeat or (50 if dev.type == "cuda" else 20)
    out = args.out or os.path.join(out_dir, f"kernels-{dev.type}.json")

    torch.manual_seed(0)
    timer = Timer(dev, repeat, args.warmup)
    cache = cache_bytes(dev)
    meta = {
        "device": dev.type, "device_name": device_name(dev),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "gradcomp_build_info": gradcomp.build_info(), "torch_num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "block": args.block, "world": args.world, "reduce_rank": RANK,
        "dtype": "float32", "error_feedback": True, "repeat": repeat, "warmup": args.warmup,
        "last_level_cache_bytes": cache, "statistic": "median",
        "timing": ("wall clock per call" if dev.type == "cpu" else
                   "CUDA events per call, calls queued behind torch.cuda._sleep (GPU time, no launch gaps)"),
        "copy_baseline": ("uint8 dst.copy_(src) of bytes/2 (moves bytes)" if dev.type == "cpu" else
                          "device-to-device uint8 dst.copy_(src) of bytes/2 (moves bytes)"),
        "bytes_per_elem_formula": {p: BYTES[p][0] for p in PASSES},
        "codecs": [codec_name(c) for c in codecs],
        "goal": GOALS[dev.type],
        "argv": sys.argv[1:],
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        meta["device_props"] = {k: getattr(props, k, None) for k in
                                ("total_memory", "multi_processor_count", "L2_cache_size", "major", "minor")}
    print(f"# {meta['device_name']} | torch {torch.__version__} | threads {meta['torch_num_threads']} | "
          f"block {args.block} | world {args.world} | repeat {repeat} (median)")
    for p in PASSES:
        print(f"# {p}: {BYTES[p][0]}")
    print(f"{'codec':<22} {'N':>7} {'pass':<6} {'B/elem':>6} {'ms':>9} {'GB/s':>7} {'copy GB/s':>9} {'% copy':>6} "
          f"{'torch ms':>9} {'speed-up':>8}")
    rows = []
    for codec in codecs:
        for n in sizes:
            for r in bench_size(n, args.block, args.world, dev, timer, cache, not args.no_check, codec):
                rows.append(r)
                flag = "" if r["agrees_with_torch_ops"] in (True, None) else "  (torch-op result differs!)"
                flag += "  (noisy)" if r["noisy"] else ""
                vs = (f"{r['torch_ms']:9.3f} {r['speedup']:7.1f}x" if r["speedup"] is not None
                      else f"{'-':>9} {'-':>8}")
                print(f"{r['codec']:<22} {fmt_n(r['N']):>7} {r['pass']:<6} {r['bytes_per_elem']:6.2f} {r['ms']:9.3f} "
                      f"{r['gbps']:7.1f} {r['copy_gbps']:9.1f} {r['pct_of_copy']:5.0f}% {vs}{flag}", flush=True)
    if any(r["noisy"] for r in rows):
        print("# (noisy): other processes used > 15% of the CPU during the row, or a median was over 1.5x "
              "its fastest call: rerun on an idle machine")
    print(f"# goal ({dev.type}): {GOALS[dev.type]}")
    for line in goal_check(rows, dev.type):
        print("#   " + line)

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
