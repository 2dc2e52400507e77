"""Test-session set-up.

Without a GPU, Triton kernels run through the interpreter: TRITON_INTERPRET must
be set before triton is first imported, which is why this happens at conftest
import time (pytest imports conftest before any test module).
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fixed_seed():
    """Every test starts from the same seed: inputs are random but reproducible."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"
