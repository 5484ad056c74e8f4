"""The numerics pass rule shared by the tests and ``llm-kernels verify``.

A kernel output passes when its relative error against the float64 reference is at most twice
the relative error of the same-dtype torch computation against that reference, plus a tiny
per-dtype floor; float32 results must also be under ``1e-5`` relative. NaN never passes.
Relative error is ``||out - ref|| / ||ref||`` (Frobenius norms, computed in float64).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Absolute slack added to 2x the torch error: a fraction of the dtype's epsilon for 16-bit
# types, a few float32 ulps for float32 (torch's own fp32 error can be ~1e-8 on easy inputs).
FLOOR = {torch.float32: 1e-6, torch.float16: 2e-4, torch.bfloat16: 1.6e-3, torch.float64: 1e-12}
FP32_MAX_REL = 1e-5


@dataclass
class Comparison:
    """Errors of one output against the fp64 reference, and the verdict."""

    max_abs: float
    mean_abs: float
    rel: float
    torch_rel: float
    bound: float
    passed: bool

    def describe(self) -> str:
        return (f"rel={self.rel:.3e} (bound {self.bound:.3e}, torch {self.torch_rel:.3e}) "
                f"max_abs={self.max_abs:.3e} mean_abs={self.mean_abs:.3e}")


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (absolute error when ref is all zeros)."""
    diff = (out.detach().double() - ref.detach().double()).norm().item()
    norm = ref.detach().double().norm().item()
    return diff / norm if norm > 0 else diff


def compare(out: torch.Tensor, ref: torch.Tensor, torch_out: torch.Tensor,
            dtype: torch.dtype) -> Comparison:
    """Apply the pass rule to ``out`` given the fp64 ``ref`` and the same-dtype ``torch_out``."""
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    finite = bool(torch.isfinite(out64).all()) or bool(
        torch.equal(torch.isfinite(out64), torch.isfinite(ref64)) and
        torch.equal(out64[~torch.isfinite(out64)], ref64[~torch.isfinite(ref64)]))
    diff = (out64 - ref64).abs()
    diff = torch.where(torch.isfinite(ref64) & torch.isfinite(out64), diff,
                       torch.zeros_like(diff))
    rel = rel_error(torch.nan_to_num(out64, 0, 0, 0), torch.nan_to_num(ref64, 0, 0, 0))
    torch_rel = rel_error(torch.nan_to_num(torch_out.double().cpu(), 0, 0, 0),
                          torch.nan_to_num(ref64, 0, 0, 0))
    bound = 2.0 * torch_rel + FLOOR.get(dtype, 1e-6)
    if dtype == torch.float32:
        bound = min(bound, FP32_MAX_REL)
    passed = finite and not bool(torch.isnan(out64).any()) and rel <= bound
    return Comparison(max_abs=float(diff.max()) if diff.numel() else 0.0,
                      mean_abs=float(diff.mean()) if diff.numel() else 0.0,
                      rel=rel, torch_rel=torch_rel, bound=bound, passed=passed)


def assert_close(out, ref, torch_out, dtype, what: str = "output") -> Comparison:
    """Raise AssertionError with max and mean error when ``out`` fails the pass rule."""
    result = compare(out, ref, torch_out, dtype)
    if not result.passed:
        raise AssertionError(f"{what} ({dtype}) fails the pass rule: {result.describe()}")
    return result
