"""The engine: keys, plans, the residual store, the exchanges and their statistics.

It takes flat buffers whose pieces are named by caller-supplied stable keys (a parameter's
ordinal, a list position, a name), a process group and a codec; it knows no DDP. Every
decision is made per key, never per buffer (docs/design.md, "Per-parameter decisions"):
whether a key is compressed depends on its own size and dtype, its blocks are numbered
model-wide in the order keys are first seen, and its residual is its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import codecs
from .collectives import all_gather_single, exact_mean_, ring_allreduce_bytes, run_to_end, to_device
from .exchanges import family_of, hierarchy_refusal
from .family import Plan, Span
from .layout import num_blocks
from .store import ResidualStore, describe_key
from .topology import Topology

logger = logging.getLogger("gradcomp")

INTRA_LANES = {"exact": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class GradcompError(RuntimeError):
    """A gradcomp reduction failed; the message names the buffer and the cause."""


def new_stats() -> dict:
    return {
        "steps": 0,
        "buckets_compressed": 0,
        "buckets_fallback": 0,
        "params_compressed": 0,
        "params_fallback": 0,
        "bytes_sent": 0.0,
        "bytes_sent_intra_node": 0.0,
        "bytes_sent_inter_node": 0.0,
        "bytes_uncompressed": 0.0,
        "ratio": 1.0,
        "codec_seconds": 0.0,
        "payloads_rejected": 0,
        "buckets_sparse_over_int8": 0,
    }


@dataclass
class Call:
    """One reduction: over ``group`` (``topo`` says where this rank sits in it), at ``step``
    (keys stochastic rounding's and random-k's draws); ``what`` names it in logs and errors;
    ``compress`` False reduces everything exactly (warm-up)."""

    group: object
    topo: Topology
    step: int
    what: str
    compress: bool


@dataclass
class _Key:
    ordinal: int
    numel: int
    dtype: torch.dtype
    first_block: int | None  # model-wide index of its first block; None: reduced exactly
    shape: tuple | None = None  # the tensor's shape where the front end gives it (low-rank codecs need it)


class Engine:
    """Compression of flat buffers of keyed pieces with one codec.

    Args:
        codec: a Codec.
        min_numel: pieces with fewer elements are reduced exactly.
        seed: the seed of the random draws (None until the ranks agree on one).
        intra_node: the lane inside a node under hierarchy: "exact" (float32), "fp16", "bf16".
        chunk_numel: cut a quantizer's flat exchange into chunks of about this many elements
            (whole blocks), pipelined; None: one exchange a buffer.
    """

    def __init__(self, codec: codecs.Codec, *, min_numel: int, seed: int | None, intra_node: str = "exact",
                 chunk_numel: int | None = None):
        if intra_node not in INTRA_LANES:
            raise ValueError(f"gradcomp: intra_node must be one of {', '.join(INTRA_LANES)}, got {intra_node!r}")
        if chunk_numel is not None and (isinstance(chunk_numel, bool) or not isinstance(chunk_numel, int)
                                        or chunk_numel < 1):
            raise ValueError(f"gradcomp: chunk_numel must be None or a positive int, got {chunk_numel!r}")
        self.chunk_numel = chunk_numel
        self.codec = codec
        self.family = family_of(codec)
        self.min_numel = min_numel
        self.seed = seed
        self.intra_node = intra_node
        self.intra_lane = INTRA_LANES[intra_node]
        self.store = ResidualStore()
        self.factors = ResidualStore()  # low-rank codecs: each key's warm-started Q, the same on every rank
        self.stats = new_stats()
        self.reset_runtime()

    def reset_runtime(self) -> None:
        """Forgets what a fresh process would not know: keys, plans, pending checks."""
        self._keys: dict = {}  # key -> _Key, in first-seen order
        self._next_block = 0
        self._plans: dict = {}
        self._pending_checks: list = []  # CUDA: (event, pinned host count, what) of top-k decodes
        self._warned_over_int8 = False
        self._logged_fallback = False

    def config(self) -> dict:
        return {**self.codec.config(), "min_numel": self.min_numel, "intra_node": self.intra_node,
                "chunk_numel": self.chunk_numel}

    # ------------------------------------------------------------------ keys
    def ordinals(self, entries) -> tuple[int, ...]:
        """Ordinals of (key, numel, dtype) or (key, numel, dtype, shape) entries, numbering new
        keys in the order given (which must be the same on every rank). A known key must keep
        its size and dtype. Without a shape a key is a vector to a low-rank codec (exact)."""
        out = []
        for key, numel, dtype, *shape in entries:
            k = self._keys.get(key)
            if k is None:
                shape = tuple(int(d) for d in shape[0]) if shape and shape[0] is not None else None
                k = self._keys[key] = _Key(len(self._keys), numel, dtype, None, shape)
                if self._compressible(numel, dtype, shape):
                    k.first_block = self._next_block
                    if isinstance(self.codec, codecs.BlockQuantizer):
                        self._next_block += num_blocks(numel, self.codec.block_size)
            elif k.numel != numel or k.dtype != dtype:
                raise ValueError(f"gradcomp: {describe_key(key)} had {k.numel} elements of "
                                 f"{str(k.dtype).replace('torch.', '')} when first reduced, now {numel} of "
                                 f"{str(dtype).replace('torch.', '')}: a key's tensor must keep its size and dtype")
            elif shape and shape[0] is not None and k.shape is not None and tuple(shape[0]) != k.shape:
                raise ValueError(f"gradcomp: {describe_key(key)} had shape {list(k.shape)} when first reduced, now "
                                 f"{list(shape[0])}: a key's tensor must keep its shape")
            out.append(k.ordinal)
        return tuple(out)

    def keys(self) -> list:
        return list(self._keys)

    def _compressible(self, numel: int, dtype: torch.dtype, shape: tuple | None = None) -> bool:
        if isinstance(self.codec, codecs.Cast):
            return False  # a Cast codec casts whole buffers of the dtypes it takes
        if isinstance(self.codec, codecs.PowerSGD) and self.codec.matrix(shape) is None:
            return False  # vectors, and matrices whose factors would not be smaller
        return numel >= self.min_numel and dtype in self.codec.dtypes

    def shape_of(self, key) -> tuple | None:
        return self._keys[key].shape

    def first_block(self, key) -> int | None:
        """The model-wide index of ``key``'s first block; None when it is reduced exactly."""
        return self._keys[key].first_block

    def residual(self, key, numel: int, device: torch.device) -> torch.Tensor:
        return self.store.get(key, numel, device, self.codec.residual_dtype)

    # ------------------------------------------------------------------ plans
    def cached(self, key, build):
        """The plan cached under ``key`` (any hashable naming a layout), or ``build()``'s, kept:
        plans hold residual addresses, so one built before the residual store last changed is
        built again."""
        cached = self._plans.get(key)
        if cached is None or cached[0] != self.store.version:
            plan = build()  # may move residuals loaded from a checkpoint: the version after it counts
            cached = self._plans[key] = (self.store.version, plan)
        return cached[1]

    def plan(self, ordinals: tuple[int, ...], buf: torch.Tensor, topo: Topology, what: str) -> Plan:
        """How ``buf``, the pieces of ``ordinals`` one after another, is reduced (cached per layout)."""
        key = (ordinals, buf.dtype, buf.device, topo.world, topo.per_node, topo.rank)
        return self.cached(key, lambda: self._build_plan(ordinals, buf, topo, what))

    def _build_plan(self, ordinals: tuple[int, ...], buf: torch.Tensor, topo: Topology, what: str) -> Plan:
        by_ordinal = list(self._keys.items())
        spans, fallback, offset = [], [], 0
        for o in ordinals:
            key, k = by_ordinal[o]
            if k.first_block is not None:
                spans.append(Span(offset, k.numel, k.first_block, o, key))
            elif k.numel:
                fallback.append(torch.arange(offset, offset + k.numel, dtype=torch.int64))
            offset += k.numel
        if offset != buf.numel():
            raise GradcompError(f"gradcomp: {what} holds {buf.numel()} elements but its pieces {offset}")
        if topo.per_node > 1 and hierarchy_refusal(self.codec):  # ranks_per_node="auto" resolved to L > 1
            raise GradcompError(hierarchy_refusal(self.codec))
        one_node = topo.per_node > 1 and topo.nodes == 1
        if isinstance(self.codec, codecs.Cast):
            cast = buf.dtype in self.codec.dtypes and not one_node
            plan = Plan(self.family if cast else None, None, len(ordinals) if cast else 0,
                        0 if cast else len(ordinals))
            if cast:
                plan.detail = self.family.build(self, [], buf, topo)
        elif not spans or one_node:  # nothing compressed, or one node: nothing crosses a slow link
            plan = Plan(None, None, 0, len(ordinals))
        else:
            fallback_index = to_device(torch.cat(fallback), buf.device) if fallback else None
            plan = Plan(self.family, fallback_index, len(spans), len(ordinals) - len(spans))
            plan.detail = self.family.build(self, spans, buf, topo)
        if plan.params_fallback:
            self._log_fallback(plan.params_fallback, buf.numel() - sum(s.numel for s in spans), what)
        return plan

    # ------------------------------------------------------------------ the reduction
    def exchange(self, buf: torch.Tensor, ordinals: tuple[int, ...], call: Call):
        """Averages ``buf`` over the group in place (a generator of two steps, as in
        collectives.py: the first ``next()`` encodes and issues the first collectives; the end
        waits for them, finishes, and returns ``buf``). Every rank issues the same collectives
        in the same order."""
        es, s, topo = buf.element_size(), self.stats, call.topo
        if topo.world == 1 and not call.compress:  # nothing to average, nothing forced: no collective
            s["buckets_fallback"] += 1
            return buf
        s["bytes_uncompressed"] += ring_allreduce_bytes(buf.numel() * es, topo.world)
        plan = self.plan(ordinals, buf, topo, call.what) if call.compress else None
        if plan is None or plan.family is None:
            self._count_exact((yield from exact_mean_(buf, topo.world, call.group)), topo)
            s["buckets_fallback"] += 1
            if plan is not None:
                s["params_fallback"] += plan.params_fallback
        else:
            lane = exact_values = None
            if plan.fallback_index is not None:  # exact lane first: the same order on every rank
                exact_values = buf.index_select(0, plan.fallback_index)
                lane = exact_mean_(exact_values, topo.world, call.group)
                next(lane)  # not empty: the lane's all-to-all is in flight
            intra, inter, codec_s = yield from plan.family.run(self, buf, plan.detail, call)
            self._count(intra, inter, topo)
            s["codec_seconds"] += codec_s
            if lane is not None:
                self._count_exact(run_to_end(lane), topo)
                buf.index_copy_(0, plan.fallback_index, exact_values)
            s["buckets_compressed"] += 1
            s["params_compressed"] += plan.params_compressed
            s["params_fallback"] += plan.params_fallback
        s["ratio"] = s["bytes_uncompressed"] / s["bytes_sent"] if s["bytes_sent"] else 1.0
        return buf

    def _count(self, intra: float, inter: float, topo: Topology) -> None:
        s = self.stats
        s["bytes_sent"] += intra + inter
        if topo.known:  # without ranks_per_node the engine cannot tell which bytes cross nodes
            s["bytes_sent_intra_node"] += intra
            s["bytes_sent_inter_node"] += inter

    def _count_exact(self, sent: float, topo: Topology) -> None:
        """A plain all-reduce over the whole group: inside the node when there is one node,
        otherwise counted as crossing nodes (an upper bound: some of a ring's hops stay inside)."""
        self._count(sent, 0.0, topo) if topo.nodes == 1 else self._count(0.0, sent, topo)

    # ------------------------------------------------------------------ top-k's checks
    def compare_with_int8(self, sent: float, numel: int, world: int, what: str) -> None:
        """Counts (and warns once about) top-k payloads dearer than the dense int8 exchange of
        the same values (1 byte a value plus a 4-byte scale per 256, in a scatter-reduce /
        all-gather)."""
        int8 = ring_allreduce_bytes(numel * (1 + 4 / 256), world)
        if sent > int8:
            self.stats["buckets_sparse_over_int8"] += 1
            if not self._warned_over_int8:
                self._warned_over_int8 = True
                logger.warning("gradcomp: %s: top-k sent %d bytes where int8 would send about %d (world %d): "
                               "lower the ratio or use int8", what, sent, int8, world)

    def watch_rejections(self, rejected, what: str) -> None:
        """Counts corrupted payloads a top-k decode rejected: now on CPU; on CUDA once the
        decode has finished (a pinned copy and an event polled at later calls: no sync)."""
        if isinstance(rejected, int):
            self._count_rejected(rejected, what)
            return
        host = torch.empty(1, dtype=torch.int32, pin_memory=True)
        host.copy_(rejected, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._pending_checks.append((done, host, what))

    def poll_rejections(self) -> None:
        pending, self._pending_checks = self._pending_checks, []
        for done, host, what in pending:
            if done.query():
                self._count_rejected(int(host[0]), what)
            else:
                self._pending_checks.append((done, host, what))

    def _count_rejected(self, rejected: int, what: str) -> None:
        if rejected:
            self.stats["payloads_rejected"] += rejected
            logger.error("gradcomp: %s: %d top-k index lists from peers were out of range or not increasing; "
                         "the compressed values were set to NaN on every rank", what, rejected)

    def _log_fallback(self, params: int, elements: int, what: str) -> None:
        if not self._logged_fallback:  # once: every step would repeat it
            self._logged_fallback = True
            logger.info("gradcomp: %d parameters (%d elements) of %s are reduced exactly, uncompressed: fewer than "
                        "min_numel=%d elements or a dtype %s does not take (State.stats counts them all)", params,
                        elements, what, self.min_numel, self.codec)


def hash56(blob: bytes) -> int:
    """56 bits of SHA-256: fits an int64 tensor for the first call's all-gather."""
    return int.from_bytes(hashlib.sha256(blob).digest()[:7], "little")


def config_hash(config: dict) -> int:
    return hash56(json.dumps(config, sort_keys=True).encode())


def agree(group, device: torch.device, config: dict, seed: int | None, extra: tuple[int, ...] = (),
          what: str = "the State configuration") -> tuple[int, list[list[int]]]:
    """At the first call: every rank must run the same configuration; returns rank 0's seed
    (its own, or one it drew) and every rank's ``extra`` integers, [[...] per rank]. ``what``
    names the configuration in the error."""
    world = dist.get_world_size(group)
    proposal = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    mine = torch.tensor([config_hash(config), proposal, *extra], dtype=torch.int64, device=device)
    every = torch.empty(world * mine.numel(), dtype=torch.int64, device=device)
    all_gather_single(every, mine, group)
    rows = every.view(world, -1).tolist()  # a one-time sync, allowed at the first call
    hashes = [r[0] for r in rows]
    if len(set(hashes)) != 1:
        differ = [r for r, h in enumerate(hashes) if h != hashes[0]]
        raise GradcompError(f"gradcomp: ranks disagree on {what} (ranks {differ} differ from rank 0); "
                            f"this rank runs {config}")
    return rows[0][1], [r[2:] for r in rows]
