"""Bad input raises a clear error naming the argument, before any kernel runs."""
import sys
import warnings

import pytest
import torch

import llm_kernels as lk


def _qkv(b=2, h=4, hkv=2, lq=5, lk_=7, d=16, dtype=torch.float32):
    return (torch.randn(b, h, lq, d, dtype=dtype), torch.randn(b, hkv, lk_, d, dtype=dtype),
            torch.randn(b, hkv, lk_, d, dtype=dtype))


@pytest.mark.parametrize("backend", ["torch", None])
def test_attention_bad_inputs(backend):
    q, k, v = _qkv()
    cases = [
        (TypeError, "q must be a torch.Tensor", lambda: lk.attention(q.numpy(), k, v)),
        (ValueError, "q must have 4 dims", lambda: lk.attention(q[0], k, v)),
        (ValueError, "must agree in B and D", lambda: lk.attention(q[:1], k, v)),
        (ValueError, "must agree in B and D", lambda: lk.attention(q[..., :8], k, v)),
        (ValueError, "multiple of the key/value heads", lambda: lk.attention(q[:, :3], k, v)),
        (ValueError, "k and v must have the same shape", lambda: lk.attention(q, k, v[:, :, :3])),
        (TypeError, "k has dtype", lambda: lk.attention(q, k.half(), v)),
        (TypeError, "q must be float16", lambda: lk.attention(q.int(), k, v)),
        (ValueError, "contiguous last dim", lambda: lk.attention(q.transpose(-1, -2)[..., :5, :],
                                                                 k[..., :5, :].transpose(-1, -2),
                                                                 v[..., :5, :].transpose(-1, -2))),
        (TypeError, "causal must be a bool", lambda: lk.attention(q, k, v, causal="no")),
        (TypeError, "is_causal must be a bool",
         lambda: lk.scaled_dot_product_attention(q, k, v, is_causal=1, enable_gqa=True)),
        (ValueError, "not broadcastable",
         lambda: lk.attention(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.bool))),
        (TypeError, "attn_mask must be bool",
         lambda: lk.attention(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.int32))),
    ]
    for exc, message, call in cases:
        with pytest.raises(exc, match=message):
            with lk.use_backend(backend or "auto"):
                call()


def test_attention_mixed_devices_rejected():
    q, k, v = _qkv()
    meta = k.to("meta")
    with pytest.raises(ValueError, match="k is on meta"):
        lk.attention(q, meta, v)


def test_norm_bad_inputs():
    x = torch.randn(4, 17)
    cases = [
        (ValueError, "weight must have shape", lambda: lk.layer_norm(x, torch.ones(16))),
        (ValueError, "bias must have 1 dims", lambda: lk.layer_norm(x, None, torch.ones(1, 17))),
        (ValueError, "residual must have shape", lambda: lk.layer_norm(x, residual=x[:2])),
        (TypeError, "residual has dtype", lambda: lk.rms_norm(x, residual=x.half())),
        (TypeError, "x must be float16", lambda: lk.rms_norm(x.long())),
        (ValueError, "contiguous last dim", lambda: lk.layer_norm(x.t())),
        (ValueError, "eps must be a non-negative", lambda: lk.rms_norm(x, eps=-1.0)),
        (ValueError, "backend must be one of", lambda: lk.layer_norm(x, backend="fast")),
    ]
    for exc, message, call in cases:
        with pytest.raises(exc, match=message):
            call()


def test_softmax_bad_inputs():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="dim must be an int"):
        lk.softmax(x, dim=2)
    with pytest.raises(TypeError, match="x must be float16"):
        lk.softmax(x.int())


def test_feed_forward_bad_inputs():
    x, w1, b1, w2, b2 = (torch.randn(5, 8), torch.randn(16, 8), torch.randn(16), torch.randn(8, 16),
                         torch.randn(8))
    cases = [
        (ValueError, "w1 must have shape", lambda: lk.feed_forward(x, w1.t(), b1, w2, b2)),
        (ValueError, "b1 must have shape", lambda: lk.feed_forward(x, w1, b2, w2, b2)),
        (ValueError, "w2 must have shape", lambda: lk.feed_forward(x, w1, b1, w1, b2)),
        (ValueError, "activation must be one of",
         lambda: lk.feed_forward(x, w1, b1, w2, b2, activation="tanh")),
        (TypeError, "w2 has dtype", lambda: lk.feed_forward(x, w1, b1, w2.half(), b2)),
        (ValueError, "w_up must have w_gate's shape", lambda: lk.swiglu(x, w1, w1[:8], w2)),
        (ValueError, "w_down must have shape", lambda: lk.swiglu(x, w1, w1, w1)),
    ]
    for exc, message, call in cases:
        with pytest.raises(exc, match=message):
            call()


def test_cross_entropy_bad_inputs():
    logits, target = torch.randn(6, 11), torch.randint(0, 11, (6,))
    cases = [
        (ValueError, "logits must have 2 dims", lambda: lk.cross_entropy(logits[0], target)),
        (TypeError, "target must be an int64", lambda: lk.cross_entropy(logits, target.int())),
        (ValueError, r"target must have shape \(N,\)",
         lambda: lk.cross_entropy(logits, target[:3])),
        (ValueError, "reduction must be one of",
         lambda: lk.cross_entropy(logits, target, reduction="avg")),
        (ValueError, r"target values must be in \[0, 11\)",
         lambda: lk.cross_entropy(logits, target + 11)),
    ]
    for exc, message, call in cases:
        with pytest.raises(exc, match=message):
            call()


def test_sdpa_fallback_warns_once_and_logs(monkeypatch):
    monkeypatch.setattr(sys.modules["llm_kernels.backends"], "_warned", set())
    q, k, v = _qkv(h=2, hkv=2)
    lk.dispatch_log(clear=True)
    with pytest.warns(UserWarning, match="dropout_p"):
        lk.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.scaled_dot_product_attention(q, k, v, dropout_p=0.5)  # once per reason
    assert [e["reason"] for e in lk.dispatch_log()] == ["fallback: dropout_p=0.5 (the kernels "
                                                        "compute no dropout)"] * 2
