"""Compressed all-reduce algorithms over torch.distributed.

Each exchange is a generator of two steps: the first ``next()`` runs the encode pass and
issues the first collective, asynchronously; running it to the end waits for that, runs
the rest, and returns the result (``StopIteration.value``; ``run_to_end`` does both). The
Gloo worker starts bucket k+1 before it finishes bucket k, so one bucket's encode runs
while another's bytes are on the wire. Collectives are issued in a fixed order (docs/design.md,
"Collective order"): the callers make sure every rank starts and finishes the same buckets in the same order
(one FIFO worker per State on Gloo; the hook call itself, straight through, on NCCL).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .. import ops
from .layout import BlockTable, SparseTable

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_single(output: torch.Tensor, inp: torch.Tensor, group, async_op: bool = False):
    """Gather of equal-sized tensors into ``output``; on Gloo read ``output``, not the
    future's value (a list of chunks). With ``async_op`` returns the work handle."""
    return _all_gather_single(output, inp, group=group, async_op=async_op)


def run_to_end(exchange):
    """Runs an exchange generator (started or not) to its end; returns its result."""
    try:
        while True:
            next(exchange)
    except StopIteration as done:
        return done.value


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-built tensor on ``device`` without a host sync: a pageable host-to-device copy
    waits for the stream, a pinned one with non_blocking does not (torch's pinned allocator
    keeps the staging memory until the copy is done)."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def sum_rows(rows: torch.Tensor) -> torch.Tensor:
    """Row 0 + row 1 + ... in that order, in float32: a sum whose bits do not depend on the
    backend's reduction order."""
    total = rows[0].to(torch.float32, copy=True)
    for i in range(1, rows.shape[0]):
        total += rows[i]
    return total


def ring_allreduce_bytes(nbytes: int, world: int) -> float:
    """Bytes one rank puts on the wire in a ring all-reduce of ``nbytes``."""
    return 2.0 * (world - 1) / world * nbytes if world > 1 else 0.0


def quantized_allreduce_(bucket: torch.Tensor, table: BlockTable, table_dev: torch.Tensor,
                         my_rows_dev: torch.Tensor, rank: int, group, bits: int = 8, *,
                         residual_dtype: torch.dtype = torch.float32, stochastic: bool = False, seed: int = 0,
                         step: int = 0):
    """Scatter-reduce / all-gather of ``bucket``'s compressed blocks, averaged over the
    group, written back into ``bucket`` in place (a generator: module docstring). Returns
    (bytes this rank sent, seconds
    spent in the codec passes — measured on CPU only, where they run synchronously; 0 on
    CUDA, where timing them would need a host sync). ``residual_dtype`` is the element type
    the table's residual addresses point to; ``stochastic``, ``seed`` and ``step`` choose the
    rounding (ops.py).

    1. encode with error feedback, each block into its owner's shard;
    2. ``all_to_all_single`` of the shards;
    3. decode the W shards of my slots, sum in rank order, average, re-encode;
    4. ``all_gather`` of the reduced slices; decode into the bucket.
    """
    world, slots, block = table.world, table.slots, table.block
    timed = bucket.device.type == "cpu"
    t0 = time.perf_counter()
    # the table came from layout.build_table: its bounds hold by construction
    rounding = {"residual_dtype": residual_dtype, "stochastic": stochastic, "seed": seed, "step": step,
                "rank": rank}
    send = ops.quant_encode(bucket, table_dev, world, slots, block, bits=bits, check_bounds=False, **rounding)
    codec_s = time.perf_counter() - t0
    recv = torch.empty_like(send)
    work = dist.all_to_all_single(recv, send, group=group, async_op=True)
    yield
    work.wait()
    t0 = time.perf_counter()
    reduced = ops.quant_reduce(recv, my_rows_dev, world, slots, block, bits=bits, check_bounds=False, **rounding)
    codec_s += time.perf_counter() - t0
    gathered = torch.empty_like(send)
    all_gather_single(gathered, reduced, group)
    t0 = time.perf_counter()
    ops.quant_decode(gathered, table_dev, world, slots, block, bucket, bits=bits, check_bounds=False)
    codec_s += time.perf_counter() - t0
    shard = table.shard_bytes(bits)
    return 2 * (world - 1) * shard, codec_s if timed else 0.0


