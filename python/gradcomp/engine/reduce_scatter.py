"""The engine's compressed reduce-scatter: FSDP2's gradient reduction (docs/design.md,
"FSDP2 and HSDP").

The input is what FSDP2 hands its reduce-scatter: ``[W · S]`` elements, viewed as ``[W, S]``;
row j holds rank j's chunk of every parameter of the unit, one after another, each chunk
``chunk`` elements long (dim 0 padded to a multiple of W). Rank ``me`` keeps row ``me`` of the
sum. It encodes the W − 1 rows it sends (error feedback per parameter chunk: the residual of
(parameter, row j) is this rank's own), all-to-alls them, decodes the W − 1 rows it receives
and sums the W rows of its shard in rank order in float32 (its own row as it is, without
loss), then divides by W. Blocks never straddle parameters, nor cover a chunk's padding.
Parameters below min_numel, or of a dtype the codec does not take, travel in an exact lane
(an all-to-all of their columns in the input dtype, or a cast codec's wire dtype), summed the
same way. Every number is a function of the inputs alone, so tests/reference.py reproduces it
bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .. import codecs, ops
from ..layout import ROW_WORDS, noise_words
from .exchanges import _sum_rows, to_device


@dataclass(frozen=True)
class Chunked:
    """A parameter as the reduce-scatter input holds it."""

    key: str  # its residuals are keyed "<key>@<row>"
    index: int  # model-wide parameter index: stochastic rounding's ordinal is index · W + row
    numel: int  # the whole parameter's elements: decides compression, as for DDP
    offset: int  # its chunk's offset within a row
    chunk: int  # its chunk's elements in a row, padding included
    real: tuple  # valid (unpadded) elements of its chunk in row j, for each j


@dataclass
class RSPlan:
    """How one unit's input layout is reduce-scattered (cached per layout and residual version)."""

    world: int
    rank: int
    shard: int  # S, elements of a row
    slots: int = 0  # block slots of one destination's payload shard
    enc_table: torch.Tensor | None = None  # [W * slots, 4] rows of the blocks I send (device)
    dec_table: torch.Tensor | None = None  # [W * slots, 4] where the blocks I receive go (device)
    exact_cols: torch.Tensor | None = None  # [E] int64 columns of the exact lane; None: none
    pad_cols: torch.Tensor | None = None  # [P] int64 padding columns of my row's compressed chunks
    all_exact: bool = False
    wire: torch.dtype | None = None  # the exact lane's dtype
    params_compressed: int = 0
    params_fallback: int = 0
    residuals: list = field(default_factory=list)  # keeps the tensors the table's addresses point to


def compressible(engine, piece: Chunked, dtype: torch.dtype) -> bool:
    c = engine.codec
    return isinstance(c, codecs.BlockQuantizer) and piece.numel >= engine.min_numel and dtype in c.dtypes


def cached_plan(engine, unit, pieces: list[Chunked], world: int, rank: int, dtype: torch.dtype,
                device: torch.device, compress: bool) -> RSPlan:
    """``unit``'s plan (any hashable naming the layout), kept in the engine's plan cache beside
    its all-reduce plans and rebuilt, as they are, when the residual store's version moves."""
    key = ("reduce_scatter", unit, world, rank, dtype, device, compress)
    cached = engine._plans.get(key)
    if cached is None or cached[0] != engine.store.version:
        cached = engine._plans[key] = (engine.store.version, plan_reduce_scatter(engine, pieces, world, rank, dtype,
                                                                                 device, compress))
    return cached[1]


