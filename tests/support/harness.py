"""What the kernel tests share: seeded generators, bit-exact comparison, and the W-rank
exchanges simulated in one process on any backend — the CPU, a CUDA device (the tensors'
device decides), or the CUDA kernels on the CPU through the host emulation (``emu``, an
emulator.EmulatedCuda).

Quantizers (``exchange``): every rank builds its block table (same layout, its own residual
addresses), encodes its bucket, receives shard ``w`` of every rank's payload, reduces its
slots, and every rank decodes the concatenation of the W reduced slices. Top-k
(``topk_exchange``): every rank encodes, the payloads are concatenated in rank order as
all_gather would, every rank decodes the same concatenation. Random-k (``randomk_run``): one
rank's payload, summed as by W ranks.
"""

from __future__ import annotations

import types
import zlib

import reference as ref
import torch
from gradcomp import ops
from gradcomp.engine import layout

_INT_OF_SIZE = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


# ------------------------------------------------------------------------------ comparison
def gen(*key) -> torch.Generator:
    """A generator seeded from the test's parametrization: fresh data per case, reproducible."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of ``t`` (same shape), as signed integers of its element size."""
    return t.view(_INT_OF_SIZE[t.element_size()])


def _mismatch(got: torch.Tensor, want: torch.Tensor, nan_bytes: bool = False) -> str | None:
    """None if ``got`` and ``want`` are the same bits (-0.0 is not +0.0); NaNs by position
    only unless ``nan_bytes`` (then their payloads too). Else what differs first."""
    if got.dtype != want.dtype:
        return f"dtype {got.dtype} != {want.dtype}"
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    g, w = got.detach().reshape(-1).cpu(), want.detach().reshape(-1).cpu()
    bad = bits_of(g) != bits_of(w)
    if g.dtype.is_floating_point and not nan_bytes:
        gn, wn = g.isnan(), w.isnan()
        bad = (gn != wn) | (~gn & ~wn & bad)
    if not bad.any():
        return None
    i = int(bad.nonzero()[0, 0])
    return (f"{int(bad.sum())} of {bad.numel()} elements differ; first at flat index {i}: got {g[i].item()!r} "
            f"({int(bits_of(g)[i]):#x}), want {w[i].item()!r} ({int(bits_of(w)[i]):#x})")


def bits_equal(got: torch.Tensor, want: torch.Tensor, nan_bytes: bool = False) -> bool:
    """Bit-exact equality (torch.equal would take -0.0 for +0.0); NaNs by position only
    unless ``nan_bytes``."""
    return _mismatch(got, want, nan_bytes) is None


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, what: str = "", nan_bytes: bool = False) -> None:
    """Raises unless ``bits_equal(got, want, nan_bytes)``, saying where they differ."""
    why = _mismatch(got, want, nan_bytes)
    if why is not None:
        raise AssertionError(f"{what}: {why}" if what else why)


