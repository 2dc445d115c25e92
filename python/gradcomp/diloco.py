"""``gradcomp.DiLoCo``: low-communication training, H local steps between compressed syncs.

    model = Net().to(device)                             # a plain module on every rank: no DDP
    inner = torch.optim.AdamW(model.parameters(), lr=3e-4)
    diloco = gradcomp.DiLoCo(model, inner, sync_every=100, codec="int8")
    for x, y in data:
        loss_fn(model(x), y).backward()
        inner.step()
        inner.zero_grad()
        diloco.step()                                    # every 100 steps: the outer step

DiLoCo (Douillard et al. 2023, arXiv:2311.08105): every rank takes H steps of its own
optimizer from the shared anchor weights, then the ranks average their pseudo-gradients
(anchor − local weights) and an outer optimizer, Nesterov SGD, moves the anchor, which
every rank loads. The average runs through gradcomp's compressed all-reduce (the engine
under ``gradcomp.all_reduce``): error feedback per parameter and per rank, bit-identical
results on every rank. With ``fragments=F`` the parameters are cut into F groups synced at
staggered steps, each sync overlapped with the next inner steps (Streaming DiLoCo, Douillard
et al. 2025, arXiv:2501.18512). docs/guides/diloco.md says what is sent when; docs/design.md,
"DiLoCo", how it sits on the engine.
"""

from __future__ import annotations

import io
import json
import logging
import math
import warnings
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from . import codecs
from .engine import agree
from .state import DEFAULT_MIN_NUMEL, DEFAULT_TIMEOUT, State

__all__ = ["DiLoCo"]

logger = logging.getLogger("gradcomp")

_FORMAT = "gradcomp.DiLoCo/1"
EXACT_CODECS = (None, "fp32")


