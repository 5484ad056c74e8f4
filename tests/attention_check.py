"""Attention forward and backward of one backend against the float64 reference, shared by
test_attention.py (triton) and test_cuda_attention.py (cuda)."""
import torch

import llm_kernels as lk
from llm_kernels.numerics import assert_close
from llm_kernels.reference import attention_ref


def make_qkv(b, h, hkv, lq, lk_, d, dtype, device, seq_major=False):
    """q (B, H, Lq, D), k/v (B, Hkv, Lk, D) leaves; with seq_major, views of (B, L, H, D)
    tensors transposed (strided, last dim contiguous)."""
    def make(heads, length):
        if seq_major:
            base = torch.randn(b, length, heads, d, dtype=dtype, device=device)
            return base.transpose(1, 2).requires_grad_()
        return torch.randn(b, heads, length, d, dtype=dtype, device=device, requires_grad=True)
    return make(h, lq), make(hkv, lk_), make(hkv, lk_)


def leaf64(t):
    return t.detach().double().requires_grad_()


def check_attention(backend, q, k, v, *, causal=False, scale=None, attn_mask=None,
                    grad_out=None):
    """Forward and backward of ``backend`` against the fp64 reference by the pass rule, the
    torch backend in the same dtype setting the budget; returns (out, dq, dk, dv)."""
    dtype = q.dtype
    kwargs = dict(causal=causal, scale=scale, attn_mask=attn_mask)
    out = lk.attention(q, k, v, backend=backend, **kwargs)
    torch_out = lk.attention(q, k, v, backend="torch", **kwargs)
    q64, k64, v64 = leaf64(q), leaf64(k), leaf64(v)
    ref = attention_ref(q64, k64, v64, upcast=True, **kwargs)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    assert_close(out, ref, torch_out, dtype, "out")
    if grad_out is None:
        grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    torch_grads = torch.autograd.grad(torch_out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    for name, g, tg, rg in zip(("dq", "dk", "dv"), grads, torch_grads, ref_grads):
        assert g.dtype == dtype and g.shape == rg.shape
        assert_close(g, rg, tg, dtype, name)
    return (out, *grads)
