"""Hugging Face transformers attention backend: ``attn_implementation="llm_kernels"``.

    from llm_kernels.integrations.transformers import register
    register()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="llm_kernels")

:func:`attention_forward` has the contract of transformers' ``sdpa_attention_forward``:
query (B, H, Lq, D), key/value (B, Hkv, Lk, D) in, ``(attn_output (B, Lq, H, D), None)`` out.
Masks are built by transformers' SDPA mask builder (bool, True = attend, or None when plain
causal / full attention suffices); GQA runs without copying K/V. transformers is imported only
by :func:`register`.
"""
from __future__ import annotations

from typing import Optional

import torch

from llm_kernels.attention import attention
from llm_kernels.backends import record, warn_once

NAME = "llm_kernels"
_UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux", "sinks")


def _fallback_reason(query, key, value, dropout: float, kwargs) -> Optional[str]:
    if dropout > 0.0:
        return f"dropout={dropout} (the kernels compute no dropout)"
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            return f"{name} is not supported by the kernels"
    if value.shape[-1] != query.shape[-1] or key.shape[-1] != query.shape[-1]:
        return "key/value head dims differ from the query's"
    if query.shape[1] % key.shape[1] != 0:
        return "query heads are not a multiple of key/value heads"
    return None


def _torch_fallback(reason, module, query, key, value, attention_mask, dropout, scaling,
                    is_causal, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    warn_once(f"llm_kernels attention for transformers: falling back to torch SDPA for {reason}",
              stacklevel=3)
    record("attention", "torch", "fallback (transformers): " + reason)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, is_causal=is_causal, **kwargs)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                      dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs) -> tuple[torch.Tensor, None]:
    """softmax(q k^T * scaling + mask) v for a transformers attention module, through lk.attention.

    query (B, H, Lq, D), key/value (B, Hkv, Lk, D), ``attention_mask`` bool or additive float
    broadcastable to (B, H, Lq, Lk), or None. Returns ((B, Lq, H, D) contiguous, None).
    """
    reason = _fallback_reason(query, key, value, dropout, kwargs)
    if reason is not None:
        return _torch_fallback(reason, module, query, key, value, attention_mask, dropout,
                               scaling, is_causal, kwargs)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    lq = query.shape[2]
    # An explicit mask already holds the causal pattern; a single query sees the whole cache.
    causal = bool(is_causal) and attention_mask is None and lq > 1
    if causal and key.shape[2] > lq:
        # transformers leaves the mask out with Lk > Lq only for a prefill into an empty static
        # cache, meaning top-left causality: the keys past Lq are unused slots.
        key, value = key[:, :, :lq], value[:, :, :lq]
    out = attention(query, key, value, causal=causal, scale=scaling,
                    attn_mask=attention_mask)  # (B, H, Lq, D)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"llm_kernels"`` as a transformers attention implementation (and its mask
    builder, transformers' SDPA one). Idempotent."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as exc:
        raise ImportError("llm_kernels.integrations.transformers needs Hugging Face transformers "
                          ">= 4.53: pip install llm-kernels[hf]") from exc
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
