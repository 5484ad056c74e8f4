"""The compiled backend ``cuda`` (llm_kernels._C): its C++ CPU twins on CPU tensors, its CUDA
kernels on CUDA tensors (tests marked ``cuda``), the op schemas, the preconditions, and the
ptxas register-spill check of the sm_90 fast paths.

Every output and every gradient goes through the public API with ``backend="cuda"`` and is
compared with ``*_ref(upcast=True)`` (float64) by the pass rule; the allowance is the error of
the same computation through the torch backend in the same dtype. The attention ops are tested
by tests/test_attention*.py; here only their schemas.
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest
import torch

import llm_kernels as lk
from llm_kernels import _ops
from llm_kernels.backends import extension_status
from llm_kernels.numerics import assert_close
from llm_kernels.reference import (ACTIVATIONS, cross_entropy_ref, feed_forward_ref,
                                   layer_norm_ref, rms_norm_ref, softmax_ref, swiglu_ref)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = [F32, F16, BF16]
ROWS = [1, 37]
WIDTHS = [1, 17, 127, 1000, 1025]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.fixture
def ext():
    """Skip (with the reason) when llm_kernels._C is not built."""
    ok, why = extension_status()
    if not ok:
        pytest.skip(why)
    return torch.ops.llm_kernels


# ---- a generic forward + backward check against the float64 reference -------------------------

def _outputs_and_grads(fn, backend, leaves, grad_outs):
    """Outputs of fn(backend, **leaves) and the gradients of sum(out_i * grad_outs[i]) w.r.t. every
    floating leaf; backend None is the float64 reference."""
    def cast(t):
        return t.double() if backend is None and t.is_floating_point() else t
    inputs = {name: cast(t).detach().clone().requires_grad_(t.is_floating_point())
              for name, t in leaves.items()}
    outs = fn(backend, **inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    diff = {n: t for n, t in inputs.items() if t.requires_grad}
    grads = torch.autograd.grad(outs, list(diff.values()),
                                [cast(g) for g in grad_outs[:len(outs)]])
    named = {f"out{i}": o for i, o in enumerate(outs)}
    named.update({"d" + n: g for n, g in zip(diff, grads)})
    return named


def _check(fn, leaves, grad_outs, dtype, what):
    ours = _outputs_and_grads(fn, "cuda", leaves, grad_outs)
    torch_out = _outputs_and_grads(fn, "torch", leaves, grad_outs)
    ref = _outputs_and_grads(fn, None, leaves, grad_outs)
    assert set(ours) == set(ref)
    for name in ref:
        assert ours[name].dtype == torch_out[name].dtype, name
        assert_close(ours[name], ref[name], torch_out[name], dtype, f"{what} {name}")


def _randn(*shape, dtype, device, scale=1.0):
    return (scale * torch.randn(*shape, device=device)).to(dtype)


# ---- layer_norm / rms_norm ---------------------------------------------------------------------

def _norm(rms):
    def fn(backend, x, weight=None, bias=None, residual=None):
        if backend is None:
            return (rms_norm_ref(x, weight, residual=residual, upcast=True) if rms else
                    layer_norm_ref(x, weight, bias, residual=residual, upcast=True))
        if rms:
            return lk.rms_norm(x, weight, residual=residual, backend=backend)
        return lk.layer_norm(x, weight, bias, residual=residual, backend=backend)
    return fn


def _check_norm(rms, rows, cols, dtype, device, weight, bias, residual):
    leaves = {"x": _randn(rows, cols, dtype=dtype, device=device)}
    if weight:
        leaves["weight"] = (1 + 0.5 * torch.randn(cols, device=device)).to(dtype)
    if bias and not rms:
        leaves["bias"] = _randn(cols, dtype=dtype, device=device)
    if residual:
        leaves["residual"] = _randn(rows, cols, dtype=dtype, device=device)
    grad_outs = [_randn(rows, cols, dtype=dtype, device=device) for _ in range(2)]
    _check(_norm(rms), leaves, grad_outs, dtype,
           f"{'rms' if rms else 'layer'}_norm ({rows}, {cols}) w={weight} b={bias} r={residual}")


# (weight, bias, residual)
NORM_FLAGS = [(True, True, True), (False, False, False), (True, False, True), (False, True, False)]
# (rms, dtype, rows, cols), all combinations but RMSNorm over 1 column, where y = x / |x| up to
# eps and dx = g * eps * rstd^3 comes out of g - g * xhat^2 with xhat^2 = 1 - 1e-6: the float32
# rounding of rstd alone costs ~5% of dx in any float32 computation (torch's own error there
# ranges from 2e-5 to 3e-2, so the pass rule decides by luck).
NORM_CASES = [(rms, dtype, rows, cols) for rms in (False, True) for dtype in DTYPES
              for rows in ROWS for cols in WIDTHS if not (rms and cols == 1)]


@pytest.mark.parametrize("weight,bias,residual", NORM_FLAGS)
@pytest.mark.parametrize("rms,dtype,rows,cols", NORM_CASES)
def test_norm_cpu(ext, rms, dtype, rows, cols, weight, bias, residual):
    _check_norm(rms, rows, cols, dtype, CPU, weight, bias, residual)


def test_norm_and_softmax_large_outputs_cpu(ext):
    """Outputs of 32 MiB and more (2048 x 4096 float32), which the kernels prefault in one
    system call per thread: layer norm with the residual (y, h and dx) and softmax (y, dx),
    forward and backward against the fp64 reference."""
    _check_norm(False, 2048, 4096, torch.float32, CPU, True, True, True)
    x = _randn(2048, 4096, dtype=torch.float32, device=CPU)
    _check(_softmax(-1), {"x": x}, [torch.randn_like(x)], torch.float32, "softmax (2048, 4096)")


# Rows whose mean is far outside their spread, where E[h^2] - E[h]^2 (or sums about a poor
# shift) would lose most digits of the variance: each row kind by name. (Means beyond ~1e3
# times the spread are out of reach: the float32 mean alone then rounds by more than the
# 1e-5 cap of the pass rule, in torch as here.)
LARGE_MEAN_ROWS = {
    "100+N(0,1)": lambda: 100 + torch.randn(7, 3001),
    "0.5+1e-2N(0,1)": lambda: 0.5 + 1e-2 * torch.randn(7, 3001),
    "outlier_first": lambda: torch.randn(7, 3001).index_fill_(1, torch.tensor([0]), 1e3),
    "sorted+100": lambda: 100 + torch.randn(7, 3001).sort(dim=1).values,
}


@pytest.mark.parametrize("rows", LARGE_MEAN_ROWS)
def test_layer_norm_large_mean_cpu(ext, rows):
    """The variance keeps full float32 accuracy whatever the mean (one-read moments with an
    exact second pass when the shifted sums would cancel)."""
    x = LARGE_MEAN_ROWS[rows]()
    _check(_norm(False), {"x": x}, [torch.randn_like(x)], F32, f"layer_norm of rows {rows}")


def test_norm_statistics_and_empty_outputs(ext):
    """The op contract: float32 (N,) mean/rstd, empty h/mean/dweight/dbias where absent."""
    x = torch.randn(37, 127, dtype=BF16)
    y, h, mean, rstd = ext.layer_norm_forward(x, None, None, None, 1e-5, False)
    assert y.dtype == BF16 and h.shape == (0,) and mean.shape == rstd.shape == (37,)
    x64 = x.double()
    torch.testing.assert_close(mean.double(), x64.mean(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(x64.var(-1, unbiased=False) + 1e-5),
                               rtol=1e-6, atol=0)
    _, _, mean, rstd = ext.layer_norm_forward(x, None, None, None, 1e-6, True)
    assert mean.shape == (0,)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(x64.pow(2).mean(-1) + 1e-6),
                               rtol=1e-6, atol=0)
    dx, dw, db = ext.layer_norm_backward(torch.randn_like(x), None, x, None, None, mean, rstd,
                                         True)
    assert dx.shape == x.shape and dw.shape == db.shape == (0,)


def test_norm_backward_is_deterministic_across_thread_counts(ext):
    """dweight/dbias sum fixed row chunks in a fixed order: bitwise equal for 1 and 2 threads."""
    x, r, gy, gh = (torch.randn(301, 1025) for _ in range(4))
    w, b = torch.randn(1025), torch.randn(1025)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y, h, mean, rstd = ext.layer_norm_forward(x, w, b, r, 1e-5, False)
            results.append(ext.layer_norm_backward(gy, gh, h, w, b, mean, rstd, False))
    finally:
        torch.set_num_threads(threads)
    for first, second in zip(*results):
        assert torch.equal(first, second)


# ---- softmax ----------------------------------------------------------------------------------

def _softmax(dim):
    def fn(backend, x):
        if backend is None:
            return softmax_ref(x, dim, upcast=True)
        return lk.softmax(x, dim, backend=backend)
    return fn


@pytest.mark.parametrize("cols", WIDTHS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_cpu(ext, rows, cols, dtype):
    x = _randn(rows, cols, dtype=dtype, device=CPU)
    _check(_softmax(-1), {"x": x}, [torch.randn_like(x)], dtype, f"softmax ({rows}, {cols})")


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_dim0_of_3d_cpu(ext, dtype):
    x = _randn(17, 5, 3, dtype=dtype, device=CPU)
    _check(_softmax(0), {"x": x}, [torch.randn_like(x)], dtype, "softmax dim 0 of (17, 5, 3)")


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_minus_inf_rows_cpu(ext, dtype):
    """A row of all -inf gives zeros (and zero gradients); -inf entries get probability 0."""
    x = _randn(4, 33, dtype=dtype, device=CPU)
    x[1] = float("-inf")
    x[2, ::3] = float("-inf")
    x.requires_grad_()
    y = lk.softmax(x, backend="cuda")
    (dx,) = torch.autograd.grad(y, x, torch.randn_like(y))
    assert torch.equal(y[1], torch.zeros_like(y[1])) and torch.equal(dx[1], torch.zeros_like(dx[1]))
    assert torch.equal(y[2, ::3], torch.zeros_like(y[2, ::3]))
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    ref = softmax_ref(x.detach(), upcast=True)
    assert_close(y, ref, softmax_ref(x.detach()), dtype, "softmax with -inf")


def test_softmax_tiny_probabilities_cpu(ext):
    """The vectorized exp near float32's underflow: probabilities down to the subnormals come
    out right (within two subnormal ulps), smaller ones and -inf entries give exactly 0."""
    row = [0.0, -20.0, -87.0, -90.0, -100.0, -103.0, -105.0, -200.0, float("-inf")]
    x = torch.tensor([row * 3])  # 27 values: one full vector and a tail
    y = ext.softmax_forward(x)
    torch.testing.assert_close(y.double(), softmax_ref(x, upcast=True), rtol=1e-6, atol=2**-148)
    assert (y[0, 6::9] == 0).all() and (y[0, 7::9] == 0).all() and (y[0, 8::9] == 0).all()
    assert (y[0, 3::9] > 0).all() and (y[0, 4::9] > 0).all()  # subnormal, not flushed


# ---- cross_entropy ----------------------------------------------------------------------------

def _cross_entropy(reduction, ignore_index=-100):
    def fn(backend, logits, target):
        if backend is None:
            return cross_entropy_ref(logits, target, ignore_index=ignore_index,
                                     reduction=reduction, upcast=True)
        return lk.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction,
                                backend=backend)
    return fn


def _targets(rows, cols, device, ignore_index=-100):
    target = torch.randint(0, cols, (rows,), device=device)
    if rows > 2:
        target[::3] = ignore_index  # row 1 stays a real target
    return target


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("cols", WIDTHS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_cpu(ext, reduction, rows, cols, dtype):
    logits = _randn(rows, cols, dtype=dtype, device=CPU, scale=2.0)
    leaves = {"logits": logits, "target": _targets(rows, cols, CPU)}
    grad = torch.randn(rows if reduction == "none" else ()).to(dtype)
    _check(_cross_entropy(reduction), leaves, [grad], dtype,
           f"cross_entropy {reduction} ({rows}, {cols})")


def test_cross_entropy_chunks_over_long_rows_cpu(ext):
    """V = 5000 spans several 2048-wide chunks of the online logsumexp; ignore_index = 7."""
    logits = _randn(9, 5000, dtype=F32, device=CPU, scale=4.0)
    target = torch.randint(0, 5000, (9,))
    target[4] = 7
    _check(_cross_entropy("mean", ignore_index=7), {"logits": logits, "target": target},
           [torch.randn(())], F32, "cross_entropy V=5000")


def test_cross_entropy_op_out_of_range_target_gives_nan(ext):
    """The op never reads past a row: a target outside [0, V) gives a NaN loss and gradient
    row, an ignored row gives 0; the other rows are exact."""
    logits = torch.randn(4, 17)
    target = torch.tensor([3, 17, -100, -5])
    loss, lse = ext.cross_entropy_forward(logits, target, -100)
    assert torch.isnan(loss[1]) and torch.isnan(loss[3]) and loss[2] == 0
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1))
    torch.testing.assert_close(loss[0], lse[0] - logits[0, 3])
    grad = ext.cross_entropy_backward(torch.ones(4), logits, target, lse, -100)
    assert torch.isnan(grad[1]).all() and torch.isnan(grad[3]).all()
    assert torch.equal(grad[2], torch.zeros(17))
    expected = torch.softmax(logits[0], -1) - torch.nn.functional.one_hot(torch.tensor(3), 17)
    torch.testing.assert_close(grad[0], expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_and_cross_entropy_are_deterministic_across_thread_counts(ext, dtype):
    """Rows are independent: bitwise equal results for 1 and 2 threads; the in-place
    cross-entropy backward equals the out-of-place one (V = 5000: chunks and a vector tail,
    one target in the tail)."""
    x, grad_y = torch.randn(301, 1025).to(dtype), torch.randn(301, 1025).to(dtype)
    logits = (torch.randn(97, 5000) * 3).to(dtype)
    target = torch.randint(0, 5000, (97,))
    target[::7] = -100
    target[1] = 4999
    grad_loss = torch.randn(97)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y = ext.softmax_forward(x)
            loss, lse = ext.cross_entropy_forward(logits, target, -100)
            inplace = logits.clone()
            ext.cross_entropy_backward_inplace(grad_loss, inplace, target, lse, -100)
            results.append((y, ext.softmax_backward(grad_y, y), loss, lse,
                            ext.cross_entropy_backward(grad_loss, logits, target, lse, -100),
                            inplace))
    finally:
        torch.set_num_threads(threads)
    for first, second in zip(*results):
        assert torch.equal(first, second)
    assert torch.equal(results[0][4], results[0][5])


# ---- feed_forward / swiglu --------------------------------------------------------------------

def _linear_weight(out_features, in_features, dtype, device):
    return (torch.randn(out_features, in_features, device=device)
            / math.sqrt(in_features)).to(dtype)


def _feed_forward(activation):
    def fn(backend, x, w1, w2, b1=None, b2=None):
        if backend is None:
            return feed_forward_ref(x, w1, b1, w2, b2, activation=activation, upcast=True)
        return lk.feed_forward(x, w1, b1, w2, b2, activation=activation, backend=backend)
    return fn


def _swiglu(backend, x, w_gate, w_up, w_down):
    if backend is None:
        return swiglu_ref(x, w_gate, w_up, w_down, upcast=True)
    return lk.swiglu(x, w_gate, w_up, w_down, backend=backend)


def _check_feed_forward(n, d, d_ff, d_out, activation, bias, dtype, device):
    leaves = {"x": _randn(n, d, dtype=dtype, device=device),
              "w1": _linear_weight(d_ff, d, dtype, device),
              "w2": _linear_weight(d_out, d_ff, dtype, device)}
    if bias:
        leaves["b1"] = _randn(d_ff, dtype=dtype, device=device, scale=0.5)
        leaves["b2"] = _randn(d_out, dtype=dtype, device=device, scale=0.5)
    _check(_feed_forward(activation), leaves, [_randn(n, d_out, dtype=dtype, device=device)],
           dtype, f"feed_forward {activation} bias={bias} ({n}, {d}, {d_ff}, {d_out})")


def _check_swiglu(n, d, d_ff, d_out, dtype, device):
    leaves = {"x": _randn(n, d, dtype=dtype, device=device),
              "w_gate": _linear_weight(d_ff, d, dtype, device),
              "w_up": _linear_weight(d_ff, d, dtype, device),
              "w_down": _linear_weight(d_out, d_ff, dtype, device)}
    _check(_swiglu, leaves, [_randn(n, d_out, dtype=dtype, device=device)], dtype,
           f"swiglu ({n}, {d}, {d_ff}, {d_out})")


FF_SIZES = [(1, 17, 37, 5), (37, 127, 97, 17), (37, 16, 1025, 8)]  # (N, d, d_ff, d_out)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("size", FF_SIZES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_feed_forward_cpu(ext, size, activation, bias, dtype):
    _check_feed_forward(*size, activation, bias, dtype, CPU)


@pytest.mark.parametrize("size", FF_SIZES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_cpu(ext, size, dtype):
    _check_swiglu(*size, dtype, CPU)


# ---- the binding layer -------------------------------------------------------------------------

def test_schemas_match_the_contract(ext):
    """Every op of _ops.SCHEMAS is registered with the identical schema."""
    for op, schema in _ops.SCHEMAS.items():
        registered = str(getattr(ext, op).default._schema)
        assert registered.startswith(_ops.CUDA_NAMESPACE + "::" + op + "(")
        assert registered.split("::", 1)[1] == op + schema


def test_every_op_has_cpu_and_cuda_kernels(ext):
    from llm_kernels import _C
    keys = ["CPU"] + (["CUDA"] if _C.has_cuda() else [])
    for op in _ops.SCHEMAS:
        for key in keys:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"llm_kernels::{op}", key), (
                op, key)


STALE_BUILD = """
import torch
import llm_kernels as lk
from llm_kernels import _ops
_ops.SCHEMAS["newer_op_forward"] = "(Tensor x) -> Tensor"  # an op this build predates
ok, why = lk.available_backends()["cuda"]
print(ok, why)
x = torch.randn(3, 5)
assert torch.equal(lk.layer_norm(x, backend=None), lk.layer_norm(x, backend="torch"))
try:
    lk.rms_norm(x, backend="cuda")
