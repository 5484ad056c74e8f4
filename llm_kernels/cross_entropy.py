"""``lk.cross_entropy``: loss_i = logsumexp(logits_i) - logits_i[target_i] on (N, V) logits.

The kernels work in chunks over V: the forward keeps only the per-row loss and logsumexp in
float32, the backward writes softmax(logits) - onehot(target) straight into the gradient, in
the logits' dtype, never an fp32 (N, V) copy. With ``inplace_backward=True`` (FlashAttention's
and Apex's option of that name) the gradient is written over the logits themselves, so the
backward allocates nothing of size (N, V).
"""
from __future__ import annotations

from typing import Optional

import torch

from llm_kernels import _amp, _checks, _ops
from llm_kernels.backends import select
from llm_kernels.reference import cross_entropy_ref

REDUCTIONS = ("mean", "sum", "none")


class CrossEntropyFunction(torch.autograd.Function):
    """Per-row losses (N,) float32 (0 on ignored rows) around the cross_entropy kernels.

    In-place backward: dlogits (N, V) overwrites the saved logits and is returned as their
    gradient; the logits' version counter is bumped, so another autograd node that saved them
    and runs later raises "modified by an inplace operation" instead of reading the gradient
    as logits.
    """

    @staticmethod
    def forward(ctx, logits, target, ignore_index: int, backend: str, inplace_backward: bool):
        loss, lse = _ops.ops(backend).cross_entropy_forward(logits, target, ignore_index)
        ctx.save_for_backward(logits, target, lse)
        ctx.args = (ignore_index, backend, inplace_backward)
        return loss

    @staticmethod
    @_ops.first_order_backward
    def backward(ctx, grad_loss):
        logits, target, lse = ctx.saved_tensors
        ignore_index, backend, inplace_backward = ctx.args
        ops = _ops.ops(backend)
        grad_loss = grad_loss.float().contiguous()
        if not inplace_backward:
            grad = ops.cross_entropy_backward(grad_loss, logits, target, lse, ignore_index)
            return grad, None, None, None, None
        ops.cross_entropy_backward_inplace(grad_loss, logits, target, lse, ignore_index)
        torch.autograd.graph.increment_version(logits)
        # A new tensor on the same storage: autograd adopts it as a leaf's .grad without the
        # copy it makes of a tensor referenced elsewhere (the saved logits are).
        return logits.detach(), None, None, None, None


def _no_classes(logits, target) -> bool:
    """V == 0 with rows to score: only ignored targets are valid, a case the kernels never see
    (torch computes it), so the targets are read even on a GPU (outside torch.compile)."""
    return logits.shape[1] == 0 and target.numel() > 0 and not torch.compiler.is_compiling()


def _validate(logits, target, ignore_index, reduction, inplace_backward):
    _checks.tensor("logits", logits, ndim=2)
    if not isinstance(target, torch.Tensor) or target.dtype != torch.int64:
        raise TypeError(f"target must be an int64 tensor, got "
                        f"{getattr(target, 'dtype', type(target).__name__)}")
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"target must have shape (N,) = ({logits.shape[0]},), "
                         f"got {tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits is on {logits.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    _checks.last_dim_contiguous("logits", logits)
    if _checks.can_read_values(target) or _no_classes(logits, target):
        valid = (target == ignore_index) | ((target >= 0) & (target < logits.shape[1]))
        if not bool(valid.all()):
            raise ValueError(f"target values must be in [0, {logits.shape[1]}) or equal "
                             f"ignore_index={ignore_index}")


def cross_entropy(logits, target, *, ignore_index: int = -100, reduction: str = "mean",
                  backend: Optional[str] = None, inplace_backward: bool = False) -> torch.Tensor:
    """Same result as ``torch.nn.functional.cross_entropy`` on (N, V) logits, in their dtype.

    loss_i = logsumexp(logits_i) - logits_i[target_i], 0 where target_i == ignore_index;
    reduced by ``mean`` (over the rows not ignored), ``sum`` or ``none`` ((N,) losses).
    dlogits_ij = dloss_i * (softmax(logits_i)_j - [j == target_i]), 0 on ignored rows.

    ``inplace_backward=True``: the backward writes dlogits over the logits' storage and returns
    it as their gradient, so it allocates no (N, V) buffer; the logits' values are lost after
    the backward, and another op that saved them for a backward running after this one raises
    torch's "modified by an inplace operation" error. Logits that are not contiguous are copied
    first (the copy is overwritten). A memory hint only: ignored by the ``torch`` backend.

    Under autocast the loss is float32 (or float64), as torch's; the logits are not copied.

    A target outside [0, V) that is not ``ignore_index`` raises a ValueError for CPU tensors.
    GPU targets are not read on the host (that would stall the host until the device catches
    up, each step): there the kernels give that row a NaN loss and gradient (they never read
    past a row) and the ``torch`` backend raises torch's device-side assert.
    """
    if _amp.dtype_for(logits) is not None:
        with _amp.disabled(logits):
            return _cross_entropy(logits, target, ignore_index, reduction, backend,
                                  inplace_backward, torch.promote_types(logits.dtype,
                                                                        torch.float32))
    return _cross_entropy(logits, target, ignore_index, reduction, backend, inplace_backward,
                          None)


def _cross_entropy(logits, target, ignore_index, reduction, backend, inplace_backward,
                   loss_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """cross_entropy with the loss in ``loss_dtype`` (None: the logits' dtype)."""
    _validate(logits, target, ignore_index, reduction, inplace_backward)
    loss_dtype = loss_dtype or logits.dtype
    name = select("cross_entropy", backend, logits.device,
                  lambda _: _checks.kernel_dtype_reason(logits.dtype),
                  empty=_checks.empty_reason(logits=logits))
    if name == "torch":
        return cross_entropy_ref(logits.to(loss_dtype), target, ignore_index=ignore_index,
                                 reduction=reduction)
    loss = _ops.apply(CrossEntropyFunction, logits.contiguous(), target.contiguous(),
                      ignore_index, name, inplace_backward)
    if reduction == "none":
        return loss.to(loss_dtype)
    total = loss.sum()
    if reduction == "mean":
        total = total / (target != ignore_index).sum()
    return total.to(loss_dtype)