class DiLoCo:
    """DiLoCo's outer loop around a model trained by its own (inner) optimizer on every rank.

    Args:
        model: the module, the same architecture on every rank, not wrapped in DDP or FSDP.
            Its trainable parameters (``requires_grad``, in ``named_parameters()`` order) are
            synced; everything else (buffers, frozen parameters) is broadcast from rank 0 here
            and then left to each rank. Building a DiLoCo is collective: rank 0's parameters
            and buffers are broadcast over the group, so every rank starts from the same anchor.
        inner_optimizer: the optimizer that steps ``model`` between syncs (AdamW in the paper).
            DiLoCo never steps or resets it; it checks that it holds the synced parameters.
        sync_every: H, the inner steps between two syncs of a parameter (the paper's main
            setting is 500; INTELLECT-1 used 100). Required: it is the trade of bytes for
            quality, and a property of the workload.
        codec: the codec of the pseudo-gradients' all-reduce: a spec (``"int8"``, ``"int4"``,
            ``"int2:block=64"``, ...), a Codec, or ``None`` / ``"fp32"`` for an exact average
            (float32, summed in rank order).
        outer_lr, outer_momentum, nesterov: the outer optimizer, SGD on the anchor with the
            averaged pseudo-gradient as its gradient, the paper's recipe: lr 0.7, momentum 0.9,
            Nesterov (its section 3 and table 2 compare outer optimizers; this one won). Its
            update is ``torch.optim.SGD``'s, element for element.
        process_group: the group to average over; None: the default group.
        fragments: F, or a list of lists of parameter names. An int cuts the parameters, in
            order, into F contiguous groups of about equal size (each non-empty); fragment p
            is synced at the inner steps s with ``s % H == (p + 1) * H // F % H``: staggered
            evenly, the last one at the multiples of H.
        delay: the inner steps a sync's all-reduce has to land: it is started after inner
            step s and its outer update applied after inner step s + delay, on every rank at
            that step whatever the network's timing (it waits for it there). The local progress
            made meanwhile is kept: the fragment becomes new anchor + (local now − local when
            sent). Default: 0 (the paper's DiLoCo) with one fragment, 1 (Streaming DiLoCo's
            overlap of one step) with several. Must be below H.
        ranks_per_node: L for hierarchical compression (exact inside a node, compressed
            across nodes): gradcomp.State's keyword, ``"auto"`` reads torchrun's
            LOCAL_WORLD_SIZE. The exact average (``codec=None``) is one exchange over the
            whole group and ignores it.
        min_numel, seed, timeout, force_compression, chunk_numel, intra_node: the compressed
            all-reduce's State (gradcomp.State's keywords).

    Memory: the anchor and the outer momentum (a copy of the synced parameters each; no
    momentum with ``outer_momentum=0``), this
    rank's residuals (1/L of that under hierarchy), and with ``delay > 0`` the pseudo-
    gradients in flight and the local weights they were taken from.

    ``stats``: inner steps, syncs (fragment syncs landed), syncs skipped for non-finite
    pseudo-gradients, and the bytes this rank put on the wire (the State's count).
    """

    def __init__(self, model: torch.nn.Module, inner_optimizer, *, sync_every: int, codec="int8",
                 outer_lr: float = 0.7, outer_momentum: float = 0.9, nesterov: bool = True, process_group=None,
                 fragments=1, delay: int | None = None, ranks_per_node=None, min_numel: int = DEFAULT_MIN_NUMEL,
                 seed: int | None = None, timeout: timedelta = DEFAULT_TIMEOUT, force_compression: bool = False,
                 chunk_numel: int | None = None, intra_node: str = "exact"):
        _check_arguments(model, inner_optimizer, sync_every, outer_lr, outer_momentum, nesterov)
        self.model = model
        self.inner_optimizer = inner_optimizer
        self.sync_every = sync_every
        self.outer_lr, self.outer_momentum, self.nesterov = float(outer_lr), float(outer_momentum), bool(nesterov)
        self.process_group = process_group
        self._names, self._params = self._trainable()
        self._check_parameters_synced()
        self.device = self._params[0].device
        self._check_optimizer()
        self.fragments = self._fragments(fragments)
        self.delay = self._delay(delay)
        # the offsets of the fragments' syncs in the period: (p + 1) * H // F mod H
        F = len(self.fragments)
        self.offsets = [((p + 1) * sync_every // F) % sync_every for p in range(F)]
        self.codec_spec = None if codec in EXACT_CODECS else codec
        exact = self.codec_spec is None
        self.state = State(codecs.Exact() if exact else codecs.parse(codec), process_group, min_numel=min_numel,
                           timeout=timeout, seed=seed, ranks_per_node=None if exact else ranks_per_node,
                           force_compression=force_compression, chunk_numel=chunk_numel, intra_node=intra_node)
        if isinstance(self.state.codec, codecs.PowerSGD):
            raise ValueError("gradcomp.DiLoCo: powersgd is not a codec for pseudo-gradients here (its warm-started "
                             "factors assume one step's gradient); use a quantizer, a sparsifier or a cast codec")
        self.state.claim("diloco")
        # every key, model order, numbered now: a fragment's blocks keep their model-wide numbers
        self.state.engine.ordinals((n, p.numel(), p.dtype, tuple(p.shape)) for n, p in zip(self._names, self._params))
        self._broadcast_from_rank0()
        with torch.no_grad():
            self.anchor = {n: p.detach().clone() for n, p in zip(self._names, self._params)}
            # none without momentum: a copy of the model less
            self.momentum = {n: torch.zeros_like(p) for n, p in zip(self._names, self._params)} \
                if self.outer_momentum else {}
        self._momentum_started = [False] * F
        self.inner_steps = 0
        self._pending: dict = {}  # fragment -> (landing step, future or None, deltas, local weights when sent)
        self._agreed = False
        self._counts = {"syncs": 0, "syncs_skipped": 0}

    # ------------------------------------------------------------------ set-up
    def _trainable(self) -> tuple[list[str], list[torch.nn.Parameter]]:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        return [n for n, _ in named], [p for _, p in named]

    def _check_parameters_synced(self) -> None:
        """The trainable parameters: some, whole (no DTensor), floating point, on one device."""
        if not self._params:
            raise ValueError("gradcomp.DiLoCo: the model has no trainable parameters")
        for n, p in zip(self._names, self._params):
            if _is_dtensor(p):
                raise TypeError(f"gradcomp.DiLoCo: parameter {n!r} is a DTensor: DiLoCo takes a model whose every "
                                "rank holds whole parameters (no FSDP or tensor parallelism)")
            if not p.is_floating_point():
                raise TypeError(f"gradcomp.DiLoCo: parameter {n!r} is {p.dtype}; only floating-point parameters "
                                "are synced")
        if len({p.device for p in self._params}) > 1:
            raise ValueError("gradcomp.DiLoCo: the model's parameters are on several devices; DiLoCo syncs one "
                             "device's model a rank")

    def _delay(self, delay: int | None) -> int:
        """The inner steps a sync has to land (default: 0 with one fragment, 1 with several)."""
        if self.sync_every < len(self.fragments):
            raise ValueError(f"gradcomp.DiLoCo: sync_every={self.sync_every} is below fragments="
                             f"{len(self.fragments)}: each fragment needs its own step of the period")
        if delay is None:
            delay = 0 if len(self.fragments) == 1 else 1
        if isinstance(delay, bool) or not isinstance(delay, int) or not 0 <= delay < self.sync_every:
            raise ValueError(f"gradcomp.DiLoCo: delay must be an int in [0, sync_every={self.sync_every}), got "
                             f"{delay!r}: a fragment's sync must land before its next one starts")
        return delay

    def _check_optimizer(self) -> None:
        held = {id(p) for g in self.inner_optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in zip(self._names, self._params) if id(p) not in held]
        if missing:
            warnings.warn(f"gradcomp.DiLoCo: the inner optimizer does not hold {len(missing)} trainable "
                          f"parameter(s) of the model ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})"
                          ": they are synced, but never trained between syncs", stacklevel=3)

    def _fragments(self, fragments) -> list[list[int]]:
        """The fragments as lists of parameter indices, in model order."""
        n = len(self._params)
        if isinstance(fragments, int) and not isinstance(fragments, bool):
            if not 1 <= fragments <= n:
                raise ValueError(f"gradcomp.DiLoCo: fragments must be in [1, {n}] (the model's trainable "
                                 f"parameters), got {fragments}")
            return split_fragments([p.numel() for p in self._params], fragments)
        if isinstance(fragments, Sequence) and not isinstance(fragments, str) and fragments and \
                all(isinstance(f, Sequence) and not isinstance(f, str) for f in fragments):
            index = {name: i for i, name in enumerate(self._names)}
            out, seen = [], set()
            for f in fragments:
                if not f:
                    raise ValueError("gradcomp.DiLoCo: a fragment is empty")
                unknown = [x for x in f if x not in index]
                if unknown:
                    raise ValueError(f"gradcomp.DiLoCo: fragment names {unknown[:5]} are not trainable parameters "
                                     "of the model")
                twice = [x for x in f if x in seen]
                if twice:
                    raise ValueError(f"gradcomp.DiLoCo: parameters {twice[:5]} are in two fragments")
                seen.update(f)
                out.append(sorted(index[x] for x in f))
            left = [x for x in self._names if x not in seen]
            if left:
                raise ValueError(f"gradcomp.DiLoCo: parameters {left[:5]} are in no fragment")
            return out
        raise TypeError("gradcomp.DiLoCo: fragments must be an int or a list of lists of parameter names, got "
                        f"{fragments!r}")

    def _group(self):
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def _broadcast_from_rank0(self) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("gradcomp.DiLoCo: the process group is not initialized (call "
                               "torch.distributed.init_process_group first): DiLoCo broadcasts rank 0's weights")
        group = self._group()
        if dist.get_world_size(group) == 1:
            return
        src = dist.get_global_rank(group, 0)
        with torch.no_grad():
            for t in [*self.model.parameters(), *self.model.buffers()]:
                dist.broadcast(t.data, src, group=group)

    # ------------------------------------------------------------------ the loop
    def step(self) -> None:
        """Call once after every inner ``optimizer.step()``. Lands the syncs due now (their
        outer step, the anchor loaded into the model), then starts the syncs due now."""
        self.inner_steps += 1
        s = self.inner_steps
        if self.delay > 0:  # with no delay a sync lands in the step that sends it, after the send
            for p in [p for p in sorted(self._pending) if self._pending[p][0] == s]:
                self._land(p)
        for p, offset in enumerate(self.offsets):
            if s % self.sync_every == offset:
                self._send(p)
        if self.delay == 0:
            for p in sorted(self._pending):
                self._land(p)

    def _send(self, p: int) -> None:
        self._check_parameters()
        if not self._agreed:
            self._agree()
        idx = self.fragments[p]
        with torch.no_grad():
            sent = [self._params[i].detach().clone() for i in idx] if self.delay > 0 else None
            deltas = [self.anchor[self._names[i]] - self._params[i].detach() for i in idx]
        fut = self._reduce(p, deltas)
        self._pending[p] = (self.inner_steps + self.delay, fut, deltas, sent)

    def _reduce(self, p: int, deltas: list) -> torch.futures.Future:
        """The fragment's pseudo-gradients averaged in place by the State's engine (async)."""
        state, idx = self.state, self.fragments[p]
        step = state.take_step()
        state.log_once(dist.get_world_size(self._group()))
        what = f"DiLoCo sync of fragment {p} (inner step {self.inner_steps})"
        return state.reduce_keyed([(self._names[i], d) for i, d in zip(idx, deltas)], step, what, deltas)

    def _land(self, p: int) -> None:
        _, fut, deltas, sent = self._pending.pop(p)
        if fut is not None:
            fut.wait()  # on CUDA: the current stream waits for the side stream, no host sync
        idx = self.fragments[p]
        names = [self._names[i] for i in idx]
        with torch.no_grad():
            # one host sync a landing (every H steps): every rank holds the same average, so every
            # rank takes the same branch
            finite = bool(torch.stack([torch.isfinite(d).all() for d in deltas]).all())
            if finite:
                self._outer_step(p, names, deltas)
                self._counts["syncs"] += 1
            else:
                self._counts["syncs_skipped"] += 1
                logger.warning("gradcomp.DiLoCo: fragment %d's averaged pseudo-gradient at inner step %d is not "
                               "finite: its outer step is skipped on every rank and its parameters restart from "
                               "the anchor", p, self.inner_steps)
                warnings.warn(f"gradcomp.DiLoCo: fragment {p}'s averaged pseudo-gradient at inner step "
                              f"{self.inner_steps} is not finite; the outer step is skipped on every rank and the "
                              "fragment's parameters restart from the anchor", RuntimeWarning, stacklevel=3)
            for k, (i, n) in enumerate(zip(idx, names)):
                param = self._params[i]
                if finite and sent is not None:  # keep the progress made while the sync was in flight
                    param.copy_(self.anchor[n] + (param - sent[k]))
                else:
                    param.copy_(self.anchor[n])

    def _outer_step(self, p: int, names: list[str], deltas: list) -> None:
        """torch.optim.SGD's step (no weight decay, no dampening) on the fragment's anchor."""
        m, lr = self.outer_momentum, self.outer_lr
        for n, g in zip(names, deltas):
            if m != 0:
                buf = self.momentum[n]
                if not self._momentum_started[p]:
                    buf.copy_(g)
                else:
                    buf.mul_(m).add_(g)
                g = g.add(buf, alpha=m) if self.nesterov else buf
            self.anchor[n].add_(g, alpha=-lr)
        self._momentum_started[p] = True

    def _check_parameters(self) -> None:
        names, params = self._trainable()
        if names == self._names and all(a is b and a.shape == s.shape for a, b, s in
                                        zip(params, self._params, self.anchor.values())):
            return
        raise RuntimeError("gradcomp.DiLoCo: the model's trainable parameters changed since this DiLoCo was built ("
                           + describe_change(self._names, [tuple(a.shape) for a in self.anchor.values()], names,
                                             [tuple(p.shape) for p in params])
                           + "); the anchor, momentum and residuals belong to the old ones: build a new DiLoCo (and "
                             "a new inner optimizer) for the new model")

    def _agree(self) -> None:
        """At the first sync (and the first after a load): the ranks run the same
        configuration on the same parameters, from the same inner step."""
        group = self._group()
        if dist.get_world_size(group) > 1:
            device = self.device if self.device.type == "cuda" else torch.device("cpu")
            _, rows = agree(group, device, self.config(), 0, (self.inner_steps,),
                            what="the configuration (DiLoCo's and its State's) or the model's parameters")
            if len({r[0] for r in rows}) != 1:
                raise RuntimeError(f"gradcomp.DiLoCo: ranks are at different inner steps at their first sync "
                                   f"({[r[0] for r in rows]} by group rank): every rank must load the same "
                                   "checkpoint step, and call step() after every inner step")
        self._agreed = True

    def config(self) -> dict:
        """What every rank must agree on: DiLoCo's settings, the synced parameters and the State's."""
        return {"sync_every": self.sync_every, "outer_lr": self.outer_lr, "outer_momentum": self.outer_momentum,
                "nesterov": self.nesterov, "fragments": [[self._names[i] for i in f] for f in self.fragments],
                "delay": self.delay, "codec": None if self.codec_spec is None else str(self.state.codec),
                "parameters": [(n, list(p.shape), str(p.dtype)) for n, p in zip(self._names, self._params)],
                "state": {k: v for k, v in self.state.config().items() if k != "seed"}}

    def sync_steps(self, fragment: int, until: int) -> list[int]:
        """The inner steps (1 … until) after which ``fragment``'s syncs start; each lands
        ``delay`` steps later."""
        H, offset = self.sync_every, self.offsets[fragment]
        return [s for s in range(1, until + 1) if s % H == offset]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """This rank's DiLoCo state, for an exact resume; safe under torch.distributed.checkpoint.

        Waits for the syncs in flight first. The anchor, the outer momentum, the averaged
        pseudo-gradients in flight and the step are the same on every rank (plain keys: DCP
        writes them once); the State's per-rank residuals (under ``"state"``, keyed by rank as
        gradcomp.State keys them) and the local weights a sync in flight was taken from
        (under ``"rank<r>"``) are each rank's own. The structure is the same at every step,
        so a fresh DiLoCo's state_dict is a template ``dcp.load`` can fill. Save the inner
        optimizer's and the model's own state beside it."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else None
        F = len(self.fragments)
        landing = [-1] * F
        in_flight: dict = {}
        mine: dict = {"rank": rank, "sent": {}}
        for p in range(F):
            if p in self._pending:
                land, fut, deltas, sent = self._pending[p]
                if fut is not None:
                    fut.wait()
                self._pending[p] = (land, None, deltas, sent)
                landing[p] = land
                if sent is not None:
                    mine["sent"][p] = {self._names[i]: t for i, t in zip(self.fragments[p], sent)}
            if self.delay > 0:  # zeros when nothing is in flight: the structure stays fixed
                deltas = self._pending[p][2] if p in self._pending else None
                in_flight[f"fragment{p}"] = {self._names[i]: (deltas[k] if deltas is not None else
                                                               torch.zeros_like(self.anchor[self._names[i]]))
                                             for k, i in enumerate(self.fragments[p])}
        blob = io.BytesIO()
        torch.save(mine, blob)
        out = {"format": _FORMAT, "config": json.dumps(self.config()), "inner_steps": self.inner_steps,
               "counts": dict(self._counts), "anchor": dict(self.anchor), "momentum": dict(self.momentum),
               "momentum_started": torch.tensor(self._momentum_started, dtype=torch.int64),
               "landing_step": torch.tensor(landing, dtype=torch.int64),
               "in_flight": in_flight, "state": self.state.state_dict(),
               f"rank{rank}" if rank is not None else "unranked": blob.getvalue()}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores what :meth:`state_dict` saved (this rank's own entry), in place: the
        anchor, momentum, step, syncs in flight and the State's residuals. The model's
        parameters are not touched: load the model's and the inner optimizer's own state too."""
        if not isinstance(state_dict, dict) or state_dict.get("format") != _FORMAT:
            raise ValueError(f"gradcomp.DiLoCo: not a DiLoCo state_dict (its 'format' is not {_FORMAT!r})")
        self._check_parameters()
        saved, here = json.loads(state_dict["config"]), json.loads(json.dumps(self.config()))
        if saved != here:
            differ = sorted(k for k in saved.keys() | here.keys() if saved.get(k) != here.get(k))
            detail = "; ".join(f"{k}: saved {saved.get(k)!r}, here {here.get(k)!r}" for k in differ
                               if k != "parameters")
            if "parameters" in differ:
                old, new = saved.get("parameters") or [], here["parameters"]
                detail = ("the model's parameters differ from the checkpoint's ("
                          + describe_change([n for n, *_ in old], [tuple(s) for _, s, _ in old],
                                            [n for n, *_ in new], [tuple(s) for _, s, _ in new])
                          + ")" + (f"; {detail}" if detail else ""))
            raise ValueError(f"gradcomp.DiLoCo: this checkpoint was saved with another configuration: {detail}")
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else None
        key = f"rank{rank}" if rank is not None else "unranked"
        entries = [k for k in state_dict if k.startswith("rank") or k == "unranked"]
        if key not in state_dict:
            raise ValueError(f"gradcomp.DiLoCo: this checkpoint has no entry for {key} (it has "
                             f"{', '.join(sorted(entries)) or 'none'}): each rank loads its own")
        mine = torch.load(io.BytesIO(state_dict[key]), weights_only=True)
        if mine["rank"] != rank:
            raise ValueError(f"gradcomp.DiLoCo: this entry was saved by rank {mine['rank']} and is loaded on rank "
                             f"{rank}")
        self.state.load_state_dict(state_dict["state"])
        with torch.no_grad():
            for n in self._names:
                self.anchor[n].copy_(state_dict["anchor"][n])
                if n in self.momentum:
                    self.momentum[n].copy_(state_dict["momentum"][n])
        self._momentum_started = [bool(x) for x in state_dict["momentum_started"].tolist()]
        self.inner_steps = int(state_dict["inner_steps"])
        self._counts = {**self._counts, **{k: int(v) for k, v in state_dict["counts"].items()}}
        self._pending = {}
        for p, land in enumerate(state_dict["landing_step"].tolist()):
            land = int(land)
            if land < 0:
                continue
            idx = self.fragments[p]
            names = [self._names[i] for i in idx]
            deltas = [state_dict["in_flight"][f"fragment{p}"][n].clone() for n in names]  # delay > 0 here
            sent = [mine["sent"][p][n].to(self.device).clone() for n in names]
            self._pending[p] = (land, None, [d.to(self.device) for d in deltas], sent)
        self._agreed = False  # the ranks check again that they resume from the same step

    def __repr__(self) -> str:
        return (f"gradcomp.DiLoCo(sync_every={self.sync_every}, codec={self.codec_spec!r}, outer_lr={self.outer_lr}, "
                f"outer_momentum={self.outer_momentum}, nesterov={self.nesterov}, fragments={len(self.fragments)}, "
                f"delay={self.delay})")

    @property
    def stats(self) -> dict:
        """inner_steps; syncs (fragment syncs landed); syncs_skipped (non-finite); bytes_sent
        (what this rank put on the wire for its syncs, the State's count) and
        bytes_sent_per_step (over the inner steps)."""
        sent = float(self.state.stats["bytes_sent"])
        return {"inner_steps": self.inner_steps, **self._counts, "bytes_sent": sent,
                "bytes_sent_per_step": sent / self.inner_steps if self.inner_steps else 0.0}


def _check_arguments(model, inner_optimizer, sync_every, outer_lr, outer_momentum, nesterov) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"gradcomp.DiLoCo: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError("gradcomp.DiLoCo: pass the plain module, not a DistributedDataParallel one: DDP would "
                        "all-reduce every step's gradients, which is what DiLoCo avoids (use ddp.module)")
    if not hasattr(inner_optimizer, "param_groups"):
        raise TypeError("gradcomp.DiLoCo: inner_optimizer must be a torch.optim.Optimizer (something with "
                        f"param_groups), got {type(inner_optimizer).__name__}")
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"gradcomp.DiLoCo: sync_every must be a positive int, got {sync_every!r}")
    for name, value in (("outer_lr", outer_lr), ("outer_momentum", outer_momentum)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"gradcomp.DiLoCo: {name} must be a finite number >= 0, got {value!r}")
    if outer_lr == 0:
        raise ValueError("gradcomp.DiLoCo: outer_lr must be above 0 (0 would never move the anchor)")
    if outer_momentum >= 1:
        raise ValueError(f"gradcomp.DiLoCo: outer_momentum must be below 1, got {outer_momentum!r}")
    if nesterov and outer_momentum == 0:
        raise ValueError("gradcomp.DiLoCo: nesterov=True needs outer_momentum > 0 (as torch.optim.SGD)")


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor: nothing is one
        return False
    return isinstance(t, DTensor)


