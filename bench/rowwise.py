"""Cases and providers shared by the memory-bound row-wise ops (norms, softmax, cross-entropy).

Inputs are (N, C) with the row-wise op over C; GB/s counts each input read once and each
output written once (the bytes the op cannot avoid moving).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from llm_kernels.bench.common import (Case, Options, check_lk_available, compiled, default_dtype,
                                      lk_backend, pick_modes, timed_step)

ROWS_GPU = 16384
ROWS_CPU = 2048
ROWS_CPU_QUICK = 1024


def sizes(opts: Options, device: torch.device, *, gpu: Sequence[int], gpu_quick: Sequence[int],
          cpu: Sequence[int]) -> list[int]:
    """The sizes given by --hidden-sizes, else the device's defaults (the first CPU size only
    with --quick)."""
    if opts.hidden_sizes:
        return list(opts.hidden_sizes)
    if device.type == "cuda":
        return list(gpu_quick if opts.quick else gpu)
    return list(cpu[:1] if opts.quick else cpu)


def rows(opts: Options, device: torch.device) -> int:
    if device.type == "cuda":
        return ROWS_GPU
    return ROWS_CPU_QUICK if opts.quick else ROWS_CPU


def row_cases(name: str, opts: Options, device: torch.device,
              bytes_per_mode: Callable[[str, int, int, int], float], *,
              x_name: str = "hidden", n_rows: int | None = None,
              widths: Sequence[int] | None = None) -> list[Case]:
    """Cases (N rows, C columns) for each mode and width; ``bytes_per_mode(mode, n, c, e)``."""
    dtype = default_dtype(opts, device)
    e = torch.empty((), dtype=dtype).element_size()
    n = n_rows or rows(opts, device)
    widths = widths or sizes(opts, device, gpu=(1024, 2048, 4096, 8192, 16384),
                             gpu_quick=(4096, 8192), cpu=(2048, 8192))
    default = ["fwd", "fwd+bwd"] if opts.quick else ["fwd", "bwd", "fwd+bwd"]
    short = {"hidden": "C", "vocab": "V"}[x_name]
    return [Case(op=name, mode=mode, dtype=dtype, params={"N": n, short: c}, x_name=x_name, x=c,
                 nbytes=bytes_per_mode(mode, n, c, e))
            for mode in pick_modes(opts, default, ("fwd", "bwd", "fwd+bwd")) for c in widths]


def sum_modes(fwd: float, bwd: float, mode: str) -> float:
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def lk_provider(fn: Callable, make_inputs: Callable, provider: str, case: Case,
                device: torch.device, opts: Options):
    """``fn(*inputs, backend=...)`` through the llm_kernels public API; ``provider`` is
    ``lk-triton``, ``lk-cuda`` or ``lk-torch`` (the ``torch`` provider: the eager reference)."""
    check_lk_available(provider, device)
    backend = lk_backend(provider)
    return timed_step(lambda *a: fn(*a, backend=backend), make_inputs(case, device), case.mode)


def plain_provider(fn: Callable, make_inputs: Callable, case: Case, device: torch.device,
                   opts: Options):
    return timed_step(fn, make_inputs(case, device), case.mode)


def compile_provider(fn: Callable, make_inputs: Callable, case: Case, device: torch.device,
                     opts: Options):
    return timed_step(compiled(fn, device, opts), make_inputs(case, device), case.mode)
