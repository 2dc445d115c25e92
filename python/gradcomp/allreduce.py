"""``gradcomp.all_reduce``: a compressed, averaged all-reduce of any tensors, in place.

    state = gradcomp.State("int8")                      # error feedback per tensor, per rank
    gradcomp.all_reduce(list_of_tensors, state)         # or a dict name -> tensor
    handle = gradcomp.all_reduce(tensors, state, async_op=True)
    ...                                                 # compute meanwhile
    handle.wait()

What outer steps of DiLoCo-style training and model averaging call. The same engine as the
DDP hook: per-tensor decisions, bit-identical results on every rank, a fixed collective
order, non-finite values propagated, per-rank checkpoints (``state.state_dict()``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .engine.core import hash56
from .state import State

__all__ = ["all_reduce"]


class AllReduceFront:
    """The all_reduce front end's own bookkeeping on its State (``state.front``): the keys,
    shapes and dtypes of the first call, which every later call (and every rank) must pass."""

    def __init__(self):
        self.signature: tuple | None = None
        self.signature_hash = 0  # what the ranks compare at the first call

    def check(self, signature: tuple) -> None:
        if self.signature is None:
            self.signature, self.signature_hash = signature, hash56(repr(signature).encode())
        elif signature != self.signature:
            raise ValueError("gradcomp.all_reduce: " + _difference(self.signature, signature))


def all_reduce(tensors, state: State, *, async_op: bool = False):
    """Averages ``tensors`` over ``state``'s group in place, compressing each with its codec.

    Args:
        tensors: a list (or tuple) of tensors, keyed by position, or a dict name -> tensor,
            keyed by name: floating-point tensors of any shapes, all on one device (CPU with
            Gloo, CUDA with NCCL). Every call with this State must pass the same keys with the
            same sizes and dtypes, and every rank the same ones.
        state: a :class:`gradcomp.State` used for nothing else: it holds the error feedback of
            each key, the step counter (one step a call: stochastic rounding draws per step),
            and the statistics, and checkpoints per rank like the hook's.
        async_op: return a handle at once instead of waiting; ``handle.wait()`` returns
            ``tensors`` once they hold the average (on CUDA it makes the current stream wait,
            without a host sync). The tensors must not be touched before then.

    Returns ``tensors`` (``async_op=False``) or a ``torch.futures.Future`` whose value is
    ``tensors``.

    Tensors of each dtype travel as one flat buffer (a copy in, a copy out). A tensor below
    the State's min_numel, or of a dtype the codec does not take, is averaged exactly.
    """
    if not isinstance(state, State):
        raise TypeError(f"gradcomp.all_reduce: state must be a gradcomp.State, got {type(state).__name__}")
    items = _items(tensors)
    front = state.claim("all_reduce", AllReduceFront)
    front.check(tuple((k, tuple(t.shape), t.dtype) for k, t in items))
    step = state.take_step()
    if not items:
        fut = torch.futures.Future()
        fut.set_result(tensors)
        return fut if async_op else tensors
    state.log_once(state.world_rank()[0])
    fut = state.reduce_keyed(items, step, f"all_reduce of {len(items)} tensors (step {step})", tensors,
                             signature=front.signature_hash)
    if async_op:
        return fut
    fut.wait()
    return tensors


def _items(tensors) -> list:
    if isinstance(tensors, Mapping):
        items = list(tensors.items())
        for k, _ in items:
            if not isinstance(k, str):
                raise TypeError(f"gradcomp.all_reduce: a dict's keys must be str (names), got {k!r}")
    elif isinstance(tensors, Sequence) and not isinstance(tensors, (str, bytes)):
        items = list(enumerate(tensors))
    else:
        raise TypeError(f"gradcomp.all_reduce: tensors must be a list or a dict of tensors, got "
                        f"{type(tensors).__name__}")
    devices = set()
    for k, t in items:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"gradcomp.all_reduce: {_name(k)} is a {type(t).__name__}, not a tensor")
        if not t.is_floating_point():
            raise TypeError(f"gradcomp.all_reduce: {_name(k)} is {str(t.dtype).replace('torch.', '')}; only "
                            "floating-point tensors are averaged")
        if t.requires_grad and t.is_leaf and torch.is_grad_enabled():
            raise RuntimeError(f"gradcomp.all_reduce: {_name(k)} requires grad; pass its .data or call under "
                               "torch.no_grad() (it is written in place)")
        devices.add(t.device)
    if len(devices) > 1:
        raise ValueError(f"gradcomp.all_reduce: the tensors are on several devices "
                         f"({', '.join(sorted(str(d) for d in devices))}); pass one device's tensors a call")
    return items


def _name(key) -> str:
    return f"tensor {key}" if isinstance(key, int) else f"tensor {key!r}"


def _difference(first: tuple, now: tuple) -> str:
    if len(first) != len(now):
        return (f"this State's first call had {len(first)} tensors, this one has {len(now)}: every call must pass "
                "the same tensors (error feedback is kept per key)")
    for (k0, s0, d0), (k1, s1, d1) in zip(first, now):
        if k0 != k1:
            return f"the first call had key {k0!r} where this one has {k1!r}: keys must stay the same, in order"
        if s0 != s1 or d0 != d1:
            return (f"{_name(k0)} was {list(s0)} {str(d0).replace('torch.', '')} at the first call, now {list(s1)} "
                    f"{str(d1).replace('torch.', '')}: a key's tensor must keep its shape and dtype")
    return "the tensors differ from the first call's"
