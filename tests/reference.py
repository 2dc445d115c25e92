"""Pure-torch reference of gradcomp's int8 codec and compressed all-reduce: the oracle the
tests hold the compiled backends to. Written from the math (DESIGN.md, codec.h's
comments), not from the kernels: element-wise torch ops, each one IEEE-rounded float32
operation, so the compiled backends must match it bit for bit.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

QMAX = 127.0


def block_quantize(a: torch.Tensor, block: int):
    """a: [n] float32 (one parameter's values). Returns (scales [nb], codes [nb, block]
    int8, dequantized [n], nonfinite [nb] bool), blocks padded with zeros."""
    n = a.numel()
    nb = -(-n // block)
    padded = torch.zeros(nb * block, dtype=torch.float32)
    padded[:n] = a
    blocks = padded.view(nb, block)
    absval = blocks.abs()
    nonfinite = ~torch.isfinite(blocks).all(dim=1)
    absmax = absval.amax(dim=1)
    inv = torch.tensor(QMAX) / absmax  # quantize by multiplying with qmax / absmax
    usable = ~nonfinite & torch.isfinite(inv)  # absmax 0, or so tiny qmax / absmax overflows: codes 0
    scales = torch.where(nonfinite, torch.full_like(absmax, float("nan")),
                         torch.where(usable, absmax / torch.tensor(QMAX), torch.zeros_like(absmax)))
    # near FLT_MAX, 127 * scale can overflow: the scale steps one ulp down
    overflow = ~torch.isfinite(scales * torch.tensor(QMAX)) & usable
    scales = torch.where(overflow, torch.nextafter(scales, torch.zeros_like(scales)), scales)
    safe_inv = torch.where(usable, inv, torch.zeros_like(inv))
    q = torch.round(blocks * safe_inv[:, None]).clamp(-QMAX, QMAX)  # torch.round: half to even
    q = torch.where(usable[:, None], q, torch.zeros_like(q))
    deq = (q * scales[:, None]).reshape(-1)[:n]
    deq = torch.where(usable.repeat_interleave(block)[:n], deq, torch.zeros_like(deq))
    return scales, q.to(torch.int8), deq, nonfinite


def encode_ef(x: torch.Tensor, residual: torch.Tensor | None, block: int):
    """Pass 1 for one parameter. x: [n] any float dtype; residual: [n] float32 or None.
    Returns (scales, codes, new_residual or None, nonfinite)."""
    a = x.float()
    if residual is not None:
        a = a + residual
    scales, codes, deq, nonfinite = block_quantize(a, block)
    new_res = None
    if residual is not None:
        new_res = a - deq
        bad_block = nonfinite.repeat_interleave(block)[: a.numel()]
        # a non-finite block keeps the old residual where a is finite and clears it where not
        new_res = torch.where(bad_block, torch.where(torch.isfinite(a), residual, torch.zeros_like(a)), new_res)
    return scales, codes, new_res, nonfinite


def compressed_allreduce(xs: list[torch.Tensor], residuals: list[torch.Tensor | None], block: int,
                         owners: torch.Tensor) -> SimpleNamespace:
    """The whole compressed all-reduce of one parameter over W ranks, piece by piece.

    xs[r]: rank r's gradient [n]; residuals[r]: its residual [n] or None; owners: [nb]
    owner rank of each block. Returns stage1 (per rank: scales, codes, residual, nonfinite),
    mean (the rank-order sum times fl(1/W)), its stage-2 scales2 / codes2 / nonfinite2, out
    (what every rank decodes: NaN everywhere if any block is non-finite) and res_after (the
    second encoding's error, times W, added to the owner's residual for finite blocks)."""
    world = len(xs)
    n = xs[0].numel()
    assert owners.numel() == -(-n // block)
    stage1 = [encode_ef(x, r, block) for x, r in zip(xs, residuals)]
    total = torch.zeros(n, dtype=torch.float32)
    for scales, codes, _, _ in stage1:  # rank order
        total = total + (codes.float() * scales[:, None]).reshape(-1)[:n]
    mean = total * (torch.tensor(1.0) / torch.tensor(float(world)))  # x * fl(1/W)
    scales2, codes2, _, nonfinite2 = block_quantize(mean, block)
    sent = (codes2.float() * scales2[:, None]).reshape(-1)[:n]  # int8 codes: no -0.0
    out = torch.full_like(sent, float("nan")) if nonfinite2.any() else sent
    res_after = [s[2] for s in stage1]
    if residuals[0] is not None:
        err = mean - sent  # masked to finite blocks below
        elem_owner = owners.repeat_interleave(block)[:n]
        finite = (~nonfinite2).repeat_interleave(block)[:n]
        res_after = [torch.where((elem_owner == r) & finite, res_after[r] + torch.tensor(float(world)) * err,
                                 res_after[r]) for r in range(world)]
    return SimpleNamespace(stage1=stage1, mean=mean, scales2=scales2, codes2=codes2, nonfinite2=nonfinite2,
                           out=out, res_after=res_after)


def compressed_mean(xs: list[torch.Tensor], residuals: list[torch.Tensor | None], block: int,
                    owners: torch.Tensor):
    """(what every rank decodes [n] float32, the new residuals) of compressed_allreduce."""
    r = compressed_allreduce(xs, residuals, block, owners)
    return r.out, r.res_after
