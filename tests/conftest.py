"""Shared test settings: tests marked ``cuda`` run only where gradcomp's CUDA backend and a
CUDA device are both available; the one-rank process group fixture."""

import gradcomp
import pytest
import torch.distributed as dist


def pytest_collection_modifyitems(config, items):
    if gradcomp.cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and gradcomp built with CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_rank_group(tmp_path):
    """The default process group for the test's duration: Gloo, of one rank (this process)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
