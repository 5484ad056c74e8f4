"""Extreme values on every kernel backend available on CPU: attention scores of +-1e4 in 16
bits, fully masked rows, all-equal scores, softmax rows with -inf / all -inf / +-1e4, very
long softmax and cross-entropy rows, degenerate and offset layer-norm rows. Outputs must be
finite where the math is, and pass the pass rule against the float64 reference, forward and
backward.
"""
import pytest
import torch

import llm_kernels as lk
from llm_kernels.numerics import assert_close
from llm_kernels.reference import (attention_ref, causal_keep, cross_entropy_ref,
                                   layer_norm_ref, rms_norm_ref, softmax_ref)
from reference_check import check_against_reference, randn, require_cpu_backend

BACKENDS = ("cuda", "triton")
HALF = (torch.float16, torch.bfloat16)


@pytest.fixture(params=BACKENDS)
def backend(request):
    require_cpu_backend(request.param)
    return request.param


@pytest.fixture
def gen(seed):
    return torch.Generator().manual_seed(seed)


def all_finite(results: dict) -> None:
    for name, t in results.items():
        assert torch.isfinite(t).all(), f"{name} has {int((~torch.isfinite(t)).sum())} non-finite"


def check_attention(backend, gen, q, k, v, what, **kwargs) -> dict:
    """Forward and backward of lk.attention against the fp64 reference; returns the results."""
    return check_against_reference(
        lambda backend, q, k, v: lk.attention(q, k, v, backend=backend, **kwargs),
        lambda q, k, v: attention_ref(q, k, v, upcast=True, **kwargs),
        dict(q=q, k=k, v=v), q.dtype, backend, gen, what)


# ---- attention --------------------------------------------------------------------------------

