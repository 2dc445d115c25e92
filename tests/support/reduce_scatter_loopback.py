"""The engine's reduce-scatter (what gradcomp.fsdp's comm runs) for W ranks as threads in one
process, their all_to_all a loopback: tests/multirank/test_fsdp.py holds it to the pure-torch
reference, tests/cuda/test_cuda.py holds the GPU's bytes to the CPU's."""

from __future__ import annotations

import threading

import torch
from gradcomp import codecs
from gradcomp.engine import Engine
from gradcomp.engine.reduce_scatter import Chunked, plan_reduce_scatter, reduce_scatter_

MIN = 256  # min_numel: test_fsdp's model and random_layout have compressed and exact parameters on both sides


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit: NaN where NaN, and -0.0 told from +0.0 (torch.equal would equate them)."""
    bits = {4: torch.int32, 2: torch.int16, 8: torch.int64, 1: torch.uint8}
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(bits[a.element_size()]), b.reshape(-1).view(bits[b.element_size()])))


def loopback(world: int):
    """all_to_all for ``world`` threads, each a rank: the handle's wait() has the data."""
    barrier = threading.Barrier(world)
    sends: dict = {}

    def for_rank(rank):
        def a2a(recv, send):
            sends[rank] = send.reshape(-1)
            barrier.wait()
            chunk = send.numel() // world
            flat = recv.view(-1)
            for j in range(world):
                flat[j * chunk : (j + 1) * chunk].copy_(sends[j][rank * chunk : (rank + 1) * chunk])
            barrier.wait()

            class Done:
                def wait(self):
                    return True

            return Done()
        return a2a

    return for_rank


def engine_reduce_scatter(inputs, pieces, codec, steps, device="cpu", min_numel=MIN, seed=3):
    """Every rank's output of ``steps`` reduce-scatters of ``inputs[step][rank]``, the ranks as threads."""
    world = len(inputs[0])
    engines = [Engine(codecs.parse(codec), min_numel=min_numel, seed=seed) for _ in range(world)]
    outs = [[None] * world for _ in steps]
    for si, step in enumerate(steps):
        a2a = loopback(world)
        errors = []

        def rank_body(r, si=si, step=step, a2a=a2a, errors=errors):
            try:
                x = inputs[si][r].to(device).clone()
                plan = plan_reduce_scatter(engines[r], pieces, world, r, x.dtype, torch.device(device), True)
                out = torch.empty(x.numel() // world, dtype=x.dtype, device=device)
                reduce_scatter_(engines[r], plan, x, out, None, step, all_to_all=a2a(r))
                outs[si][r] = out.cpu()
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=rank_body, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
    return outs


def random_layout(world: int, gen: torch.Generator):
    """Odd dim-0 sizes, including one with no rows for the last rank and one below MIN."""
    shapes = [(3 * world - 1, 97), (world - 1, 300), (5, 7), (2 * world + 1, 700)]
    pieces, offset = [], 0
    for i, (d0, inner) in enumerate(shapes):
        per = -(-d0 // world)
        real = tuple(max(0, min(per, d0 - j * per)) * inner for j in range(world))
        pieces.append(Chunked(f"p{i}", i, d0 * inner, offset, per * inner, real))
        offset += per * inner
    return pieces, offset
