"""``llm_kernels.nn``: torch.nn modules computed by the llm_kernels functions.

``LayerNorm`` and ``RMSNorm`` are state_dict-compatible with ``torch.nn.LayerNorm`` /
``torch.nn.RMSNorm`` (same parameter names, shapes and defaults) and take an optional residual
(``forward(x, residual)`` returns ``(normed, x + residual)``). ``FeedForward`` holds
``nn.Linear``-compatible ``fc1``/``fc2``, ``SwiGLU`` holds ``w_gate``/``w_up``/``w_down``, and
``MultiheadAttention`` is state_dict-compatible with ``torch.nn.MultiheadAttention`` (packed
in-projection) and computes attention through ``lk.scaled_dot_product_attention``.
``convert(model)`` swaps the torch modules of a model for these, sharing their parameters.
Every module takes ``backend`` (None = the default dispatch), passed to the lk function.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from llm_kernels import _amp
from llm_kernels.attention import scaled_dot_product_attention
from llm_kernels.backends import record, use_backend, warn_once
from llm_kernels.feed_forward import feed_forward, swiglu
from llm_kernels.layer_norm import layer_norm, rms_norm
from llm_kernels.reference import ACTIVATIONS

__all__ = ["FeedForward", "LayerNorm", "MultiheadAttention", "RMSNorm", "SwiGLU", "convert"]

ShapeLike = Union[int, Sequence[int], torch.Size]


def _as_shape(normalized_shape: ShapeLike) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(int(s) for s in normalized_shape)


def _flat_param(p: Optional[torch.Tensor], x: torch.Tensor,
                autocast: bool) -> Optional[torch.Tensor]:
    """The affine parameter as a 1-D tensor in x's dtype (differentiable view/cast); as is under
    autocast, where the norm promotes its inputs (float32 parameters: a float32 result, as
    torch's modules give)."""
    if p is None:
        return None
    if p.dim() != 1:
        p = p.reshape(-1)
    return p if autocast or p.dtype == x.dtype else p.to(x.dtype)


def _flat_rows(t: torch.Tensor, lead, features: int) -> torch.Tensor:
    """t (..., *normalized_shape) as (..., features) with a contiguous last dim."""
    flat = t.reshape(*lead, features)
    return _last_dim_contiguous(flat, features)


def _last_dim_contiguous(t: torch.Tensor, features: int) -> torch.Tensor:
    return t if features <= 1 or t.stride(-1) == 1 else t.contiguous()


def _normalize(fn, module, x, residual, **params):
    """Apply norm ``fn`` over the trailing ``module.normalized_shape`` dims of x (flattened)."""
    shape = module.normalized_shape
    if tuple(x.shape[-len(shape):]) != shape:
        raise ValueError(f"{type(module).__name__}: input of shape {tuple(x.shape)} does not end "
                         f"with normalized_shape {shape}")
    lead = x.shape[:-len(shape)]
    features = math.prod(shape)
    one_dim = len(shape) == 1  # x already is (..., features): no reshapes
    flat = _last_dim_contiguous(x, features) if one_dim else _flat_rows(x, lead, features)
    flat_res = None if residual is None else _flat_rows(residual, lead, features)
    autocast = _amp.dtype_for(x) is not None
    params = {k: _flat_param(v, x, autocast) for k, v in params.items()}
    out = fn(flat, **params, residual=flat_res, backend=module.backend)
    if residual is None:
        return out if one_dim else out.view_as(x)
    normed, summed = out
    return (normed, summed) if one_dim else (normed.view_as(x), summed.view_as(x))


class LayerNorm(torch.nn.Module):
    """Layer norm over the trailing ``normalized_shape`` dims (``torch.nn.LayerNorm``'s
    parameters and defaults): (h - mean) / sqrt(var + eps) * weight + bias, h = x (+ residual)."""

    def __init__(self, normalized_shape: ShapeLike, eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, device=None, dtype=None,
                 backend: Optional[str] = None):
        super().__init__()
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.register_parameter("weight", torch.nn.Parameter(
            torch.empty(self.normalized_shape, **factory)) if elementwise_affine else None)
        self.register_parameter("bias", torch.nn.Parameter(
            torch.empty(self.normalized_shape, **factory)) if elementwise_affine and bias else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """weight = 1, bias = 0 (torch.nn.LayerNorm's initialization)."""
        if self.weight is not None:
            torch.nn.init.ones_(self.weight)
        if self.bias is not None:
            torch.nn.init.zeros_(self.bias)

    @classmethod
    def from_torch(cls, module: torch.nn.LayerNorm, backend: Optional[str] = None) -> "LayerNorm":
        """An lk LayerNorm holding ``module``'s parameter objects (no copies)."""
        new = cls(module.normalized_shape, module.eps, module.elementwise_affine,
                  bias=module.bias is not None, device="meta", backend=backend)
        new.weight, new.bias = module.weight, module.bias
        return new.train(module.training)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        """normed, or (normed, x + residual) when residual is given."""
        return _normalize(lambda h, **kw: layer_norm(h, eps=self.eps, **kw), self, x, residual,
                          weight=self.weight, bias=self.bias)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine="
                f"{self.elementwise_affine}, bias={self.bias is not None}, backend={self.backend}")


class RMSNorm(torch.nn.Module):
    """RMSNorm over the trailing ``normalized_shape`` dims (``torch.nn.RMSNorm``'s parameters and
    defaults): h / sqrt(mean(h^2) + eps) * weight, h = x (+ residual). ``eps=None`` does what
    torch does: the machine epsilon of the compute type (float32 for 16-bit and float32 inputs,
    float64 for float64 ones)."""

    def __init__(self, normalized_shape: ShapeLike, eps: Optional[float] = None,
                 elementwise_affine: bool = True, device=None, dtype=None,
                 backend: Optional[str] = None):
        super().__init__()
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.backend = backend
        self.register_parameter("weight", torch.nn.Parameter(torch.empty(
            self.normalized_shape, device=device, dtype=dtype)) if elementwise_affine else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """weight = 1 (torch.nn.RMSNorm's initialization)."""
        if self.weight is not None:
            torch.nn.init.ones_(self.weight)

    @classmethod
    def from_torch(cls, module: torch.nn.RMSNorm, backend: Optional[str] = None) -> "RMSNorm":
        """An lk RMSNorm holding ``module``'s parameter object (no copy)."""
        new = cls(module.normalized_shape, module.eps, module.elementwise_affine, device="meta",
                  backend=backend)
        new.weight = module.weight
        return new.train(module.training)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        """normed, or (normed, x + residual) when residual is given."""
        eps = self.eps
        if eps is None:
            eps = torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps
        return _normalize(lambda h, **kw: rms_norm(h, eps=eps, **kw), self, x, residual,
                          weight=self.weight)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine="
                f"{self.elementwise_affine}, backend={self.backend}")


class FeedForward(torch.nn.Module):
    """fc2(act(fc1(x))) with ``nn.Linear`` submodules ``fc1`` (d_model -> d_ff) and ``fc2``
    (d_ff -> d_model); activation in gelu, gelu_tanh, relu, silu."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", bias: bool = True,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.backend = backend
        self.fc1 = torch.nn.Linear(d_model, d_ff, bias=bias, device=device, dtype=dtype)
        self.fc2 = torch.nn.Linear(d_ff, d_model, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return feed_forward(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                            activation=self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, backend={self.backend}"


class SwiGLU(torch.nn.Module):
    """w_down(silu(w_gate(x)) * w_up(x)) with bias-free ``nn.Linear`` submodules ``w_gate``,
    ``w_up`` (d_model -> d_ff) and ``w_down`` (d_ff -> d_model)."""

    def __init__(self, d_model: int, d_ff: int, backend: Optional[str] = None, device=None,
                 dtype=None):
        super().__init__()
        self.backend = backend
        factory = {"bias": False, "device": device, "dtype": dtype}
        self.w_gate = torch.nn.Linear(d_model, d_ff, **factory)
        self.w_up = torch.nn.Linear(d_model, d_ff, **factory)
        self.w_down = torch.nn.Linear(d_ff, d_model, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.w_gate.weight, self.w_up.weight, self.w_down.weight,
                      backend=self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend}"


def _additive_mask(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """torch MHA's mask convention (bool True = masked out, or additive float) -> additive."""
    if mask is None or mask.is_floating_point():
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"only bool and floating masks are supported, got {mask.dtype}")
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask,
                                                                                 float("-inf"))


