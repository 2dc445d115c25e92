"""The DistributedDataParallel front end: ``comm_hook`` and ``register()``, a thin adapter
on the State (buckets -> keys, steps), keeping its own bookkeeping in ``DDPFront``.

    state = gradcomp.register(ddp_model, "int8")
    # or, torch style (also what Lightning's DDPStrategy takes):
    ddp_model.register_comm_hook(gradcomp.State(codec="int8"), gradcomp.comm_hook)

A bucket's parameters are keyed by their ordinal: the order parameters are first seen in,
which is DDP's first-iteration bucket order, the same on every rank and in every restart.
Collective order (docs/design.md, "Collective order"): on Gloo the State's worker thread
starts bucket k before it finishes bucket k-1, an order that depends only on the bucket
sequence; on NCCL each bucket is issued from the hook call itself (DDP calls hooks in bucket
order on one thread) on the State's side stream.
"""

import warnings

import torch
import torch.distributed as dist

from . import _C, codecs
from .engine import GradcompError
from .per_parameter import ParameterSteps, number_in_bucket_order, reduce_parameter
from .state import State

__all__ = ["State", "comm_hook", "register", "GradcompError"]


class DDPFront:
    """The DDP front end's own bookkeeping on its State (``state.front``): made at the first
    claim in a process, never pickled or checkpointed (a fresh process numbers parameters in
    the same first-seen order again)."""

    def __init__(self):
        self.ordinal_of: dict[int, int] = {}  # id(parameter) -> its key, the order parameters are first seen in
        self.pinned: list = []  # the parameters themselves: keeps those ids valid
        self.bypass_watch: BypassWatch | None = None  # register()'s watch on its model
        self.parameter_steps: ParameterSteps | None = None  # DDP's python reducer: a hook call per parameter

    def ordinal(self, param: torch.Tensor) -> int:
        """A parameter's key: its model-wide ordinal, in the order parameters are first seen."""
        ordinal = self.ordinal_of.get(id(param))
        if ordinal is None:
            ordinal = self.ordinal_of[id(param)] = len(self.ordinal_of)
            self.pinned.append(param)
        return ordinal


# No return annotation: DDP's register_comm_hook accepts only Future[Tensor] there, and under
# DDP's python reducer the hook returns None.
def comm_hook(state: State, bucket: dist.GradBucket):
    """The DDP communication hook: averages ``bucket`` over ``state``'s group, compressing
    each parameter that is large enough and of a dtype the codec takes. Returns the bucket's
    ``torch.futures.Future[torch.Tensor]``; under DDP's python reducer, which calls it with a
    ``(grad, param)`` pair and ignores what it returns, it averages that gradient in place and
    returns None."""
    if isinstance(bucket, tuple):  # DDP's python reducer (compiled autograd) calls hooks per parameter
        grad, param = bucket
        if not isinstance(state.front, DDPFront) or state.front.parameter_steps is None:  # not register()ed
            raise RuntimeError(_PYTHON_REDUCER)
        front = state.claim("ddp", DDPFront)
        reduce_parameter(state, front.parameter_steps, grad, front.ordinal(param), param.shape)
        return None
    front = state.claim("ddp", DDPFront)
    buf = bucket.buffer()
    step = state.current_step()
    if bucket.is_last():
        state.end_step()
    # numbered at every call, compressing or not, so warm-up steps (start_step) number
    # parameters in the same first-iteration order as a run without warm-up
    ordinals = state.engine.ordinals((front.ordinal(p), p.numel(), p.dtype, p.shape) for p in bucket.parameters())
    what = f"bucket {bucket.index()} (step {step}, {buf.numel()} elements of {str(buf.dtype).replace('torch.', '')})"
    state.log_once(state.world_rank()[0])
    return state.reduce(lambda: [(buf, ordinals)], buf.device, step, what, last=bucket.is_last())


_PYTHON_REDUCER = (
    "gradcomp: DDP's python reducer (torch._dynamo.config.optimize_ddp = 'python_reducer') calls the hook once "
    "per parameter, and gradcomp tells one step from the next by counting the model's parameters: register it "
    "with gradcomp.register(ddp_model, ...), or gradcomp.integrations' helpers, not with register_comm_hook.")


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


