"""``lk.feed_forward`` and ``lk.swiglu``: the transformer feed-forward block.

feed_forward: act(x @ w1.T + b1) @ w2.T + b2 (bias and activation fused into the matmuls)
swiglu:       (silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T
Weights are in nn.Linear layout (out_features, in_features).
"""
from __future__ import annotations

from typing import Optional

import torch

from llm_kernels import _amp, _checks, _ops
from llm_kernels.backends import select
from llm_kernels.reference import ACTIVATIONS, feed_forward_ref, swiglu_ref


class FeedForwardFunction(torch.autograd.Function):
    """Autograd around ``feed_forward_forward``/``_backward`` on x (N, d); saves the
    pre-activation (N, d_ff) and recomputes the activation in the backward."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, activation: str, backend: str):
        out, pre = _ops.ops(backend).feed_forward_forward(x, w1, b1, w2, b2, activation)
        ctx.save_for_backward(x, w1, b1, w2, b2, pre)
        ctx.args = (activation, backend)
        return out

    @staticmethod
    @_ops.first_order_backward
    def backward(ctx, grad_out):
        x, w1, b1, w2, b2, pre = ctx.saved_tensors
        activation, backend = ctx.args
        dx, dw1, db1, dw2, db2 = _ops.ops(backend).feed_forward_backward(
            grad_out.contiguous(), x, w1, b1, w2, b2, pre, activation)
        return (dx, dw1, db1 if b1 is not None else None, dw2, db2 if b2 is not None else None,
                None, None)


class SwiGLUFunction(torch.autograd.Function):
    """Autograd around ``swiglu_forward``/``_backward`` on x (N, d); saves gate and up (N, d_ff)."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, backend: str):
        out, gate, up = _ops.ops(backend).swiglu_forward(x, w_gate, w_up, w_down)
        ctx.save_for_backward(x, w_gate, w_up, w_down, gate, up)
        ctx.backend = backend
        return out

    @staticmethod
    @_ops.first_order_backward
    def backward(ctx, grad_out):
        grads = _ops.ops(ctx.backend).swiglu_backward(grad_out.contiguous(), *ctx.saved_tensors)
        return (*grads, None)


def _linear_weight(name, w, in_features, x):
    _checks.tensor(name, w, ndim=2)
    if w.shape[1] != in_features:
        raise ValueError(f"{name} must have shape (out_features, {in_features}) in nn.Linear "
                         f"layout, got {tuple(w.shape)}")
    _checks.same_dtype_device("x", x, (name, w))


def _bias(name, b, out_features, x):
    if b is not None:
        _checks.tensor(name, b, ndim=1)
        _checks.shape(name, b, (out_features,))
        _checks.same_dtype_device("x", x, (name, b))


def _kernel_reason(x) -> Optional[str]:
    return _checks.kernel_dtype_reason(x.dtype)


def feed_forward(x, w1, b1, w2, b2, *, activation: str = "gelu",
                 backend: Optional[str] = None) -> torch.Tensor:
    """act(x @ w1.T + b1) @ w2.T + b2 over the last dim of x; b1/b2 may be None. Under
    autocast the inputs are cast to the autocast dtype, as ``F.linear`` casts them."""
    dtype = _amp.dtype_for(x)
    if dtype is not None:
        x, w1, b1, w2, b2 = _amp.cast(dtype, x, w1, b1, w2, b2)
        with _amp.disabled(x):
            return feed_forward(x, w1, b1, w2, b2, activation=activation, backend=backend)
    _checks.tensor("x", x, min_ndim=1)
    _linear_weight("w1", w1, x.shape[-1], x)
    _bias("b1", b1, w1.shape[0], x)
    _linear_weight("w2", w2, w1.shape[0], x)
    _bias("b2", b2, w2.shape[0], x)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    name = select("feed_forward", backend, x.device, lambda _: _kernel_reason(x),
                  empty=_checks.empty_reason(x=x, w1=w1, w2=w2))
    if name == "torch":
        return feed_forward_ref(x, w1, b1, w2, b2, activation=activation)
    out = _ops.apply(FeedForwardFunction, _ops.rows(x), w1.contiguous(), _ops.contiguous(b1),
                     w2.contiguous(), _ops.contiguous(b2), activation, name)
    return _ops.unrows(out, x)


def swiglu(x, w_gate, w_up, w_down, *, backend: Optional[str] = None) -> torch.Tensor:
    """(silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T over the last dim of x (in the autocast
    dtype under autocast)."""
    dtype = _amp.dtype_for(x)
    if dtype is not None:
        x, w_gate, w_up, w_down = _amp.cast(dtype, x, w_gate, w_up, w_down)
        with _amp.disabled(x):
            return swiglu(x, w_gate, w_up, w_down, backend=backend)
    _checks.tensor("x", x, min_ndim=1)
    _linear_weight("w_gate", w_gate, x.shape[-1], x)
    _linear_weight("w_up", w_up, x.shape[-1], x)
    if w_up.shape != w_gate.shape:
        raise ValueError(f"w_up must have w_gate's shape {tuple(w_gate.shape)}, "
                         f"got {tuple(w_up.shape)}")
    _linear_weight("w_down", w_down, w_gate.shape[0], x)
    name = select("swiglu", backend, x.device, lambda _: _kernel_reason(x),
                  empty=_checks.empty_reason(x=x, w_gate=w_gate, w_down=w_down))
    if name == "torch":
        return swiglu_ref(x, w_gate, w_up, w_down)
    out = _ops.apply(SwiGLUFunction, _ops.rows(x), w_gate.contiguous(), w_up.contiguous(),
                     w_down.contiguous(), name)
    return _ops.unrows(out, x)