class MultiheadAttention(torch.nn.Module):
    """Multi-head attention with ``torch.nn.MultiheadAttention``'s parameters (packed
    ``in_proj_weight``/``in_proj_bias``, ``out_proj``), call signature and results, computing
    attention through ``lk.scaled_dot_product_attention``.

    Calls that ask for the attention weights (``need_weights=True``, torch's default) or use
    dropout in training run torch's own math instead (warned once per reason).
    """

    # False although q, k and v share one packed projection: torch's TransformerEncoder(Layer)
    # take their inference fast path only when it is True, and that path calls torch's fused
    # kernel with these parameters, bypassing this module.
    _qkv_same_embed_dim = False
    bias_k = bias_v = None
    add_zero_attn = False

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, device=None, dtype=None,
                 backend: Optional[str] = None):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout, self.batch_first, self.backend = dropout, batch_first, backend
        factory = {"device": device, "dtype": dtype}
        self.in_proj_weight = torch.nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
        self.register_parameter("in_proj_bias", torch.nn.Parameter(
            torch.zeros(3 * embed_dim, **factory)) if bias else None)
        self.out_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if self.in_proj_weight.device.type != "meta":
            torch.nn.init.xavier_uniform_(self.in_proj_weight)
            if bias:
                torch.nn.init.zeros_(self.out_proj.bias)

    @classmethod
    def from_torch(cls, module: torch.nn.MultiheadAttention,
                   backend: Optional[str] = None) -> "MultiheadAttention":
        """An lk MultiheadAttention holding ``module``'s parameters and ``out_proj`` (no copies)."""
        reason = cannot_convert_mha(module)
        if reason is not None:
            raise ValueError(f"cannot convert this MultiheadAttention: {reason}")
        new = cls(module.embed_dim, module.num_heads, module.dropout,
                  bias=module.in_proj_bias is not None, batch_first=module.batch_first,
                  device="meta", backend=backend)
        new.in_proj_weight, new.in_proj_bias = module.in_proj_weight, module.in_proj_bias
        new.out_proj = module.out_proj
        return new.train(module.training)

    def _fallback_reason(self, need_weights: bool) -> Optional[str]:
        if need_weights:
            return "need_weights=True (the kernels return no attention weights)"
        if self.training and self.dropout > 0:
            return f"dropout={self.dropout} in training (the kernels compute no dropout)"
        return None

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True,
                attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        """(attn_output, None), or torch's (attn_output, weights) on the fallback path."""
        reason = self._fallback_reason(need_weights)
        if reason is not None:
            warn_once(f"llm_kernels.nn.MultiheadAttention: torch math for {reason}", stacklevel=2)
            record("MultiheadAttention", "torch", "fallback: " + reason)
            return self._torch_forward(query, key, value, key_padding_mask, need_weights,
                                       attn_mask, average_attn_weights, is_causal)
        batched = query.dim() == 3
        q, k, v = self._project(query, key, value, batched)          # (B, H, L|S, Dh)
        mask, causal = self._mask(key_padding_mask, attn_mask, is_causal, batched, q)
        select = use_backend(self.backend) if self.backend else contextlib.nullcontext()
        with select:
            out = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        b, _, length, _ = out.shape
        out = F.linear(out.transpose(1, 2).reshape(b, length, self.embed_dim),
                       self.out_proj.weight, self.out_proj.bias)    # (B, L, E)
        if not batched:
            return out.squeeze(0), None
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _project(self, query, key, value, batched):
        """The q, k, v projections as (B, H, L, Dh) views of batch-first (B, L, E) products."""
        same_kv, self_attn = key is value, query is key and key is value

        def batch_first(t):
            if not batched:
                return t.unsqueeze(0)
            return t if self.batch_first else t.transpose(0, 1)

        w, b = self.in_proj_weight, self.in_proj_bias
        e = self.embed_dim
        if self_attn:
            q, k, v = F.linear(batch_first(query), w, b).chunk(3, dim=-1)
        elif same_kv:
            q = F.linear(batch_first(query), w[:e], None if b is None else b[:e])
            k, v = F.linear(batch_first(key), w[e:], None if b is None else b[e:]).chunk(2, dim=-1)
        else:
            bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
            wq, wk, wv = w.chunk(3)
            q, k, v = (F.linear(batch_first(t), wt, bt) for t, wt, bt in
                       ((query, wq, bq), (key, wk, bk), (value, wv, bv)))

        def heads(t):  # (B, L, E) -> (B, H, L, Dh)
            return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

        return heads(q), heads(k), heads(v)

    def _mask(self, key_padding_mask, attn_mask, is_causal, batched, q):
        """torch MHA's masks merged into one additive mask broadcastable to (B, H, L, S), and
        whether the causal hint survives (as in F.multi_head_attention_forward)."""
        b, h, length, _ = q.shape
        kpm = _additive_mask(key_padding_mask, q.dtype)
        if kpm is not None:
            kpm = kpm.reshape(b, 1, 1, -1)                          # (B, 1, 1, S)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
        if is_causal and kpm is None:
            return None, True
        mask = _additive_mask(attn_mask, q.dtype)
        if mask is not None:
            mask = mask.unsqueeze(0).unsqueeze(0) if mask.dim() == 2 else mask.view(b, h, length,
                                                                                    -1)
        if kpm is not None:
            mask = kpm if mask is None else mask + kpm
        return mask, False

    def _torch_forward(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                       average_attn_weights, is_causal):
        """torch.nn.MultiheadAttention's own computation on these parameters."""
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight,
            self.in_proj_bias, None, None, False, self.dropout, self.out_proj.weight,
            self.out_proj.bias, training=self.training, key_padding_mask=key_padding_mask,
            need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}, backend={self.backend}")


