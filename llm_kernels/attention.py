"""Exact softmax attention: ``lk.attention`` and the torch drop-in
``lk.scaled_dot_product_attention``.

out = softmax(q k^T * scale + mask) v, computed by the kernels tile by tile (online softmax,
O(L) memory) with the row logsumexp saved for the backward.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from llm_kernels import _amp, _checks, _ops
from llm_kernels.backends import record, select, warn_once
from llm_kernels.reference import attention_ref

MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 256


class AttentionFunction(torch.autograd.Function):
    """Autograd around the ``attention_forward``/``attention_backward`` kernels of a backend."""

    @staticmethod
    def forward(ctx, q, k, v, mask, causal: bool, causal_offset: int, scale: float, backend: str):
        out, lse = _ops.ops(backend).attention_forward(q, k, v, mask, causal, causal_offset, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask = mask
        ctx.args = (causal, causal_offset, scale, backend)
        return out

    @staticmethod
    @_ops.first_order_backward
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        causal, causal_offset, scale, backend = ctx.args
        dq, dk, dv = _ops.ops(backend).attention_backward(
            grad_out, q, k, v, out, lse, ctx.mask, causal, causal_offset, scale)
        return dq, dk, dv, None, None, None, None, None


def _validate(q, k, v, attn_mask, *, checked: bool = False):
    """``checked``: q, k and v are known to be 4-D floating tensors with a contiguous last dim
    (scaled_dot_product_attention's fallback checks), which is not checked again."""
    if not checked:
        _checks.tensor("q", q, ndim=4)
        _checks.tensor("k", k, ndim=4)
        _checks.tensor("v", v, ndim=4)
    _checks.same_dtype_device("q", q, ("k", k), ("v", v))
    b, h, lq, d = q.shape
    bk, hkv, lk, dk = k.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, Hkv, Lk, D), got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    if bk != b or dk != d:
        raise ValueError(f"q (B, H, Lq, D) = {tuple(q.shape)} and k (B, Hkv, Lk, D) = "
                         f"{tuple(k.shape)} must agree in B and D")
    if (h % hkv != 0) if hkv else h != 0:
        raise ValueError(f"the query heads H={h} must be a multiple of the key/value heads "
                         f"Hkv={hkv}")
    if not checked:
        _checks.last_dim_contiguous("q", q)
        _checks.last_dim_contiguous("k", k)
        _checks.last_dim_contiguous("v", v)
    if attn_mask is not None:
        _validate_mask(attn_mask, q, (b, h, lq, lk))


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _validate_mask(attn_mask, q, full_shape):
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool (True = attend) or floating (additive), "
                        f"got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {q.device}")
    shape = tuple(attn_mask.shape)
    ok = len(shape) <= 4 and all(s in (1, f) for s, f in zip(shape[::-1], full_shape[::-1]))
    if not ok:
        raise ValueError(f"attn_mask of shape {shape} is not broadcastable to "
                         f"(B, H, Lq, Lk) = {full_shape}")


