"""Triton softmax over the rows of a contiguous (N, C) tensor, forward and backward.

Forward: y = exp(x - m) / sum(exp(x - m)), m = max(x) (m = 0 when the row is all -inf, whose
output is then all zeros), computed in float32. Backward: dx = p * (dy - sum(dy * p)) with
p = y / sum(y), which is y * (dy - sum(dy * y)) for an exact softmax (sum(y) = 1). With y saved
in 16 bits, renormalizing removes the rounding error common to the row (all of it for tied
maxima) and keeps the rounding of a dominant y_k from being amplified by 1 / (1 - y_k).
A row of at most ``MAX_BLOCK`` elements is read once; a longer row loops over chunks, with an
online max and rescaled sum in the forward, then a second pass that writes y.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llm_kernels.backends import interpreting
from llm_kernels.kernels._rounding import to_dtype
from ._host import next_power_of_2

# Longest row kept in registers; longer rows loop over chunks of this many elements.
MAX_BLOCK = 16384


@triton.jit
def _finite_or_zero(m):
    """The row max to subtract: 0 for an all -inf row, so exp(-inf - 0) gives 0, not NaN."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _inverse_or_zero(total):
    """1 / total, or 0 for a row of zeros (all -inf logits); a NaN total stays NaN."""
    return tl.where(total != 0, 1.0, 0.0) / tl.where(total != 0, total, 1.0)


@triton.jit
def _softmax_fwd_kernel(X, Y, C, BLOCK: tl.constexpr, SINGLE: tl.constexpr,
                        INTERPRET: tl.constexpr):
    """One program per row."""
    start = tl.program_id(0).to(tl.int64) * C
    if SINGLE:
        cols = tl.arange(0, BLOCK)
        mask = cols < C
        x = tl.load(X + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        e = tl.exp(x - _finite_or_zero(tl.max(x, axis=0)))
        total = tl.sum(e, axis=0)
        inv = _inverse_or_zero(total)
        tl.store(Y + start + cols, to_dtype(e * inv, Y.dtype.element_ty, INTERPRET), mask=mask)
    else:
        m = float("-inf")
        total = 0.0
        for c0 in range(0, C, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            x = tl.load(X + start + cols, mask=cols < C, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            shift = _finite_or_zero(m_new)
            total = total * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
            m = m_new
        shift = _finite_or_zero(m)
        inv = _inverse_or_zero(total)
        for c0 in range(0, C, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            mask = cols < C
            x = tl.load(X + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            y = tl.exp(x - shift) * inv
            tl.store(Y + start + cols, to_dtype(y, Y.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _softmax_bwd_kernel(DY, Y, DX, C, BLOCK: tl.constexpr, SINGLE: tl.constexpr,
                        INTERPRET: tl.constexpr):
    """One program per row: dx = p * (dy - sum(dy * p)), p = y / sum(y) (0 when all y are 0)."""
    start = tl.program_id(0).to(tl.int64) * C
    if SINGLE:
        cols = tl.arange(0, BLOCK)
        mask = cols < C
        y = tl.load(Y + start + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + start + cols, mask=mask, other=0.0).to(tl.float32)
        inv = _inverse_or_zero(tl.sum(y, axis=0))
        dx = y * inv * (dy - tl.sum(dy * y, axis=0) * inv)
        tl.store(DX + start + cols, to_dtype(dx, DX.dtype.element_ty, INTERPRET), mask=mask)
    else:
        dot = 0.0
        total = 0.0
        for c0 in range(0, C, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            mask = cols < C
            y = tl.load(Y + start + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + start + cols, mask=mask, other=0.0).to(tl.float32)
            dot += tl.sum(dy * y, axis=0)
            total += tl.sum(y, axis=0)
        inv = _inverse_or_zero(total)
        for c0 in range(0, C, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            mask = cols < C
            y = tl.load(Y + start + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + start + cols, mask=mask, other=0.0).to(tl.float32)
            dx = y * inv * (dy - dot * inv)
            tl.store(DX + start + cols, to_dtype(dx, DX.dtype.element_ty, INTERPRET), mask=mask)


def _config(c: int) -> tuple[int, bool, int]:
    """(block, single, num_warps) for rows of ``c`` elements."""
    single = next_power_of_2(c) <= MAX_BLOCK
    block = next_power_of_2(c) if single else MAX_BLOCK
    # 16-byte accesses need >= 8 (16-bit) elements per thread; 512 per warp keeps registers low.
    return block, single, min(max(block // 512, 1), 16)


def softmax_forward(x):
    """Softmax of each row of x (N, C), in x's dtype."""
    x = x.contiguous()
    n, c = x.shape
    y = torch.empty_like(x)
    block, single, num_warps = _config(c)
    _softmax_fwd_kernel[(n,)](x, y, c, BLOCK=block, SINGLE=single, INTERPRET=interpreting(),
                              num_warps=num_warps)
    return y


def softmax_backward(grad_y, y):
    """dx = p * (dy - rowsum(dy * p)), p = y / rowsum(y), for rows (N, C), in y's dtype."""
    grad_y, y = grad_y.contiguous(), y.contiguous()
    n, c = y.shape
    dx = torch.empty_like(y)
    block, single, num_warps = _config(c)
    _softmax_bwd_kernel[(n,)](grad_y, y, dx, c, BLOCK=block, SINGLE=single,
                              INTERPRET=interpreting(), num_warps=num_warps)
    return dx
