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


def pytest_runtest_logreport(report):
    """With LLM_KERNELS_FAILURE_LOG set, append each failure (id, phase, error) to that file the
    moment it happens: a GPU check cut off by its time limit still names what failed. Written
    by the main process only (pytest-xdist forwards its workers' reports there)."""
    path = os.environ.get("LLM_KERNELS_FAILURE_LOG")
    if not path or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    entry = f"=== FAILED {report.nodeid} ({report.when}, {report.duration:.1f} s)\n{report.longreprtext}\n"
    with open(path, "a", encoding="utf-8") as log:
        log.write(entry)
