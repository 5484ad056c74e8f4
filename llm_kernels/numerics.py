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
# Elements per chunk: the comparison streams over its inputs, so its float64 temporaries stay
# at a few hundred MB however large the outputs (a realistic-size output in float64 on the host
# took tens of seconds a comparison).
CHUNK = 1 << 24


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


def _flat(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.detach().to(device).reshape(-1)


def _chunk_stats(out, ref, torch_out) -> tuple:
    """One chunk's (out all finite, out non-finite exactly where ref is and with ref's values,
    any NaN in out, sums) of 1-D float64 chunks, sums = [max and sum of |out - ref| where both
    are finite, sum of squares of ref, of out - ref and of torch_out - ref (NaN and inf as 0)]."""
    out_finite, ref_finite = torch.isfinite(out), torch.isfinite(ref)
    match = torch.equal(out_finite, ref_finite) and torch.equal(out[~out_finite],
                                                               ref[~ref_finite])
    diff = torch.where(out_finite & ref_finite, (out - ref).abs(), 0.0)
    clean_ref = torch.nan_to_num(ref, 0, 0, 0)
    sums = torch.stack([diff.max(), diff.sum(), clean_ref.square().sum(),
                        (torch.nan_to_num(out, 0, 0, 0) - clean_ref).square().sum(),
                        (torch.nan_to_num(torch_out, 0, 0, 0) - clean_ref).square().sum()])
    return bool(out_finite.all()), match, bool(torch.isnan(out).any()), sums


def compare(out: torch.Tensor, ref: torch.Tensor, torch_out: torch.Tensor,
            dtype: torch.dtype, chunk: int = CHUNK) -> Comparison:
    """Apply the pass rule to ``out`` given the fp64 ``ref`` and the same-dtype ``torch_out``,
    in float64 on ``out``'s device, ``chunk`` elements at a time."""
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    n = out.numel()
    flats = [_flat(t, out.device) for t in (out, ref, torch_out)]
    stats = [_chunk_stats(*(f[i:i + chunk].double() for f in flats)) for i in range(0, n, chunk)]
    sums = (torch.stack([s[3] for s in stats]).cpu() if stats
            else torch.zeros(1, 5, dtype=torch.float64))  # (chunks, 5)
    finite = all(s[0] for s in stats) or all(s[1] for s in stats)
    ref_norm, diff_norm, torch_norm = (float(sums[:, k].sum().sqrt()) for k in (2, 3, 4))
    scale = ref_norm if ref_norm > 0 else 1.0  # absolute error when ref is all zeros
    rel, torch_rel = diff_norm / scale, torch_norm / scale
    bound = 2.0 * torch_rel + FLOOR.get(dtype, 1e-6)
    if dtype == torch.float32:
        bound = min(bound, FP32_MAX_REL)
    passed = finite and not any(s[2] for s in stats) and rel <= bound
    return Comparison(max_abs=float(sums[:, 0].max()), mean_abs=float(sums[:, 1].sum()) / max(n, 1),
                      rel=rel, torch_rel=torch_rel, bound=bound, passed=passed)


def assert_close(out, ref, torch_out, dtype, what: str = "output") -> Comparison:
    """Raise AssertionError with max and mean error when ``out`` fails the pass rule."""
    result = compare(out, ref, torch_out, dtype)
    if not result.passed:
        raise AssertionError(f"{what} ({dtype}) fails the pass rule: {result.describe()}")
    return result
