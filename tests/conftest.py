"""Shared test settings: tests marked ``cuda`` run only where gradcomp's CUDA backend and a
CUDA device are both available."""

import gradcomp
import pytest


def pytest_collection_modifyitems(config, items):
    if gradcomp.cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and gradcomp built with CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
