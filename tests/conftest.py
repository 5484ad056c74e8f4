"""Test setup: Triton runs through its interpreter on machines without a GPU.

TRITON_INTERPRET must be set before anything imports triton (importing torch does not).
"""
import os
import zlib

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible); bench/gpu_check.sh runs these")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seed(request):
    """A seed per test derived from its id: fresh inputs for each test, reproducible runs."""
    value = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(value)
    return value


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")
