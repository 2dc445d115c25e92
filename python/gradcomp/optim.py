"""AdamW with a frozen variance: what lets low-bit codecs (int2, sign) train under Adam::

    opt = gradcomp.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, freeze_step=100)
    state = gradcomp.register(ddp_model, "sign", start_step=100)   # exact until v is frozen

Adam divides each coordinate by the square root of a running mean of its squared gradient,
v. A low-bit codec with error feedback sends, per coordinate, the true gradient spread over
several steps (what one step drops, a later one sends): the sum is right, which is all SGD
needs, but v, a mean of squares, sees the bursts and grows, and the update, a nonlinear
function of each step's gradient, no longer adds up to the uncompressed one. 1-bit Adam
(Tang et al., 2021) runs plain Adam for a warm-up, then freezes v: from there the update is
a fixed per-coordinate scaling of the momentum, linear in the gradients, and error feedback
makes up for compression as it does under SGD. This optimizer is that: torch's AdamW
(decoupled weight decay) until ``freeze_step`` steps have been taken, then the same with v
and its bias correction kept as they were. Pair it with the State's ``start_step`` (or the
spec's ``warmup=``) at the same step, so that v is learnt from exact gradients.
"""

from __future__ import annotations

import math

import torch

__all__ = ["AdamW"]


class AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update (the single-tensor form, ``amsgrad=False``) whose second
    moment stops changing after ``freeze_step`` steps.

    Args:
        params, lr, betas, eps, weight_decay: as torch.optim.AdamW.
        freeze_step: steps after which v (``exp_avg_sq``) and its bias correction stay as
            they are; None never freezes (then this is torch's AdamW). A parameter's own step
            count decides, so one that first gets a gradient later freezes later.

    Its ``state_dict()`` holds, per parameter, ``step``, ``exp_avg`` and ``exp_avg_sq`` as
    torch's does, so a checkpoint resumes it exactly.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 freeze_step: int | None = None):
        if not 0.0 <= lr:
            raise ValueError(f"gradcomp.optim.AdamW: invalid lr {lr!r}")
        if not 0.0 <= eps:
            raise ValueError(f"gradcomp.optim.AdamW: invalid eps {eps!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"gradcomp.optim.AdamW: betas must be in [0, 1), got {betas!r}")
        if freeze_step is not None and (isinstance(freeze_step, bool) or not isinstance(freeze_step, int)
                                        or freeze_step < 1):
            raise ValueError(f"gradcomp.optim.AdamW: freeze_step must be None or a positive int, got {freeze_step!r}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "freeze_step": freeze_step})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd, freeze = group["lr"], group["eps"], group["weight_decay"], group["freeze_step"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("gradcomp.optim.AdamW does not take sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                grad, exp_avg, exp_avg_sq = p.grad, state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                step = int(state["step"].item())
                p.mul_(1 - lr * wd)
                exp_avg.lerp_(grad, 1 - beta1)
                frozen = freeze is not None and step > freeze
                if not frozen:
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad.conj(), value=1 - beta2)
                bias_correction1 = 1 - beta1**step
                bias_correction2 = 1 - beta2 ** (min(step, freeze) if frozen else step)
                step_size = lr / bias_correction1
                denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-step_size)
        return loss
