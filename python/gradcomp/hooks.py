"""The DistributedDataParallel front end: ``comm_hook`` and ``register()``, a thin adapter
on the engine (buckets -> keys, step counting).

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

import torch
import torch.distributed as dist

from . import _C, codecs
from .engine import GlooWorker as _GlooWorker  # noqa: F401 - tests and older code import it from here
from .engine import GradcompError
from .engine.runner import _workers  # noqa: F401
from .state import DEFAULT_MIN_NUMEL, DEFAULT_TIMEOUT, State  # noqa: F401

__all__ = ["State", "comm_hook", "register", "GradcompError"]


def _ordinal(state: State, p: torch.Tensor) -> int:
    """A parameter's key: its model-wide ordinal, in the order parameters are first seen."""
    o = state._ddp_ordinal_of.get(id(p))
    if o is None:
        o = state._ddp_ordinal_of[id(p)] = len(state._ddp_ordinal_of)
        state._pinned_params.append(p)  # keeps the id valid
    return o


def comm_hook(state: State, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The DDP communication hook: averages ``bucket`` over ``state``'s group, compressing
    each parameter that is large enough and of a dtype the codec takes."""
    if isinstance(bucket, tuple):  # DDP's python reducer (compiled autograd) calls hooks per parameter
        raise RuntimeError(_PYTHON_REDUCER)
    state._claim("ddp")
    buf = bucket.buffer()
    step = state.step
    state._check_loaded()
    if bucket.is_last():
        state.step += 1
        state.stats["steps"] = state.step
    # numbered at every call, compressing or not, so warm-up steps (start_step) number
    # parameters in the same first-iteration order as a run without warm-up
    ordinals = state.engine.ordinals((_ordinal(state, p), p.numel(), p.dtype, p.shape) for p in bucket.parameters())
    what = f"bucket {bucket.index()} (step {step}, {buf.numel()} elements of {str(buf.dtype).replace('torch.', '')})"
    state._log_once(state._world_rank()[0])
    return state._submit(lambda: [(buf, ordinals)], buf.device, step, what, bucket.is_last())


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
