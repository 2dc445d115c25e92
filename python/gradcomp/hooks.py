"""State + comm_hook + register(): the DistributedDataParallel integration.

    state = gradcomp.register(ddp_model, "int8")
    # or, torch style (also what Lightning's DDPStrategy takes):
    ddp_model.register_comm_hook(gradcomp.State(codec="int8"), gradcomp.comm_hook)

Collective order (DESIGN rule 7). On Gloo every collective of a State goes through one
first-in-first-out worker thread on a private Gloo group; it starts bucket k before it
finishes bucket k-1 (``_GlooWorker``), an order that depends only on the bucket sequence,
so it is the same on every rank. On NCCL each bucket's pipeline is issued from the hook
call itself (DDP calls hooks in bucket order on one thread) on a side stream of the State, and the
returned future is completed on that stream: the autograd stream is never blocked and the
host never waits for the device.
"""

import atexit
import hashlib
import json
import logging
import os
import queue
import threading
import weakref
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from . import _C, codecs
from .collectives import (
    all_gather_single,
    quantized_allreduce_,
    randomk_allreduce_,
    ring_allreduce_bytes,
    run_to_end,
    start_exact_allreduce,
    topk_allgather_,
)
from .layout import BlockTable, Span, SparseTable, build_sparse_table, build_table, num_blocks

__all__ = ["State", "comm_hook", "register", "GradcompError"]

logger = logging.getLogger("gradcomp")

DEFAULT_MIN_NUMEL = 1024
DEFAULT_TIMEOUT = timedelta(minutes=5)
_STATE_DICT_FORMAT = "gradcomp.State/1"


class GradcompError(RuntimeError):
    """A gradcomp hook failed; the message names the bucket and the cause."""


@dataclass
class _Plan:
    """How one bucket layout is reduced: its compressed blocks and its exact lane."""

    table: BlockTable | None  # None when nothing in the bucket is compressed
    table_dev: torch.Tensor | None
    my_rows_dev: torch.Tensor | None
    fallback_index: torch.Tensor | None  # element indices reduced exactly, None when none
    params_compressed: int
    params_fallback: int
    residuals: list  # the residual tensors whose addresses the table holds: kept alive with it
    cast_dtype: torch.dtype | None = None  # Cast codecs: the whole bucket travels in this dtype
    sparse: SparseTable | None = None  # TopK / RandomK: the rows of the compressed parameters


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-built tensor on ``device`` without a host sync: a pageable host-to-device copy
    waits for the stream, a pinned one with non_blocking does not (torch's pinned allocator
    keeps the staging memory until the copy is done)."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _new_stats() -> dict:
    return {
        "steps": 0,
        "buckets_compressed": 0,
        "buckets_fallback": 0,
        "params_compressed": 0,
        "params_fallback": 0,
        "bytes_sent": 0.0,
        "bytes_uncompressed": 0.0,
        "ratio": 1.0,
        "codec_seconds": 0.0,
        "payloads_rejected": 0,
        "buckets_sparse_over_int8": 0,
    }


