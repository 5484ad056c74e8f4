"""Triton softmax, forward and backward, against the float64 reference by the pass rule."""
import pytest
import torch

import llm_kernels as lk
from llm_kernels.kernels import softmax as kernels
from llm_kernels.numerics import assert_close
from llm_kernels.reference import softmax_ref

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _id(value):
    """Readable test ids: 37x1000, float32."""
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value).removeprefix("torch.")


def _check(x, dim=-1, what="softmax"):
    """Forward and the gradient for a random upstream gradient, against the fp64 reference."""
    grad_y = torch.randn(x.shape, device=x.device).to(x.dtype)
    results = {}
    for backend in ("triton", "torch", None):
        xb = (x.double() if backend is None else x).detach().clone().requires_grad_()
        y = softmax_ref(xb, dim, upcast=True) if backend is None else lk.softmax(
            xb, dim, backend=backend)
        results[backend] = (y, *torch.autograd.grad(y, xb, grad_y.to(y.dtype)))
    for name, ours, torch_out, ref in zip(("y", "dx"), *results.values()):
        assert ours.dtype == x.dtype
        assert_close(ours, ref, torch_out, x.dtype, f"{what} {name} {tuple(x.shape)}")
    return results["triton"]


@pytest.mark.parametrize("shape,dtype", [
    ((37, 1), F32), ((1, 17), F32), ((37, 127), F32), ((37, 1000), F32), ((1, 1025), F32),
    ((37, 1025), F32), ((37, 17), F16), ((1, 1000), F16), ((37, 1025), F16),
    ((37, 127), BF16), ((1, 1025), BF16), ((37, 1000), BF16),
], ids=_id)
def test_matches_reference(shape, dtype, device):
    """Standard-normal rows. (The backward works from the saved y in x's dtype, while the torch
    backend keeps its float32 y: on a single sharply peaked 16-bit row that alone can exceed the
    2x bound; peaked rows are covered over 37 rows below.)"""
    _check(torch.randn(shape, device=device).to(dtype))


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=_id)
def test_along_dim0_of_3d(dtype, device):
    _check(torch.randn(17, 3, 5, device=device).to(dtype), dim=0, what="softmax(dim=0)")


def _with_infinities(n, c, device, dtype):
    """Rows with scattered -inf, one with all but one entry -inf, one all -inf (zeros)."""
    x = 3 * torch.randn(n, c, device=device)
    x[torch.rand(n, c, device=device) < 0.3] = float("-inf")
    x[1, 1:] = float("-inf")
    x[2] = float("-inf")
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=_id)
def test_minus_inf_rows(dtype, device):
    y, dx = _check(_with_infinities(37, 127, device, dtype), what="softmax with -inf")
    assert torch.equal(y[2], torch.zeros_like(y[2])) and torch.equal(dx[2], torch.zeros_like(dx[2]))
    assert y[1, 0] == 1


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=_id)
def test_large_magnitudes(dtype, device):
    """Entries near +-1e4 (exp would overflow without the max shift)."""
    sign = torch.where(torch.rand(37, 1000, device=device) < 0.5, -1.0, 1.0)
    _check((1e4 * sign + 3 * torch.randn(37, 1000, device=device)).to(dtype), what="softmax +-1e4")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=_id)
def test_rows_longer_than_one_block_loop(dtype, device, monkeypatch):
    """5000 wide rows in chunks of 1024; the first chunk of row 3 is all -inf."""
    monkeypatch.setattr(kernels, "MAX_BLOCK", 1024)
    x = _with_infinities(5, 5000, device, F32)
    x[3, :2000] = float("-inf")
    x[4] = 1e4 + 3 * torch.randn(5000, device=device)
    y, dx = _check(x.to(dtype), what="chunked softmax")
    assert torch.equal(y[2], torch.zeros_like(y[2])) and torch.equal(dx[2], torch.zeros_like(dx[2]))


@pytest.mark.cuda
@pytest.mark.parametrize("width", [4096, 8192])
def test_realistic_sizes_cuda(width, device):
    _check(torch.randn(8192, width, device=device, dtype=BF16))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F32, BF16], ids=_id)
def test_long_rows_cuda(dtype, device):
    """Rows of 100003 (chunked), with -inf entries and an all -inf row."""
    _check(_with_infinities(64, 100003, device, dtype), what="long softmax")