except lk.BackendUnavailableError as exc:
    print(exc)
"""


def test_extension_older_than_the_package_is_reported_not_fatal(ext):
    """A _C built before an op was added: the cuda backend is unavailable with a rebuild hint,
    auto dispatch falls back, and naming the backend raises with the same reason."""
    import subprocess
    out = subprocess.run([sys.executable, "-c", STALE_BUILD], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.strip().splitlines()
    assert first.startswith("False llm_kernels._C is older than the Python package (it lacks "
                            "newer_op_forward): rebuild it with `pip install")
    assert "backend 'cuda' cannot run this call: llm_kernels._C is older" in second


@pytest.mark.parametrize("op,args", [
    ("softmax_forward", lambda: (torch.randn(5, 7),)),
    ("layer_norm_forward", lambda: (torch.randn(5, 7), torch.randn(7), None, torch.randn(5, 7),
                                    1e-5, False)),
    ("layer_norm_forward", lambda: (torch.randn(5, 7), None, None, None, 1e-5, True)),
    ("cross_entropy_forward", lambda: (torch.randn(5, 7), torch.randint(0, 7, (5,)), -100)),
    ("feed_forward_forward", lambda: (torch.randn(5, 7), torch.randn(9, 7), None,
                                      torch.randn(3, 9), torch.randn(3), "gelu")),
    ("swiglu_forward", lambda: (torch.randn(5, 7), torch.randn(9, 7), torch.randn(9, 7),
                                torch.randn(3, 9))),
], ids=lambda v: v if isinstance(v, str) else "")
def test_fake_implementations_match_the_kernels(ext, op, args):
    """torch.library.opcheck: schema and fake (meta) outputs agree with the real op."""
    torch.library.opcheck(getattr(ext, op).default, args(),
                          test_utils=("test_schema", "test_faketensor"))


BAD_CALLS = [
    ("layer_norm_forward", lambda: (torch.randn(5, 7).t(), None, None, None, 1e-5, False),
     r"x must be contiguous, got strides \[1, 7\]"),
    ("layer_norm_forward", lambda: (torch.randn(5, 7), None, None, None, -0.5, False),
     "eps must be >= 0, got -0.5"),
    ("layer_norm_forward", lambda: (torch.randn(5, 7), torch.randn(6), None, None, 1e-5, False),
     r"weight must have shape \[7\]"),
    ("layer_norm_forward", lambda: (torch.randn(5, 7), torch.randn(7, dtype=F16), None, None,
                                    1e-5, False), "weight has dtype Half but x has Float"),
    ("layer_norm_forward", lambda: (torch.randn(5, 7, dtype=torch.float64), None, None, None,
                                    1e-5, False), "x must be float16, bfloat16 or float32"),
    ("layer_norm_forward", lambda: (torch.randn(5, 7), None, None, torch.randn(5, 6), 1e-5,
                                    False), "residual must have shape"),
    ("layer_norm_forward", lambda: (torch.randn(35), None, None, None, 1e-5, False),
     r"x must be 2D \(N, C\)"),
    ("layer_norm_backward", lambda: (torch.randn(5, 7), None, torch.randn(5, 7), None, None,
                                     torch.randn(5), torch.randn(4), False),
     r"rstd must have shape \[5\]"),
    ("softmax_backward", lambda: (torch.randn(5, 8), torch.randn(5, 7)), "grad_y must have shape"),
    ("cross_entropy_forward", lambda: (torch.randn(5, 7), torch.zeros(5, dtype=torch.int32), -100),
     "target must be int64"),
    ("cross_entropy_forward", lambda: (torch.randn(5, 7), torch.zeros(4, dtype=torch.int64), -100),
     "target must have shape"),
    ("cross_entropy_backward", lambda: (torch.ones(5, dtype=F16), torch.randn(5, 7),
                                        torch.zeros(5, dtype=torch.int64), torch.zeros(5), -100),
     "grad_loss must be float32"),
    ("feed_forward_forward", lambda: (torch.randn(5, 7), torch.randn(9, 7), None, torch.randn(3, 9),
                                      None, "tanh"), "activation must be gelu, gelu_tanh"),
    ("feed_forward_forward", lambda: (torch.randn(5, 7), torch.randn(9, 6), None, torch.randn(3, 9),
                                      None, "relu"), r"w1 must have shape \(d_out, 7\)"),
    ("swiglu_forward", lambda: (torch.randn(5, 7), torch.randn(9, 7), torch.randn(8, 7),
                                torch.randn(3, 9)), r"w_up must have shape \(9, 7\)"),
]


@pytest.mark.parametrize("op,args,message", BAD_CALLS, ids=[c[2][:30] for c in BAD_CALLS])
def test_preconditions_raise_clear_errors(ext, op, args, message):
    with pytest.raises(RuntimeError, match=message):
        getattr(ext, op)(*args())


# ---- ptxas register spills of the sm_90 fast paths --------------------------------------------

def _spill_checker():
    spec = importlib.util.spec_from_file_location(
        "check_spills", os.path.join(ROOT, "scripts", "check_spills.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_no_register_spills_in_sm90_fast_paths():
    """nvcc -arch=sm_90 -Xptxas -v on the fast-path .cu files: no spill stores/loads."""
    checker = _spill_checker()
    if checker.find_nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME): cannot run ptxas")
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU build: no CUDA headers to compile the kernels against")
    failures, report = checker.check(checker.default_files())
    assert "layer_norm_forward_kernel" in report
    assert not failures, "register spills:\n" + "\n".join(failures) + "\n" + report


def test_spill_parser_reads_ptxas_output():
    text = ("ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'\n"
            "ptxas info    : Function properties for _Z3fooPf\n"
            "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
            "ptxas info    : Used 255 registers, used 1 barriers, 4224 bytes smem\n"
            "ptxas info    : Compiling entry function '_Z3barv' for 'sm_80'\n")
    (kernel,) = _spill_checker().parse_ptxas(text)
    assert (kernel.name, kernel.registers, kernel.spill_stores, kernel.spill_loads,
            kernel.smem) == ("_Z3fooPf", 255, 4, 12, 4224)
    assert kernel.spills


# ---- CUDA kernels at realistic sizes (run by bench/gpu_check.sh) ------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("rows,cols", [(4096, 4096), (1024, 8192), (512, 12288), (64, 65536),
                                       (2048, 4097), (3000, 1000), (17, 127), (1, 1025)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_cuda(ext, rms, rows, cols, dtype):
    _check_norm(rms, rows, cols, dtype, CUDA, True, True, True)


@pytest.mark.cuda
@pytest.mark.parametrize("weight,bias,residual", NORM_FLAGS[1:])
def test_norm_flags_cuda(ext, weight, bias, residual):
    _check_norm(False, 2048, 2048, BF16, CUDA, weight, bias, residual)


@pytest.mark.cuda
@pytest.mark.parametrize("cols", [4096, 65536])
def test_norm_backward_is_deterministic_cuda(ext, cols):
    rows = 262144 // cols * 8
    x, r, gy, gh = (torch.randn(rows, cols, device=CUDA, dtype=BF16) for _ in range(4))
    w, b = (torch.randn(cols, device=CUDA, dtype=BF16) for _ in range(2))
    y, h, mean, rstd = ext.layer_norm_forward(x, w, b, r, 1e-5, False)
    first = ext.layer_norm_backward(gy, gh, h, w, b, mean, rstd, False)
    second = ext.layer_norm_backward(gy, gh, h, w, b, mean, rstd, False)
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)


@pytest.mark.cuda
@pytest.mark.parametrize("rows,cols", [(4096, 4096), (1024, 32000), (256, 50257), (8, 131072),
                                       (37, 1025), (4096, 17)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_cuda(ext, rows, cols, dtype):
    x = _randn(rows, cols, dtype=dtype, device=CUDA)
    _check(_softmax(-1), {"x": x}, [torch.randn_like(x)], dtype, f"softmax ({rows}, {cols})")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_minus_inf_rows_cuda(ext, dtype):
    x = _randn(64, 4096, dtype=dtype, device=CUDA)
    x[3] = float("-inf")
    x[5, ::2] = float("-inf")
    y = lk.softmax(x, backend="cuda")
    assert torch.equal(y[3], torch.zeros_like(y[3])) and torch.isfinite(y).all()
    assert_close(y, softmax_ref(x, upcast=True), softmax_ref(x), dtype, "softmax with -inf")


@pytest.mark.cuda
@pytest.mark.parametrize("rows,cols", [(4096, 32000), (1024, 50257), (64, 128256), (37, 17)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_cuda(ext, rows, cols, dtype):
    logits = _randn(rows, cols, dtype=dtype, device=CUDA, scale=2.0)
    _check(_cross_entropy("mean"), {"logits": logits, "target": _targets(rows, cols, CUDA)},
           [torch.randn((), device=CUDA).to(dtype)], dtype, f"cross_entropy ({rows}, {cols})")


@pytest.mark.cuda
def test_cross_entropy_op_out_of_range_target_cuda(ext):
    logits = torch.randn(4, 1000, device=CUDA)
    target = torch.tensor([3, 1000, -100, -5], device=CUDA)
    loss, lse = ext.cross_entropy_forward(logits, target, -100)
    grad = ext.cross_entropy_backward(torch.ones(4, device=CUDA), logits, target, lse, -100)
    assert torch.isnan(loss[1]) and torch.isnan(loss[3]) and loss[2] == 0
    assert torch.isnan(grad[1]).all() and torch.equal(grad[2], torch.zeros_like(grad[2]))
    torch.testing.assert_close(loss[0], torch.logsumexp(logits[0], -1) - logits[0, 3])


@pytest.mark.cuda
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_feed_forward_cuda(ext, activation, dtype):
    _check_feed_forward(2048, 1024, 4096, 1024, activation, True, dtype, CUDA)


@pytest.mark.cuda
@pytest.mark.parametrize("size", [(37, 127, 97, 17), (1000, 1024, 4095, 512)], ids=str)
def test_feed_forward_odd_cuda(ext, size):
    _check_feed_forward(*size, "gelu_tanh", False, BF16, CUDA)


@pytest.mark.cuda
@pytest.mark.parametrize("size", [(2048, 1024, 2816, 1024), (37, 127, 97, 17)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_cuda(ext, size, dtype):
    _check_swiglu(*size, dtype, CUDA)
