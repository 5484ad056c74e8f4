"""Softmax over the last dim of (N, C): GB/s.

Bytes: forward reads x and writes y; backward reads dy, y and writes dx.
"""
from __future__ import annotations

import functools

import torch

from llm_kernels.bench import rowwise
from llm_kernels.bench.common import Case, Options, randn

NAME = "softmax"
METRIC = "gbps"


def bytes_moved(mode: str, n: int, c: int, e: int) -> float:
    return rowwise.sum_modes(2 * n * c * e, 3 * n * c * e, mode)


def cases(opts: Options, device: torch.device) -> list[Case]:
    return rowwise.row_cases(NAME, opts, device, bytes_moved)


def make_inputs(case: Case, device: torch.device):
    """x (N, C)."""
    n, c = case.params["N"], case.params["C"]
    return (randn((n, c), case.dtype, device, requires_grad=case.mode != "fwd"),)


def lk_softmax(x, *, backend):
    import llm_kernels as lk
    return lk.softmax(x, -1, backend=backend)


def torch_softmax(x):
    return torch.softmax(x, dim=-1)


PROVIDERS = {
    "lk-triton": functools.partial(rowwise.lk_provider, lk_softmax, make_inputs, "lk-triton"),
    "lk-cuda": functools.partial(rowwise.lk_provider, lk_softmax, make_inputs, "lk-cuda"),
    "torch": functools.partial(rowwise.lk_provider, lk_softmax, make_inputs, "lk-torch"),
    "torch-native": functools.partial(rowwise.plain_provider, torch_softmax, make_inputs),
    "torch-compile": functools.partial(rowwise.compile_provider, torch_softmax, make_inputs),
}
