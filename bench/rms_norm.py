"""RMSNorm over the last dim of (N, C), with weight: GB/s.

Bytes: forward reads x, weight and writes y, rstd; backward reads dy, x, weight, rstd and
writes dx, dweight.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from llm_kernels.bench import rowwise
from llm_kernels.bench.common import Case, Options, check_importable, randn

NAME = "rms_norm"
METRIC = "gbps"
EPS = 1e-6


def bytes_moved(mode: str, n: int, c: int, e: int) -> float:
    fwd = 2 * n * c * e + c * e + n * 4
    bwd = 3 * n * c * e + c * e + n * 4 + c * e
    return rowwise.sum_modes(fwd, bwd, mode)


def cases(opts: Options, device: torch.device) -> list[Case]:
    return rowwise.row_cases(NAME, opts, device, bytes_moved)


def make_inputs(case: Case, device: torch.device):
    """x (N, C), weight (C,)."""
    n, c = case.params["N"], case.params["C"]
    grad = case.mode != "fwd"
    return (randn((n, c), case.dtype, device, requires_grad=grad),
            randn((c,), case.dtype, device, requires_grad=grad))


def lk_rms_norm(x, w, *, backend):
    import llm_kernels as lk
    return lk.rms_norm(x, w, EPS, backend=backend)


def torch_rms_norm(x, w):
    return F.rms_norm(x, x.shape[-1:], w, EPS)


def liger_provider(case: Case, device: torch.device, opts: Options):
    check_importable("liger_kernel")
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    return rowwise.plain_provider(lambda x, w: LigerRMSNormFunction.apply(x, w, EPS),
                                  make_inputs, case, device, opts)


PROVIDERS = {
    "lk-triton": functools.partial(rowwise.lk_provider, lk_rms_norm, make_inputs, "lk-triton"),
    "lk-cuda": functools.partial(rowwise.lk_provider, lk_rms_norm, make_inputs, "lk-cuda"),
    "torch": functools.partial(rowwise.lk_provider, lk_rms_norm, make_inputs, "lk-torch"),
    "torch-compile": functools.partial(rowwise.compile_provider, torch_rms_norm, make_inputs),
    "liger": liger_provider,
}