def kernel_mask(attn_mask: Optional[torch.Tensor], full_shape) -> Optional[torch.Tensor]:
    """The additive float mask the kernels read, as a (B, H, Lq, Lk) view with 0 strides on
    broadcast dims (never expanded in memory). A bool mask becomes 0 / -inf of its own shape,
    a float64 one float32."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        additive = torch.zeros(attn_mask.shape, dtype=torch.float32, device=attn_mask.device)
        attn_mask = additive.masked_fill_(~attn_mask, float("-inf"))
    elif attn_mask.dtype not in _checks.KERNEL_DTYPES:  # float64: the kernels read 16/32 bits
        attn_mask = attn_mask.float()
    while attn_mask.dim() < 4:
        attn_mask = attn_mask.unsqueeze(0)
    return attn_mask.expand(full_shape)


def _kernel_reason(q, attn_mask) -> Optional[str]:
    d = q.shape[-1]
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        return f"the kernels take head dims {MIN_HEAD_DIM}..{MAX_HEAD_DIM}, got D={d}"
    if attn_mask is not None and attn_mask.requires_grad:
        return "a gradient for attn_mask needs the torch backend"
    return _checks.kernel_dtype_reason(q.dtype)


def _attention(q, k, v, *, causal_offset: Optional[int], scale: float, attn_mask, backend,
               op: str, torch_fn) -> torch.Tensor:
    name = select(op, backend, q.device, lambda _: _kernel_reason(q, attn_mask),
                  kernel="attention", empty=_checks.empty_reason(q=q, k=k))
    if name == "torch":
        return torch_fn()
    b, h, lq, _ = q.shape
    mask = kernel_mask(attn_mask, (b, h, lq, k.shape[2]))
    return _ops.apply(AttentionFunction, q, k, v, mask, causal_offset is not None,
                      causal_offset or 0, float(scale), name)


def attention(q, k, v, *, causal: bool = False, scale: Optional[float] = None, attn_mask=None,
              backend: Optional[str] = None) -> torch.Tensor:
    """softmax(q k^T * scale + attn_mask) v.

    q (B, H, Lq, D); k, v (B, Hkv, Lk, D) with H % Hkv == 0 (GQA/MQA, K/V never copied).
    ``causal`` is bottom-right aligned: query i sees key j iff j <= i + Lk - Lq. ``attn_mask``
    is bool (True = attend) or additive float, broadcastable to (B, H, Lq, Lk); an additive
    value below about -45426 (``torch.finfo(dtype).min``, ``-1e9``) hides its key like -inf. A
    query that sees no key gives zeros (and zero gradients). ``scale`` defaults to 1/sqrt(D).
    Returns (B, H, Lq, D) in q's dtype (under autocast, the inputs and so the result in the
    autocast dtype, as for torch's SDPA).
    """
    dtype = _amp.dtype_for(q)
    if dtype is not None:
        q, k, v, attn_mask = _amp.cast(dtype, q, k, v, attn_mask)
        with _amp.disabled(q):
            return attention(q, k, v, causal=causal, scale=scale, attn_mask=attn_mask,
                             backend=backend)
    _validate(q, k, v, attn_mask)
    _check_bool("causal", causal)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0  # D = 0: any scale
    else:
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale}")
    offset = k.shape[2] - q.shape[2] if causal else None
    return _attention(q, k, v, causal_offset=offset, scale=scale, attn_mask=attn_mask,
                      backend=backend, op="attention", torch_fn=lambda: attention_ref(
                          q, k, v, causal=causal, scale=scale, attn_mask=attn_mask))


def _sdpa_fallback_reason(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    if dropout_p != 0.0:
        return f"dropout_p={dropout_p} (the kernels compute no dropout)"
    if scale is not None and not math.isfinite(scale):
        return f"scale={scale} (the kernels take a finite scale)"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "inputs are not 4-D (B, H, L, D)"
    if key.shape[0] != query.shape[0] or value.shape[0] != query.shape[0]:
        return "a batch dim broadcast between query and key/value"
    if value.shape[-1] != query.shape[-1] or key.shape[-1] != query.shape[-1]:
        return "value/key head dim differs from the query's"
    if query.shape[1] != key.shape[1] and not enable_gqa:
        return "query and key head counts differ without enable_gqa"
    if attn_mask is not None and is_causal:
        return "attn_mask together with is_causal"
    if query.dtype not in _checks.KERNEL_DTYPES:
        return f"dtype {query.dtype}"
    if not MIN_HEAD_DIM <= query.shape[-1] <= MAX_HEAD_DIM:
        return f"head dim {query.shape[-1]}"
    if attn_mask is not None and attn_mask.requires_grad:
        return "attn_mask requires grad"
    for t in (query, key, value):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            return "a last dim that is not contiguous"
    return None


def _torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    # torch._C._nn holds the original op, so this still reaches torch under lk.patch_torch().
    return torch._C._nn.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
        scale=scale, enable_gqa=enable_gqa)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``: same signature and
    semantics (``is_causal`` top-left aligned: query i sees key j iff j <= i), except for a query
    row whose every key is hidden by -inf or by an additive mask below about -45426: zeros here,
    where torch gives NaN or an average of the values. What the kernels cannot do falls back to
    torch, with a warning (once per reason) and a dispatch_log entry."""
    dtype = _amp.dtype_for(query)
    if dtype is not None:
        query, key, value, attn_mask = _amp.cast(dtype, query, key, value, attn_mask)
        with _amp.disabled(query):
            return scaled_dot_product_attention(query, key, value, attn_mask, dropout_p,
                                                is_causal, scale, enable_gqa)
    for name, t in (("query", query), ("key", key), ("value", value)):
        _checks.tensor(name, t, min_ndim=2)
    _check_bool("is_causal", is_causal)
    reason = _sdpa_fallback_reason(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                   enable_gqa)
    if reason is not None:
        warn_once(f"llm_kernels.scaled_dot_product_attention: falling back to torch for {reason}",
                  stacklevel=2)
        record("scaled_dot_product_attention", "torch", "fallback: " + reason)
        return _torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    _validate(query, key, value, attn_mask, checked=True)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    return _attention(query, key, value, causal_offset=0 if is_causal else None, scale=scale,
                      attn_mask=attn_mask, backend=None, op="scaled_dot_product_attention",
                      torch_fn=lambda: _torch_sdpa(query, key, value, attn_mask, 0.0, is_causal,
                                                   scale, enable_gqa))