def assert_same_runs(a: dict, b: dict, what="", nan_bytes: bool = False) -> None:
    """Two runs' results — dicts of per-rank lists whose items are tensors or lists of
    tensors — bit for bit alike (``bits_equal``)."""
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    for key in a:
        assert len(a[key]) == len(b[key]), key
        for w, (x, y) in enumerate(zip(a[key], b[key])):
            if isinstance(x, list):
                assert len(x) == len(y), (key, w)
            for j, (u, v) in enumerate(zip(x, y) if isinstance(x, list) else [(x, y)]):
                why = _mismatch(u, v, nan_bytes)
                assert why is None, f"{key} of rank {w} [{j}]: {why}; {what}"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (2-norms)."""
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------ quantizers
def wide_inputs(numels, world, dtype, g) -> list[torch.Tensor]:
    """Per-rank buckets spanning magnitudes 1e-30 .. 1e4."""
    n = sum(numels)
    return [(torch.randn(n, generator=g) * torch.logspace(-30, 30, n).clamp(max=1e4)).to(dtype) for _ in range(world)]


def extreme_inputs(g) -> tuple[list[int], list[torch.Tensor]]:
    """(numels, two ranks' float32 buckets): subnormals (the scale underflows: codes 0, the
    residual keeps them), an all-zero block, normal values, FLT_MAX (the scale steps one ulp
    down) and -FLT_MAX / 3."""
    fmax = torch.finfo(torch.float32).max
    x = torch.cat([torch.randn(256, generator=g) * 1e-40, torch.zeros(256), torch.randn(256, generator=g),
                   torch.randn(300, generator=g)])
    x[600] = fmax
    x[601] = -fmax / 3
    return [256, 256, 256, 300], [x, -x.flip(0)]


def make_residuals(numels, world, g, *, scale=0.01, dtype=torch.float32, device="cpu", misalign=0) -> list:
    """Per-rank lists of residuals, N(0, scale²) rounded to ``dtype``, on ``device``; each
    starts ``misalign`` bytes into its own allocation (off every vector boundary: no vector
    access) where asked."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    assert misalign % itemsize == 0
    out = []
    for _ in range(world):
        rr = []
        for n in numels:
            values = (torch.randn(n, generator=g) * scale).to(dtype)
            if misalign:
                r = torch.empty(n + 16, dtype=dtype, device=device)[misalign // itemsize :][:n]
                rr.append(r.copy_(values))
            else:
                rr.append(values.to(device))
        out.append(rr)
    return out


def clone_residuals(residuals):
    return None if residuals is None else [[r.clone() for r in rr] for rr in residuals]


def exchange(xs, numels, block, world, residuals=None, bits=8, rounding=None, *, ordinals=None, emu=None,
             poison=None, bucket_misalign=0, payload_misalign=0, res_misalign=0):
    """The simulated compressed all-reduce of ``world`` ranks' buckets ``xs`` (packed
    parameters of ``numels`` elements) on their device, or on ``emu`` (CPU tensors).

    ``residuals[w]``: rank w's list of per-parameter residuals on the same device, all
    float32 or all bfloat16 (updated in place), or None (no error feedback). ``rounding``:
    None (to nearest) or {"seed", "step"} (stochastic; rank w draws as rank w). ``ordinals``:
    the parameters' (default 0, 1, ...). ``poison``: a byte the CPU backend's payloads start
    as (every byte must be written). The misalignments (emulated only): bytes past a 256-byte
    boundary at which the bucket, the payloads (16-byte aligned, as ops requires) and the
    residuals sit in the emulator's memory. Everything returned is on the CPU: tables, slots,
    sb (shard bytes), sends, recvs, slices, gathered, outs (every rank's decode), res_enc /
    res_red (the residuals after encode / after reduce; None without error feedback)."""
    res_dtype = residuals[0][0].dtype if residuals is not None and residuals[0] else torch.float32
    device = xs[0].device
    tables = []
    for w in range(world):
        addrs = None
        if residuals is not None:
            addrs = [emu.place(r, res_misalign) if emu is not None else r.data_ptr() for r in residuals[w]]
        tables.append(layout.build_table(layout.contiguous_spans(numels, block, addrs, ordinals), block, world,
                                         res_dtype.itemsize))
    for t in tables[1:]:  # every rank lays the bucket out the same way
        assert torch.equal(t.table[:, :2], tables[0].table[:, :2])
    S, sb = tables[0].slots, tables[0].shard_bytes(bits)
    kw = [{"bits": bits, "residual_dtype": res_dtype, "stochastic": rounding is not None, "rank": w,
           **(rounding or {})} for w in range(world)]

    def snap():
        return None if residuals is None else [[r.detach().clone().cpu() for r in rr] for rr in residuals]

    if emu is None:
        tdev = [t.table.to(device) for t in tables]

        def out(n):
            return None if poison is None else torch.full((n,), poison, dtype=torch.uint8, device=device)

        def encode(w):
            return ops.quant_encode(xs[w], tdev[w], world, S, block, out=out(world * sb), **kw[w])

        def reduce(w, recv):
            return ops.quant_reduce(recv, tdev[w][w * S : (w + 1) * S], world, S, block, out=out(sb), **kw[w])

        def decode(w, gathered):
            return ops.quant_decode(gathered, tdev[w], world, S, block, torch.full_like(xs[w], 1234.0), bits=bits)
    else:
        def encode(w):
            return emu.quant_encode(xs[w], tables[w].table, world, S, block, bucket_misalign=bucket_misalign,
                                    payload_misalign=payload_misalign, **kw[w])

        def reduce(w, recv):
            return emu.quant_reduce(recv, tables[w].rows_of(w).clone(), world, S, block,
                                    payload_misalign=payload_misalign, **kw[w])

        def decode(w, gathered):
            return emu.quant_decode(gathered, tables[w].table, world, S, block, torch.full_like(xs[w], 1234.0),
                                    bits=bits, bucket_misalign=bucket_misalign, payload_misalign=payload_misalign)

    sends = [encode(w) for w in range(world)]
    res_enc = snap()
    recvs = [torch.cat([sends[src][w * sb : (w + 1) * sb] for src in range(world)]) for w in range(world)]
    slices = [reduce(w, recvs[w]) for w in range(world)]
    res_red = snap()
    gathered = torch.cat(slices)
    outs = [decode(w, gathered) for w in range(world)]
    if emu is not None:
        emu.clear()

    def host(ts):
        return [t.cpu() for t in ts]

    return types.SimpleNamespace(tables=tables, slots=S, sb=sb, sends=host(sends), recvs=host(recvs),
                                 slices=host(slices), gathered=gathered.cpu(), outs=host(outs), res_enc=res_enc,
                                 res_red=res_red)


def exchange_results(ex) -> dict:
    """What two backends' runs of ``exchange`` must agree on, for ``assert_same_runs``."""
    return {"sends": ex.sends, "slices": ex.slices, "outs": ex.outs, "res_enc": ex.res_enc or [],
            "res_red": ex.res_red or []}


# ------------------------------------------------------------------------------ top-k and random-k
class SparseBucket:
    """A bucket of parameters separated by gaps of elements no sparse row names (they stand
    for exactly reduced parameters and must never be touched by a decode), with float32
    residuals (or none) and its sparse table."""

    def __init__(self, numels, dtype, g, ef=True, ratio=0.01, gap=7, scale=1.0, ordinals=None):
        self.numels, self.dtype, self.ratio = numels, dtype, ratio
        self.offsets, off = [], 0
        for n in numels:
            off += gap
            self.offsets.append(off)
            off += n
        self.numel = off + gap
        self.x = (torch.randn(self.numel, generator=g) * scale).to(dtype)
        self.residuals = [torch.randn(n, generator=g) * 0.1 * scale if ef else None for n in numels]
        self.ordinals = ordinals or list(range(len(numels)))
        self.refresh()

    def refresh(self, emu=None):
        """The table again, naming the residuals where they are now (placed in ``emu``, if given)."""
        addrs = [0 if r is None else (emu.place(r) if emu is not None else r.data_ptr()) for r in self.residuals]
        spans = [layout.Span(o, n, 0, a, ordn)
                 for o, n, a, ordn in zip(self.offsets, self.numels, addrs, self.ordinals)]
        self.table = layout.build_sparse_table(spans, self.ratio)
        return self.table

    def to(self, device):
        """The bucket and its residuals moved to ``device``, the table renewed."""
        self.x = self.x.to(device)
        self.residuals = [r.to(device) if r is not None else None for r in self.residuals]
        self.refresh()
        return self

    def param(self, i) -> torch.Tensor:
        return self.x[self.offsets[i] : self.offsets[i] + self.numels[i]]

    def gap_mask(self) -> torch.Tensor:
        m = torch.ones(self.numel, dtype=torch.bool)
        for o, n in zip(self.offsets, self.numels):
            m[o : o + n] = False
        return m


def tied_buckets(numels, dtype, world, gens, *, ef=True, ratio=0.01, nan_at=None, device="cpu") -> list:
    """One SparseBucket a rank (values ×10, rank w's from ``gens(w)``) whose parameter 3 is
    one value throughout (ties across tiles); ``nan_at``: a NaN at that index of parameter 4
    of the last rank."""
    buckets = []
    for w in range(world):
        b = SparseBucket(numels, dtype, gens(w), ef=ef, ratio=ratio, scale=10.0)
        b.param(3)[:] = 1.5
        if nan_at is not None and w == world - 1:
            b.param(4)[nan_at] = float("nan")
        buckets.append(b.to(device))
    return buckets


def topk_exchange(buckets, wire, approx, *, emu=None, corrupt=None, decoders=None, poison=None):
    """The top-k exchange of W ranks' ``buckets`` (one a rank, on their device, or CPU ones on
    ``emu``): every rank encodes, ``corrupt(gathered, table)`` may edit the gathered payloads,
    and each rank of ``decoders`` (all by default) decodes them. ``poison``: a byte the CPU
    backend's payloads start as. Returns ({"payloads", "outs", "residuals"} on the CPU, the
    rejected index lists each decoding rank counted)."""
    world = len(buckets)
    tables = [b.refresh(emu) for b in buckets]
    pairs, tiles = tables[0].pairs, tables[0].tiles
    if emu is None:
        devs = [t.table.to(b.x.device) for b, t in zip(buckets, tables)]
        payloads = []
        for b, t in zip(buckets, devs):
            out = None if poison is None else torch.full((ops.topk_payload_bytes(pairs, wire),), poison,
                                                         dtype=torch.uint8, device=b.x.device)
            payloads.append(ops.topk_encode(b.x, t, pairs, approx=approx, value_dtype=wire, tiles=tiles, out=out))
    else:
        devs = [t.table for t in tables]
        payloads = [emu.topk_encode(b.x, t, pairs, approx=approx, value_dtype=wire, tiles=tiles)
                    for b, t in zip(buckets, devs)]
    gathered = torch.cat(payloads)
    if corrupt is not None:
        corrupt(gathered, tables[0])
    outs, rejected = [], []
    for w, (b, t) in enumerate(zip(buckets, devs)):
        if decoders is not None and w not in decoders:
            continue
        out = b.x.clone()
        if emu is None:
            rej = ops.topk_decode(gathered, t, pairs, world, out, value_dtype=wire)
            rejected.append(rej if isinstance(rej, int) else int(rej.cpu()[0]))
        else:
            rejected.append(emu.topk_decode(gathered, t, pairs, world, out, value_dtype=wire)[0])
        outs.append(out.cpu())
    if emu is not None:
        emu.clear()
    results = {"payloads": [p.cpu() for p in payloads], "outs": outs,
               "residuals": [[r.cpu() for r in b.residuals if r is not None] for b in buckets]}
    return results, rejected


def corrupter(corruption: str, g: torch.Generator):
    """A ``corrupt(gathered, table)`` for topk_exchange that spoils rank 1's payload of two
    (parameter 4's index list: "out_of_range" (its numel), "negative", "duplicate"; or
    "random_bytes": the whole payload), as a faulty or hostile peer would send it."""

    def corrupt(gathered, table):
        nbytes = gathered.numel() // 2
        idx = gathered[nbytes + 16 : nbytes + 16 + 4 * table.pairs].view(torch.int32)
        first = int(table.table[4, 4])
        if corruption == "out_of_range":
            idx[first] = int(table.table[4, 1])
        elif corruption == "negative":
            idx[first + 1] = -5
        elif corruption == "duplicate":
            idx[first + 2] = idx[first + 1]
        else:
            assert corruption == "random_bytes", corruption
            gathered[nbytes:] = torch.randint(0, 256, (nbytes,), generator=g, dtype=torch.uint8).to(gathered.device)

    return corrupt


def randomk_run(b: SparseBucket, *, emu=None, seed=11, step=4) -> dict:
    """Random-k of one rank's bucket ``b`` (on its device, or on ``emu``), decoded twice: its
    payload times 2 as the sum of 2 ranks (flagged if ``b`` holds a non-finite value), then
    with the flag cleared as the sum of 3 (the finite path). Returns payload, residuals and
    both decodes, on the CPU."""
    table = b.refresh(emu)
    t = table.table if emu is not None else table.table.to(b.x.device)
    enc = ops.randomk_encode if emu is None else emu.randomk_encode
    dec = ops.randomk_decode if emu is None else emu.randomk_decode
    payload = enc(b.x, t, table.pairs, seed=seed, step=step)
    res = [r.cpu().clone() for r in b.residuals if r is not None]
    out = b.x.clone()
    dec(payload.clone().mul_(2), t, 2, out, seed=seed, step=step)
    payload[0] = 0
    out2 = b.x.clone()
    dec(payload, t, 3, out2, seed=seed, step=step)
    if emu is not None:
        emu.clear()
    return {"payload": [payload.cpu()], "res": [res], "out": [out.cpu()], "out2": [out2.cpu()]}


# ------------------------------------------------------------------------------ the DDP hooks at W = 1
def model_and_twin(dev, d_in: int, hidden: int, d_out: int):
    """A two-layer MLP on ``dev`` and a twin with the same weights (its local gradients are the
    reference's input)."""
    model, twin = (torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden, d_out)).to(dev) for _ in range(2))
    twin.load_state_dict(model.state_dict())
    return model, twin


