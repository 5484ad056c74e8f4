"""``lk.softmax``: exp(x - max) / sum(exp(x - max)) along one dim; a row of all -inf gives 0."""
from __future__ import annotations

from typing import Optional

import torch

from llm_kernels import _amp, _checks, _ops
from llm_kernels.backends import select
from llm_kernels.reference import softmax_ref


class SoftmaxFunction(torch.autograd.Function):
    """Autograd around ``softmax_forward``/``softmax_backward`` on 2D (N, C) rows.

    Backward: dx = y * (dy - rowsum(dy * y)).
    """

    @staticmethod
    def forward(ctx, x, backend: str):
        y = _ops.ops(backend).softmax_forward(x)
        ctx.save_for_backward(y)
        ctx.backend = backend
        return y

    @staticmethod
    @_ops.first_order_backward
    def backward(ctx, grad_y):
        (y,) = ctx.saved_tensors
        return _ops.ops(ctx.backend).softmax_backward(grad_y.contiguous(), y), None


def softmax(x, dim: int = -1, *, backend: Optional[str] = None) -> torch.Tensor:
    """Softmax of ``x`` along ``dim``, in x's dtype (computed in float32), under autocast too."""
    if _amp.dtype_for(x) is not None:
        with _amp.disabled(x):
            return softmax(x, dim, backend=backend)
    _checks.tensor("x", x, min_ndim=1)
    ndim = x.dim()
    if isinstance(dim, bool) or not isinstance(dim, int) or not -ndim <= dim < ndim:
        raise ValueError(f"dim must be an int in [{-ndim}, {ndim}), got {dim!r}")
    name = select("softmax", backend, x.device, lambda _: _checks.kernel_dtype_reason(x.dtype),
                  empty=_checks.empty_reason(x=x))
    if name == "torch":
        return softmax_ref(x, dim)
    if dim in (-1, ndim - 1):
        return _ops.unrows(_ops.apply(SoftmaxFunction, _ops.rows(x), name), x)  # (N, C) rows
    moved = x.movedim(dim, -1)
    y = _ops.unrows(_ops.apply(SoftmaxFunction, _ops.rows(moved), name), moved)
    return y.movedim(-1, dim).contiguous()
