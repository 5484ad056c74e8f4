"""Pure-torch references, one ``*_ref`` per public op.

They are the ``torch`` backend (differentiable through torch autograd) and, with
``upcast=True``, the float64 ground truth that tests and ``llm-kernels verify`` compare every
kernel against. With ``upcast=True`` the result stays in float64; otherwise it is returned in
the input dtype. No input validation here: the public functions validate before dispatching.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from llm_kernels import _checks

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


def _up(t: Optional[torch.Tensor], upcast: bool) -> Optional[torch.Tensor]:
    return t.double() if (upcast and t is not None and t.is_floating_point()) else t


def _safe_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim in which a row of all -inf (or of no keys) gives zeros (and
    zero gradients)."""
    if scores.shape[-1] == 0:
        return scores
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    exp = torch.exp(scores - row_max)
    denom = exp.sum(dim=-1, keepdim=True)
    return exp / torch.where(denom == 0, torch.ones_like(denom), denom)


def causal_keep(lq: int, lk: int, offset: int, device) -> torch.Tensor:
    """Bool (Lq, Lk): query i sees key j iff j <= i + offset."""
    rows = torch.arange(lq, device=device).unsqueeze(1)
    cols = torch.arange(lk, device=device).unsqueeze(0)
    return cols <= rows + offset


def _masked_scores(q, k, *, causal_offset, scale, attn_mask):
    h, hkv = q.shape[-3], k.shape[-3]
    if h != hkv:
        k = k.repeat_interleave(h // hkv, dim=-3)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, Lq, Lk)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(scores.dtype)
    if causal_offset is not None:
        keep = causal_keep(q.shape[-2], k.shape[-2], causal_offset, q.device)
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores


def attention_ref(q, k, v, *, causal=False, scale=None, attn_mask=None, causal_offset=None,
                  upcast=False):
    """softmax(q k^T * scale + mask) v with GQA; causal is bottom-right aligned.

    q (B, H, Lq, D), k/v (B, Hkv, Lk, D) -> (B, H, Lq, D). A query that sees no key gives 0.
    ``causal_offset`` overrides the alignment: query i sees key j iff j <= i + causal_offset.
    """
    dtype = q.dtype
    q, k, v, attn_mask = (_up(t, upcast) for t in (q, k, v, attn_mask))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if causal and causal_offset is None:
        causal_offset = k.shape[-2] - q.shape[-2]
    if not causal:
        causal_offset = None
    scores = _masked_scores(q, k, causal_offset=causal_offset, scale=scale, attn_mask=attn_mask)
    probs = _safe_softmax(scores)
    h, hkv = q.shape[-3], v.shape[-3]
    if h != hkv:
        v = v.repeat_interleave(h // hkv, dim=-3)
    out = torch.matmul(probs, v)
    return out if upcast else out.to(dtype)


def sdpa_ref(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False, upcast=False):
    """torch.nn.functional.scaled_dot_product_attention's semantics (``is_causal`` top-left)
    without dropout; any leading batch dims, value dim may differ from the query's."""
    if dropout_p != 0.0:
        raise ValueError("sdpa_ref computes no dropout: dropout_p must be 0")
    if query.shape[-3:-2] != key.shape[-3:-2] and query.dim() >= 3 and not enable_gqa:
        raise ValueError("query and key head counts differ: pass enable_gqa=True")
    return attention_ref(query, key, value, causal=is_causal, scale=scale, attn_mask=attn_mask,
                         causal_offset=0 if is_causal else None, upcast=upcast)


def layer_norm_ref(x, weight=None, bias=None, eps=1e-5, *, residual=None, upcast=False):
    """(h - mean(h)) / sqrt(var(h) + eps) * weight + bias over the last dim, h = x + residual.

    Returns ``normed``, or ``(normed, h)`` when ``residual`` is given.
    """
    dtype = x.dtype
    x, weight, bias, residual = (_up(t, upcast) for t in (x, weight, bias, residual))
    h = x if residual is None else x + residual
    if upcast:
        mean = h.mean(dim=-1, keepdim=True)
        var = ((h - mean) ** 2).mean(dim=-1, keepdim=True)
        normed = _affine((h - mean) * torch.rsqrt(var + eps), weight, bias)
    else:
        normed = F.layer_norm(h, h.shape[-1:], weight, bias, eps).to(dtype)
    return normed if residual is None else (normed, h)


def rms_norm_ref(x, weight=None, eps=1e-6, *, residual=None, upcast=False):
    """h / sqrt(mean(h^2) + eps) * weight over the last dim, h = x + residual.

    Returns ``normed``, or ``(normed, h)`` when ``residual`` is given.
    """
    dtype = x.dtype
    x, weight, residual = (_up(t, upcast) for t in (x, weight, residual))
    h = x if residual is None else x + residual
    if upcast:
        normed = _affine(h * torch.rsqrt((h * h).mean(dim=-1, keepdim=True) + eps), weight, None)
    else:
        normed = F.rms_norm(h, h.shape[-1:], weight, eps).to(dtype)
    return normed if residual is None else (normed, h)


def _affine(normed, weight, bias):
    if weight is not None:
        normed = normed * weight.to(normed.dtype)
    if bias is not None:
        normed = normed + bias.to(normed.dtype)
    return normed


def softmax_ref(x, dim=-1, *, upcast=False):
    """exp(x - max) / sum(exp(x - max)) along ``dim``; a row of all -inf gives zeros."""
    if upcast:
        return _safe_softmax(x.double().transpose(dim, -1)).transpose(dim, -1)
    # torch's own softmax in x's dtype (its backward reads the rounded output, as the kernels'
    # do), with rows of all -inf set to zeros instead of NaN (on a CPU only when x has an -inf;
    # on a GPU always, as checking would wait for the device).
    if _checks.can_read_values(x) and not bool(torch.isneginf(x).any()):
        return torch.softmax(x, dim=dim)
    empty_rows = (x == float("-inf")).all(dim=dim, keepdim=True)
    out = torch.softmax(x.masked_fill(empty_rows, 0.0), dim=dim)
    return out.masked_fill(empty_rows, 0.0)


def activation_ref(x, activation: str):
    """gelu (erf), gelu_tanh, relu or silu."""
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "relu":
        return F.relu(x)
    if activation == "silu":
        return F.silu(x)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def feed_forward_ref(x, w1, b1, w2, b2, *, activation="gelu", upcast=False):
    """act(x @ w1.T + b1) @ w2.T + b2, weights in nn.Linear layout."""
    dtype = x.dtype
    x, w1, b1, w2, b2 = (_up(t, upcast) for t in (x, w1, b1, w2, b2))
    out = F.linear(activation_ref(F.linear(x, w1, b1), activation), w2, b2)
    return out if upcast else out.to(dtype)


def swiglu_ref(x, w_gate, w_up, w_down, *, upcast=False):
    """(silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T."""
    dtype = x.dtype
    x, w_gate, w_up, w_down = (_up(t, upcast) for t in (x, w_gate, w_up, w_down))
    out = F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)
    return out if upcast else out.to(dtype)


def cross_entropy_ref(logits, target, *, ignore_index=-100, reduction="mean", upcast=False):
    """torch.nn.functional.cross_entropy on (N, V) logits."""
    dtype = logits.dtype
    logits = _up(logits, upcast)
    out = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)
    return out if upcast else out.to(dtype)
