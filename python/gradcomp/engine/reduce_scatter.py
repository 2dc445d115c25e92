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
same way. Every number is a function of the inputs alone, so tests/support/reference.py reproduces it
bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .. import codecs, ops
from .collectives import sum_rows, to_device
from .layout import ROW_WORDS, noise_words


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


def quantizes(codec: codecs.Codec, min_numel: int, piece: Chunked, dtype: torch.dtype) -> bool:
    """Whether ``piece`` goes through the block quantizer (else the exact lane): the rule of
    the reduce-scatter and the all-gather alike."""
    return isinstance(codec, codecs.BlockQuantizer) and piece.numel >= min_numel and dtype in codec.dtypes


def compressible(engine, piece: Chunked, dtype: torch.dtype) -> bool:
    return quantizes(engine.codec, engine.min_numel, piece, dtype)


def exact_lane(plan, pieces: list[Chunked], exact: list[Chunked], codec: codecs.Codec, dtype: torch.dtype,
               device: torch.device, cast_allowed: bool) -> bool:
    """Sets ``plan``'s exact lane for the ``exact`` pieces (a non-empty part of ``pieces``):
    ``all_exact``, or their columns ``exact_cols``, and the lane's ``wire`` dtype (a cast
    codec's, where ``cast_allowed`` and it takes ``dtype``, else ``dtype``). Returns whether the
    lane is cast (a cast codec then compresses every piece)."""
    if len(exact) == len(pieces):
        plan.all_exact = True
    else:
        cols = torch.cat([torch.arange(p.offset, p.offset + p.chunk, dtype=torch.int64) for p in exact])
        plan.exact_cols = to_device(cols, device)
    cast = cast_allowed and isinstance(codec, codecs.Cast) and dtype in codec.dtypes
    plan.wire = codec.wire_dtype if cast else dtype
    return cast


def cached_plan(engine, unit, pieces: list[Chunked], world: int, rank: int, dtype: torch.dtype,
                device: torch.device, compress: bool) -> RSPlan:
    """``unit``'s plan (any hashable naming the layout), kept in the engine's plan cache beside
    its all-reduce plans and rebuilt, as they are, when the residual store's version moves."""
    key = ("reduce_scatter", unit, world, rank, dtype, device, compress)
    return engine.cached(key, lambda: plan_reduce_scatter(engine, pieces, world, rank, dtype, device, compress))


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
    if exact and exact_lane(plan, pieces, exact, c, dtype, device, cast_allowed=compress):
        plan.params_compressed, plan.params_fallback = len(exact), 0  # a cast codec compresses every parameter
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
    if plan.shard == 0:
        return 0.0, 0.0
    rows = inp.view(plan.world, plan.shard)
    t0 = time.perf_counter()
    # both lanes' all-to-alls are in flight before either is waited for
    quantized = _send_quantized(engine, plan, inp, step, all_to_all) if plan.enc_table is not None else None
    exact = _send_exact(plan, rows, all_to_all) if plan.wire is not None else None
    codec_s = time.perf_counter() - t0
    sent = (quantized[2] if quantized else 0) + (exact[2] if exact else 0)
    total = None
    if quantized is not None:
        t0 = time.perf_counter()
        total = _sum_quantized(engine, plan, rows, quantized, inp.dtype)
        codec_s += time.perf_counter() - t0
    if exact is not None:
        total = _add_exact(plan, rows, exact, total, inp.device)
    total.div_(plan.world)
    out.copy_(total)
    codec_s = codec_s if inp.device.type == "cpu" else 0.0
    _count(engine.stats, plan, sent, codec_s, inp.element_size())
    return float(sent), codec_s


def _send_quantized(engine, plan: RSPlan, inp: torch.Tensor, step: int, all_to_all) -> tuple:
    """Encodes the rows this rank sends (error feedback through the table) and starts their
    all-to-all: (work, received payload, bytes sent)."""
    c, world = engine.codec, plan.world
    send = ops.quant_encode(inp, plan.enc_table, world, plan.slots, c.block_size, bits=c.bits, check_bounds=False,
                            residual_dtype=c.residual_dtype, stochastic=c.stochastic, seed=engine.seed or 0,
                            step=step, rank=plan.rank)
    received = torch.empty_like(send)
    return all_to_all(received, send), received, (world - 1) * send.numel() // world


def _send_exact(plan: RSPlan, rows: torch.Tensor, all_to_all) -> tuple:
    """Starts the exact lane's all-to-all of its columns: (work, received lane, bytes sent)."""
    lane = rows if plan.all_exact else rows.index_select(1, plan.exact_cols)
    lane = lane.to(plan.wire).contiguous()
    received = torch.empty_like(lane)
    return all_to_all(received, lane), received, (plan.world - 1) * lane.shape[1] * lane.element_size()


def _sum_quantized(engine, plan: RSPlan, rows: torch.Tensor, quantized: tuple, dtype: torch.dtype) -> torch.Tensor:
    """Decodes the rows received into a scratch copy of the input and sums the W rows of this
    rank's shard in rank order, in float32."""
    work, received, _ = quantized
    work.wait()
    c = engine.codec
    scratch = rows if dtype == torch.float32 else rows.float()
    # rows j != me take what rank j sent me (NaN everywhere compressed if any sender
    # flagged a non-finite value); my own row stays as it is
    ops.quant_decode(received, plan.dec_table, plan.world, plan.slots, c.block_size, scratch.view(-1), bits=c.bits,
                     check_bounds=False)
    total = sum_rows(scratch)
    if plan.pad_cols is not None:  # scratch rows j != me hold my data for rank j there: padding is 0
        total.index_fill_(0, plan.pad_cols, 0.0)
    return total


def _add_exact(plan: RSPlan, rows: torch.Tensor, exact: tuple, total, device: torch.device) -> torch.Tensor:
    """Sums the exact lane's W rows in rank order (this rank's own row as it is, without the
    wire's rounding) into ``total``'s exact columns."""
    work, received, _ = exact
    work.wait()
    me = plan.rank
    got = received.view(plan.world, -1).float()
    got[me] = rows[me] if plan.all_exact else rows[me].index_select(0, plan.exact_cols)
    lane_sum = sum_rows(got)
    if total is None and plan.all_exact:
        return lane_sum
    if total is None:
        total = torch.zeros(plan.shard, dtype=torch.float32, device=device)
    total.index_copy_(0, plan.exact_cols, lane_sum)
    return total


def _count(stats: dict, plan: RSPlan, sent: float, codec_s: float, element_size: int) -> None:
    stats["bytes_sent"] += sent
    stats["bytes_uncompressed"] += (plan.world - 1) * plan.shard * element_size  # a ring reduce-scatter's
    stats["codec_seconds"] += codec_s
    stats["buckets_compressed" if plan.params_compressed else "buckets_fallback"] += 1
    stats["params_compressed"] += plan.params_compressed
    stats["params_fallback"] += plan.params_fallback
    stats["ratio"] = stats["bytes_uncompressed"] / stats["bytes_sent"] if stats["bytes_sent"] else 1.0
    if "all_gather_bytes_sent" in stats:
        update_total_ratio(stats)


def update_total_ratio(stats: dict) -> None:
    """``total_ratio``: the bytes a plain reduce-scatter and all-gather would have sent over
    those sent, both counted (an FSDP state that gathers through gradcomp)."""
    sent = stats["bytes_sent"] + stats.get("all_gather_bytes_sent", 0.0)
    plain = stats["bytes_uncompressed"] + stats.get("all_gather_bytes_uncompressed", 0.0)
    stats["total_ratio"] = plain / sent if sent else 1.0
