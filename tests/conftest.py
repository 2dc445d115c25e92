"""Shared test settings, for every folder under tests/: tests/support on sys.path (so a test
imports ``harness``, ``reference``, ``dist_utils``, ... by name, wherever it lives); tests
marked ``cuda`` run only where gradcomp's CUDA backend and a CUDA device are both available;
the one-rank process group fixture."""

import sys
from pathlib import Path

import gradcomp
import pytest
import torch.distributed as dist

# The shared modules (harness, reference, dist_utils, emulator, worker_main, ...): importable by
# name from tests in every folder. Worker processes get it on PYTHONPATH (dist_utils.run_ranks).
SUPPORT = Path(__file__).resolve().parent / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))


def pytest_collection_modifyitems(config, items):
    if gradcomp.cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and gradcomp built with CUDA")
    for item in items:
        # the marker, not the keyword: "cuda" is also the name of the folder tests/cuda/ (whose
        # emulated tests run on the CPU), and a folder's name is one of its tests' keywords
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def one_rank_group(tmp_path):
    """The default process group for the test's duration: Gloo, of one rank (this process)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
