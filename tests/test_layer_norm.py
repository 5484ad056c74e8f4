"""Triton layer norm and RMSNorm (fused residual) against the float64 reference, by the pass rule.

Every case runs forward and backward through a loss that uses both outputs (the normed y and,
with a residual, h = x + residual), so the gradients of x, weight, bias and residual include
the residual stream's own gradient.
"""
import pytest
import torch

import llm_kernels as lk
from llm_kernels import _ops
from llm_kernels.kernels import layer_norm as kernels
from llm_kernels.numerics import assert_close
from llm_kernels.reference import layer_norm_ref, rms_norm_ref

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _id(value):
    """Readable test ids: 37x1000, float32."""
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value).removeprefix("torch.")


# (shape, dtype, weight, bias, residual): widths 1, 17, 127, 1000, 1025; rows 1 and 37.
# Width 1 runs in bfloat16: for RMSNorm, d/dh of h / sqrt(h^2 + eps) is eps / (h^2 + eps)^1.5,
# which the backward (given rstd, not eps) gets as 1 - (h * rstd)^2, a float32 cancellation that
# leaves torch's float32 gradient (same formula) above the 1e-5 cap as well.
CASES = [
    ((37, 1), BF16, True, True, False),
    ((1, 17), F32, True, True, True),
    ((37, 127), F32, False, False, False),
    ((37, 1000), F32, True, False, True),
    ((1, 1025), F32, True, True, False),
    ((37, 1025), F32, True, True, True),
    ((3, 5, 17), F32, False, True, True),
    ((37, 17), F16, True, True, True),
    ((37, 1000), F16, False, False, True),
    ((1, 1025), F16, True, True, False),
    ((37, 127), BF16, True, True, True),
    ((37, 1025), BF16, True, False, False),
    ((1, 1000), BF16, False, False, True),
]


def _case_id(case):
    shape, dtype, weight, bias, residual = case
    flags = "".join(tag for tag, on in (("w", weight), ("b", bias), ("r", residual)) if on)
    return f"{_id(shape)}-{_id(dtype)}-{flags or 'plain'}"


def _leaves(shape, dtype, device, *, weight, bias, residual, rms):
    """Fresh random inputs (weights away from 0), keyed by the argument they feed."""
    c = shape[-1]
    leaves = {"x": torch.randn(shape, device=device).to(dtype)}
    if weight:
        leaves["weight"] = (1 + 0.5 * torch.randn(c, device=device)).to(dtype)
    if bias and not rms:
        leaves["bias"] = torch.randn(c, device=device).to(dtype)
    if residual:
        leaves["residual"] = torch.randn(shape, device=device).to(dtype)
    return leaves


def _forward(rms, backend, x, weight=None, bias=None, residual=None):
    """(y,) or (y, h) by the kernels (backend) or the float64 reference (backend None)."""
    if backend is None:
        if rms:
            out = rms_norm_ref(x, weight, residual=residual, upcast=True)
        else:
            out = layer_norm_ref(x, weight, bias, residual=residual, upcast=True)
    elif rms:
        out = lk.rms_norm(x, weight, residual=residual, backend=backend)
    else:
        out = lk.layer_norm(x, weight, bias, residual=residual, backend=backend)
    return out if residual is not None else (out,)


def _outputs_and_grads(rms, backend, leaves, grad_outs):
    """Outputs and the gradients of every leaf for sum(y * gy) + sum(h * gh)."""
    cast = (lambda t: t.double()) if backend is None else (lambda t: t)
    inputs = {name: cast(t).detach().clone().requires_grad_() for name, t in leaves.items()}
    outs = _forward(rms, backend, **inputs)
    grads = torch.autograd.grad(outs, list(inputs.values()),
                                [cast(g) for g in grad_outs[:len(outs)]])
    named = dict(zip(("y", "h"), outs))
    named.update({"d" + name: g for name, g in zip(inputs, grads)})
    return named


