"""DDP's python reducer (optimize_ddp = "python_reducer": a comm hook call per parameter,
the mode compiled autograd traces), on 2 Gloo processes: gradcomp gives the gradients, the
residuals and the step count of the bucket hook under DDP's C++ reducer, bit for bit, in
eager mode and under compiled autograd."""

from pathlib import Path

import pytest
import torch
from dist_utils import describe, run_ranks

WORKER = Path(__file__).with_name("python_reducer_worker.py")
STEPS = 3


CODEC = "int4:stochastic"  # rounding draws per step: a step miscounted changes the bits


def _run(mode, tmp_path, **opts):
    res = run_ranks(mode, 2, tmp_path / mode, timeout=240, worker=WORKER, steps=STEPS, **opts)
    assert res.ok, describe(res)
    return res.outputs


@pytest.fixture(scope="module")
def buckets(tmp_path_factory):
    """The bucket hook under DDP's C++ reducer; and compression really runs there: its
    average differs from an exact one's."""
    tmp = tmp_path_factory.mktemp("buckets")
    outs = _run("buckets", tmp, codec=CODEC)
    exact = _run("buckets", tmp / "exact", codec="fp16")
    assert not _same(exact[0]["grads"][0]["a.weight"], outs[0]["grads"][0]["a.weight"])
    return outs


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("mode", ["python_reducer", "compiled_autograd"])
def test_per_parameter_hook_is_the_bucket_hook_bit_for_bit(tmp_path, mode, buckets):
    per_param = _run(mode, tmp_path, codec=CODEC)
    for r in range(2):
        got, want = per_param[r], buckets[r]
        assert got["python_reducer"] and not want["python_reducer"]
        assert got["step"] == want["step"] == STEPS and not got["warnings"]
        for s in range(STEPS):
            assert got["grads"][s].keys() == want["grads"][s].keys()
            for n, g in want["grads"][s].items():
                assert _same(got["grads"][s][n], g), f"rank {r} step {s} {n}"
        assert got["residuals"].keys() == want["residuals"].keys() and got["residuals"]
        for k, v in want["residuals"].items():
            assert _same(got["residuals"][k], v), f"rank {r} residual {k}"
        # more bytes: each parameter's shards are padded on their own, and its exact values carry their own flag
        assert want["stats"]["bytes_sent"] > 0 and got["stats"]["bytes_sent"] >= want["stats"]["bytes_sent"]
    for n, p in per_param[0]["params"].items():  # replicas identical
        assert _same(p, per_param[1]["params"][n])


def test_a_parameter_without_gradient_makes_the_step_count_late_with_a_warning(tmp_path):
    outs = _run("python_reducer", tmp_path, codec="int8", unused=True)
    for out in outs:
        assert out["step"] == STEPS - 1  # the last step ends only at a next step's first gradient
        assert len(out["warnings"]) == 1 and "received no gradient" in out["warnings"][0]
    for n, p in outs[0]["params"].items():
        assert _same(p, outs[1]["params"][n])