def split_fragments(numels: list[int], F: int) -> list[list[int]]:
    """Parameter indices cut, in order, into F contiguous non-empty groups of about equal
    numbers of elements: parameter i, whose first element is element e_i of the T in all,
    goes to fragment floor(F · e_i / T), kept between the previous parameter's fragment and
    the one after it (no fragment skipped) and low enough to leave a parameter to each
    fragment still to come."""
    n, total = len(numels), sum(numels)
    out: list[list[int]] = [[] for _ in range(F)]
    start, prev = 0, 0
    for i, k in enumerate(numels):
        want = F * start // total if total else 0
        f = 0 if i == 0 else min(max(want, prev), prev + 1)
        f = max(f, F - (n - i))  # the parameters left must reach the last fragment
        out[f].append(i)
        prev, start = f, start + k
    return out


def describe_change(old_names, old_shapes, new_names, new_shapes) -> str:
    old, new = dict(zip(old_names, old_shapes)), dict(zip(new_names, new_shapes))
    parts = []
    gone = [n for n in old_names if n not in new]
    added = [n for n in new_names if n not in old]
    resized = [f"{n} {list(old[n])} -> {list(new[n])}" for n in old_names if n in new and old[n] != new[n]]
    for label, items in (("missing", gone), ("new", added), ("reshaped", resized)):
        if items:
            parts.append(f"{label}: {', '.join(items[:5])}{', ...' if len(items) > 5 else ''}")
    if not parts:
        parts.append("the same names, other tensors: a parameter was replaced")
    return "; ".join(parts)