def near_tie_attention(gen, b, h, lq, lk_, d, dtype):
    """q, k, v whose scores (scale 1) are about +-1e4 (the sign drawn per query) and differ
    between keys by O(1-10): every key shares a direction k0 and q_i is +-1e4 k0 / |k0|^2.
    A softmax over such scores is neither uniform nor one-hot, so no gradient vanishes."""
    k0 = randn(gen, d, dtype=torch.float64)
    k = (k0 + randn(gen, b, h, lk_, d, dtype=torch.float64, scale=0.004)).to(dtype)
    sign = torch.randint(0, 2, (b, h, lq, 1), generator=gen) * 2 - 1
    q = sign * 1e4 * k0 / k0.dot(k0) + randn(gen, b, h, lq, d, dtype=torch.float64, scale=0.02)
    return q.to(dtype), k, randn(gen, b, h, lk_, d, dtype=dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_attention_scores_1e4(backend, gen, dtype, causal):
    """Scores of +-1e4 in 16-bit inputs (q k^T within fp16 range): the kernels' fp32 scores
    keep the softmax finite and right, forward and backward."""
    b, h, lq, lk_, d = 1, 2, 33, 41, 64
    q, k, v = near_tie_attention(gen, b, h, lq, lk_, d, dtype)
    scores = q.double() @ k.double().transpose(-1, -2)  # (B, H, Lq, Lk)
    assert 5e3 < scores.abs().min() and scores.abs().max() < 2e4
    assert (scores > 0).any() and (scores < 0).any()
    assert (scores.softmax(-1).amax(-1) < 0.99).double().mean() > 0.2  # not all one-hot
    results = check_attention(backend, gen, q, k, v, "scores 1e4", causal=causal, scale=1.0)
    all_finite(results)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_fully_masked_rows(backend, gen, dtype):
    """Rows that see no key (bool mask rows all False, an additive -inf row, causal with
    Lq > Lk) give exact zeros in out and dq; the other rows pass the pass rule."""
    b, h, lq, lk_, d = 2, 2, 23, 17, 32
    q, k, v = (randn(gen, b, h, n, d, dtype=dtype) for n in (lq, lk_, lk_))
    keep = torch.rand(b, h, lq, lk_, generator=gen) > 0.4
    keep[0, 1, 3] = False
    keep[1, :, 20] = False
    blind = ~(keep & causal_keep(lq, lk_, lk_ - lq, "cpu")).any(-1)  # (B, H, Lq)
    assert blind.sum() >= lq - lk_
    results = check_attention(backend, gen, q, k, v, "masked rows", attn_mask=keep, causal=True)
    all_finite(results)
    for name in ("out0", "dq"):
        assert torch.equal(results[name][blind], torch.zeros_like(results[name][blind])), name
    bias = torch.zeros(lq, lk_, dtype=dtype)
    bias[[2, 11]] = float("-inf")
    results = check_attention(backend, gen, q, k, v, "-inf bias rows", attn_mask=bias)
    all_finite(results)
    for name in ("out0", "dq"):
        assert torch.equal(results[name][:, :, [2, 11]],
                           torch.zeros_like(results[name][:, :, [2, 11]])), name


@pytest.mark.parametrize("dtype,fill", [(torch.float32, "finfo.min"), (torch.bfloat16, "finfo.min"),
                                        (torch.float32, -1e9), (torch.float32, -5e4)], ids=str)
def test_attention_large_finite_mask(backend, gen, dtype, fill):
    """Additive masks with huge finite values (Hugging Face's torch.finfo(dtype).min,
    masked_fill(-1e9)): values below about -45426 hide their key like -inf. Rows hidden
    everywhere give exact zeros in out and dq (torch would average V there), every gradient is
    finite, and the rest (the other rows; dk, dv with no gradient from the hidden rows) passes
    the pass rule."""
    b, h, lq, lk_, d = 2, 2, 19, 23, 32
    q, k, v = (randn(gen, b, h, n, d, dtype=dtype).requires_grad_() for n in (lq, lk_, lk_))
    low = torch.finfo(dtype).min if fill == "finfo.min" else fill
    bias = torch.zeros(b, 1, lq, lk_, dtype=dtype)
    bias[0, :, :, 15:] = low  # padded keys
    hidden = [0, 5, 18]
    bias[1, :, hidden] = low  # query rows that see no key
    grad_out = randn(gen, b, h, lq, d, dtype=dtype)
    grad_out[1, :, hidden] = 0
    out = lk.attention(q, k, v, attn_mask=bias, backend=backend)
    grads = dict(zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), grad_out)))
    all_finite({"out": out, **grads})
    for name, t in (("out", out), ("dq", grads["dq"])):
        assert torch.equal(t[1, :, hidden], torch.zeros_like(t[1, :, hidden])), name
    upcast = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_ref(*upcast, attn_mask=bias.double(), upcast=True)
    ref_grads = dict(zip(("dq", "dk", "dv"), torch.autograd.grad(ref, upcast, grad_out.double())))
    torch_out = lk.attention(q, k, v, attn_mask=bias, backend="torch")
    torch_grads = dict(zip(("dq", "dk", "dv"), torch.autograd.grad(torch_out, (q, k, v), grad_out)))
    seen = [i for i in range(lq) if i not in hidden]
    for name, t, r, tt in (("out", out, ref, torch_out), *((n, grads[n], ref_grads[n],
                                                             torch_grads[n]) for n in grads)):
        rows = seen if name in ("out", "dq") else slice(None)
        assert_close(t.detach()[1, :, rows], r.detach()[1, :, rows], tt.detach()[1, :, rows],
                     dtype, f"{name} batch 1")
        assert_close(t.detach()[0], r.detach()[0], tt.detach()[0], dtype, f"{name} batch 0")


def test_attention_everything_masked(backend, gen):
    """No query sees any key: out and every gradient are exactly zero."""
    q, k, v = (randn(gen, 1, 2, n, 16).requires_grad_() for n in (9, 13, 13))
    out = lk.attention(q, k, v, attn_mask=torch.zeros(9, 13, dtype=torch.bool), backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), randn(gen, *out.shape))
    for t in (out, *grads):
        assert torch.equal(t, torch.zeros_like(t))


