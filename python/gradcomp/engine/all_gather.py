"""The engine's compressed all-gather: FSDP2's parameter gather (docs/design.md, "FSDP2's
parameter all-gather").

The output is what FSDP2 hands its all-gather: ``[W · S]`` elements, viewed as ``[W, S]``;
row j holds rank j's chunk of every parameter of the unit, one after another, each chunk
``chunk`` elements long (dim 0 padded to a multiple of W), the layout of the reduce-scatter's
input (``Chunked``). The input is this rank's row. Each rank encodes the valid part of its
own row by blocks (never straddling two parameters, never covering padding; rounded to
nearest, no error feedback), the payloads are all-gathered, and every rank, the row's owner
too, decodes every row from the same bytes: the weights forward and backward use are the
same bits on every rank, a pure function of the sharded weights (tests/support/reference.py
reproduces them). Padding is written as zeros, as FSDP pads. Parameters below min_numel, or
of a dtype the codec does not take, travel in an exact lane (an all-gather of their columns);
a cast codec (fp16, bf16) casts every parameter of a float32 gather and back, its owner's row
too. A non-finite weight flags its payload: every compressed weight of the unit decodes to
NaN on every rank, never to finite values.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .. import codecs, ops
from .collectives import all_gather_single, to_device
from .layout import ROW_WORDS, noise_words
from .reduce_scatter import Chunked, exact_lane, quantizes, update_total_ratio


@dataclass
class AGPlan:
    """How one unit's gather is laid out (cached per layout, rank and dtype)."""

    world: int
    rank: int
    shard: int  # S, elements of a row
    slots: int = 0  # block slots of one rank's payload
    enc_table: torch.Tensor | None = None  # [slots, 4] my row's blocks, offsets in my row (device)
    dec_table: torch.Tensor | None = None  # [W * slots, 4] every row's blocks, offsets in the output (device)
    pad_index: torch.Tensor | None = None  # [P] int64 output positions of compressed chunks' padding
    exact_cols: torch.Tensor | None = None  # [E] int64 columns of the exact lane; None: none or all
    all_exact: bool = False
    wire: torch.dtype | None = None  # the exact lane's dtype; None: no exact lane


def check_codec(spec) -> codecs.Codec:
    """The all-gather's codec: a block quantizer of 8, 4 or 2 bits (rounded to nearest, no
    error feedback) or a cast codec. Refuses what cannot gather weights."""
    codec = codecs.parse(spec)
    if isinstance(codec, codecs.Sign):
        raise ValueError(f"gradcomp.fsdp: all_gather={spec!r}: a scaled sign of every weight is not the weight (and "
                         "weights get no error feedback); use int8, int4 or int2, or fp16/bf16")
    if isinstance(codec, codecs.BlockQuantizer):
        if codec.stochastic:
            raise ValueError(f"gradcomp.fsdp: all_gather={spec!r}: weights are rounded to nearest, so that forward "
                             "and backward gather the same weights; drop ':stochastic'")
        # weights need no error feedback (docs/design.md): the codec runs without it
        return type(codec)(block_size=codec.block_size, error_feedback=False)
    if isinstance(codec, codecs.Cast):
        return codec
    raise ValueError(f"gradcomp.fsdp: all_gather={spec!r}: the parameter all-gather takes a quantizer (int8, "
                     "int4, int2) or fp16/bf16; sparsifiers and powersgd drop weights")


def plan_all_gather(codec: codecs.Codec, min_numel: int, pieces: list[Chunked], world: int, rank: int,
                    dtype: torch.dtype, device: torch.device) -> AGPlan:
    """The tables of one layout. Rank j's payload lists the blocks of row j, parameter by
    parameter, block by block; every rank builds every rank's list, so it can decode them all."""
    shard = sum(p.chunk for p in pieces)
    plan = AGPlan(world, rank, shard)
    quant = [p for p in pieces if quantizes(codec, min_numel, p, dtype)]
    exact = [p for p in pieces if p not in quant]
    if quant:
        _block_tables(plan, codec.block_size, quant, device)
    if exact:  # a cast codec casts every parameter, in the lane
        exact_lane(plan, pieces, exact, codec, dtype, device, cast_allowed=True)
    return plan


