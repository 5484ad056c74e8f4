"""``lk.layer_norm`` and ``lk.rms_norm`` over the last dim, with an optional fused residual add.

layer_norm: y = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias
rms_norm:   y = h / sqrt(mean(h^2) + eps) * weight
with h = x + residual (returned as ``(y, h)``) or h = x. Statistics are float32.
"""
from __future__ import annotations

from typing import Optional

import torch

from llm_kernels import _amp, _checks, _ops
from llm_kernels.backends import select
from llm_kernels.reference import layer_norm_ref, rms_norm_ref


class NormFunction(torch.autograd.Function):
    """Autograd around the ``layer_norm_forward``/``layer_norm_backward`` kernels.

    Inputs are 2D (N, C). Returns (y, h); h is empty when there is no residual.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps: float, rms: bool, backend: str):
        y, h, mean, rstd = _ops.ops(backend).layer_norm_forward(x, weight, bias, residual, eps, rms)
        has_residual = residual is not None
        ctx.save_for_backward(h if has_residual else x, weight, bias, mean, rstd)
        ctx.args = (rms, has_residual, backend)
        ctx.set_materialize_grads(False)
        if not has_residual:
            ctx.mark_non_differentiable(h)
        return y, h

    @staticmethod
    @_ops.first_order_backward
    def backward(ctx, grad_y, grad_h):
        h, weight, bias, mean, rstd = ctx.saved_tensors
        rms, has_residual, backend = ctx.args
        if grad_y is None:
            grad_y = torch.zeros_like(h)
        dx, dweight, dbias = _ops.ops(backend).layer_norm_backward(
            grad_y, grad_h if has_residual else None, h, weight, bias, mean, rstd, rms)
        # dx is also the residual's gradient: a tensor of its own, or two leaves could end up
        # sharing one .grad storage (a later accumulation into one would change the other)
        d_residual = None
        if has_residual and ctx.needs_input_grad[3]:
            d_residual = dx.clone() if ctx.needs_input_grad[0] else dx
        return (dx, dweight if weight is not None else None, dbias if bias is not None else None,
                d_residual, None, None, None)


def _validate(x, weight, bias, residual, eps):
    _checks.tensor("x", x, min_ndim=1)
    c = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _checks.tensor(name, t, ndim=1)
            _checks.shape(name, t, (c,))
    if residual is not None:
        _checks.tensor("residual", residual)
        _checks.shape("residual", residual, x.shape)
    _checks.same_dtype_device("x", x, ("weight", weight), ("bias", bias), ("residual", residual))
    _checks.last_dim_contiguous("x", x)
    _checks.last_dim_contiguous("residual", residual)
    if not isinstance(eps, (float, int)) or not eps >= 0:  # NaN too
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")


def _norm(op, x, weight, bias, eps, residual, backend, rms, torch_fn):
    name = select(op, backend, x.device, lambda _: _checks.kernel_dtype_reason(x.dtype),
                  kernel="layer_norm", empty=_checks.empty_reason(x=x))
    if name == "torch":
        return torch_fn()
    rows = _ops.rows(x)  # (N, C)
    r_rows = None if residual is None else _ops.rows(residual)
    y, h = _ops.apply(NormFunction, rows, _ops.contiguous(weight), _ops.contiguous(bias),
                      r_rows, float(eps), rms, name)
    y = _ops.unrows(y, x)
    return y if residual is None else (y, _ops.unrows(h, x))


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5, *, residual=None,
               backend: Optional[str] = None):
    """Layer norm over the last dim; with ``residual`` returns ``(normed, x + residual)``."""
    if _amp.dtype_for(x) is not None:
        x, weight, bias, residual = _amp.promote(x, weight, bias, residual)
        with _amp.disabled(x):
            return layer_norm(x, weight, bias, eps, residual=residual, backend=backend)
    _validate(x, weight, bias, residual, eps)
    return _norm("layer_norm", x, weight, bias, eps, residual, backend, False,
                 lambda: layer_norm_ref(x, weight, bias, eps, residual=residual))


def rms_norm(x, weight=None, eps: float = 1e-6, *, residual=None, backend: Optional[str] = None):
    """RMSNorm over the last dim; with ``residual`` returns ``(normed, x + residual)``."""
    if _amp.dtype_for(x) is not None:
        x, weight, residual = _amp.promote(x, weight, residual)
        with _amp.disabled(x):
            return rms_norm(x, weight, eps, residual=residual, backend=backend)
    _validate(x, weight, None, residual, eps)
    return _norm("rms_norm", x, weight, None, eps, residual, backend, True,
                 lambda: rms_norm_ref(x, weight, eps, residual=residual))