def visible_average(v: torch.Tensor, lq: int, causal: bool) -> torch.Tensor:
    """(B, H, Lq, D) float64: each query's plain average of the values it sees."""
    lk_ = v.shape[-2]
    seen = causal_keep(lq, lk_, lk_ - lq, "cpu") if causal else torch.ones(lq, lk_, dtype=bool)
    return (seen.double() / seen.sum(-1, keepdim=True)) @ v.double()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_attention_all_equal_scores_zero_query(backend, gen, dtype, causal):
    """q = 0: every score is 0, out is the plain average of the values each query sees, and
    dk = scale * sum_i p_ij (dp_ij - D_i) q_i is exactly 0."""
    b, h, lq, lk_, d = 2, 2, 19, 29, 24
    q = torch.zeros(b, h, lq, d, dtype=dtype)
    k, v = randn(gen, b, h, lk_, d, dtype=dtype), randn(gen, b, h, lk_, d, dtype=dtype)
    results = check_attention(backend, gen, q, k, v, "zero query", causal=causal)
    torch_out = lk.attention(q, k, v, causal=causal, backend="torch")
    assert_close(results["out0"], visible_average(v, lq, causal), torch_out, dtype, "average")
    assert torch.equal(results["dk"], torch.zeros_like(results["dk"]))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_attention_all_equal_scores_identical_keys(backend, gen, dtype, causal):
    """Every key the same: all scores of a row are equal and out is the plain average of the
    values each query sees. dq = scale * k0 * sum_j p_ij (dp_ij - D_i) is exactly 0 in exact
    arithmetic, so only rounding noise is left on every side: dk and dv are compared."""
    b, h, lq, lk_, d = 2, 2, 19, 29, 24
    q, v = randn(gen, b, h, lq, d, dtype=dtype), randn(gen, b, h, lk_, d, dtype=dtype)
    k = randn(gen, b, h, 1, d, dtype=dtype).expand(b, h, lk_, d).contiguous()
    results = check_against_reference(
        lambda backend, q, k, v: lk.attention(q, k, v, causal=causal, backend=backend),
        lambda q, k, v: attention_ref(q, k, v, causal=causal, upcast=True),
        dict(q=q, k=k, v=v), dtype, backend, gen, "identical keys", compared_grads=("k", "v"))
    all_finite(results)
    torch_out = lk.attention(q, k, v, causal=causal, backend="torch")
    assert_close(results["out0"], visible_average(v, lq, causal), torch_out, dtype, "average")


# ---- softmax ----------------------------------------------------------------------------------