def cannot_convert_mha(module: torch.nn.MultiheadAttention) -> Optional[str]:
    """Why ``module`` has no lk equivalent, or None."""
    if not module._qkv_same_embed_dim:
        return "kdim/vdim differ from embed_dim (separate q/k/v projection weights)"
    if module.bias_k is not None:
        return "add_bias_kv=True"
    if module.add_zero_attn:
        return "add_zero_attn=True"
    return None


_CONVERTERS = {
    torch.nn.LayerNorm: LayerNorm.from_torch,
    torch.nn.RMSNorm: RMSNorm.from_torch,
    torch.nn.MultiheadAttention: MultiheadAttention.from_torch,
}


def _replacement(module: torch.nn.Module, path: str,
                 backend: Optional[str]) -> Optional[torch.nn.Module]:
    """The lk module replacing ``module``, or None (with a warning when it is a torch module of
    a convertible kind that cannot be converted)."""
    converter = _CONVERTERS.get(type(module))
    if converter is None:
        base = next((cls for cls in _CONVERTERS if isinstance(module, cls)), None)
        if base is not None:
            warnings.warn(f"llm_kernels.nn.convert: left {path or 'the model'} "
                          f"({type(module).__name__}) as is: it subclasses {base.__name__} and "
                          "may change its forward", stacklevel=3)
        return None
    if type(module) is torch.nn.MultiheadAttention:
        reason = cannot_convert_mha(module)
        if reason is not None:
            warnings.warn(f"llm_kernels.nn.convert: left {path or 'the model'} "
                          f"(MultiheadAttention) as is: {reason}", stacklevel=3)
            return None
    return converter(module, backend)


def convert(model: torch.nn.Module, backend: Optional[str] = None) -> torch.nn.Module:
    """Replace every ``torch.nn.LayerNorm``, ``torch.nn.RMSNorm`` and (where its arguments
    allow) ``torch.nn.MultiheadAttention`` in ``model`` by the lk module sharing the same
    Parameter objects; returns the model (the replacement when ``model`` itself is one).
    What cannot be converted is left as is, with a warning saying why. A
    ``torch.nn.TransformerEncoder`` stops packing padded batches into nested tensors, which only
    torch's own attention module takes."""
    root = _replacement(model, "", backend)
    if root is not None:
        return root
    for path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            new = _replacement(child, f"{path}.{name}" if path else name, backend)
            if new is not None:
                setattr(parent, name, new)
        if isinstance(parent, torch.nn.TransformerEncoder):
            parent.use_nested_tensor = False
    return model