def _check(rms, shape, dtype, device, **flags):
    leaves = _leaves(shape, dtype, device, rms=rms, **flags)
    grad_outs = [torch.randn(shape, device=device).to(dtype) for _ in range(2)]
    ours = _outputs_and_grads(rms, "triton", leaves, grad_outs)
    torch_out = _outputs_and_grads(rms, "torch", leaves, grad_outs)
    ref = _outputs_and_grads(rms, None, leaves, grad_outs)
    assert set(ours) == set(ref)
    for name in ref:
        assert ours[name].dtype == dtype, name
        assert_close(ours[name], ref[name], torch_out[name], dtype,
                     f"{'rms' if rms else 'layer'}_norm {name} {tuple(shape)}")


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("shape,dtype,weight,bias,residual", CASES, ids=map(_case_id, CASES))
def test_matches_reference(rms, shape, dtype, weight, bias, residual, device):
    _check(rms, shape, dtype, device, weight=weight, bias=bias, residual=residual)


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=_id)
def test_rows_longer_than_one_block_loop(rms, dtype, device, monkeypatch):
    monkeypatch.setattr(kernels, "MAX_BLOCK", 1024)  # 5000 = 4 full chunks and a tail of 904
    _check(rms, (5, 5000), dtype, device, weight=True, bias=True, residual=True)


@pytest.mark.parametrize("max_block", [None, 1024], ids=["one_block", "chunked"])
def test_large_mean_is_stable(max_block, device, monkeypatch):
    """Rows of 100 + N(0, 1): E[h^2] - E[h]^2 in float32 would lose ~4 digits of the variance."""
    if max_block is not None:
        monkeypatch.setattr(kernels, "MAX_BLOCK", max_block)
    x = 100 + torch.randn(7, 3001, device=device)
    gy = torch.randn_like(x)
    results = {}
    for backend in ("triton", "torch", None):
        xb = (x.double() if backend is None else x).requires_grad_()
        y = layer_norm_ref(xb, upcast=True) if backend is None else lk.layer_norm(
            xb, backend=backend)
        results[backend] = (y, *torch.autograd.grad(y, xb, gy.to(y.dtype)))
    for name, ours, torch_out, ref in zip(("y", "dx"), *results.values()):
        assert_close(ours, ref, torch_out, F32, f"layer_norm {name} of rows with mean 100")


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_statistics_are_float32(rms, device):
    """The op's contract: mean (N,) and rstd (N,) float32, empty h and mean where absent."""
    x = torch.randn(37, 127, device=device, dtype=BF16)
    y, h, mean, rstd = _ops.triton_ops().layer_norm_forward(x, None, None, None, 1e-5, rms)
    assert y.shape == x.shape and y.dtype == BF16 and h.numel() == 0
    assert rstd.shape == (37,) and rstd.dtype == F32
    x64 = x.double()
    ms = x64.pow(2).mean(-1) if rms else x64.var(-1, unbiased=False)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(ms + 1e-5), rtol=1e-6, atol=0)
    if rms:
        assert mean.numel() == 0
    else:
        assert mean.shape == (37,) and mean.dtype == F32
        torch.testing.assert_close(mean.double(), x64.mean(-1), rtol=0, atol=1e-6)


