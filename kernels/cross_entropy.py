"""Triton cross-entropy over (N, V) logits, in chunks over V.

Forward, one program per row, one read of the logits: an online max and rescaled sum give
lse = logsumexp(logits_i) in float32, and loss_i = lse - logits_i[target_i] (0 when
target_i == ignore_index). Backward, one program per (row, chunk of V), one read and one
write: dlogits_ij = grad_loss_i * (exp(logits_ij - lse_i) - [j == target_i]), 0 on ignored
rows, written in the logits' dtype. Nothing of size (N, V) is allocated beyond dlogits, and
not even that with ``cross_entropy_backward_inplace``, which writes dlogits over the logits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llm_kernels.backends import interpreting
from llm_kernels.kernels._rounding import to_dtype
from ._host import cdiv

# Elements of a row handled per step: 16 per thread at 8 warps (two 16-byte bf16 vectors).
BLOCK_V = 4096
NUM_WARPS = 8


@triton.jit
def _finite_or_zero(m):
    """The running max to subtract: 0 while everything seen is -inf (no -inf - -inf = NaN)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _cross_entropy_fwd_kernel(LOGITS, TARGET, LOSS, LSE, V, ignore_index,
                              BLOCK: tl.constexpr):
    row = tl.program_id(0)
    start = row.to(tl.int64) * V
    m = float("-inf")
    total = 0.0
    for c0 in range(0, V, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        x = tl.load(LOGITS + start + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = _finite_or_zero(m_new)
        total = total * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        m = m_new
    lse = m + tl.log(total)
    target = tl.load(TARGET + row)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < V)  # a target outside [0, V) is never read: NaN loss
    target_logit = tl.load(LOGITS + start + target, mask=valid & in_range,
                           other=float("nan")).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - target_logit, 0.0))
    tl.store(LSE + row, lse)


@triton.jit
def _cross_entropy_bwd_kernel(GRAD_LOSS, LOGITS, TARGET, LSE, DLOGITS, V, ignore_index,
                              BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    offs = row.to(tl.int64) * V + cols
    target = tl.load(TARGET + row)
    valid = target != ignore_index
    grad = tl.load(GRAD_LOSS + row)
    lse = tl.load(LSE + row)
    # DLOGITS may be LOGITS (in-place backward): this program reads exactly the elements offs
    # it writes, each stored value depends only on the value loaded from the same address (so
    # the store cannot come first), and no other element (not even logits[target]) is read.
    x = tl.load(LOGITS + offs, mask=mask & valid, other=0.0).to(tl.float32)  # skip ignored rows
    prob = tl.exp(x - lse)
    in_range = (target >= 0) & (target < V)
    d = grad * (prob - tl.where(cols == target, 1.0, 0.0))
    d = tl.where(valid, tl.where(in_range, d, float("nan")), 0.0)
    tl.store(DLOGITS + offs, to_dtype(d, DLOGITS.dtype.element_ty, INTERPRET), mask=mask)


def cross_entropy_forward(logits, target, ignore_index):
    """(loss, lse), both (N,) float32; loss is 0 on rows whose target is ignore_index."""
    logits, target = logits.contiguous(), target.contiguous()
    n, v = logits.shape
    loss = torch.empty((n,), dtype=torch.float32, device=logits.device)
    lse = torch.empty((n,), dtype=torch.float32, device=logits.device)
    _cross_entropy_fwd_kernel[(n,)](logits, target, loss, lse, v, ignore_index,
                                    BLOCK=BLOCK_V, num_warps=NUM_WARPS)
    return loss, lse


def _backward_into(dlogits, grad_loss, logits, target, lse, ignore_index):
    """Launch the backward writing into dlogits (N, V), contiguous, possibly logits itself."""
    n, v = logits.shape
    _cross_entropy_bwd_kernel[(n, cdiv(v, BLOCK_V))](
        grad_loss.float().contiguous(), logits, target.contiguous(), lse, dlogits, v,
        ignore_index, BLOCK=BLOCK_V, INTERPRET=interpreting(), num_warps=NUM_WARPS)


def cross_entropy_backward(grad_loss, logits, target, lse, ignore_index):
    """dlogits (N, V) in the logits' dtype: grad_loss_i * (softmax(logits_i) - onehot(t_i))."""
    logits = logits.contiguous()
    dlogits = torch.empty_like(logits)
    _backward_into(dlogits, grad_loss, logits, target, lse, ignore_index)
    return dlogits


def cross_entropy_backward_inplace(grad_loss, logits, target, lse, ignore_index):
    """cross_entropy_backward's dlogits written over logits (N, V), which must be contiguous."""
    if not logits.is_contiguous():
        raise ValueError(f"logits must be contiguous for the in-place backward, got strides "
                         f"{logits.stride()}")
    _backward_into(logits, grad_loss, logits, target, lse, ignore_index)
