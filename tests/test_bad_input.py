"""The bad-input matrix (tests/bad_input_matrix.py) on every backend, each in a subprocess.

Every public function gets wrong ranks, mismatched B/H/D, H % Hkv != 0, mixed dtypes and
devices, integer and float64 inputs, strided last dims, empty tensors, bad masks, NaN and inf;
each case must give its documented result or a clear error naming the argument before any
kernel op is looked up. The subprocess must exit 0 with every case reported as passing: a
segfault or an abort in a kernel shows as a failed test here, not a dead pytest.
"""
import os
import subprocess
import sys

import pytest

import llm_kernels as lk

MATRIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bad_input_matrix.py")
MIN_CASES = 190  # the matrix holds 200 cases (219 on cuda): guards against it shrinking


def run_matrix(backend: str, device: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, MATRIX, backend, "--device", device],
                          capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("backend", ["torch", "cuda", "triton", "auto"])
def test_bad_input_matrix(backend):
    """CPU tensors (the script runs Triton through its interpreter, GPU or not)."""
    if backend in lk.BACKENDS:
        ok, why = lk.available_backends()[backend]
        if not ok:
            pytest.skip(f"backend {backend!r} unavailable: {why}")
    proc = run_matrix(backend, "cpu")
    lines = proc.stdout.splitlines()
    failures = [line for line in lines if not line.startswith(("PASS ", "DONE "))]
    passed = [line for line in lines if line.startswith("PASS ")]
    done = [line for line in lines if line.startswith("DONE ")]
    report = "\n".join(failures) + "\n--- stderr (tail) ---\n" + proc.stderr[-3000:]
    returncode = proc.returncode
    assert returncode == 0, f"the matrix exited with {returncode}:\n{report}"
    assert not failures and len(done) == 1, report
    assert done[0] == f"DONE {len(passed)} cases, 0 failed", done[0]
    assert len(passed) >= MIN_CASES, f"only {len(passed)} cases ran"