def extreme_rows(gen, c: int, dtype) -> torch.Tensor:
    """(6, C): random; random with some -inf; all -inf; +-1e4 (ties at the max); 1e4 * randn;
    a single finite entry among -inf."""
    x = randn(gen, 6, c, dtype=torch.float64)
    x[1, torch.randperm(c, generator=gen)[: c // 3]] = float("-inf")
    x[2] = float("-inf")
    x[3] = 1e4 * torch.sign(x[3])
    x[4] = 1e4 * x[4]
    x[5] = float("-inf")
    x[5, c // 2] = 3.0
    return x.to(dtype)


@pytest.mark.parametrize("c", [7, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_softmax_extreme_rows(backend, gen, dtype, c):
    """-inf entries give exact zeros, an all -inf row zeros with zero gradient, a single
    finite entry exactly 1; +-1e4 rows stay finite and right."""
    x = extreme_rows(gen, c, dtype)
    results = check_against_reference(
        lambda backend, x: lk.softmax(x, backend=backend),
        lambda x: softmax_ref(x, upcast=True), {"x": x}, dtype, backend, gen, "softmax")
    all_finite(results)
    y, dx = results["out0"], results["dx"]
    assert torch.equal(y[2], torch.zeros_like(y[2])) and torch.equal(dx[2], torch.zeros_like(dx[2]))
    assert (y[1][x[1] == float("-inf")] == 0).all()
    assert y[5, c // 2] == 1 and (y[5].sum() == 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_softmax_long_rows(backend, gen, dtype):
    """Rows of 70000 (beyond one block: the chunked online-max path), large spread."""
    x = randn(gen, 3, 70000, dtype=dtype, scale=4.0)
    results = check_against_reference(
        lambda backend, x: lk.softmax(x, backend=backend),
        lambda x: softmax_ref(x, upcast=True), {"x": x}, dtype, backend, gen, "long softmax")
    all_finite(results)


# ---- cross_entropy ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cross_entropy_long_rows(backend, gen, dtype):
    """V = 200003 (a large vocabulary, odd), with an ignored row."""
    n, vocab = 3, 200003
    logits = randn(gen, n, vocab, dtype=dtype, scale=3.0)
    target = torch.randint(0, vocab, (n,), generator=gen)
    target[1] = -100
    for reduction in ("mean", "none"):
        results = check_against_reference(
            lambda backend, logits: lk.cross_entropy(logits, target, reduction=reduction,
                                                     backend=backend),
            lambda logits: cross_entropy_ref(logits, target, reduction=reduction, upcast=True),
            {"logits": logits}, dtype, backend, gen, f"long cross_entropy {reduction}")
        all_finite(results)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_cross_entropy_logits_1e4(backend, gen, dtype):
    """Logits of +-1e4 in 16 bits, targets at the max, at the min and random: losses of 0 up
    to about 2e4, all finite."""
    n, vocab = 5, 301
    logits = randn(gen, n, vocab, dtype=torch.float64, scale=1e4 / 3).to(dtype)
    target = torch.randint(0, vocab, (n,), generator=gen)
    target[0], target[1] = logits[0].argmax(), logits[1].argmin()
    results = check_against_reference(
        lambda backend, logits: lk.cross_entropy(logits, target, reduction="none",
                                                 backend=backend),
        lambda logits: cross_entropy_ref(logits, target, reduction="none", upcast=True),
        {"logits": logits}, dtype, backend, gen, "cross_entropy 1e4")
    all_finite(results)


# ---- layer_norm / rms_norm --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_layer_norm_single_column(backend, gen, dtype):
    """C = 1: x - mean(x) is exactly 0, so the output is exactly the bias and dx exactly 0."""
    x, w, b = randn(gen, 37, 1, dtype=dtype), randn(gen, 1, dtype=dtype), randn(gen, 1, dtype=dtype)
    x.requires_grad_()
    y = lk.layer_norm(x, w, b, backend=backend)
    assert torch.equal(y, b.expand_as(y))
    (dx,) = torch.autograd.grad(y, x, randn(gen, 37, 1, dtype=dtype))
    assert torch.equal(dx, torch.zeros_like(dx))


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype,offset", [(torch.float32, 100.0), (torch.float16, 500.0),
                                          (torch.bfloat16, 100.0)], ids=str)
def test_norm_large_offset(backend, gen, dtype, offset, rms):
    """Rows of offset + N(0, 1): a variance computed as E[x^2] - E[x]^2 would cancel away.
    (In float32 the offset stays at 100: the float32 rounding of the mean alone, ulp(offset)/2
    relative to a unit std, must stay under the 1e-5 bound.)"""
    x = (offset + randn(gen, 17, 1025, dtype=torch.float64)).to(dtype)
    tensors = {"x": x, "weight": randn(gen, 1025, dtype=dtype)}
    fn, ref = (lk.rms_norm, rms_norm_ref) if rms else (lk.layer_norm, layer_norm_ref)
    results = check_against_reference(
        lambda backend, **t: fn(**t, backend=backend), lambda **t: ref(**t, upcast=True),
        tensors, dtype, backend, gen, "offset norm")
    all_finite(results)


# ---- on a GPU ---------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("gpu_backend", BACKENDS)
def test_cuda_long_rows(gpu_backend, gen):
    """The CUDA and Triton GPU kernels on bf16 softmax rows of 70000 and cross-entropy over
    V = 200003, forward and backward, by the pass rule."""
    ok, why = lk.available_backends()[gpu_backend]
    if not ok:
        pytest.skip(f"backend {gpu_backend!r} unavailable: {why}")
    dtype = torch.bfloat16
    x = randn(gen, 5, 70000, dtype=dtype, scale=4.0).cuda()
    all_finite(check_against_reference(
        lambda backend, x: lk.softmax(x, backend=backend),
        lambda x: softmax_ref(x, upcast=True), {"x": x}, dtype, gpu_backend, gen, "softmax"))
    logits = randn(gen, 7, 200003, dtype=dtype, scale=3.0).cuda()
    target = torch.randint(0, 200003, (7,), generator=gen)
    target[2] = -100
    target = target.cuda()
    all_finite(check_against_reference(
        lambda backend, logits: lk.cross_entropy(logits, target, backend=backend),
        lambda logits: cross_entropy_ref(logits, target, upcast=True),
        {"logits": logits}, dtype, gpu_backend, gen, "cross_entropy"))
