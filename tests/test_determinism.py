"""Deterministic backwards: with ``lk.use_deterministic(True)``, and separately with
``torch.use_deterministic_algorithms(True)``, every op's forward and backward run twice on the
same inputs give bit-identical outputs and gradients, on every kernel backend available on CPU;
the test marked ``cuda`` repeats it for attention at L = 4096 on a GPU.
"""
import math

import pytest
import torch

import llm_kernels as lk
from llm_kernels.backends import deterministic
from reference_check import backward, forward, randn, random_grads, require_cpu_backend

BACKENDS = ("cuda", "triton")
MODES = ("lk.use_deterministic", "torch.use_deterministic_algorithms")


@pytest.fixture(params=MODES)
def deterministic_mode(request):
    """Turn one of the two switches on for the test; reset both afterwards."""
    torch_before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if request.param == "lk.use_deterministic":
        lk.use_deterministic(True)
    else:
        torch.use_deterministic_algorithms(True)
    try:
        assert deterministic()
        yield request.param
    finally:
        lk.use_deterministic(False)
        torch.use_deterministic_algorithms(torch_before, warn_only=warn_only)


def linear(gen, out_features, in_features, dtype):
    return randn(gen, out_features, in_features, dtype=dtype, scale=1 / math.sqrt(in_features))


def op_call(op: str, gen, dtype, large: bool):
    """(call(backend, **tensors), tensors) for one op; ``large`` sizes for the C++ kernels
    (enough rows to split reductions across threads), small ones for the interpreter."""
    rows = 1025 if large else 37
    if op == "attention":
        b, h, hkv, lq, lk_, d = (2, 8, 2, 129, 257, 64) if large else (1, 4, 2, 37, 45, 32)
        mask = torch.rand(b, 1, lq, lk_, generator=gen) > 0.2
        tensors = {"q": randn(gen, b, h, lq, d, dtype=dtype),
                   "k": randn(gen, b, hkv, lk_, d, dtype=dtype),
                   "v": randn(gen, b, hkv, lk_, d, dtype=dtype)}
        return (lambda backend, **t: lk.attention(**t, causal=True, attn_mask=mask,
                                                  backend=backend)), tensors
    if op in ("layer_norm", "rms_norm"):
        c = 257
        tensors = {"x": randn(gen, rows, c, dtype=dtype), "weight": randn(gen, c, dtype=dtype),
                   "residual": randn(gen, rows, c, dtype=dtype)}
        if op == "layer_norm":
            tensors["bias"] = randn(gen, c, dtype=dtype)
        fn = getattr(lk, op)
        return (lambda backend, **t: fn(**t, backend=backend)), tensors
    if op == "softmax":
        return ((lambda backend, x: lk.softmax(x, backend=backend)),
                {"x": randn(gen, rows, 1000, dtype=dtype, scale=3.0)})
    d, d_ff = (96, 160) if large else (24, 40)
    if op == "feed_forward":
        tensors = {"x": randn(gen, rows, d, dtype=dtype), "w1": linear(gen, d_ff, d, dtype),
                   "b1": randn(gen, d_ff, dtype=dtype), "w2": linear(gen, d, d_ff, dtype),
                   "b2": randn(gen, d, dtype=dtype)}
        return (lambda backend, x, w1, b1, w2, b2: lk.feed_forward(
            x, w1, b1, w2, b2, activation="gelu", backend=backend)), tensors
    if op == "swiglu":
        tensors = {"x": randn(gen, rows, d, dtype=dtype), "w_gate": linear(gen, d_ff, d, dtype),
                   "w_up": linear(gen, d_ff, d, dtype), "w_down": linear(gen, d, d_ff, dtype)}
        return (lambda backend, **t: lk.swiglu(**t, backend=backend)), tensors
    assert op == "cross_entropy"
    vocab = 5003
    target = torch.randint(0, vocab, (rows,), generator=gen)
    target[::7] = -100
    return ((lambda backend, logits: lk.cross_entropy(logits, target, backend=backend)),
            {"logits": randn(gen, rows, vocab, dtype=dtype, scale=2.0)})


def run_twice(call, tensors, backend, gen):
    """Outputs and gradients of two identical forward + backward runs."""
    runs = []
    grad_outs = None
    for _ in range(2):
        inputs, outs = forward(lambda **t: call(backend, **t), tensors)
        grad_outs = grad_outs or random_grads(gen, outs)
        runs.append(({f"out{i}": o for i, o in enumerate(outs)}, backward(inputs, outs, grad_outs)))
    return runs


def assert_bit_identical(first, second):
    (outs1, grads1), (outs2, grads2) = first, second
    for name in outs1:
        assert torch.equal(outs1[name], outs2[name]), f"{name} differs between runs"
    for name in grads1:
        assert torch.equal(grads1[name], grads2[name]), f"d{name} differs between runs"


OPS = ("attention", "layer_norm", "rms_norm", "softmax", "feed_forward", "swiglu",
       "cross_entropy")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_bit_identical(backend, op, dtype, deterministic_mode, seed):
    require_cpu_backend(backend)
    gen = torch.Generator().manual_seed(seed)
    call, tensors = op_call(op, gen, dtype, large=backend == "cuda")
    first, second = run_twice(call, tensors, backend, gen)
    assert first[1], "no gradient was computed"
    assert_bit_identical(first, second)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["default", "lk.use_deterministic"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_attention_backward_bit_identical_4k(backend, mode, seed):
    """Two attention backwards at L = 4096, bf16, GQA 8/2, causal, on the GPU: bit-identical
    dq, dk, dv (no float atomics in the reductions over query tiles or grouped heads)."""
    ok, why = lk.available_backends()[backend]
    if not ok:
        pytest.skip(f"backend {backend!r} unavailable: {why}")
    gen = torch.Generator().manual_seed(seed)
    b, h, hkv, length, d = 1, 8, 2, 4096, 128
    tensors = {"q": randn(gen, b, h, length, d, dtype=torch.bfloat16).cuda(),
               "k": randn(gen, b, hkv, length, d, dtype=torch.bfloat16).cuda(),
               "v": randn(gen, b, hkv, length, d, dtype=torch.bfloat16).cuda()}
    lk.use_deterministic(mode != "default")
    try:
        first, second = run_twice(
            lambda backend, **t: lk.attention(**t, causal=True, backend=backend),
            tensors, backend, gen)
    finally:
        lk.use_deterministic(False)
    assert_bit_identical(first, second)