def plan_reduce_scatter(engine, pieces: list[Chunked], world: int, rank: int, dtype: torch.dtype,
                        device: torch.device, compress: bool) -> RSPlan:
    """The tables of one layout. Destination j's payload shard lists the blocks of row j
    (parameter by parameter, block by block), the same order on every rank, so a receiver's
    decode table is its own row's blocks at the sender's rows. A rank's own row is not sent:
    its slots are padding rows (length 0)."""
    c = engine.codec
    shard = sum(p.chunk for p in pieces)
    plan = RSPlan(world, rank, shard)
    quant = [p for p in pieces if compress and compressible(engine, p, dtype)]
    exact = [p for p in pieces if p not in quant]
    plan.params_compressed, plan.params_fallback = len(quant), len(exact)
    if quant:
        B = c.block_size
        itemsize = c.residual_dtype.itemsize
        rows = [[] for _ in range(world)]  # per destination: (offset in the row, length, residual addr, word)
        for p in quant:
            for j in range(world):
                n = p.real[j]
                nb = -(-n // B)
                if nb == 0:
                    continue
                b = torch.arange(nb, dtype=torch.int64)
                addr = torch.zeros(nb, dtype=torch.int64)
                if c.error_feedback and j != rank:
                    r = engine.residual(f"{p.key}@{j}", n, device)
                    plan.residuals.append(r)
                    addr = r.data_ptr() + b * (B * itemsize)
                rows[j].append(torch.stack([p.offset + b * B, torch.clamp(n - b * B, max=B), addr,
                                            noise_words(p.index * world + j, n, b * B)], dim=1))
        per_dest = [torch.cat(r) if r else torch.zeros(0, ROW_WORDS, dtype=torch.int64) for r in rows]
        slots = max(t.shape[0] for t in per_dest)
        enc = torch.zeros(world * slots, ROW_WORDS, dtype=torch.int64)
        dec = torch.zeros(world * slots, ROW_WORDS, dtype=torch.int64)
        mine = per_dest[rank]
        for j, t in enumerate(per_dest):
            if j != rank:
                enc[j * slots : j * slots + t.shape[0]] = t + torch.tensor([j * shard, 0, 0, 0])
                # what rank j sent me: my row's blocks, decoded into row j of the scratch
                dec[j * slots : j * slots + mine.shape[0], :2] = mine[:, :2] + torch.tensor([j * shard, 0])
        plan.slots = slots
        pads = [torch.arange(p.offset + p.real[rank], p.offset + p.chunk, dtype=torch.int64) for p in quant
                if p.chunk > p.real[rank]]
        if pads:
            plan.pad_cols = to_device(torch.cat(pads), device)
        plan.enc_table, plan.dec_table = to_device(enc, device), to_device(dec, device)
    if exact:
        if len(exact) == len(pieces):
            plan.all_exact = True
        else:
            cols = torch.cat([torch.arange(p.offset, p.offset + p.chunk, dtype=torch.int64) for p in exact])
            plan.exact_cols = to_device(cols, device)
        cast = compress and isinstance(c, codecs.Cast) and dtype in c.dtypes
        plan.wire = c.wire_dtype if cast else dtype
        if cast:  # a cast codec compresses every parameter, in the lane
            plan.params_compressed, plan.params_fallback = len(exact), 0
    return plan


def reduce_scatter_(engine, plan: RSPlan, inp: torch.Tensor, out: torch.Tensor, group, step: int,
                    all_to_all=None) -> tuple:
    """Writes the mean of the W ranks' rows ``plan.rank`` into ``out`` ([S], any float dtype),
    from ``inp`` ([W · S], this rank's rows; used as scratch when float32). Runs on the
    current stream with no host sync; counts the call in ``engine.stats`` and returns (bytes
    this rank sent, codec seconds on CPU).
    ``all_to_all(recv, send)`` returns a handle to wait on; default: ``all_to_all_single`` over
    ``group`` (tests pass a loopback among threads)."""
    if all_to_all is None:
        def all_to_all(recv, send):
            return dist.all_to_all_single(recv, send, group=group, async_op=True)
    W, me, S = plan.world, plan.rank, plan.shard
    if S == 0:
        return 0.0, 0.0
    c = engine.codec
    rows = inp.view(W, S)
    timed = inp.device.type == "cpu"
    t0 = time.perf_counter()
    sent, work_q, work_x = 0.0, None, None
    if plan.enc_table is not None:
        send = ops.quant_encode(inp, plan.enc_table, W, plan.slots, c.block_size, bits=c.bits, check_bounds=False,
                                residual_dtype=c.residual_dtype, stochastic=c.stochastic, seed=engine.seed or 0,
                                step=step, rank=me)
        recv = torch.empty_like(send)
        work_q = all_to_all(recv, send)
        sent += (W - 1) * send.numel() // W
    if plan.wire is not None:
        lane = rows if plan.all_exact else rows.index_select(1, plan.exact_cols)
        lane = lane.to(plan.wire).contiguous()
        lane_recv = torch.empty_like(lane)
        work_x = all_to_all(lane_recv, lane)
        sent += (W - 1) * lane.shape[1] * lane.element_size()
    codec_s = time.perf_counter() - t0
    acc = None
    if work_q is not None:
        work_q.wait()
        t0 = time.perf_counter()
        scratch = rows if inp.dtype == torch.float32 else rows.float()
        # rows j != me take what rank j sent me (NaN everywhere compressed if any sender
        # flagged a non-finite value); my own row stays as it is
        ops.quant_decode(recv, plan.dec_table, W, plan.slots, c.block_size, scratch.view(-1), bits=c.bits,
                         check_bounds=False)
        acc = _sum_rows(scratch)
        if plan.pad_cols is not None:  # scratch rows j != me hold my data for rank j there: padding is 0
            acc.index_fill_(0, plan.pad_cols, 0.0)
        codec_s += time.perf_counter() - t0
    if work_x is not None:
        work_x.wait()
        got = lane_recv.view(W, -1)
        own = rows[me] if plan.all_exact else rows[me].index_select(0, plan.exact_cols)
        got = got.float()
        got[me] = own  # my own row without the wire's rounding
        lane_sum = _sum_rows(got)
        if acc is None and plan.all_exact:
            acc = lane_sum
        else:
            if acc is None:
                acc = torch.zeros(S, dtype=torch.float32, device=inp.device)
            acc.index_copy_(0, plan.exact_cols, lane_sum)
    acc.div_(W)
    out.copy_(acc)
    codec_s = codec_s if timed else 0.0
    st = engine.stats
    st["bytes_sent"] += sent
    st["bytes_uncompressed"] += (W - 1) * S * inp.element_size()  # a ring reduce-scatter's
    st["codec_seconds"] += codec_s
    st["buckets_compressed" if plan.params_compressed else "buckets_fallback"] += 1
    st["params_compressed"] += plan.params_compressed
    st["params_fallback"] += plan.params_fallback
    st["ratio"] = st["bytes_uncompressed"] / st["bytes_sent"] if st["bytes_sent"] else 1.0
    return float(sent), codec_s
