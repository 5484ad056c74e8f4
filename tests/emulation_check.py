"""What the CPU-emulator tests of the CUDA kernels share (tests/cuda_emulation): finding g++,
and running a driver on one case directory."""
from __future__ import annotations

import shutil
import signal
import subprocess

import pytest
import torch

CXX_FLAGS = ["-O2", "-std=c++20", "-pthread", "-fno-strict-aliasing"]


def gxx() -> str:
    """The g++ that builds the drivers; skips the test without one."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found: cannot build the CPU emulator of the CUDA kernels")
    return cxx


def run_driver(driver, case_dir, fields: dict, inputs: dict[str, bytes]) -> list[str]:
    """Writes case.txt (one "key value..." line per field; tuples space-separated) and the raw
    inputs into ``case_dir``, runs the driver there (a crash or an error fails the test) and
    returns the emulator's fault messages."""
    for name, data in inputs.items():
        (case_dir / f"{name}.bin").write_bytes(data)
    (case_dir / "case.txt").write_text("".join(
        f"{key} {' '.join(map(str, value)) if isinstance(value, tuple) else value}\n"
        for key, value in fields.items()))
    result = subprocess.run([str(driver), str(case_dir)], capture_output=True, text=True,
                            timeout=600)
    if result.returncode != 0:
        how = (f"signal {signal.Signals(-result.returncode).name}" if result.returncode < 0
               else f"exit status {result.returncode}")
        pytest.fail(f"the emulator driver failed ({how}):\n{result.stderr[-4000:]}")
    count, *faults = (case_dir / "faults.txt").read_text().splitlines()
    if int(count) > len(faults):
        faults.append(f"... {int(count) - len(faults)} more")
    return faults


def read(path, shape, dtype) -> torch.Tensor:
    """A raw file written by a driver as a tensor."""
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=dtype).reshape(shape)
