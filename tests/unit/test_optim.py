"""gradcomp.optim.AdamW: torch's AdamW until freeze_step, then the same update with the second
moment and its bias correction held (1-bit Adam's frozen variance)."""

import copy
import math

import gradcomp.optim
import pytest
import torch


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(37, 5, generator=g).requires_grad_(), torch.randn(11, generator=g).requires_grad_()]


def _grads(step, params):
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * (1 + step % 3)


def test_matches_torch_adamw_bit_for_bit_without_freezing():
    ours, theirs = _params(), _params()
    kw = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    a = gradcomp.optim.AdamW(ours, **kw)
    b = torch.optim.AdamW(theirs, foreach=False, **kw)
    for step in range(6):
        _grads(step, ours)
        _grads(step, theirs)
        a.step()
        b.step()
        for p, q in zip(ours, theirs):
            assert torch.equal(p, q), f"step {step}"


def test_freezes_the_variance_and_its_bias_correction():
    """After freeze_step steps exp_avg_sq stops changing and the update is the reference's
    m̂ / (sqrt(v_frozen / (1 - beta2^freeze)) + eps), with m still moving."""
    freeze, lr, (b1, b2), eps, wd = 3, 1e-2, (0.9, 0.99), 1e-8, 0.01
    (p,) = _params()[:1]
    opt = gradcomp.optim.AdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, freeze_step=freeze)
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    w = p.detach().clone()
    for step in range(1, 8):
        _grads(step, [p])
        g = p.grad.clone()
        opt.step()
        m = b1 * m + (1 - b1) * g
        if step <= freeze:
            v = b2 * v + (1 - b2) * g * g
        bc2 = 1 - b2 ** min(step, freeze)
        w = w * (1 - lr * wd) - lr / (1 - b1**step) * m / ((v / bc2).sqrt() + eps)
        torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], v, rtol=1e-6, atol=0)
    assert opt.state[p]["step"].item() == 7


def test_state_dict_resumes_exactly():
    ps, qs = _params(), _params()
    a = gradcomp.optim.AdamW(ps, lr=1e-2, freeze_step=2)
    for step in range(3):
        _grads(step, ps)
        a.step()
    b = gradcomp.optim.AdamW(qs, lr=1e-2, freeze_step=2)
    with torch.no_grad():
        for p, q in zip(ps, qs):
            q.copy_(p)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # as from a file: torch shares the tensors otherwise
    for step in range(3, 6):
        _grads(step, ps)
        _grads(step, qs)
        a.step()
        b.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


def test_bad_arguments():
    for kw, why in [({"lr": -1.0}, "lr"), ({"betas": (1.0, 0.9)}, "betas"), ({"freeze_step": 0}, "freeze_step"),
                    ({"freeze_step": 2.5}, "freeze_step"), ({"eps": -1.0}, "eps")]:
        with pytest.raises(ValueError, match=why):
            gradcomp.optim.AdamW(_params(), **kw)
    assert math.isfinite(gradcomp.optim.AdamW(_params()).defaults["lr"])
