"""One exchange a codec family: how a flat buffer's compressed parameters are planned and
reduced, flat or hierarchically (docs/design.md, "The pipeline").

A family's ``build`` returns its plan once per buffer layout; its ``run`` is a generator of two
steps, as in collectives.py: the first ``next()`` encodes and issues the first collective,
the end finishes and returns (bytes sent inside nodes, bytes sent across nodes, codec
seconds). Exact lanes (parameters below min_numel, dtypes the codec does not take) are the
engine's, not a family's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .. import codecs
from .collectives import (
    all_gather_single,
    pipelined_quantized_allreduce_,
    quantized_allreduce_,
    randomk_allreduce_,
    ring_allreduce_bytes,
    run_to_end,
    sum_rows,
    to_device,
    topk_allgather_,
)
from .family import Exchange, Span
from .layout import (
    BlockTable,
    SparseTable,
    build_sparse_table,
    build_table,
    chunked_tables,
    noise_words,
    table_of_blocks,
)
from .layout import Span as LayoutSpan
from .lowrank import LowRankExchange
from .topology import Topology


@dataclass
class Hier:
    """The intra-node stage of a hierarchical plan: the buffer's compressed elements, laid out
    as L chunks of ``chunk`` elements (chunk i: the blocks local rank i owns)."""

    pieces: list | None  # _Piece a (span, local rank); None: the buffer itself, cut in L contiguous chunks
    chunk: int
    lane: torch.dtype  # dtype of the intra-node lane (float32: exact)


@dataclass(frozen=True)
class _Piece:
    """The blocks of one span that one local rank owns: every L-th block from ``first``, at
    block places ``place``, ``place`` + 1, ... of that rank's chunk (``count`` whole blocks, then
    the span's partial last block if it is one of them: ``tail`` elements, else 0)."""

    local: int
    offset: int  # the span's offset in the buffer
    whole: int  # whole blocks in the span
    first: int
    count: int
    place: int
    tail: int
    tail_offset: int  # element offset of the partial block in the buffer


def _views(buf: torch.Tensor, flat: torch.Tensor, piece: _Piece, L: int, B: int, chunk: int):
    """(the piece's blocks in ``buf``, [count, B] strided; their places in ``flat``, [count, B];
    the partial block in ``buf``; its place in ``flat``) — blocks are copied as rows, no index."""
    rows = buf[piece.offset : piece.offset + piece.whole * B].view(piece.whole, B)[piece.first :: L]
    at = piece.local * chunk + piece.place * B
    slots = flat[at : at + piece.count * B].view(piece.count, B)
    tail = buf[piece.tail_offset : piece.tail_offset + piece.tail]
    at += piece.count * B
    return rows, slots, tail, flat[at : at + piece.tail]


def _intra_scatter(buf: torch.Tensor, hier: Hier, topo: Topology, block: int = 0):
    """Starts the exact (or 16-bit) reduce-scatter inside the node as an all-to-all: the caller
    sums the L rows it receives in local-rank order, so the sum is the same on every backend.
    Values are divided by L first (in float32), as torch's default hook does, so 16-bit sums do
    not overflow. Returns (work, received [L, chunk], bytes sent)."""
    L, chunk = topo.per_node, hier.chunk
    send = torch.zeros(L * chunk, dtype=hier.lane, device=buf.device)

    def put(src: torch.Tensor, dst: torch.Tensor) -> None:
        if src.dtype == torch.float32 and dst.dtype == torch.float32:
            torch.div(src, L, out=dst)
        else:
            dst.copy_(torch.div(src.float(), L))

    if hier.pieces is None:
        put(buf, send[: buf.numel()])
    else:
        for piece in hier.pieces:
            rows, slots, tail, tail_slot = _views(buf, send, piece, L, block, chunk)
            if piece.count:
                put(rows, slots)
            if piece.tail:
                put(tail, tail_slot)
    recv = torch.empty_like(send)
    work = dist.all_to_all_single(recv, send, group=topo.intra, async_op=True)
    return work, recv.view(L, chunk), (L - 1) * chunk * send.element_size()


