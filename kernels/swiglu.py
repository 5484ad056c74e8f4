"""Triton kernels for SwiGLU ``(silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T``.

forward:  one kernel computes the gate and up products from the same x tiles (two fp32
          accumulators) and writes gate, up and ``h = silu(gate) * up``; then ``out = h @ w_down.T``
          with the matmul of ``kernels/feed_forward.py``.
backward: ``dh = grad_out @ w_down`` with the silu derivative in the epilogue, which writes
          ``dgate = dh * up * silu'(gate)``, ``dup = dh * silu(gate)`` and, from the same gate
          and up tiles, ``h = silu(gate) * up`` again; ``dx = dgate @ w_gate + dup @ w_up`` (one
          kernel, two products into one accumulator); ``dw_gate = dgate.T @ x``,
          ``dw_up = dup.T @ x``; ``dw_down = (h.T @ grad_out).T``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .feed_forward import (EPI_SWIGLU_GRAD, _store_tile, _tile_position,
                           bf16_interpreted, matmul, prune_configs, tile_configs)
from ._host import cdiv, dtypes, launch_tuned


GATE_UP_TILES = [(128, 128, 64, 3, 8), (128, 128, 64, 4, 8), (64, 128, 64, 4, 4)]
GATE_UP_CONFIGS = tile_configs(tensor_core=GATE_UP_TILES, fp32=[(64, 64, 32, 3, 4)])


@triton.autotune(configs=GATE_UP_CONFIGS, key=["M", "N", "K"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def _gate_up_kernel(a_ptr, bg_ptr, bu_ptr, gate_ptr, up_ptr, h_ptr, M, N, K,
                    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                    BF16_INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """gate = A @ Bg, up = A @ Bu (M, N) from shared A (M, K) tiles; h = silu(gate) * up."""
    pid_m, pid_n = _tile_position(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = (row0 + rm) < M
    n_ok = (col0 + rn) < N
    a_tile = a_ptr + row0.to(tl.int64) * stride_am + (rm[:, None] * stride_am +
                                                      rk[None, :] * stride_ak)
    b_offs = col0.to(tl.int64) * stride_bn + (rk[:, None] * stride_bk + rn[None, :] * stride_bn)
    bg_tile = bg_ptr + b_offs
    bu_tile = bu_ptr + b_offs
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        b_mask = k_ok[:, None] & n_ok[None, :]
        a = tl.load(a_tile, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        bg = tl.load(bg_tile, mask=b_mask, other=0.0)
        bu = tl.load(bu_tile, mask=b_mask, other=0.0)
        if BF16_INTERPRETED:
            a = a.to(tl.float32)
            bg = bg.to(tl.float32)
            bu = bu.to(tl.float32)
        acc_g = tl.dot(a, bg, acc_g, input_precision="ieee", out_dtype=acc_g.dtype)
        acc_u = tl.dot(a, bu, acc_u, input_precision="ieee", out_dtype=acc_u.dtype)
        a_tile += BLOCK_K * stride_ak
        bg_tile += BLOCK_K * stride_bk
        bu_tile += BLOCK_K * stride_bk
    _store_tile(gate_ptr, acc_g, row0, col0, M, N, stride_cm, stride_cn, BF16_INTERPRETED,
                BLOCK_M, BLOCK_N)
    _store_tile(up_ptr, acc_u, row0, col0, M, N, stride_cm, stride_cn, BF16_INTERPRETED,
                BLOCK_M, BLOCK_N)
    _store_tile(h_ptr, acc_g * tl.sigmoid(acc_g) * acc_u, row0, col0, M, N, stride_cm, stride_cn,
                BF16_INTERPRETED, BLOCK_M, BLOCK_N)


def _gate_up(x, w_gate, w_up):
    """x (N, d), w_gate/w_up (d_ff, d) -> gate, up, silu(gate) * up, each (N, d_ff)."""
    n, d = x.shape
    d_ff = w_gate.shape[0]
    gate, up, h = (x.new_empty((n, d_ff)) for _ in range(3))
    bg, bu = w_gate.t(), w_up.t()  # (d, d_ff) views
    if bg.stride() != bu.stride():
        raise ValueError("w_gate and w_up must have the same strides")

    def grid(meta):
        return (cdiv(n, meta["BLOCK_M"]) * cdiv(d_ff, meta["BLOCK_N"]),)

    args = (x, bg, bu, gate, up, h, n, d_ff, d, x.stride(0), x.stride(1),
            bg.stride(0), bg.stride(1), gate.stride(0), gate.stride(1))
    launch_tuned(_gate_up_kernel, grid, args, dict(BF16_INTERPRETED=bf16_interpreted(x.dtype)),
                 (n, d_ff, d) + dtypes(args))
    return gate, up, h


def swiglu_forward(x, w_gate, w_up, w_down):
    """x (N, d), w_gate/w_up (d_ff, d), w_down (d_out, d_ff)
    -> out (N, d_out), gate and up (N, d_ff) saved for the backward."""
    gate, up, h = _gate_up(x, w_gate, w_up)
    out = matmul(h, w_down.t(), x.new_empty((x.shape[0], w_down.shape[0])))
    return out, gate, up


def swiglu_backward(grad_out, x, w_gate, w_up, w_down, gate, up):
    """Gradients of (silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T
    -> (dx, dw_gate, dw_up, dw_down)."""
    dgate, dup, h = (gate.new_empty(gate.shape) for _ in range(3))      # (N, d_ff)
    matmul(grad_out, w_down, dgate, epilogue=EPI_SWIGLU_GRAD.value, aux=dup, aux2=h, e1=gate,
           e2=up)
    dx = matmul(dgate, w_gate, x.new_empty(x.shape), a2=dup, b2=w_up)   # (N, d)
    dw_gate = matmul(dgate.t(), x, w_gate.new_empty(w_gate.shape))      # (d_ff, d)
    dw_up = matmul(dup.t(), x, w_up.new_empty(w_up.shape))              # (d_ff, d)
    dw_down = w_down.new_empty(w_down.shape)                            # (d_out, d_ff)
    matmul(h.t(), grad_out, dw_down.t())
    return dx, dw_gate, dw_up, dw_down