def check_sparse_hook_at_world_one(codec: str, dev, hook=None, *, steps=4, sizes=(512, 512, 64), seed=3):
    """DDP over the default process group, of one rank, on ``dev``, with gradcomp's hook for
    the sparse ``codec`` (``hook``: a wrapper of gradcomp.comm_hook, or None for it), forced to
    compress tensors of 1000 elements or more. Every gradient, step by step, must be the
    reference's (tests/support/reference.py) for a twin's local gradient, bit for bit: at W = 1 the
    average is what was sent — exactly k values per compressed tensor, at the reference's
    indices (top-k: the largest |gradient + residual|; random-k: the strata's draws from the
    State's seed, the step and the tensor's ordinal), zeros elsewhere, the residual keeping
    the rest — and the tensors below 1000 elements pass unchanged. Returns the State."""
    import gradcomp
    from gradcomp import codecs
    from torch.nn.parallel import DistributedDataParallel as DDP

    c = codecs.parse(codec)
    torch.manual_seed(0)
    model, twin = model_and_twin(dev, *sizes)
    ddp = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, bucket_cap_mb=0.5)
    state = gradcomp.State(codec, force_compression=True, min_numel=1000, seed=seed)
    ddp.register_comm_hook(state, hook or gradcomp.comm_hook)
    residuals = {}
    for step in range(steps):
        x = torch.randn(32, sizes[0], device=dev)
        ddp.zero_grad()
        ddp(x).square().mean().backward()
        twin.zero_grad()
        twin(x).square().mean().backward()
        for i, (p, q) in enumerate(zip(model.parameters(), twin.parameters())):
            got, local = p.grad.reshape(-1).cpu(), q.grad.reshape(-1).cpu()
            what = f"{codec}: param {i} step {step}"
            n = local.numel()
            if n < 1000:
                assert_bits_equal(got, local, what + " (exact at W=1)")
                continue
            k = layout.pairs_for(n, c.ratio)
            res = residuals.get(i, torch.zeros(n)) if c.error_feedback else None
            if isinstance(c, codecs.TopK):
                idx, values, new_res, bad = ref.topk_encode(local, res, k, c.approx, c.value_dtype)
                assert not bad
                want = ref.sparse_decode([(idx, values)], n)
            else:
                idx = ref.randomk_indices(state.seed, step, state.front.ordinal_of[id(p)], n, k)
                a = local + res if res is not None else local
                want = torch.zeros(n)
                want[idx] = a[idx] * (torch.tensor(1.0) / torch.tensor(1.0))
                new_res = a.clone()
                new_res[idx] = 0.0
            assert int((want != 0).sum()) == k, what  # the reference sends k nonzero values
            assert_bits_equal(got, want, what)
            residuals[i] = new_res
        twin.load_state_dict(model.state_dict())
    assert state.seed == seed and state.stats["payloads_rejected"] == 0
    assert state.stats["buckets_compressed"] > 0 and state.stats["params_compressed"] == 2 * steps
    return state