def test_backward_is_deterministic(device):
    """dweight/dbias come from fixed per-program partial sums: two runs are bit-identical."""
    x, r = (torch.randn(37, 1025, device=device, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(1025, device=device, requires_grad=True) for _ in range(2))
    gy, gh = torch.randn(37, 1025, device=device), torch.randn(37, 1025, device=device)

    def grads():
        y, h = lk.layer_norm(x, w, b, residual=r, backend="triton")
        return torch.autograd.grad([y, h], [x, w, b, r], [gy, gh])

    for first, second in zip(grads(), grads()):
        assert torch.equal(first, second)


@pytest.mark.parametrize("regs,warps,shared,expected", [
    (81, 16, 32916, 1),   # H100 hidden 4096 bf16: a second program's registers do not fit
    (64, 16, 32836, 2),
    (50, 32, 32768, 1),
    (32, 4, 8212, 16),    # warps limit: 64 per SM
    (40, 2, 120000, 1),   # shared memory limit
])
def test_backward_programs_per_sm_fit_the_compiled_kernel(regs, warps, shared, expected):
    """Programs per SM from the compiled backward's registers (per warp, in units of 256),
    warps and shared memory: all of them resident at once, never a second wave."""
    assert kernels.resident_programs(regs, shared, warps, 233472) == expected


@pytest.mark.parametrize("resident,expected", [
    ({16: 1, 32: 1}, (32, 1)),   # 16 warps x 82 registers fit once: 32 warps resident beat 16
    ({16: 2, 32: 1}, (16, 2)),   # a tie keeps the fewer warps per program
    ({4: 7, 8: 4}, (8, 4)),
])
def test_backward_plan_keeps_the_most_warps_resident(monkeypatch, resident, expected):
    """Of the two warp counts the one leaving more warps resident per SM wins; each kernel
    variant is compiled and sized once per process."""
    compiled = []

    def per_sm(args, constexprs, warps, device):
        compiled.append(warps)
        return resident[warps]
    monkeypatch.setattr(kernels, "_compiled_per_sm", per_sm)
    monkeypatch.setattr(kernels, "_backward_plans", {})
    block = 256 * min(resident)
    args = tuple(torch.empty(1) for _ in range(4))
    device = torch.device("cuda", 0)
    assert kernels._backward_plan(args, {"RMS": False}, block, device) == expected
    assert kernels._backward_plan(args, {"RMS": False}, block, device) == expected
    assert sorted(compiled) == sorted(resident)


def test_gradient_of_y_alone_with_residual(device):
    """Only y feeds the loss: the residual's gradient is the normed path's alone."""
    x, r = (torch.randn(37, 127, device=device, requires_grad=True) for _ in range(2))
    w = torch.randn(127, device=device, requires_grad=True)
    gy = torch.randn(37, 127, device=device)
    grads = {}
    for backend in ("triton", "torch"):
        y, _ = lk.rms_norm(x, w, residual=r, backend=backend)
        grads[backend] = torch.autograd.grad(y, [x, w, r], gy)
    x64, r64, w64 = (t.detach().double().requires_grad_() for t in (x, r, w))
    y64, _ = rms_norm_ref(x64, w64, residual=r64, upcast=True)
    ref = torch.autograd.grad(y64, [x64, w64, r64], gy.double())
    for name, ours, torch_out, expected in zip("xwr", grads["triton"], grads["torch"], ref):
        assert_close(ours, expected, torch_out, F32, "d" + name)


@pytest.mark.cuda
@pytest.mark.parametrize("hidden", [4096, 8192])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_realistic_sizes_cuda(hidden, rms, device):
    _check(rms, (8192, hidden), BF16, device, weight=True, bias=True, residual=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F32, BF16], ids=_id)
def test_widest_rows_cuda(dtype, device):
    """65536 wide rows (chunked), with a tail: 65536 - 3."""
    _check(False, (64, 65533), dtype, device, weight=True, bias=True, residual=True)


@pytest.mark.cuda
def test_backward_is_deterministic_cuda(device):
    x = torch.randn(8192, 4096, device=device, dtype=BF16, requires_grad=True)
    w, b = (torch.randn(4096, device=device, dtype=BF16, requires_grad=True) for _ in range(2))
    gy = torch.randn_like(x)
    first = torch.autograd.grad(lk.layer_norm(x, w, b, backend="triton"), [x, w, b], gy)
    second = torch.autograd.grad(lk.layer_norm(x, w, b, backend="triton"), [x, w, b], gy)
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)
