"""PowerSGD's exchange: per-parameter low-rank factors, averaged exactly in rank order
(docs/design.md, "Low rank").

For a buffer's compressed parameters M_k (each an n_k × m_k matrix, gradient + residual):

1. P_k = M_k Q_k, all P_k packed in one flat buffer with a non-finite flag, averaged
   (``exact_mean_``: all-to-all, sum in rank order, all-gather);
2. P_k = QR(P_k).Q on every rank (the same bits: every rank holds the same P_k);
3. Q_k = M_kᵀ P_k, packed and averaged the same way;
4. the parameter's average is P_k Q_kᵀ; the residual keeps M_k − P_k Q_kᵀ; Q_k is kept as the
   next step's start.

Every product and factorization is torch's (matmul and QR are BLAS / LAPACK / cuBLAS /
cuSOLVER work that a hand-written kernel would not beat). Besides the products, each
compressed value is touched by the residual's add (M = g + e), the copy of P Qᵀ into the
bucket, and the residual's subtract and keep-on-a-bad-step select; each is one torch op.
Each M_k, P_k and Q_k
is a fresh contiguous tensor, so a product's bits do not depend on where a parameter sits in
a bucket.
"""

from __future__ import annotations

import hashlib
import time

import torch

from .collectives import exact_mean_, run_to_end, to_device
from .family import Exchange


def initial_q(seed: int, ordinal: int, step: int | None, m: int, rank: int) -> torch.Tensor:
    """The m × R start of a key's power iteration, the same on every rank: standard normal
    draws from a CPU generator seeded by (seed, key ordinal) — and the step, without warm
    start — each column scaled to unit length."""
    words = f"{seed}:{ordinal}:{'' if step is None else step}".encode()
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(words).digest()[:8], "little") >> 1)
    return unit_columns(torch.randn(m, rank, generator=g, dtype=torch.float32))


def unit_columns(q: torch.Tensor) -> torch.Tensor:
    """``q`` with each column divided by its length (a zero column stays zero). QR(M Q D) has
    the Q factor of QR(M Q) for any positive diagonal D, so this changes no output; it keeps
    P = M Q at the scale of M instead of M's square (which 16-bit factors would overflow)."""
    norm = q.norm(dim=0, keepdim=True)
    return q / torch.where(norm > 0, norm, torch.ones_like(norm))


class LowRankExchange(Exchange):
    """PowerSGD: two exact averages of small factors a buffer, P then Q."""

    flat_because = "it orthogonalizes P = MQ over a whole matrix, which a node's share of the blocks is not"

    def build(self, engine, spans, buf, topo):
        """The plan: (span, n, m) a compressed parameter, viewed as an n × m matrix."""
        return [(s, *engine.codec.matrix(engine.shape_of(s.key))) for s in spans]

    def run(self, engine, buf, matrices, call):
        c, world, dev = engine.codec, call.topo.world, buf.device
        R, wire = c.rank, c.factor_dtype
        t0 = time.perf_counter()
        mats, ps = [], []
        for s, n, m in matrices:
            g = buf[s.offset : s.offset + s.numel].view(n, m)
            r = engine.residual(s.key, s.numel, dev).view(n, m) if c.error_feedback else None
            mat = torch.add(g, r) if r is not None else g.to(torch.float32, copy=True)
            q = self._start(engine, s, m, R, call.step, dev)
            mats.append((s, n, m, mat, r, q))
            ps.append(mat @ q)
        # a non-finite gradient anywhere in the buffer makes every compressed value NaN on every
        # rank (docs/design.md, "Non-finite values"). A non-finite element of M makes its row of
        # P = M Q non-finite (inf * 0 is NaN), so the flag reads the n x R factors, not M again
        flag = (~torch.isfinite(torch.cat([p.reshape(-1) for p in ps])).all()).to(torch.float32).reshape(1)
        p_flat = torch.cat([p.reshape(-1) for p in ps] + [flag]).to(wire)
        mean = exact_mean_(p_flat, world, call.group)
        next(mean)  # the P all-to-all is in flight
        codec_s = time.perf_counter() - t0
        yield
        sent = run_to_end(mean)
        t0 = time.perf_counter()
        qs_new, pqs, off = [], [], 0
        for _, n, _, mat, _, _ in mats:
            p = p_flat[off : off + n * R].view(n, R).to(torch.float32, copy=True)
            off += n * R
            pq = torch.linalg.qr(p).Q
            pqs.append(pq)
            qs_new.append(mat.t() @ pq)
        q_flat = torch.cat([q.reshape(-1) for q in qs_new]).to(wire)
        codec_s += time.perf_counter() - t0
        sent += run_to_end(exact_mean_(q_flat, world, call.group))
        t0 = time.perf_counter()
        # the flag, or a factor that overflowed on the way (the averages are the same bits on
        # every rank, so is this decision): the step is NaN, and leaves no trace
        bad = (p_flat[-1] > 0) | ~torch.isfinite(p_flat).all() | ~torch.isfinite(q_flat).all()
        off = 0
        for (s, n, m, mat, r, q), pq in zip(mats, pqs):
            qa = q_flat[off : off + m * R].view(m, R).to(torch.float32, copy=True)
            off += m * R
            out = pq.masked_fill_(bad, float("nan")) @ qa.t()  # NaN everywhere after a bad step
            g = buf[s.offset : s.offset + s.numel].view(n, m)
            g.copy_(out)
            if r is not None:
                applied = out if g.dtype == torch.float32 else g.to(torch.float32)
                diff = mat.sub_(applied)
                if g.dtype == torch.float16:  # an output beyond float16's range: not carried as -inf
                    diff.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
                torch.where(bad, r, diff, out=r)  # a bad step keeps the residual it found
            if c.warm_start:
                # the next step starts from this Q (unit columns), but never from a bad step's
                # or a zero column (a zero gradient's Q is zero: the iteration would stay there)
                keep = bad | (qa.abs().amax(0, keepdim=True) == 0)
                q.copy_(torch.where(keep, q, unit_columns(qa)))
        codec_s += time.perf_counter() - t0
        return 0, sent, codec_s if dev.type == "cpu" else 0.0

    @staticmethod
    def _start(engine, s, m: int, R: int, step: int, dev: torch.device) -> torch.Tensor:
        """The key's Q: the stored one (warm start; drawn at the first step), or a fresh draw."""
        if not engine.codec.warm_start:
            return to_device(initial_q(engine.seed or 0, s.ordinal, step, m, R), dev)
        if s.key not in engine.factors:
            engine.factors.put(s.key, to_device(initial_q(engine.seed or 0, s.ordinal, None, m, R).reshape(-1), dev))
        return engine.factors.get(s.key, m * R, dev, torch.float32).view(m, R)