def _check_registrable(ddp_model) -> None:
    if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(f"gradcomp.register needs a torch.nn.parallel.DistributedDataParallel model, "
                        f"got {type(ddp_model).__name__}")
    if getattr(ddp_model, "_comm_hooks", None):
        hooks = ", ".join(getattr(h, "__qualname__", repr(h)) for h, _ in ddp_model._comm_hooks)
        raise RuntimeError(f"gradcomp.register: this DDP model already has a communication hook ({hooks}); "
                           "DDP takes one per model, so register gradcomp once, on a model without one")


def register(ddp_model, codec="int8", **kwargs) -> State:
    """Registers gradcomp's hook on a DistributedDataParallel model; returns its State.

    The process group is the model's own. ``kwargs`` go to :class:`State`. If that model is
    then bypassed (its parameters receive gradients while its forward does not run, because
    another wrapper or the bare module is trained), a ``UserWarning`` says so once.
    """
    _check_registrable(ddp_model)
    if "process_group" in kwargs:
        raise TypeError("gradcomp.register takes the process group from the DDP model; "
                        "use State(process_group=...) with register_comm_hook for another group")
    state = State(codec, process_group=getattr(ddp_model, "process_group", None), **kwargs)
    return attach(ddp_model, state)


def attach(ddp_model, state: State) -> State:
    """Registers a ready ``state`` on ``ddp_model`` (register()'s checks; a State without a
    process group takes the model's) and watches the model for a bypass."""
    _check_registrable(ddp_model)
    group = getattr(ddp_model, "process_group", None)
    if state.process_group is None:
        state.process_group = group
    elif group is not None and state.process_group is not group:
        raise ValueError("gradcomp: this State has another process group than the DDP model it is registered on")
    _check_cuda_backend(ddp_model, state.codec)
    front = state.claim("ddp", DDPFront)
    ddp_model.register_comm_hook(state, comm_hook)
    if getattr(ddp_model, "_use_python_reducer", False):  # a hook call per parameter (per_parameter.py)
        front.parameter_steps = ParameterSteps(number_in_bucket_order(state, ddp_model, front.ordinal))
    if front.bypass_watch is not None:
        front.bypass_watch.remove()
    front.bypass_watch = BypassWatch(ddp_model)
    state.log_once(state.world_rank()[0])
    return state


BYPASS_AFTER = 3  # gradients on a watched parameter in a row, without a forward of its DDP model

_BYPASSED = (
    "gradcomp: a parameter of the DistributedDataParallel model gradcomp is registered on received gradients {n} "
    "times without that model's forward running (with gradients enabled) in between: another wrapper (a second "
    "DDP, or the bare module) is being trained, so gradcomp's hook never sees these gradients. Nothing of them is "
    "compressed, and they are averaged, if at all, by whatever that wrapper does. Train the model gradcomp is "
    "registered on, or register gradcomp on the one being trained.")


class BypassWatch:
    """Notices that a registered DDP model is bypassed: its forward pre-hook zeroes a count
    that a post-accumulate-grad hook on one of its parameters increments; the count reaching
    ``BYPASS_AFTER`` means gradients arrive without this model's forward, so not through its
    reducer (a DDP whose forward did not run calls no hook). One Python call per forward and
    per backward, no host sync. Warns once."""

    def __init__(self, ddp_model):
        self.since_forward = 0
        self.warned = False
        params = getattr(ddp_model, "_module_parameters", None) or list(ddp_model.module.parameters())
        param = next((p for p in params if p.requires_grad), None)
        self.handles = [] if param is None else [ddp_model.register_forward_pre_hook(self._forward),
                                                 param.register_post_accumulate_grad_hook(self._grad)]

    def _forward(self, module, args) -> None:
        if torch.is_grad_enabled():  # a forward under no_grad (evaluation) prepares no backward
            self.since_forward = 0

    def _grad(self, param) -> None:
        self.since_forward += 1
        if self.since_forward >= BYPASS_AFTER and not self.warned:
            self.warned = True
            warnings.warn(_BYPASSED.format(n=self.since_forward), UserWarning, stacklevel=2)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