def pipelined_quantized_allreduce_(bucket: torch.Tensor, chunks: list, rank: int, group, bits: int = 8, *,
                                   residual_dtype: torch.dtype = torch.float32, stochastic: bool = False,
                                   seed: int = 0, step: int = 0):
    """``quantized_allreduce_`` cut into chunks of whole blocks, pipelined: chunk c+1 is
    encoded and its all-to-all issued before chunk c is reduced and all-gathered, and chunk
    c-1 is decoded while chunk c's gather is on the wire, so the codec passes of one chunk
    overlap the bytes of another. ``chunks``: (BlockTable, its table on the device, my rows)
    each. A block's row is the same in any chunk, so the numbers are those of the whole
    bucket's exchange, except that a non-finite value makes its chunk NaN rather than the
    whole bucket. Collectives go a2a 0, a2a 1, gather 0, a2a 2, gather 1, ...: a function of
    the chunk count alone. Returns (bytes sent, codec seconds (CPU only))."""
    timed = bucket.device.type == "cpu"
    rounding = {"residual_dtype": residual_dtype, "stochastic": stochastic, "seed": seed, "step": step, "rank": rank}
    codec_s, sent = 0.0, 0

    def start(chunk):
        nonlocal codec_s
        table, table_dev, rows_dev = chunk
        t0 = time.perf_counter()
        send = ops.quant_encode(bucket, table_dev, table.world, table.slots, table.block, bits=bits,
                                check_bounds=False, **rounding)
        codec_s += time.perf_counter() - t0
        recv = torch.empty_like(send)
        return chunk, send, recv, dist.all_to_all_single(recv, send, group=group, async_op=True)

    def middle(started):
        nonlocal codec_s
        (table, table_dev, rows_dev), send, recv, work = started
        work.wait()
        t0 = time.perf_counter()
        reduced = ops.quant_reduce(recv, rows_dev, table.world, table.slots, table.block, bits=bits,
                                   check_bounds=False, **rounding)
        codec_s += time.perf_counter() - t0
        gathered = torch.empty_like(send)
        return started[0], gathered, all_gather_single(gathered, reduced, group, async_op=True)

    def finish(gathering):
        nonlocal codec_s, sent
        (table, table_dev, _), gathered, work = gathering
        work.wait()
        t0 = time.perf_counter()
        ops.quant_decode(gathered, table_dev, table.world, table.slots, table.block, bucket, bits=bits,
                         check_bounds=False)
        codec_s += time.perf_counter() - t0
        sent += 2 * (table.world - 1) * table.shard_bytes(bits)

    in_a2a = start(chunks[0])
    yield
    in_gather = None
    for chunk in chunks[1:]:
        following = start(chunk)
        gathering = middle(in_a2a)
        if in_gather is not None:
            finish(in_gather)
        in_a2a, in_gather = following, gathering
    gathering = middle(in_a2a)
    if in_gather is not None:
        finish(in_gather)
    finish(gathering)
    return sent, codec_s if timed else 0.0


def exact_mean_(values: torch.Tensor, world: int, group):
    """Averages ``values`` over the group in place, exactly and in rank order (a generator:
    module docstring): each rank divides by W (as torch's default hook does, so 16-bit sums do
    not overflow), an all-to-all gives rank j the j-th of W contiguous chunks from every rank,
    it sums them in rank order (in float32, or the values' dtype if wider), and an all-gather
    returns the sums. The bytes are
    a ring all-reduce's, but every element's sum is (x_0 + x_1) + ... in rank order whatever
    the buffer's size, where a ring all-reduce's order depends on where the element falls in
    the buffer: with three or more ranks its bits would change with DDP's bucket layout, and
    a resumed run would drift from the straight one. Returns the bytes this rank sent."""
    n = values.numel()
    if n == 0:
        return 0
    chunk = -(-n // world)
    send = torch.zeros(world * chunk, dtype=values.dtype, device=values.device)
    torch.div(values, world, out=send[:n])
    recv = torch.empty_like(send)
    work = dist.all_to_all_single(recv, send, group=group, async_op=True)
    yield
    work.wait()
    rows = recv.view(world, chunk)
    acc = rows[0].to(torch.promote_types(values.dtype, torch.float32), copy=True)  # float64 stays float64
    for j in range(1, world):
        acc += rows[j]
    gathered = torch.empty_like(send)
    all_gather_single(gathered, acc.to(values.dtype), group)
    values.copy_(gathered[:n])
    return 2 * (world - 1) * chunk * values.element_size()


def topk_allgather_(bucket: torch.Tensor, sparse: SparseTable, table_dev: torch.Tensor, group, world: int, *,
                    approx: bool = False, value_dtype: torch.dtype = torch.float32):
    """Top-k of each compressed parameter of ``bucket`` (error feedback through the table's
    residual addresses), all-gather of the fixed-size payloads, deterministic decode: the
    average, written back into ``bucket`` in place (a generator: module docstring). Returns (bytes this rank sent, codec
    seconds (CPU only), rejected index lists: an int on CPU, a device tensor on CUDA)."""
    timed = bucket.device.type == "cpu"
    t0 = time.perf_counter()
    payload = ops.topk_encode(bucket, table_dev, sparse.pairs, approx=approx, value_dtype=value_dtype,
                              check_bounds=False, tiles=sparse.tiles)
    codec_s = time.perf_counter() - t0
    gathered = torch.empty(world * payload.numel(), dtype=torch.uint8, device=bucket.device)
    work = all_gather_single(gathered, payload, group, async_op=True)
    yield
    work.wait()
    t0 = time.perf_counter()
    rejected = ops.topk_decode(gathered, table_dev, sparse.pairs, world, bucket, value_dtype=value_dtype,
                               check_bounds=False)
    codec_s += time.perf_counter() - t0
    return (world - 1) * payload.numel(), codec_s if timed else 0.0, rejected


def randomk_allreduce_(bucket: torch.Tensor, sparse: SparseTable, table_dev: torch.Tensor, group, world: int, *,
                       seed: int, step: int):
    """Random-k of each compressed parameter of ``bucket`` (the same indices on every rank),
    a summing all-reduce of the values, decode of the average into ``bucket`` in place (a
    generator: module docstring). Returns (bytes this rank sent, codec seconds (CPU only))."""
    timed = bucket.device.type == "cpu"
    t0 = time.perf_counter()
    payload = ops.randomk_encode(bucket, table_dev, sparse.pairs, seed=seed, step=step, check_bounds=False)
    codec_s = time.perf_counter() - t0
    work = dist.all_reduce(payload, group=group, async_op=True)
    yield
    work.wait()
    t0 = time.perf_counter()
    ops.randomk_decode(payload, table_dev, world, bucket, seed=seed, step=step, check_bounds=False)
    codec_s += time.perf_counter() - t0
    return ring_allreduce_bytes(payload.numel() * 4, world), codec_s if timed else 0.0
