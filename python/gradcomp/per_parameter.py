"""DDP's python reducer: a comm hook called once per parameter.

With ``torch._dynamo.config.optimize_ddp = "python_reducer"`` (the mode compiled autograd
traces DDP's backward in) DDP has no buckets: a post-accumulate-grad hook on each parameter
calls the comm hook as ``hook(state, (param.grad, param))``, ignores what it returns, and
expects ``param.grad`` to hold the average once the hook has returned. gradcomp then reduces
each parameter on its own, through the same engine and keys as the bucket hook: blocks'
owners, residuals and rounding depend on the parameter, never on its bucket, so the numbers
are the bucket hook's, bit for bit (docs/design.md, "Per-parameter decisions").

Each call waits for its parameter's exchange: on Gloo the host waits for the network (as it
does for any synchronous collective); on CUDA the current stream waits for the State's side
stream, with no host sync. The hooks fire in autograd's order, the same on every rank, which
fixes the collective order; under compiled autograd the call is left out of the traced graph
(``torch.compiler.disable``) and runs as it does in eager mode.

A step ends when every parameter that requires grad has been reduced once. Should a step
leave some parameter without a gradient, the step ends instead at the first parameter
reduced a second time, i.e. at the next step's first hook call; a warning says so once, as
the step counter (and what a checkpoint saves of it) then runs one step late in between.
"""

from __future__ import annotations

import warnings

import torch

_disable = getattr(getattr(torch, "compiler", None), "disable", None) or torch._dynamo.disable

LATE = ("gradcomp: a step of DDP's python reducer ended with parameters that received no gradient, so "
        "gradcomp's step counter advanced only at the next step's first gradient: a checkpoint saved between "
        "the two records the step before (set static parameters' requires_grad=False to avoid this)")


class ParameterSteps:
    """The step bookkeeping of the per-parameter mode: which parameters this step has reduced."""

    __slots__ = ("expected", "seen", "warned")

    def __init__(self, expected: int):
        self.expected = expected  # parameters of the DDP model that require grad
        self.seen: set = set()
        self.warned = False


def number_in_bucket_order(state, ddp_model, ordinal_of) -> int:
    """Numbers the model's parameters as the bucket hook would: in the order of DDP's first
    buckets (its reducer is built in this mode too), so keys, blocks' owners and rounding
    draws are the bucket hook's, whatever order autograd then calls the hooks in. Returns
    how many parameters require grad (a step's hook calls). ``ordinal_of(param)`` gives a
    parameter's key."""
    try:
        params = [p for b in ddp_model.reducer._get_zeros_like_grad_buckets() for p in b.parameters()]
    except (AttributeError, RuntimeError):  # no reducer to ask: the reverse of the model's order
        params = [p for p in reversed(list(ddp_model.module.parameters())) if p.requires_grad]
    state.engine.ordinals([(ordinal_of(p), p.numel(), p.dtype, p.shape) for p in params])
    return len(params)


@_disable
def reduce_parameter(state, steps: ParameterSteps, grad: torch.Tensor, ordinal: int, shape) -> None:
    """Averages one parameter's gradient ``grad`` in place over ``state``'s group."""
    if ordinal in steps.seen:  # the last step ended with parameters that got no gradient
        steps.seen.clear()
        state.end_step()
        if not steps.warned:
            steps.warned = True
            warnings.warn(LATE, stacklevel=2)
    step = state.current_step()
    steps.seen.add(ordinal)
    last = len(steps.seen) >= steps.expected
    keys = state.engine.ordinals([(ordinal, grad.numel(), grad.dtype, shape)])
    flat = grad.view(-1) if grad.is_contiguous() else grad.reshape(-1).clone()
    what = f"parameter {ordinal} (step {step}, {flat.numel()} elements of {str(flat.dtype).replace('torch.', '')})"
    state.log_once(state.world_rank()[0])
    state.reduce(lambda: [(flat, keys)], flat.device, step, what).wait()
    if flat.data_ptr() != grad.data_ptr():
        grad.copy_(flat.view_as(grad))
    if last:
        steps.seen.clear()
        state.end_step()