class State:
    """The hook's state: codec, process group, per-parameter error feedback and statistics.

    Args:
        codec: a spec such as ``"int8"`` or ``"int8:block=512"``, or a Codec object.
        process_group: the group to reduce over; None means the default group. Building a
            State is never collective: it can be made, and pickled, before
            ``init_process_group``.
        min_numel: parameters with fewer elements are reduced exactly (plain averaged
            all-reduce), as are parameters of a dtype the codec does not take.
        start_step: the first ``start_step`` steps run a plain all-reduce.
        force_compression: compress even at world size 1 (by default nothing is compressed
            there: there is nothing to send). For tests, e.g. NCCL on a one-GPU machine.
        timeout: timeout of the private Gloo group (how long a rank waits for a peer).
        seed: the seed of stochastic rounding's draws, an int in [0, 2**63). None (default):
            rank 0 draws one at the first hook call and every rank adopts it. Either way
            ``state.seed`` then holds it, and a pickled State carries it, so a resumed run
            draws the same numbers. A seed given explicitly must be the same on every rank.

    ``stats`` counts steps, buckets and parameters compressed or reduced exactly, the bytes
    this rank put on the wire (ring accounting: 2(W-1)/W of a plain all-reduce's buffer,
    2(W-1) shards for the compressed exchange), the bytes a plain all-reduce of the same
    buckets would have sent, their ratio, and the seconds spent in the codec's passes (CPU).
    For TopK it also counts ``buckets_sparse_over_int8``, the buckets whose sparse payloads
    cost more bytes than the dense int8 exchange would (W · k large: lower the ratio or use
    int8), and ``payloads_rejected``, index lists received from a peer that were not
    strictly increasing within their parameter (the bucket was made NaN on every rank
    instead of writing through them; on CUDA counted a few steps late, without a sync).
    """

    __slots__ = (
        "codec", "process_group", "min_numel", "start_step", "force_compression", "timeout", "seed",
        "step", "stats", "_residuals", "_ordinal_of", "_pinned_params", "_first_block", "_next_block",
        "_plans", "_worker", "_private_group", "_checked", "_side_streams", "_logged", "_pending_checks",
        "_warned_over_int8", "_saved_by", "_logged_fallback",
    )

    def __init__(self, codec="int8", process_group=None, *, min_numel: int = DEFAULT_MIN_NUMEL,
                 start_step: int = 0, force_compression: bool = False,
                 timeout: timedelta = DEFAULT_TIMEOUT, seed: int | None = None):
        self.codec = codecs.parse(codec)
        if not isinstance(min_numel, int) or min_numel < 1:
            raise ValueError(f"gradcomp: min_numel must be a positive int, got {min_numel!r}")
        if not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"gradcomp: start_step must be a non-negative int, got {start_step!r}")
        if not isinstance(timeout, timedelta) or timeout.total_seconds() <= 0:
            raise ValueError(f"gradcomp: timeout must be a positive datetime.timedelta, got {timeout!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 63):
            raise ValueError(f"gradcomp: seed must be None or an int in [0, 2**63), got {seed!r}")
        self.seed = seed
        self.process_group = process_group
        self.min_numel = min_numel
        self.start_step = start_step
        self.force_compression = bool(force_compression)
        self.timeout = timeout
        self.step = 0
        self.stats = _new_stats()
        self._residuals: dict[int, torch.Tensor] = {}  # parameter ordinal -> residual (codec's residual_dtype)
        # (rank, world size, on_world_change) of a state_dict loaded before the process group was up
        self._saved_by: tuple | None = None
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._ordinal_of: dict[int, int] = {}  # id(parameter) -> ordinal (model-wide, first seen)
        self._pinned_params: list = []  # keeps those ids valid
        self._first_block: dict[int, int] = {}  # ordinal -> model-wide index of its first block
        self._next_block = 0
        self._plans: dict = {}
        self._worker = None
        self._private_group = None
        self._checked = False
        self._side_streams: dict = {}
        self._logged = False
        self._pending_checks: list = []  # CUDA: (event, pinned host count, bucket) of top-k decodes
        self._warned_over_int8 = False
        self._logged_fallback = False

    # ------------------------------------------------------------------ pickling
    def __getstate__(self):
        # The process group, threads, streams and cached tables stay behind (as PyTorch's
        # PowerSGDState drops its group); residuals travel, keyed by parameter ordinal.
        return {
            "codec": self.codec, "min_numel": self.min_numel, "start_step": self.start_step,
            "force_compression": self.force_compression, "timeout": self.timeout, "seed": self.seed,
            "step": self.step,
            "stats": dict(self.stats), "residuals": dict(self._residuals), "saved_by": self._saved_by,
        }

    def __setstate__(self, d):
        self.codec = d["codec"]
        self.process_group = None
        self.min_numel = d["min_numel"]
        self.start_step = d["start_step"]
        self.force_compression = d["force_compression"]
        self.timeout = d["timeout"]
        self.seed = d.get("seed")
        self.step = d["step"]
        self.stats = {**_new_stats(), **d["stats"]}
        self._residuals = d["residuals"]
        self._saved_by = d.get("saved_by")
        self._init_runtime()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """This rank's hook state for a checkpoint: tensors and plain types only, so
        ``torch.load(path, weights_only=True)`` reads it back.

        Holds the step counter, the seed (the draws of stochastic rounding and random-k are
        keyed by seed and step), the statistics, this rank's own error-feedback residuals
        (keyed by parameter ordinal; not copied, as ``Module.state_dict`` does not copy), and
        for checking at load time the rank, the world size and the configuration. Every rank
        saves its own: residuals are local to their rank, so one rank's file is not another's.
        """
        rank = world = None
        if dist.is_available() and dist.is_initialized():
            world, rank = self._world_rank()
        return {
            "format": _STATE_DICT_FORMAT, "rank": rank, "world_size": world, "config": self.config(),
            "step": self.step, "seed": self.seed, "stats": dict(self.stats),
            "residuals": {o: r.detach() for o, r in sorted(self._residuals.items())},
        }

    def load_state_dict(self, state_dict: dict, *, on_world_change: str = "error") -> None:
        """Restores what :meth:`state_dict` saved on this rank, for a bit-identical resume.

        The configuration (codec, min_numel, start_step, force_compression) must be the one
        saved; a seed given to this State must equal the saved one (None adopts it). The rank
        and world size must match too: checked here when the process group is up, otherwise
        at the first hook call.

        on_world_change: what to do when the checkpoint comes from another world size.
            ``"error"`` (default) raises. ``"reset"`` keeps the step, seed and statistics but
            starts the residuals from zero: a residual holds what this rank's compression has
            not sent yet (and, for the quantizers, the re-encoding error of the slice this rank
            reduced, whose owner depends on the world size), so it has no meaning on another
            rank layout. Dropping them loses about one step's compression error, once.
        """
        if on_world_change not in ("error", "reset"):
            raise ValueError(f"gradcomp: on_world_change must be 'error' or 'reset', got {on_world_change!r}")
        if not isinstance(state_dict, dict) or state_dict.get("format") != _STATE_DICT_FORMAT:
            raise ValueError("gradcomp: not a gradcomp State state_dict (its 'format' entry is missing or "
                             f"not {_STATE_DICT_FORMAT!r})")
        saved_cfg, mine = dict(state_dict["config"]), self.config()
        saved_cfg.pop("seed", None)
        mine.pop("seed")
        if saved_cfg != mine:
            differ = sorted(k for k in saved_cfg.keys() | mine.keys() if saved_cfg.get(k) != mine.get(k))
            raise ValueError("gradcomp: this checkpoint was saved with another hook configuration: "
                             + ", ".join(f"{k}: saved {saved_cfg.get(k)!r}, here {mine.get(k)!r}" for k in differ))
        seed = state_dict["seed"]
        if self.seed is not None and seed is not None and seed != self.seed:
            raise ValueError(f"gradcomp: this checkpoint was saved with seed {seed}, this State has seed {self.seed}")
        residuals = state_dict["residuals"]
        for o, r in residuals.items():
            if not isinstance(o, int) or not isinstance(r, torch.Tensor) or r.dim() != 1:
                raise ValueError(f"gradcomp: residual entry {o!r} is not a parameter ordinal and a 1-D tensor")
        saved_by = (state_dict["rank"], state_dict["world_size"], on_world_change)
        group_up = dist.is_available() and dist.is_initialized()
        # checked now when it can be (before anything changes), else at the first hook call
        drop = saved_by[1] is not None and group_up and self._check_saved_by(saved_by)
        self._saved_by = saved_by if saved_by[1] is not None and not group_up else None
        self.seed = self.seed if seed is None else seed
        self.step = int(state_dict["step"])
        self.stats = {**_new_stats(), **state_dict["stats"]}
        self._residuals = {} if drop else {o: r.detach().clone() for o, r in residuals.items()}
        self._plans.clear()  # cached tables hold the old residuals' addresses

    def _check_saved_by(self, saved_by: tuple) -> bool:
        """Checks a loaded state_dict's (rank, world size, on_world_change) against the group;
        returns whether the residuals must be dropped (another world size, "reset")."""
        (rank, world, on_world_change), (my_world, my_rank) = saved_by, self._world_rank()
        if world != my_world:
            if on_world_change == "error":
                raise ValueError(f"gradcomp: this checkpoint was saved at world size {world}, the group now has "
                                 f"{my_world} ranks; residuals are per rank and do not carry over: load with "
                                 "on_world_change='reset' to start them from zero")
            logger.warning("gradcomp: checkpoint saved at world size %d, now %d: residuals start from zero", world,
                           my_world)
            return True
        if rank != my_rank:
            raise ValueError(f"gradcomp: this checkpoint was saved by rank {rank} and is loaded on rank {my_rank}: "
                             "each rank must load its own (residuals are local to their rank)")
        return False

    def __repr__(self) -> str:
        return (f"gradcomp.State(codec={self.codec!r}, min_numel={self.min_numel}, start_step={self.start_step}, "
                f"force_compression={self.force_compression})")

    # ------------------------------------------------------------------ config
    def config(self) -> dict:
        """Everything every rank must agree on (checked at the first hook call)."""
        return {**self.codec.config(), "min_numel": self.min_numel, "start_step": self.start_step,
                "force_compression": self.force_compression, "seed": self.seed}

    def _config_hash(self) -> int:
        blob = json.dumps(self.config(), sort_keys=True).encode()
        return int.from_bytes(hashlib.sha256(blob).digest()[:7], "little")

    def _group(self):
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def _world_rank(self) -> tuple[int, int]:
        group = self._group()
        return dist.get_world_size(group), dist.get_rank(group)

    # ------------------------------------------------------------------ per-parameter decisions
    def _compressible(self, p: torch.Tensor) -> bool:
        """Whether a parameter gets blocks of a block quantizer (Cast codecs have none)."""
        return (isinstance(self.codec, (codecs.BlockQuantizer, codecs.Sparsifier)) and p.numel() >= self.min_numel
                and p.dtype in self.codec.dtypes)

    def _ordinals(self, params) -> tuple[int, ...]:
        """Ordinals of a bucket's parameters, numbering the new ones. Called at every hook call,
        compressing or not, so warm-up steps (start_step) number parameters in the same
        first-iteration order as a run without warm-up."""
        return tuple(self._ordinal(p) for p in params)

    def _ordinal(self, p: torch.Tensor) -> int:
        """A parameter's model-wide ordinal: the order parameters are first seen in, which is
        DDP's first-iteration bucket order, the same on every rank and in every restart."""
        key = id(p)
        o = self._ordinal_of.get(key)
        if o is None:
            o = len(self._ordinal_of)
            self._ordinal_of[key] = o
            self._pinned_params.append(p)
            if self._compressible(p):
                self._first_block[o] = self._next_block
                if isinstance(self.codec, codecs.BlockQuantizer):
                    self._next_block += num_blocks(p.numel(), self.codec.block_size)
        return o

    def _residual(self, ordinal: int, p: torch.Tensor) -> torch.Tensor:
        """The parameter's residual (of the codec's residual_dtype) on its device, made (zero)
        on first use. A residual carried in from elsewhere (a pickled State) is moved, cast and
        made contiguous here, once; cached plans hold residual addresses, so any replacement
        drops them."""
        dtype = self.codec.residual_dtype
        r = self._residuals.get(ordinal)
        if r is None:
            r = self._residuals[ordinal] = torch.zeros(p.numel(), dtype=dtype, device=p.device)
            return r
        if r.numel() != p.numel():
            raise GradcompError(f"gradcomp: the residual of parameter {ordinal} has {r.numel()} elements but the "
                                f"parameter has {p.numel()}: this State was saved from another model")
        if r.device != p.device or r.dtype != dtype or not r.is_contiguous() or r.dim() != 1:
            r = self._residuals[ordinal] = r.detach().to(p.device, dtype).contiguous().reshape(-1)
            self._plans.clear()
        return r

    def _plan(self, bucket, params, ordinals: tuple[int, ...], world: int, rank: int) -> _Plan:
        buf = bucket.buffer()
        key = (ordinals, buf.dtype, buf.device, world)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        if isinstance(self.codec, codecs.Cast):
            cast = buf.dtype in self.codec.dtypes
            if not cast:
                self._log_fallback(len(params), buf.numel(), bucket.index())
            plan = _Plan(None, None, None, None, len(params) if cast else 0, 0 if cast else len(params), [],
                         self.codec.wire_dtype if cast else None)
            self._plans[key] = plan
            return plan
        spans, fallback, residuals, offset = [], [], [], 0
        for o, p in zip(ordinals, params):
            n = p.numel()
            if o in self._first_block:
                addr = 0
                if self.codec.error_feedback:
                    residuals.append(self._residual(o, p))
                    addr = residuals[-1].data_ptr()
                spans.append(Span(offset, n, self._first_block[o], addr, o))
            elif n:
                fallback.append(torch.arange(offset, offset + n, dtype=torch.int64))
            offset += n
        if offset != buf.numel():
            raise GradcompError(f"gradcomp: bucket {bucket.index()} holds {buf.numel()} elements but its "
                                f"parameters {offset}; is this a DDP GradBucket?")
        table = table_dev = rows_dev = sparse = None
        if spans and isinstance(self.codec, codecs.Sparsifier):
            sparse = build_sparse_table(spans, self.codec.ratio)
            table_dev = _to_device(sparse.table, buf.device)
        elif spans:
            table = build_table(spans, self.codec.block_size, world, self.codec.residual_dtype.itemsize)
            table_dev = _to_device(table.table, buf.device)
            rows_dev = table_dev[rank * table.slots : (rank + 1) * table.slots]
        fb_index = _to_device(torch.cat(fallback), buf.device) if fallback else None
        if fallback:
            self._log_fallback(len(fallback), sum(len(f) for f in fallback), bucket.index())
        plan = _Plan(table, table_dev, rows_dev, fb_index, len(spans), len(ordinals) - len(spans), residuals,
                     sparse=sparse)
        self._plans[key] = plan
        return plan

    # ------------------------------------------------------------------ the reduction of one bucket
    def _reduce(self, buf: torch.Tensor, plan: _Plan | None, group, world: int, rank: int,
                step: int = 0, what: str = "a bucket") -> torch.Tensor:
        """Averages ``buf`` over the group in place, straight through (see ``_exchange``)."""
        return run_to_end(self._exchange(buf, plan, group, world, rank, step, what))

    def _exchange(self, buf: torch.Tensor, plan: _Plan | None, group, world: int, rank: int,
                  step: int = 0, what: str = "a bucket"):
        """Averages ``buf`` over the group in place; ``plan`` None means plainly. ``step`` keys
        stochastic rounding's and random-k's draws; ``what`` names the bucket in logs.

        A generator of two steps, as in collectives.py: the first ``next()`` encodes and
        issues this bucket's first collectives; the end waits for them, finishes, and
        returns ``buf``. Every rank issues the same collectives in the same order either way."""
        es = buf.element_size()
        s = self.stats
        if world == 1 and plan is None:  # nothing to average, nothing forced: no collective at all
            s["buckets_fallback"] += 1
            return buf
        s["bytes_uncompressed"] += ring_allreduce_bytes(buf.numel() * es, world)
        if plan is not None and plan.cast_dtype is not None:
            # divided in float32 and cast in one pass: partial sums of the W values x/W stay
            # within the largest |x|: no overflow while every rank's gradient fits the wire dtype
            wire = torch.empty_like(buf, dtype=plan.cast_dtype)
            torch.div(buf, world, out=wire)
            work = dist.all_reduce(wire, group=group, async_op=True)
            yield
            work.wait()
            buf.copy_(wire)
            s["bytes_sent"] += ring_allreduce_bytes(wire.numel() * wire.element_size(), world)
            s["buckets_compressed"] += 1
            s["params_compressed"] += plan.params_compressed
        elif plan is None or (plan.table is None and plan.sparse is None):
            work = start_exact_allreduce(buf, world, group)
            yield
            work.wait()
            s["bytes_sent"] += ring_allreduce_bytes(buf.numel() * es, world)
            s["buckets_fallback"] += 1
            if plan is not None:
                s["params_fallback"] += plan.params_fallback
        else:
            work = fb = None
            if plan.fallback_index is not None:  # exact lane first: the same order on every rank
                fb = buf.index_select(0, plan.fallback_index)
                work = start_exact_allreduce(fb, world, group)
                s["bytes_sent"] += ring_allreduce_bytes(fb.numel() * es, world)
            c = self.codec
            if isinstance(c, codecs.TopK):
                sent, codec_s, rejected = yield from topk_allgather_(buf, plan.sparse, plan.table_dev, group, world,
                                                                     approx=c.approx, value_dtype=c.value_dtype)
                self._watch_rejections(rejected, what)
                self._compare_with_int8(sent, plan.sparse.numel, world, what)
            elif isinstance(c, codecs.RandomK):
                sent, codec_s = yield from randomk_allreduce_(buf, plan.sparse, plan.table_dev, group, world,
                                                              seed=self.seed or 0, step=step)
            else:
                sent, codec_s = yield from quantized_allreduce_(
                    buf, plan.table, plan.table_dev, plan.my_rows_dev, rank, group, c.bits,
                    residual_dtype=c.residual_dtype, stochastic=c.stochastic, seed=self.seed or 0, step=step)
            s["bytes_sent"] += sent
            s["codec_seconds"] += codec_s
            if work is not None:
                work.wait()
                buf.index_copy_(0, plan.fallback_index, fb)
            s["buckets_compressed"] += 1
            s["params_compressed"] += plan.params_compressed
            s["params_fallback"] += plan.params_fallback
        s["ratio"] = s["bytes_uncompressed"] / s["bytes_sent"] if s["bytes_sent"] else 1.0
        return buf

    def _compare_with_int8(self, sent: float, numel: int, world: int, what: str) -> None:
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

    def _watch_rejections(self, rejected, what: str) -> None:
        """Counts corrupted payloads a top-k decode rejected: now on CPU; on CUDA once the
        decode has finished (a pinned copy and an event polled at later hook calls: no sync)."""
        if isinstance(rejected, int):
            self._count_rejected(rejected, what)
            return
        host = torch.empty(1, dtype=torch.int32, pin_memory=True)
        host.copy_(rejected, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._pending_checks.append((done, host, what))

    def _poll_rejections(self) -> None:
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
                         "the bucket's compressed values were set to NaN on every rank", what, rejected)

    def _check_config(self, group, device: torch.device) -> None:
        """At the first hook call: every rank must run the same configuration; the ranks adopt
        rank 0's seed (its own, or one it drew)."""
        world = dist.get_world_size(group)
        proposal = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        mine = torch.tensor([self._config_hash(), proposal], dtype=torch.int64, device=device)
        every = torch.empty(2 * world, dtype=torch.int64, device=device)
        all_gather_single(every, mine, group)
        gathered = every.tolist()  # a one-time sync, allowed at the first call
        hashes = gathered[0::2]
        if len(set(hashes)) != 1:
            differ = [r for r, h in enumerate(hashes) if h != hashes[0]]
            raise GradcompError(f"gradcomp: ranks disagree on the hook configuration (ranks {differ} differ from "
                                f"rank 0); this rank runs {self.config()}")
        self.seed = gathered[1]

    def _log_once(self, world: int) -> None:
        if not self._logged:
            self._logged = True
            logger.info("gradcomp hook: %s over %d ranks (min_numel=%d, start_step=%d)", self.codec, world,
                        self.min_numel, self.start_step)

    def _log_fallback(self, params: int, elements: int, bucket_index: int) -> None:
        if not self._logged_fallback:  # once: every step would repeat it
            self._logged_fallback = True
            logger.info("gradcomp: %d parameters (%d elements) of bucket %d are reduced exactly, uncompressed: "
                        "fewer than min_numel=%d elements or a dtype %s does not take (State.stats counts them "
                        "all)", params, elements, bucket_index, self.min_numel, self.codec)


class _GlooWorker:
    """One first-in-first-out thread per State, on a private Gloo group over the same ranks
    (made lazily, on the first bucket). It pipelines two buckets: when bucket k arrives it
    encodes it and issues its first collectives, then finishes bucket k-1 (whose bytes were
    on the wire meanwhile), so encoding overlaps the network. The order is a function of
    the bucket sequence alone (start k, finish k-1; the step's last bucket is finished at
    once), so every rank issues the same collectives in the same order."""

    def __init__(self, state: State):
        self.state = state
        self.jobs: queue.Queue = queue.Queue()
        self.failure: GradcompError | None = None
        self.thread = threading.Thread(target=self._run, name="gradcomp-gloo", daemon=True)
        self.thread.start()
        _workers.add(self)

    def stop(self, timeout: float = 5.0) -> None:
        """Ends the thread after the buckets already submitted (a bucket still waiting for
        its step's next one is left unfinished: only called at exit), then drops the private
        group, so that it is destroyed now rather than during interpreter teardown."""
        self.jobs.put(None)
        self.thread.join(timeout)
        if not self.thread.is_alive() and self.state is not None:
            self.state._private_group = None

    def submit(self, job, fut: torch.futures.Future, what: str, step: int, last: bool) -> None:
        """``job()`` returns the bucket's exchange generator; ``last``: the step's last bucket."""
        self.jobs.put((job, fut, what, step, last))

    def _fail(self, e: Exception, what: str, *futs) -> None:
        logger.error("gradcomp: %s failed", what, exc_info=e)
        msg = e.args[0] if isinstance(e, GradcompError) and e.args else f"{type(e).__name__}: {e}"
        self.failure = GradcompError(f"gradcomp: {what} failed: {msg}")
        for fut in futs:  # the group may be out of step: every bucket in flight fails with it
            if not fut.done():
                fut.set_exception(self.failure)

    def _run(self) -> None:
        pending = None  # (exchange, fut, what, step): started, its first collectives in flight
        while True:
            item = self.jobs.get()
            if item is None:  # stop()
                return
            job, fut, what, step, last = item
            if self.failure is not None:  # the group may be out of step: never run more collectives
                fut.set_exception(GradcompError(f"gradcomp: {what} not reduced: an earlier bucket failed "
                                                f"({self.failure})"))
                continue
            in_flight = [fut] + ([pending[1]] if pending else [])
            failing = what  # the bucket an exception is reported against
            try:
                if pending is not None and pending[3] != step:
                    # the previous step's backward ended early (an error the caller caught):
                    # finishing its bucket now would write old averages into a buffer DDP is
                    # filling again
                    raise GradcompError(f"{pending[2]} was left unfinished when step {step} began (that step's "
                                        "backward pass was interrupted); the hook's group is out of step")
                exchange = job()
                try:
                    next(exchange)
                    finished, result = False, None
                except StopIteration as done:
                    finished, result = True, done.value
                if pending is not None:
                    failing = pending[2]
                    pending[1].set_result(run_to_end(pending[0]))
                    failing, pending = what, None
                if finished:
                    fut.set_result(result)
                elif last:
                    fut.set_result(run_to_end(exchange))
                else:
                    pending = (exchange, fut, what, step)
            except Exception as e:  # never let the thread die: DDP would wait for these futures forever
                self._fail(e, failing, *in_flight)
                pending = None


_workers: "weakref.WeakSet[_GlooWorker]" = weakref.WeakSet()


@atexit.register
def _stop_workers() -> None:
    # At exit, while torch's C++ side is still whole: a private Gloo group (and the daemon
    # thread that uses it) left to interpreter teardown aborted a process now and then with
    # "terminate called without an active exception" after all its work was done.
    for worker in list(_workers):
        worker.stop()


def comm_hook(state: State, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The DDP communication hook: averages ``bucket`` over ``state``'s group, compressing
    each parameter that is large enough and of a dtype the codec takes."""
    if isinstance(bucket, tuple):  # DDP's python reducer (compiled autograd) calls hooks per parameter
        raise RuntimeError(_PYTHON_REDUCER)
    buf = bucket.buffer()
    group = state._group()
    world, rank = state._world_rank()
    is_last = bucket.is_last()
    step = state.step
    if state._saved_by is not None:  # a state_dict loaded before the process group was up
        saved_by, state._saved_by = state._saved_by, None
        if state._check_saved_by(saved_by):
            state._residuals.clear()
            state._plans.clear()
    if is_last:
        state.step += 1
        state.stats["steps"] = state.step
    params = bucket.parameters()
    ordinals = state._ordinals(params)
    compress = (world > 1 or state.force_compression) and step >= state.start_step
    plan = state._plan(bucket, params, ordinals, world, rank) if compress else None
    what = f"bucket {bucket.index()} (step {step}, {buf.numel()} elements of {str(buf.dtype).replace('torch.', '')})"
    state._log_once(world)

    if buf.device.type == "cuda":
        return _run_on_side_stream(state, buf, plan, group, world, rank, what, step)

    if world == 1 and plan is None:  # no collective: no worker thread, no private group
        fut = torch.futures.Future()
        fut.set_result(state._reduce(buf, plan, group, world, rank))
        return fut

    if state._worker is None:
        state._worker = _GlooWorker(state)

    def job():
        if state._private_group is None:
            ranks = dist.get_process_group_ranks(group)
            state._private_group = dist.new_group(ranks=ranks, backend="gloo", timeout=state.timeout,
                                                  use_local_synchronization=True)
        if not state._checked:
            state._check_config(state._private_group, torch.device("cpu"))
            state._checked = True
        return state._exchange(buf, plan, state._private_group, world, rank, step, what)

    fut = torch.futures.Future()
    state._worker.submit(job, fut, what, step, is_last)
    return fut


def _run_on_side_stream(state: State, buf, plan, group, world, rank, what, step) -> torch.futures.Future:
    dev = buf.device
    side = state._side_streams.get(dev)
    if side is None:
        side = state._side_streams[dev] = torch.cuda.Stream(device=dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    try:
        with torch.cuda.stream(side):
            if not state._checked:
                state._check_config(group, dev)
                state._checked = True
            state._poll_rejections()
            state._reduce(buf, plan, group, world, rank, step, what)
            fut = torch.futures.Future(devices=[dev])
            fut.set_result(buf)  # completes on the side stream: waiters sync to it, not the host
    except GradcompError:
        raise
    except Exception as e:
        logger.exception("gradcomp: %s failed", what)
        raise GradcompError(f"gradcomp: {what} failed: {type(e).__name__}: {e}") from e
    return fut


_PYTHON_REDUCER = (
    "gradcomp: DDP was built with torch._dynamo.config.optimize_ddp = 'python_reducer', which calls a comm "
    "hook once per parameter as hook(state, (grad, param)) under compiled autograd; gradcomp compresses whole "
    "buckets and does not support it. torch.compile works with DDP's default DDPOptimizer "
    "(optimize_ddp = True): build the DDP model with that, then register gradcomp.")


def _check_cuda_backend(ddp_model, codec: codecs.Codec) -> None:
    """A model on a GPU fails at registration, not at its first backward, when gradcomp's CUDA
    backend cannot run here (built without CUDA, or a driver too old for the CUDA it was
    built with), with the reason and the fix. Cast codecs (fp16, bf16) are torch ops alone
    and run without it."""
    if isinstance(codec, codecs.Cast) or not any(p.is_cuda for p in ddp_model.parameters()):
        return
    problem = _C.cuda_problem()
    if problem:
        raise RuntimeError(f"gradcomp.register: the model is on a GPU and codec {codec.name!r} needs "
                           f"gradcomp's CUDA kernels, but {problem}")


def register(ddp_model, codec="int8", **kwargs) -> State:
    """Registers gradcomp's hook on a DistributedDataParallel model; returns its State.

    The process group is the model's own. ``kwargs`` go to :class:`State`.
    """
    if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(f"gradcomp.register needs a torch.nn.parallel.DistributedDataParallel model, "
                        f"got {type(ddp_model).__name__}")
    if "process_group" in kwargs:
        raise TypeError("gradcomp.register takes the process group from the DDP model; "
                        "use State(process_group=...) with register_comm_hook for another group")
    if getattr(ddp_model, "_use_python_reducer", False):
        raise RuntimeError(_PYTHON_REDUCER)
    if getattr(ddp_model, "_comm_hooks", None):
        hooks = ", ".join(getattr(h, "__qualname__", repr(h)) for h, _ in ddp_model._comm_hooks)
        raise RuntimeError(f"gradcomp.register: this DDP model already has a communication hook ({hooks}); "
                           "DDP takes one per model, so register gradcomp once, on a model without one")
    state = State(codec, process_group=getattr(ddp_model, "process_group", None), **kwargs)
    _check_cuda_backend(ddp_model, state.codec)
    ddp_model.register_comm_hook(state, comm_hook)
    world, _ = state._world_rank()
    state._log_once(world)
    return state