def _block_tables(plan: AGPlan, block: int, quant: list[Chunked], device: torch.device) -> None:
    """Every row's block rows (offset in its row, length, no residual, noise word), the
    encode table of this rank's row and the decode table of all rows, padded to one slot count."""
    world, shard = plan.world, plan.shard
    rows, pads = [], []
    for j in range(world):
        parts = []
        for p in quant:
            n = p.real[j]
            if p.chunk > n:
                pads.append(torch.arange(j * shard + p.offset + n, j * shard + p.offset + p.chunk, dtype=torch.int64))
            nb = -(-n // block)
            if nb == 0:
                continue
            b = torch.arange(nb, dtype=torch.int64)
            parts.append(torch.stack([p.offset + b * block, torch.clamp(n - b * block, max=block),
                                      torch.zeros(nb, dtype=torch.int64), noise_words(p.index, p.numel, b * block)],
                                     dim=1))
        rows.append(torch.cat(parts) if parts else torch.zeros(0, ROW_WORDS, dtype=torch.int64))
    slots = max(max(t.shape[0] for t in rows), 1)
    enc = torch.zeros(slots, ROW_WORDS, dtype=torch.int64)
    enc[: rows[plan.rank].shape[0]] = rows[plan.rank]
    dec = torch.zeros(world * slots, ROW_WORDS, dtype=torch.int64)
    for j, t in enumerate(rows):
        dec[j * slots : j * slots + t.shape[0], :2] = t[:, :2] + torch.tensor([j * shard, 0])
    plan.slots = slots
    plan.enc_table, plan.dec_table = to_device(enc, device), to_device(dec, device)
    if pads:
        plan.pad_index = to_device(torch.cat(pads), device)


class Pending:
    """A started gather: ``wait()`` waits for its collectives and decodes into the output
    (once); the output is not to be read before. ``codec_seconds``: the wall time of its
    encode and decode so far (CPU; 0 on CUDA, where timing would need a host sync)."""

    def __init__(self, works: list, finish, codec_seconds: float, timed: bool):
        self._works, self._finish = works, finish
        self.codec_seconds, self._timed = codec_seconds, timed

    def wait(self) -> None:
        works, self._works = self._works, []
        for work in works:
            work.wait()
        if self._finish is not None:
            finish, self._finish = self._finish, None
            started = time.perf_counter()
            finish()
            if self._timed:
                self.codec_seconds += time.perf_counter() - started


def start_all_gather(codec: codecs.Codec, plan: AGPlan, inp: torch.Tensor, out: torch.Tensor, group,
                     all_gather=None) -> tuple[Pending, float]:
    """Encodes ``inp`` ([S], this rank's row; any float dtype) and starts the gathers of the
    payload and the exact lane into ``out`` ([W · S], ``inp``'s dtype; ``inp`` may be a view
    of it). Returns (the pending gather, bytes this rank sends in a ring all-gather). Runs on
    the current stream with no host sync. ``all_gather(output, input)`` returns a handle to
    wait on; default: an all-gather into a tensor over ``group``."""
    if all_gather is None:
        def all_gather(output, input_):
            return all_gather_single(output, input_, group, async_op=True)
    works, steps, sent = [], [], 0
    world = plan.world
    started = time.perf_counter()
    if plan.enc_table is not None:
        payload = ops.quant_encode(inp, plan.enc_table, 1, plan.slots, codec.block_size, bits=codec.bits,
                                   check_bounds=False)
        gathered = torch.empty(world * payload.numel(), dtype=torch.uint8, device=inp.device)
        works.append(all_gather(gathered, payload))
        sent += (world - 1) * payload.numel()
        steps.append(lambda: ops.quant_decode(gathered, plan.dec_table, world, plan.slots, codec.block_size,
                                              out, bits=codec.bits, check_bounds=False))
    if plan.wire is not None:
        lane = inp if plan.all_exact else inp.index_select(0, plan.exact_cols)
        if plan.all_exact and plan.wire == inp.dtype:
            works.append(all_gather(out, inp))  # straight into the output: nothing to decode
        else:
            lane = lane.to(plan.wire)
            received = torch.empty(world * lane.numel(), dtype=plan.wire, device=inp.device)
            works.append(all_gather(received, lane))
            steps.append(lambda: _place_exact(plan, received, out))
        sent += (world - 1) * lane.numel() * lane.element_size()
    if plan.pad_index is not None:
        steps.append(lambda: out.index_fill_(0, plan.pad_index, 0))

    def finish():
        for step in steps:
            step()

    timed = inp.device.type == "cpu"
    return Pending(works, finish, time.perf_counter() - started if timed else 0.0, timed), float(sent)


def _place_exact(plan: AGPlan, received: torch.Tensor, out: torch.Tensor) -> None:
    """The exact lane's W rows into their columns of the output, in the output's dtype."""
    rows = received.view(plan.world, -1).to(out.dtype)
    if plan.all_exact:
        out.copy_(rows.view(-1))
    else:
        out.view(plan.world, plan.shard).index_copy_(1, plan.exact_cols, rows)


def count(stats: dict, sent: float, uncompressed: float) -> None:
    """Adds one gather to ``stats``: its bytes and the ratio over the reductions and gathers
    (its codec time is added once it is decoded)."""
    stats["all_gather_bytes_sent"] = stats.get("all_gather_bytes_sent", 0.0) + sent
    stats["all_gather_bytes_uncompressed"] = stats.get("all_gather_bytes_uncompressed", 0.0) + uncompressed
    update_total_ratio(stats)


def ring_bytes(inp: torch.Tensor, world: int) -> float:
    """Bytes one rank sends in a ring all-gather of ``inp`` from every rank."""
    return float((world - 1) * inp.numel() * inp.element_size())