def _intra_gather(buf: torch.Tensor, mine: torch.Tensor, hier: Hier, topo: Topology, block: int = 0) -> int:
    """All-gather of the node's reduced chunks, written back into the buffer; every rank of the
    node reads the same bytes (its own chunk included). Returns bytes sent."""
    part = mine.to(hier.lane)
    gathered = torch.empty(topo.per_node * hier.chunk, dtype=hier.lane, device=buf.device)
    all_gather_single(gathered, part, topo.intra)
    if hier.pieces is None:
        buf.copy_(gathered[: buf.numel()])
    else:
        for piece in hier.pieces:
            rows, slots, tail, tail_slot = _views(buf, gathered, piece, topo.per_node, block, hier.chunk)
            if piece.count:
                rows.copy_(slots)
            if piece.tail:
                tail.copy_(tail_slot)
    return (topo.per_node - 1) * part.numel() * part.element_size()


@dataclass
class CastPlan:
    """A cast codec's plan: the wire dtype, and the intra-node stage under hierarchy."""

    wire_dtype: torch.dtype
    hier: Hier | None = None


class CastExchange(Exchange):
    """Fp16 / Bf16: the buffer travels in the wire dtype, all-reduced natively."""

    def build(self, engine, spans, buf, topo):
        plan = CastPlan(engine.codec.wire_dtype)
        if topo.per_node > 1:
            plan.hier = Hier(None, -(-buf.numel() // topo.per_node), engine.intra_lane)
        return plan

    def run(self, engine, buf, plan, call):
        topo = call.topo
        if plan.hier is None:
            # divided in float32 and cast in one pass: partial sums of the W values x/W stay
            # within the largest |x|: no overflow while every rank's gradient fits the wire dtype
            wire = torch.empty_like(buf, dtype=plan.wire_dtype)
            torch.div(buf, topo.world, out=wire)
            work = dist.all_reduce(wire, group=call.group, async_op=True)
            yield
            work.wait()
            buf.copy_(wire)
            return 0, ring_allreduce_bytes(wire.numel() * wire.element_size(), topo.world), 0.0
        work, rows, intra = _intra_scatter(buf, plan.hier, topo)
        yield
        work.wait()
        wire = sum_rows(rows).div_(topo.nodes).to(plan.wire_dtype)
        dist.all_reduce(wire, group=topo.inter)
        inter = ring_allreduce_bytes(wire.numel() * wire.element_size(), topo.nodes)
        intra += _intra_gather(buf, wire.to(torch.float32), plan.hier, topo)
        return intra, inter, 0.0


@dataclass
class QuantPlan:
    """A quantizer's plan: its block table (on the host and the device, and this rank's rows of
    it), or pipelined chunks of it, and the intra-node stage under hierarchy."""

    table: BlockTable | None = None
    table_dev: torch.Tensor | None = None
    my_rows_dev: torch.Tensor | None = None
    hier: Hier | None = None
    chunks: list | None = None  # pipelined: (BlockTable, its device table, my rows) a chunk
    residuals: list = field(default_factory=list)  # the residual tensors whose addresses the tables hold


class QuantExchange(Exchange):
    """Int8 / Int4 / Int2 / Sign: scatter-reduce / all-gather of block-quantized shards."""

    def build(self, engine, spans, buf, topo):
        c, plan = engine.codec, QuantPlan()
        if topo.per_node == 1:
            layout = _layout_spans(engine, plan.residuals, spans, buf)
            chunk = engine.chunk_numel
            if chunk is not None and sum(s.numel for s in spans) > chunk:
                tables = chunked_tables(layout, c.block_size, topo.world, c.residual_dtype.itemsize, chunk)
                plan.chunks = []
                for t in tables:
                    t_dev = to_device(t.table, buf.device)
                    plan.chunks.append((t, t_dev, t_dev[topo.rank * t.slots : (topo.rank + 1) * t.slots]))
                return plan
            plan.table = build_table(layout, c.block_size, topo.world, c.residual_dtype.itemsize)
        else:
            self._build_hier(engine, plan, spans, buf, topo)
        plan.table_dev = to_device(plan.table.table, buf.device)
        rank = topo.rank if topo.per_node == 1 else topo.node
        plan.my_rows_dev = plan.table_dev[rank * plan.table.slots : (rank + 1) * plan.table.slots]
        return plan

    def _build_hier(self, engine, plan: QuantPlan, spans, buf, topo) -> None:
        """Block j of a parameter whose first block has model-wide index g belongs to local rank
        (g + j) mod L inside every node, and across nodes to node ((g + j) // L) mod N: a function
        of the block's place in the model alone (docs/design.md, "Hierarchy")."""
        c, B, L, N = engine.codec, engine.codec.block_size, topo.per_node, topo.nodes
        blocks = _blocks_of(spans, B, L, N)
        length, local, node, word, span = (blocks[k] for k in ("length", "local", "node", "word", "span"))
        order = torch.argsort(local, stable=True)  # chunk of local rank 0, then 1, ...: span order within
        counts = torch.bincount(local, minlength=L)
        chunk = int(counts.max()) * B
        starts = torch.cumsum(counts, 0) - counts
        place = torch.arange(order.numel(), dtype=torch.int64) - starts[local[order]]  # block's place in its chunk
        position = torch.empty_like(place)
        position[order] = local[order] * chunk + place * B  # chunk position of each block, in block order
        plan.hier = Hier(_pieces(spans, B, L), chunk, engine.intra_lane)
        # the inter-node table: my blocks, at their places in my chunk
        mine = local == topo.local
        my_offset = position[mine] - topo.local * chunk
        my_length, my_span = length[mine], span[mine]
        address = torch.zeros_like(my_offset)
        if c.error_feedback:
            itemsize = c.residual_dtype.itemsize
            for i, s in enumerate(spans):
                selected = (my_span == i).nonzero().reshape(-1)
                if selected.numel() == 0:
                    continue
                lengths = my_length[selected]
                r = engine.residual(s.key, int(lengths.sum()), buf.device)
                plan.residuals.append(r)
                address[selected] = r.data_ptr() + (torch.cumsum(lengths, 0) - lengths) * itemsize
        plan.table = table_of_blocks(my_offset, my_length, address, node[mine], word[mine], N, B,
                                     int(my_length.sum()))

    def run(self, engine, buf, plan, call):
        c, topo = engine.codec, call.topo
        rounding = {"residual_dtype": c.residual_dtype, "stochastic": c.stochastic, "seed": engine.seed or 0,
                    "step": call.step}
        if plan.chunks is not None:
            sent, codec_s = yield from pipelined_quantized_allreduce_(buf, plan.chunks, topo.rank, call.group, c.bits,
                                                                      **rounding)
            return 0, sent, codec_s
        if plan.hier is None:
            sent, codec_s = yield from quantized_allreduce_(buf, plan.table, plan.table_dev, plan.my_rows_dev,
                                                            topo.rank, call.group, c.bits, **rounding)
            return 0, sent, codec_s
        t0 = time.perf_counter()
        work, rows, intra = _intra_scatter(buf, plan.hier, topo, c.block_size)
        codec_s = time.perf_counter() - t0
        yield
        work.wait()
        t0 = time.perf_counter()
        mine = sum_rows(rows)
        codec_s += time.perf_counter() - t0
        sent, quant_s = run_to_end(quantized_allreduce_(mine, plan.table, plan.table_dev, plan.my_rows_dev, topo.node,
                                                     topo.inter, c.bits, **rounding))
        t0 = time.perf_counter()
        intra += _intra_gather(buf, mine, plan.hier, topo, c.block_size)
        codec_s += time.perf_counter() - t0
        return intra, sent, (codec_s if buf.device.type == "cpu" else 0.0) + quant_s


@dataclass
class SparsePlan:
    """A sparsifier's plan: its payload table (host and device)."""

    sparse: SparseTable
    table_dev: torch.Tensor
    residuals: list  # the residual tensors whose addresses the table holds


class TopKExchange(Exchange):
    """Top-k per parameter: fixed-size (index, value) payloads all-gathered, decoded rank by rank."""

    flat_because = "its payloads are chosen per whole tensor"

    def build(self, engine, spans, buf, topo):
        residuals: list = []
        sparse = build_sparse_table(_layout_spans(engine, residuals, spans, buf), engine.codec.ratio)
        return SparsePlan(sparse, to_device(sparse.table, buf.device), residuals)

    def run(self, engine, buf, plan, call):
        c, world = engine.codec, call.topo.world
        sent, codec_s, rejected = yield from topk_allgather_(buf, plan.sparse, plan.table_dev, call.group, world,
                                                             approx=c.approx, value_dtype=c.value_dtype)
        engine.watch_rejections(rejected, call.what)
        engine.compare_with_int8(sent, plan.sparse.numel, world, call.what)
        return 0, sent, codec_s


class RandomKExchange(TopKExchange):
    """Random-k per parameter: the same indices on every rank, so the values are all-reduced."""

    def run(self, engine, buf, plan, call):
        sent, codec_s = yield from randomk_allreduce_(buf, plan.sparse, plan.table_dev, call.group, call.topo.world,
                                                      seed=engine.seed or 0, step=call.step)
        return 0, sent, codec_s


def _blocks_of(spans: list[Span], B: int, L: int, N: int) -> dict:
    """Every block of ``spans``, in span then block order: its length, its owner (local rank
    inside the node, node across nodes), its noise word and its span's index."""
    columns: dict = {k: [] for k in ("length", "local", "node", "word", "span")}
    for i, s in enumerate(spans):
        count = -(-s.numel // B)
        j = torch.arange(count, dtype=torch.int64)
        model_block = s.first_block + j
        columns["length"].append(torch.clamp(s.numel - j * B, max=B))
        columns["local"].append(model_block % L)
        columns["node"].append((model_block // L) % N)
        columns["word"].append(noise_words(s.ordinal, s.numel, j * B))
        columns["span"].append(torch.full((count,), i, dtype=torch.int64))
    return {k: torch.cat(v) for k, v in columns.items()}


def _pieces(spans: list[Span], B: int, L: int) -> list[_Piece]:
    """The (span, local rank) pieces of a hierarchical layout: local rank l owns the blocks j of
    a span with (first_block + j) mod L == l, every L-th from j0 = (l - first_block) mod L, and
    lays them out in span order, then j order (the order ``_build_hier``'s table assumes)."""
    out, place = [], [0] * L
    for s in spans:
        whole, tail = s.numel // B, s.numel % B
        nb = whole + (tail > 0)
        for local in range(L):
            j0 = (local - s.first_block) % L
            count = max(0, -(-(whole - j0) // L))
            has_tail = tail > 0 and (nb - 1 - j0) % L == 0 and nb - 1 >= j0
            if count or has_tail:
                out.append(_Piece(local, s.offset, whole, j0, count, place[local], tail if has_tail else 0,
                                  s.offset + whole * B))
                place[local] += count + has_tail
    return out


def _layout_spans(engine, residuals: list, spans, buf) -> list[LayoutSpan]:
    """The spans as layout.py takes them: each with its residual's address (made here and kept
    alive in ``residuals``, the plan's), 0 without error feedback."""
    out = []
    for s in spans:
        addr = 0
        if engine.codec.error_feedback:
            residuals.append(engine.residual(s.key, s.numel, buf.device))
            addr = residuals[-1].data_ptr()
        out.append(LayoutSpan(s.offset, s.numel, s.first_block, addr, s.ordinal))
    return out


_FAMILIES = {codecs.Cast: CastExchange(), codecs.BlockQuantizer: QuantExchange(), codecs.TopK: TopKExchange(),
             codecs.RandomK: RandomKExchange(), codecs.PowerSGD: LowRankExchange()}


def hierarchy_refusal(codec: codecs.Codec) -> str | None:
    """Why ``codec`` cannot run hierarchically (ranks_per_node > 1), as a message; None if it can."""
    why = family_of(codec).flat_because
    if why is None:
        return None
    return (f"gradcomp: {codec.name} does not run hierarchically (ranks_per_node > 1): {why}; use a quantizer "
            "(int8, int4, int2, sign) or fp16/bf16 node by node, or the flat exchange")


def family_of(codec: codecs.Codec) -> Exchange:
    """The exchange of ``codec``'s family (its nearest base class with one)."""
    for cls in type(codec).__mro__:
        if cls in _FAMILIES:
            return _FAMILIES[cls]
    raise TypeError(f"gradcomp: no exchange for codec {codec!r}")
