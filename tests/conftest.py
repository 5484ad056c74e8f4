"""Test setup: Triton runs through its interpreter on machines without a GPU.

TRITON_INTERPRET must be set before anything imports triton (importing torch does not).
"""
import gc
import os
import zlib

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# pytest-xdist: each worker's torch would start one intra-op thread per core, so N workers run
# N x cores threads (libgomp spin-waits) on the fp64 CPU-side comparisons of numerics.compare.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


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


@pytest.fixture(autouse=True)
def _release_cuda_memory(request):
    """On a GPU, after every test: wait for its kernels (an asynchronous fault fails this test,
    not whichever test this worker runs next) and hand the worker's cached blocks back to the
    driver. Without it each pytest-xdist worker keeps its largest test's memory reserved for
    the rest of the session, and 8-12 workers on one 80 GB GPU run the later tests out of
    memory."""
    yield
    if HAS_CUDA and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_runtest_logreport(report):
    """For the GPU check, written by the main process only (pytest-xdist forwards its workers'
    reports there), the moment each test ends, so that a run cut off by its time limit still
    says what it did: with LLM_KERNELS_FAILURE_LOG set, each failure (id, phase, error) is
    appended to that file; with LLM_KERNELS_FINISHED_LOG set, the id of each test that ran to
    its end (whatever its outcome) to that one, so a later call can run the tests left over."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    failures = os.environ.get("LLM_KERNELS_FAILURE_LOG")
    if failures and report.failed:
        with open(failures, "a", encoding="utf-8") as log:
            log.write(f"=== FAILED {report.nodeid} ({report.when}, {report.duration:.1f} s)\n"
                      f"{report.longreprtext}\n")
    finished = os.environ.get("LLM_KERNELS_FINISHED_LOG")
    if finished and report.when == "teardown":
        with open(finished, "a", encoding="utf-8") as log:
            log.write(report.nodeid + "\n")
