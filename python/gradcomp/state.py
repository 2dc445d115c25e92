"""State: what every front end (the DDP hook, ``gradcomp.fsdp``, ``gradcomp.all_reduce``,
``gradcomp.DiLoCo``) stands on: configuration, the engine, the step counter, per-rank
checkpoints, and the engine's runtime that issues the State's collectives in one fixed order.

A front end talks to its State through the methods of the section "The front-end contract"
below, and keeps its own bookkeeping on its own object (docs/design.md, "Adding a front end").
"""

from __future__ import annotations

import io
import logging
from datetime import timedelta

import torch
import torch.distributed as dist

from . import codecs
from .engine import Engine, GradcompError, Runtime, Setup, Topology, new_stats
from .engine.exchanges import hierarchy_refusal
from .engine.topology import check_ranks_per_node

__all__ = ["State", "GradcompError"]

logger = logging.getLogger("gradcomp")

DEFAULT_MIN_NUMEL = 1024
DEFAULT_TIMEOUT = timedelta(minutes=5)
_FORMAT = "gradcomp.State/2"


class State:
    """A front end's state: codec, process group, per-key error feedback and statistics.

    Args:
        codec: a spec such as ``"int8"`` or ``"int8:block=512"``, or a Codec object.
        process_group: the group to reduce over; None means the default group. Building a
            State is never collective: it can be made, and pickled, before
            ``init_process_group``.
        min_numel: tensors with fewer elements are averaged exactly (in rank order, in
            float32 or wider: docs/design.md, "The pipeline"), as are tensors of a dtype the
            codec does not take.
        start_step: the first ``start_step`` steps run a plain all-reduce.
        force_compression: compress even at world size 1 (by default nothing is compressed
            there: there is nothing to send). For tests, e.g. NCCL on a one-GPU machine.
        timeout: timeout of the State's own groups (the private Gloo groups, and the
            hierarchy's intra- and inter-node groups on any backend): how long a rank waits
            for a peer.
        seed: the seed of stochastic rounding's and random-k's draws, an int in [0, 2**63).
            None (default): rank 0 draws one at the first call and every rank adopts it.
            Either way ``state.seed`` then holds it, and a pickled State carries it, so a
            resumed run draws the same numbers. A seed given explicitly must be the same on
            every rank.
        ranks_per_node: L, the ranks of one node, for hierarchical compression: an exact
            reduce-scatter inside each node (each local rank owning 1/L of every tensor's
            blocks), the compressed exchange across nodes among the ranks of the same local
            index, an all-gather inside the node. Ranks of a node must be contiguous in the
            group, and L must divide its size. ``"auto"`` reads torchrun's LOCAL_WORLD_SIZE and
            checks at the first call that the nodes are contiguous. None (default) or 1: the
            flat exchange. Quantizers and cast codecs only (top-k and random-k are flat).
        intra_node: the lane inside a node under hierarchy: ``"exact"`` (float32, default),
            ``"fp16"`` or ``"bf16"`` (half the bytes inside the node, rounded to 16 bits).
        chunk_numel: cut the quantizers' flat exchange of a larger buffer into chunks of about
            this many elements (whole blocks), pipelined: one chunk is encoded while another
            is on the wire. The numbers are the same as without (a non-finite value makes only
            its chunk NaN). None (default): one exchange a buffer.

    ``stats`` counts steps, buckets and tensors compressed or reduced exactly, the bytes this
    rank put on the wire (ring accounting: 2(W-1)/W of a plain all-reduce's buffer, 2(W-1)
    shards for the compressed exchange) and, with ranks_per_node, how many of them stayed
    inside the node (``bytes_sent_intra_node``) or crossed nodes (``bytes_sent_inter_node``;
    the exact lane of small tensors is a plain all-reduce over the whole group and counted as
    crossing, an upper bound); the bytes a plain all-reduce of the same buffers would have
    sent, their ratio, and the seconds spent in the codec's passes (CPU). For TopK it also
    counts ``buckets_sparse_over_int8``, the buckets whose sparse payloads cost more bytes
    than the dense int8 exchange would (W · k large: lower the ratio or use int8), and
    ``payloads_rejected``, index lists received from a peer that were not strictly
    increasing within their tensor (the bucket was made NaN on every rank instead of writing
    through them; on CUDA counted a few steps late, without a sync).

    One State serves one front end: a DDP model's hook, ``gradcomp.all_reduce`` calls, an FSDP
    model or a DiLoCo.
    """

    def __init__(self, codec="int8", process_group=None, *, min_numel: int = DEFAULT_MIN_NUMEL,
                 start_step: int = 0, force_compression: bool = False,
                 timeout: timedelta = DEFAULT_TIMEOUT, seed: int | None = None, ranks_per_node=None,
                 intra_node: str = "exact", chunk_numel: int | None = None):
        codec = codecs.parse(codec)
        if not isinstance(min_numel, int) or min_numel < 1:
            raise ValueError(f"gradcomp: min_numel must be a positive int, got {min_numel!r}")
        if not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"gradcomp: start_step must be a non-negative int, got {start_step!r}")
        if not isinstance(timeout, timedelta) or timeout.total_seconds() <= 0:
            raise ValueError(f"gradcomp: timeout must be a positive datetime.timedelta, got {timeout!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 63):
            raise ValueError(f"gradcomp: seed must be None or an int in [0, 2**63), got {seed!r}")
        self.ranks_per_node = check_ranks_per_node(ranks_per_node)
        if isinstance(self.ranks_per_node, int) and self.ranks_per_node > 1 and hierarchy_refusal(codec):
            raise ValueError(hierarchy_refusal(codec))
        self.engine = Engine(codec, min_numel=min_numel, seed=seed, intra_node=intra_node, chunk_numel=chunk_numel)
        self.process_group = process_group
        self.start_step = start_step
        self.force_compression = bool(force_compression)
        self.timeout = timeout
        self.step = 0
        # (rank, world size, on_world_change) of a state_dict loaded before the process group was up
        self._saved_by: tuple | None = None
        self._front_name: str | None = None  # the front end this State serves, set by claim()
        self._init_process_local()

    def _init_process_local(self) -> None:
        """What a fresh (or unpickled) State starts with in this process: a new runtime, no
        front-end bookkeeping yet (the claim's name is kept by pickling, the rest is remade)."""
        self.runtime = Runtime()
        self._front = None  # the front end's own bookkeeping object (claim()'s make)
        self._front_config: dict = {}  # the front end's entries in config()
        self._job_ranks = False  # checkpoint entries named by the job's ranks instead of the group's
        self._logged = False

    # ------------------------------------------------------------------ the engine's settings
    codec = property(lambda self: self.engine.codec, doc="The Codec.")
    min_numel = property(lambda self: self.engine.min_numel)
    intra_node = property(lambda self: self.engine.intra_node)
    chunk_numel = property(lambda self: self.engine.chunk_numel)

    @property
    def seed(self) -> int | None:
        return self.engine.seed

    @seed.setter
    def seed(self, value) -> None:
        self.engine.seed = value

    @property
    def stats(self) -> dict:
        return self.engine.stats

    @stats.setter
    def stats(self, value: dict) -> None:
        self.engine.stats = value

    @property
    def residuals(self) -> dict:
        """This rank's error-feedback residuals, key -> 1-D tensor (the tensors themselves)."""
        return self.engine.store.as_dict()

    @property
    def front_name(self) -> str | None:
        """The front end this State serves (``"ddp"``, ``"all_reduce"``, ``"fsdp"``, ``"diloco"``),
        or None before its first use."""
        return self._front_name

    @property
    def front(self):
        """The front end's own bookkeeping object (what its :meth:`claim` made), or None."""
        return self._front

    # ------------------------------------------------------------------ pickling
    def __getstate__(self):
        # The process group, threads, streams and cached plans stay behind (as PyTorch's
        # PowerSGDState drops its group); residuals travel, keyed as the engine keys them.
        return {
            "codec": self.codec, "min_numel": self.min_numel, "start_step": self.start_step,
            "force_compression": self.force_compression, "timeout": self.timeout, "seed": self.seed,
            "ranks_per_node": self.ranks_per_node, "intra_node": self.intra_node, "chunk_numel": self.chunk_numel,
            "step": self.step,
            "stats": dict(self.stats), "residuals": self.residuals, "factors": self.engine.factors.as_dict(),
            "saved_by": self._saved_by,
            "front": self._front_name,
        }

    def __setstate__(self, d):
        self.engine = Engine(d["codec"], min_numel=d["min_numel"], seed=d.get("seed"),
                             intra_node=d.get("intra_node", "exact"), chunk_numel=d.get("chunk_numel"))
        self.engine.stats = {**new_stats(), **d["stats"]}
        self.engine.store.replace(d["residuals"])
        self.engine.factors.replace(d.get("factors", {}))
        self.process_group = None
        self.start_step = d["start_step"]
        self.force_compression = d["force_compression"]
        self.timeout = d["timeout"]
        self.ranks_per_node = d.get("ranks_per_node")
        self.step = d["step"]
        self._saved_by = d.get("saved_by")
        self._front_name = d.get("front")
        self._init_process_local()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """This rank's state for a checkpoint, safe under torch.distributed.checkpoint (DCP).

        DCP writes a value found under one key on every rank from one rank only, so the whole
        per-rank state travels under a key that carries the rank (``"rank<global rank>"``, or
        ``"unranked"`` before the process group is up), as one value: the bytes of a
        ``torch.save`` of a dict of tensors and plain types (``torch.load(weights_only=True)``
        reads it). It holds the rank, the world size and the configuration (checked at load
        time), the step counter, the seed, the statistics, this rank's own residuals (keyed
        as the engine keys them) and PowerSGD's warm-started Q factors. Beside it,
        ``"world_size"`` (the same on every rank) lets a rank tell another world size's
        checkpoint from its own. Save it with ``torch.save`` (every rank its own file) or DCP (``dcp.save({"gradcomp":
        state.state_dict()})``, or the State itself, which DCP treats as Stateful).
        """
        rank = world = None
        key = "unranked"
        if dist.is_available() and dist.is_initialized():
            world, rank = self._checkpoint_world_rank()
            key = f"rank{dist.get_rank()}"
        mine = {
            "rank": rank, "world_size": world, "config": self.config(), "step": self.step, "seed": self.seed,
            "stats": dict(self.stats), "residuals": {k: r.detach() for k, r in self.residuals.items()},
            # PowerSGD's warm-started Q of each key (the same on every rank)
            "factors": {k: q.detach() for k, q in self.engine.factors.items()},
        }
        blob = io.BytesIO()
        torch.save(mine, blob)
        # step and seed are the same on every rank: a rank that finds no entry of its own
        # (a checkpoint of fewer ranks, loaded with on_world_change="reset") takes them from here
        return {"format": _FORMAT, "world_size": world, "step": self.step, "seed": self.seed, key: blob.getvalue()}

    def load_state_dict(self, state_dict: dict, *, on_world_change: str = "error") -> None:
        """Restores what :meth:`state_dict` saved on this rank, for a bit-identical resume.

        The configuration (codec, min_numel, start_step, force_compression, ranks_per_node,
        intra_node, chunk_numel) must be the one saved; a seed given to this State must equal the saved one
        (None adopts it). The rank and world size must match too: checked here when the
        process group is up, otherwise at the first call.

        on_world_change: what to do when the checkpoint comes from another world size.
            ``"error"`` (default) raises. ``"reset"`` keeps the step, seed and statistics but
            starts the residuals from zero: a residual holds what this rank's compression has
            not sent yet (and, for the quantizers, the re-encoding error of the slice this rank
            reduced, whose owner depends on the world size), so it has no meaning on another
            rank layout. Dropping them loses about one step's compression error, once.
        """
        if on_world_change not in ("error", "reset"):
            raise ValueError(f"gradcomp: on_world_change must be 'error' or 'reset', got {on_world_change!r}")
        mine = self._entry_of_this_rank(state_dict, on_world_change)
        saved_cfg, here = dict(mine["config"]), self.config()
        saved_cfg.pop("seed", None)
        here.pop("seed")
        if saved_cfg != here:
            differ = sorted(k for k in saved_cfg.keys() | here.keys() if saved_cfg.get(k) != here.get(k))
            raise ValueError("gradcomp: this checkpoint was saved with another configuration: "
                             + ", ".join(f"{k}: saved {saved_cfg.get(k)!r}, here {here.get(k)!r}" for k in differ))
        seed = mine["seed"]
        if self.seed is not None and seed is not None and seed != self.seed:
            raise ValueError(f"gradcomp: this checkpoint was saved with seed {seed}, this State has seed {self.seed}")
        residuals = mine["residuals"]
        for k, r in residuals.items():
            if not isinstance(k, (int, str)) or not isinstance(r, torch.Tensor) or r.dim() != 1:
                raise ValueError(f"gradcomp: residual entry {k!r} is not a key and a 1-D tensor")
        saved_by = (mine["rank"], mine["world_size"], on_world_change)
        group_up = dist.is_available() and dist.is_initialized()
        # checked now when it can be (before anything changes), else at the first call
        drop = saved_by[1] is not None and group_up and self._check_saved_by(saved_by)
        self._saved_by = saved_by if saved_by[1] is not None and not group_up else None
        self.seed = self.seed if seed is None else seed
        self.step = int(mine["step"])
        self.stats = {**new_stats(), **mine["stats"]}
        self.engine.store.replace({} if drop else residuals)
        # Q is the same on every rank: at another world size a rank without an entry starts
        # from the first draws, so every rank does
        self.engine.factors.replace({} if drop or mine["world_size"] is None else mine.get("factors", {}))

    def _entry_of_this_rank(self, state_dict, on_world_change: str) -> dict:
        """This rank's dict in a state_dict."""
        fmt = state_dict.get("format") if isinstance(state_dict, dict) else None
        if fmt != _FORMAT:
            raise ValueError("gradcomp: not a gradcomp State state_dict (its 'format' entry is missing or not "
                             f"{_FORMAT!r})")
        entries = {k: v for k, v in state_dict.items() if k.startswith("rank") or k == "unranked"}
        own = f"rank{dist.get_rank()}" if dist.is_available() and dist.is_initialized() else None
        if own in entries:
            blob = entries[own]
        elif len(entries) == 1:  # one rank's file loaded on another rank: the rank check below says so
            blob = next(iter(entries.values()))
        else:
            raise ValueError(f"gradcomp: this checkpoint has no entry for {own or 'this process'} (it has "
                             f"{', '.join(sorted(entries)) or 'none'})")
        mine = torch.load(io.BytesIO(blob), weights_only=True)
        saved_world = state_dict.get("world_size")
        if saved_world is not None and mine["world_size"] != saved_world:
            # DCP loaded "world_size" from the checkpoint, but no entry for this rank: it was
            # saved by fewer ranks, and this rank's entry is what its template held
            if on_world_change == "error":
                raise ValueError(f"gradcomp: this checkpoint was saved at world size {saved_world} and holds no "
                                 f"entry for {own}: residuals are per rank and do not carry over; load with "
                                 "on_world_change='reset' to start this rank from zero")
            logger.warning("gradcomp: checkpoint saved at world size %d has no entry for %s: this rank starts "
                           "from its current state with zero residuals", saved_world, own)
            mine = dict(mine, residuals={}, rank=None, world_size=None, step=state_dict.get("step", mine["step"]),
                        seed=state_dict.get("seed", mine["seed"]))
        return mine

    def _check_saved_by(self, saved_by: tuple) -> bool:
        """Checks a loaded state_dict's (rank, world size, on_world_change) against the group;
        returns whether the residuals must be dropped (another world size, "reset")."""
        (rank, world, on_world_change), (my_world, my_rank) = saved_by, self._checkpoint_world_rank()
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
        extra = f", ranks_per_node={self.ranks_per_node!r}" if self.ranks_per_node is not None else ""
        return (f"gradcomp.State(codec={self.codec!r}, min_numel={self.min_numel}, start_step={self.start_step}, "
                f"force_compression={self.force_compression}{extra})")

    # ------------------------------------------------------------------ config
    def config(self) -> dict:
        """Everything every rank must agree on (checked at the first call)."""
        return {**self.engine.config(), "start_step": self.start_step, "force_compression": self.force_compression,
                "ranks_per_node": self.ranks_per_node, "seed": self.seed, **self._front_config}

    def _checkpoint_world_rank(self) -> tuple[int, int]:
        """Whose entry a checkpoint holds: the group's world size and rank, or the job's."""
        return (dist.get_world_size(), dist.get_rank()) if self._job_ranks else self.world_rank()

    # ------------------------------------------------------------------ the front-end contract
    # What a front end calls (docs/design.md, "Adding a front end"); everything else of a
    # State is its own. Front ends never touch its underscore names.

    def claim(self, front: str, make=None, *, config: dict | None = None, job_ranks: bool = False):
        """Claims this State for the front end named ``front`` (one State serves one front end:
        its keys and step counter are that front end's) and returns the front end's own
        bookkeeping object, made by ``make()`` at the first claim in this process (None without
        ``make``). ``config``: entries the front end adds to :meth:`config`, which the ranks
        agree on and a checkpoint must match. ``job_ranks``: name checkpoint entries by the
        job's ranks rather than the group's (a group that is one of several, as HSDP's replica
        groups, does not say which shard a residual is of)."""
        if self._front_name is None:
            self._front_name = front
        elif self._front_name != front:
            raise RuntimeError(f"gradcomp: this State already serves {self._front_name!r}; one State serves one "
                               f"front end (its keys and step counter are that front end's): make another for "
                               f"{front!r}")
        if config is not None:
            self._front_config = dict(config)
        self._job_ranks = self._job_ranks or job_ranks
        if self._front is None and make is not None:
            self._front = make()
        return self._front

    def group(self):
        """The process group reduced over (the default group when none was given)."""
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def world_rank(self) -> tuple[int, int]:
        """The group's size and this rank's place in it."""
        group = self.group()
        return dist.get_world_size(group), dist.get_rank(group)

    def current_step(self) -> int:
        """The step a front end's call runs as. The first call also checks a state_dict loaded
        before the process group was up."""
        if self._saved_by is not None:
            saved_by, self._saved_by = self._saved_by, None
            if self._check_saved_by(saved_by):
                self.engine.store.clear()
                self.engine.factors.clear()
        return self.step

    def end_step(self) -> None:
        """Counts one step: the front end's step is over."""
        self.step += 1
        self.stats["steps"] = self.step

    def take_step(self) -> int:
        """A call that is one whole step: returns the step it runs as, and counts it."""
        step = self.current_step()
        self.end_step()
        return step

    def compressing(self, step: int) -> bool:
        """Whether ``step`` compresses: past the warm-up, and over more than one rank (or forced)."""
        world = dist.get_world_size(self.group())
        return (world > 1 or self.force_compression) and step >= max(self.start_step,
                                                                     getattr(self.codec, "warmup", 0))

    def _setup(self, signature: int = 0) -> Setup:
        """What the runtime's first-call agreement needs of this State (``signature``: the front
        end's hash of what it passes, which every rank must pass alike; 0: none)."""
        return Setup(self.config, self.ranks_per_node, self.timeout, signature)

    def ready(self, group, device: torch.device) -> Topology:
        """The first-call agreement over ``group`` (once), run in the caller's thread and
        stream, for a front end that issues its collectives itself (FSDP); returns the topology."""
        return self.runtime.ready(group, device, None, self.engine, self._setup())

    def reduce(self, make, device: torch.device, step: int, what: str, *, last: bool = True, finish=None,
               signature: int = 0) -> torch.futures.Future:
        """Averages the (buffer, ordinals) pairs ``make()`` returns, in order and in place,
        where the State's collectives run (the Gloo worker, or the CUDA side stream); ``what``
        names them in errors. The future's value is ``finish()`` (default: the first buffer).
        ``last``: the step's last call (the Gloo worker finishes it at once instead of
        overlapping it with the next)."""
        return self.runtime.submit(self.engine, self.group(), self._setup(signature), make, device, step, what,
                                   self.compressing(step), last, finish)

    def reduce_keyed(self, items: list, step: int, what: str, value, *, signature: int = 0) -> torch.futures.Future:
        """Averages the (key, tensor) ``items`` in place, asynchronously: the tensors of each
        dtype as one flat buffer (a copy in, a copy out). Returns a future whose value is
        ``value``. New keys are numbered in the order given (the same on every rank)."""
        ordinals = self.engine.ordinals((k, t.numel(), t.dtype, t.shape) for k, t in items)
        by_dtype: dict = {}
        for (_, t), o in zip(items, ordinals):
            by_dtype.setdefault(t.dtype, []).append((t, o))
        buffers: list = []

        def pack():  # where the reduction runs: on CUDA on the side stream, after the caller's work
            buffers.extend((torch.cat([t.reshape(-1) for t, _ in g]), tuple(o for _, o in g))
                           for g in by_dtype.values())
            return buffers

        def unpack():
            for (buf, _), group in zip(buffers, by_dtype.values()):
                offset = 0
                for t, _ in group:
                    t.copy_(buf[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()
            return value

        return self.reduce(pack, items[0][1].device, step, what, finish=unpack, signature=signature)

    def log_once(self, world: int, label: str | None = None) -> None:
        """Logs, once, what this State runs: ``label`` (default: the front end's name) names it."""
        if not self._logged:
            self._logged = True
            label = label or {None: "hook", "ddp": "hook"}.get(self._front_name, self._front_name)
            logger.info("gradcomp %s: %s over %d ranks (min_numel=%d, start_step=%d%s)", label, self.codec, world,
                        self.min_numel, self.start_step,
                        f", ranks_per_node={self.ranks_per_node}" if self.ranks_per_node is not None else "")
