"""FlashAttention-2 in Triton: forward, backward and split-key decoding, with GQA and masks.

Per (batch b, query head h), with key/value head h // (H / Hkv) (K/V never expanded):
    S = q k^T * scale + mask (+ -inf where causal hides key j from query i: j > i + offset)
    P = softmax(S) (a row that sees no key gives P = 0), out = P v, lse = logsumexp(S) per row.
Scores are handled in base 2: S2 = S * log2(e), so exp2(S2 - m2) = exp(S - m). The online
softmax keeps a running max m2, sum l and accumulator acc in fp32 (fp64 for fp64 inputs under
the interpreter). lse is saved in fp32 (natural log); a row that sees no key gets out = 0 and
lse = +inf, so the backward's exp2(S2 - lse2) is 0 there and its gradients are exactly 0.

Backward (dP = dO v^T, delta = rowsum(dO * out)):
    dv = P^T dO,  dS = P * (dP - delta),  dq = scale * dS k,  dk = scale * dS^T q.

Kernels:
- ``_attn_fwd_kernel``: a program per (query tile, batch x head), looping over key tiles.
- ``_attn_fwd_ws_kernel`` (opt-in, ``$LLM_KERNELS_ATTENTION_WS=1``): the same without mask, as
  one warp-specialized loop (Hopper: a TMA producer warp group, two consumers).
- ``_attn_fwd_split_kernel`` + ``_attn_fwd_combine_kernel`` (flash-decoding): for few queries
  against many keys, the rows of all query heads of a GQA group form one tile (each K/V tile is
  read once per group), the keys are split across programs, and the partial (acc, m2, l) are
  combined by a second kernel.
- ``_attn_bwd_delta_kernel``: delta = rowsum(dO * out).
- ``_attn_bwd_dkdv_kernel``: a program per (key tile, batch x kv head), looping over the query
  heads of its group and the query tiles that see the key tile; dk, dv written once.
- ``_attn_bwd_dkdv_ws_kernel`` (opt-in, ``$LLM_KERNELS_ATTENTION_WS=1``): the same without mask,
  its loop warp-specialized (Hopper: a TMA producer warp group, two consumers).
- ``_attn_bwd_dq_kernel``: a program per (query tile, batch x head), looping over key tiles.
- ``_attn_bwd_dq_ws_kernel`` (opt-in, ``$LLM_KERNELS_ATTENTION_WS=1``): the same without mask, as
  one warp-specialized loop that masks every tile.
The backward uses no atomics: it is bit-identical from run to run.

Causal: every loop is bounded to the tiles that some row can see (about half the work). In the
forward and dq kernels the masking code runs only on the key tiles that straddle the diagonal or
the key tail; the dk/dv kernel masks every tile (one loop body keeps its registers in bounds).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from llm_kernels.backends import interpreting
from ._host import cdiv, descriptor_scratch, dtypes, launch_tuned, next_power_of_2

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)
# An additive-mask value below _MASK_FLOOR2 / log2(e) (about -45426, e.g. torch.finfo(dtype).min
# or masked_fill(-1e9)) hides its key like -inf: zero weight (below fp32's exp range) in any row
# with a visible key, and a row with none gives zeros and zero gradients instead of a score so
# large that the backward's recomputed P = exp2(s - lse) loses all precision.
_MASK_FLOOR2 = tl.constexpr(-65536.0)

# Set to "0" to launch the table's config without autotuning (GPU only; the interpreter never
# autotunes).
AUTOTUNE_ENV = "LLM_KERNELS_AUTOTUNE"
# "1": the dense forward reads Q, K and V through TMA descriptors (16-bit, Hopper and newer).
TMA_ENV = "LLM_KERNELS_ATTENTION_TMA"
# "1": the warp-specialized kernels where they apply (16-bit, D of 64 or 128, no mask, Hopper and
# newer): _attn_fwd_ws_kernel for the forward, _attn_bwd_dq_ws_kernel for dQ (Lq a
# multiple of 4) and _attn_bwd_dkdv_ws_kernel for dK/dV (Lq a multiple of WS_DKDV_LQ_MULTIPLE,
# of every BLOCK_M of its launch table and of the interpreter's).
WS_ENV = "LLM_KERNELS_ATTENTION_WS"
WS_DKDV_LQ_MULTIPLE = 64
# Flash-decoding applies to at most this many queries per head...
DECODE_MAX_LQ = 16
# ...and splits the keys in chunks of a multiple of this many (a multiple of every BLOCK_N).
DECODE_KEY_CHUNK = 128
# Fewest keys per split, and at most this many splits.
DECODE_MIN_KEYS_PER_SPLIT = 256
DECODE_MAX_SPLITS = 128
# Target programs per SM for the split forward.
DECODE_PROGRAMS_PER_SM = 4
# The SM count assumed when interpreting (CPU tensors).
INTERPRETER_SM_COUNT = 8


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b. UPCAST (interpreter and bf16 only): operands go to float32 first, since the
    interpreter's bf16 dot is wrong."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def _to(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """x.to(dtype), rounded to nearest even. Under the interpreter (UPCAST) a float32 -> bfloat16
    cast truncates, so the rounding is done on the bits first (then the cast is exact)."""
    if UPCAST:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _load_rows(ptrs, rows_ok, D: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """A (rows, BLOCK_D) tile: head-dim padding (cols >= D) and, when CHECK_ROWS, rows with
    rows_ok False read as 0."""
    offs_d = tl.arange(0, BLOCK_D)
    if CHECK_ROWS:
        if BLOCK_D == D:
            x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    else:
        if BLOCK_D == D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(offs_d < D)[None, :], other=0.0)
    return x


@triton.jit
def _load_tile(base, desc, b, hd, row0, stride_row, rows_ok, D: tl.constexpr,
               BLOCK_D: tl.constexpr, ROWS: tl.constexpr, CHECK_ROWS: tl.constexpr,
               TMA: tl.constexpr):
    """Rows [row0, row0 + ROWS) of one (batch, head) of a (B, heads, L, D) tensor as a
    (ROWS, BLOCK_D) tile: with TMA through its 4-D descriptor ``desc`` at (b, hd) (rows past L
    and the head-dim padding read as zeros), else by pointers from ``base`` (that head's row
    0), as _load_rows."""
    if TMA:
        x = desc.load([b.to(tl.int32), hd.to(tl.int32), row0, 0]).reshape(ROWS, BLOCK_D)
    else:
        offs_r = row0 + tl.arange(0, ROWS)
        x = _load_rows(base + offs_r[:, None] * stride_row + tl.arange(0, BLOCK_D)[None, :],
                       rows_ok, D, BLOCK_D, CHECK_ROWS)
    return x


@triton.jit
def _load_pair(X, Y, b, hd, row0, stride_xb, stride_xh, stride_xr, stride_yb, stride_yh,
               stride_yr, rows_ok, D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
               TMA: tl.constexpr):
    """Rows [row0, row0 + ROWS) of head (b, hd) of two (B, heads, L, D) tensors (pointers, or
    with TMA their descriptors), each as a (ROWS, BLOCK_D) tile by _load_tile."""
    if TMA:
        x_head, y_head = X, Y
    else:
        x_head = X + b * stride_xb + hd * stride_xh
        y_head = Y + b * stride_yb + hd * stride_yh
    x = _load_tile(x_head, X, b, hd, row0, stride_xr, rows_ok, D, BLOCK_D, ROWS, True, TMA)
    y = _load_tile(y_head, Y, b, hd, row0, stride_yr, rows_ok, D, BLOCK_D, ROWS, True, TMA)
    return x, y


@triton.jit
def _store_rows(ptrs, x, rows_ok, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store a (rows, BLOCK_D) tile, skipping rows with rows_ok False and the head-dim padding."""
    offs_d = tl.arange(0, BLOCK_D)
    if BLOCK_D == D:
        tl.store(ptrs, x, mask=rows_ok[:, None])
    else:
        tl.store(ptrs, x, mask=rows_ok[:, None] & (offs_d < D)[None, :])


@triton.jit
def _query_tile(CAUSAL: tl.constexpr):
    """This program's query tile (grid axis 0). Causal: the last tiles of each (batch, head),
    which see the most keys, run first, so the grid ends on its lightest tiles rather than its
    heaviest (a shorter tail); the heads' order, and so their K/V reuse in L2, is unchanged."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    return pid_m


@triton.jit
def _query_head_tile(H, GROUP, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """(pid_bh, b, h, hk, m0) of a program of grid (query tiles, B * H): its (batch x head)
    index, batch, query head, kv head (GQA groups of GROUP) and first query row (the tile by
    _query_tile)."""
    pid_bh = tl.program_id(1)
    h = (pid_bh % H).to(tl.int64)
    return (pid_bh, (pid_bh // H).to(tl.int64), h, h // GROUP,
            _query_tile(CAUSAL) * BLOCK_M)


@triton.jit
def _key_range(m0, Lk, causal_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr):
    """Key tiles of the query tile [m0, m0 + BLOCK_M): [0, full_end) are seen whole by every
    row (no masking), [full_end, end) hold the causal diagonal and/or the key tail."""
    lk_full = (Lk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        end = tl.minimum(tl.maximum(m0 + BLOCK_M + causal_offset, 0), Lk)
        full_end = tl.minimum((tl.maximum(m0 + causal_offset + 1, 0) // BLOCK_N) * BLOCK_N,
                              lk_full)
    else:
        end = Lk
        full_end = lk_full
    return full_end, end


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _clamp(offs, n):
    """offs with the indices past n - 1 replaced by n - 1: rows past the end read a real row
    (their results are never stored), so their loads need no predicate."""
    return tl.minimum(offs, n - 1)


@triton.jit
def _mask_log2(bias):
    """The additive mask in the log2 domain, -inf below _MASK_FLOOR2 (NaN kept)."""
    s = bias * _LOG2E
    return tl.where(s < _MASK_FLOOR2, float("-inf"), s)


@triton.jit
def _load_bias(ptrs, cols_ok, BOUNDARY: tl.constexpr):
    """A (BLOCK_M, BLOCK_N) tile of the additive mask; only a BOUNDARY tile masks the key tail."""
    if BOUNDARY:
        return tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _fwd_key_loop(acc, m_i, l_i, q, offs_m, k_base, v_base, KD, VD, b, hk, mask_rows, start,
                  end, Lk, stride_kn, stride_vn, stride_mn, causal_offset, qk_scale,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, BOUNDARY: tl.constexpr,
                  HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                  TMA: tl.constexpr, SCALED_MAX: tl.constexpr):
    """Online softmax over the key tiles [start, end): returns the updated (acc, m2, l).

    q (BLOCK_M, BLOCK_D); offs_m the query index of each row; K/V tiles read by pointers from
    k_base/v_base (the head's row 0) or with TMA through the descriptors KD/VD at (b, hk);
    mask_rows (BLOCK_M, 1) pointers to the rows of the additive mask (rows past the end point
    at the last row). BOUNDARY tiles mask the key tail and, if CAUSAL, j > i + offset.
    SCALED_MAX (qk_scale > 0, no mask): the scores stay unscaled, the row max is scaled
    (max(c s) = c max(s) for c > 0) and exp2's argument c s - m is one FMA per score.
    """
    offs_n0 = tl.arange(0, BLOCK_N)
    for n0 in tl.range(start, end, BLOCK_N):
        offs_n = n0 + offs_n0
        cols_ok = offs_n < Lk
        k = _load_tile(k_base, KD, b, hk, n0, stride_kn, cols_ok, D, BLOCK_D, BLOCK_N, BOUNDARY,
                       TMA)                                                 # (BLOCK_N, BLOCK_D)
        s = _mma(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), acc.dtype), UPCAST, PRECISION)
        if not SCALED_MAX:
            s = s * qk_scale                                                # (BLOCK_M, BLOCK_N)
        if HAS_MASK:
            bias = _load_bias(mask_rows + offs_n[None, :] * stride_mn, cols_ok, BOUNDARY)
            s += _mask_log2(bias.to(s.dtype))
        if BOUNDARY:
            keep = cols_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
            s = tl.where(keep, s, float("-inf"))
        if SCALED_MAX:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = m_new
        if BOUNDARY or HAS_MASK:  # rows with nothing seen yet (a full tile shows every row a key)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        if SCALED_MAX:
            p = tl.exp2(s * qk_scale - m_ref[:, None])
        else:
            p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, VD, b, hk, n0, stride_vn, cols_ok, D, BLOCK_D, BLOCK_N, BOUNDARY,
                       TMA)                                                 # (BLOCK_N, BLOCK_D)
        acc = _mma(_to(p, v.dtype, UPCAST), v, acc * alpha[:, None], UPCAST, PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _finish_rows(acc, m_i, l_i):
    """out = acc / l and lse = (m2 + log2 l) * ln 2; a row that saw nothing gets 0 and +inf."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * _LN2)
    return out, lse


@triton.jit
def _attn_fwd_kernel(Q, K, V, Mask, Out, Lse,
                     stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn,
                     stride_mb, stride_mh, stride_mm, stride_mn,
                     H, GROUP, Lq, Lk, causal_offset, qk_scale,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                     HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     ACC_DTYPE: tl.constexpr, SCALED_MAX: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, TMA: tl.constexpr = False):
    """out, lse of one query tile of one (batch, head): grid (cdiv(Lq, BLOCK_M), B * H).
    With TMA, Q, K and V are 4-D TMA descriptors of those tensors (tiles of [1, 1, BLOCK_M or
    BLOCK_N, BLOCK_D]) instead of pointers; the strides then go unused."""
    pid_bh, b, h, hk, m0 = _query_head_tile(H, GROUP, BLOCK_M, CAUSAL)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows_ok = offs_m < Lq
    if TMA:
        q_base, k_base, v_base = Q, K, V
    else:
        q_base = Q + b * stride_qb + h * stride_qh
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
    q = _load_tile(q_base, Q, b, h, m0, stride_qm, rows_ok, D, BLOCK_D, BLOCK_M, True,
                   TMA)                                                     # (BLOCK_M, BLOCK_D)
    mask_rows = Mask + b * stride_mb + h * stride_mh + _clamp(offs_m, Lq)[:, None] * stride_mm
    acc = tl.zeros((BLOCK_M, BLOCK_D), ACC_DTYPE)
    m_i = tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE)
    l_i = tl.zeros((BLOCK_M,), ACC_DTYPE)
    full_end, end = _key_range(m0, Lk, causal_offset, BLOCK_M, BLOCK_N, CAUSAL)
    acc, m_i, l_i = _fwd_key_loop(acc, m_i, l_i, q, offs_m, k_base, v_base, K, V, b, hk,
                                  mask_rows, 0, full_end, Lk, stride_kn, stride_vn, stride_mn,
                                  causal_offset, qk_scale, D, BLOCK_M, BLOCK_N, BLOCK_D, CAUSAL,
                                  False, HAS_MASK, UPCAST, PRECISION, TMA, SCALED_MAX)
    acc, m_i, l_i = _fwd_key_loop(acc, m_i, l_i, q, offs_m, k_base, v_base, K, V, b, hk,
                                  mask_rows, full_end, end, Lk, stride_kn, stride_vn, stride_mn,
                                  causal_offset, qk_scale, D, BLOCK_M, BLOCK_N, BLOCK_D, CAUSAL,
                                  True, HAS_MASK, UPCAST, PRECISION, TMA, SCALED_MAX)
    out, lse = _finish_rows(acc, m_i, l_i)
    rows = pid_bh.to(tl.int64) * Lq + offs_m                                # (B, H, Lq) index
    _store_rows(Out + rows[:, None] * D + offs_d[None, :],
                _to(out, Out.dtype.element_ty, UPCAST), rows_ok, D, BLOCK_D)
    tl.store(Lse + rows, lse, mask=rows_ok)


@triton.jit
def _attn_fwd_ws_kernel(Q, K, V, Out, Lse, H, GROUP, Lq, Lk, causal_offset, qk_scale,
                        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                        stride_vb, stride_vh, stride_vn,
                        D: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out, lse of one query tile of one (batch, head), as _attn_fwd_kernel without a mask,
    16-bit inputs, a power-of-2 D and qk_scale > 0, in one warp-specialized key loop: on Hopper
    a producer warp group streams K/V tiles through TMA (device-side 2-D descriptors of this
    program's heads) while two consumer warp groups each own half of the query rows. Triton's
    warp specialization takes a single loop, so every tile masks the key tail and, if CAUSAL,
    the pairs j > i + offset."""
    pid_bh, b, h, hk, m0 = _query_head_tile(H, GROUP, BLOCK_M, CAUSAL)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q_desc = tl.make_tensor_descriptor(Q + b * stride_qb + h * stride_qh, [Lq, D], [stride_qm, 1],
                                       [BLOCK_M, D])
    k_desc = tl.make_tensor_descriptor(K + b * stride_kb + hk * stride_kh, [Lk, D], [stride_kn, 1],
                                       [BLOCK_N, D])
    v_desc = tl.make_tensor_descriptor(V + b * stride_vb + hk * stride_vh, [Lk, D], [stride_vn, 1],
                                       [BLOCK_N, D])
    q = q_desc.load([m0, 0])                               # (BLOCK_M, D), rows past Lq zero
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)
    _, end = _key_range(m0, Lk, causal_offset, BLOCK_M, BLOCK_N, CAUSAL)
    for n0 in tl.range(0, end, BLOCK_N, warp_specialize=True):
        offs_n = n0 + offs_n0
        k = k_desc.load([n0, 0])                           # (BLOCK_N, D), rows past Lk zero
        s = _mma(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), UPCAST, "tf32")
        keep = (offs_n < Lk)[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
        s = tl.where(keep, s, float("-inf"))                               # (BLOCK_M, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_ref = m_new
        if CAUSAL:  # rows that have seen no key yet
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s * qk_scale - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = v_desc.load([n0, 0])                                        # (BLOCK_N, D)
        acc = _mma(_to(p, v.dtype, UPCAST), v, acc * alpha[:, None], UPCAST, "tf32")
        m_i = m_new
    out, lse = _finish_rows(acc, m_i, l_i)
    rows_ok = offs_m < Lq
    rows = pid_bh.to(tl.int64) * Lq + offs_m                                # (B, H, Lq) index
    _store_rows(Out + rows[:, None] * D + tl.arange(0, D)[None, :],
                _to(out, Out.dtype.element_ty, UPCAST), rows_ok, D, D)
    tl.store(Lse + rows, lse, mask=rows_ok)


@triton.jit
def _attn_fwd_split_kernel(Q, K, V, Mask, PartO, PartM, PartL,
                           stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                           stride_vb, stride_vh, stride_vn,
                           stride_mb, stride_mh, stride_mm, stride_mn,
                           H, GROUP, Lq, Lk, causal_offset, qk_scale, keys_per_split, n_rows,
                           D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                           HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
                           PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
                           SCALED_MAX: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    """Partial (acc, m2, l) of one key split for a tile of the GROUP * Lq rows (head g of the
    group, query i) of one (batch, kv head): grid (splits, row tiles, B * Hkv)."""
    pid_s = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_bk = tl.program_id(2)
    hkv = H // GROUP
    b = (pid_bk // hkv).to(tl.int64)
    hk = (pid_bk % hkv).to(tl.int64)
    offs_r = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows_ok = offs_r < GROUP * Lq
    offs_m = offs_r % Lq                                                    # query index
    h = hk * GROUP + offs_r // Lq                                           # query head
    q = _load_rows(Q + b * stride_qb + h[:, None] * stride_qh + offs_m[:, None] * stride_qm
                   + offs_d[None, :], rows_ok, D, BLOCK_D, True)            # (BLOCK_M, BLOCK_D)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    last_r = _clamp(offs_r, GROUP * Lq)
    mask_rows = (Mask + b * stride_mb + (hk * GROUP + last_r // Lq)[:, None] * stride_mh
                 + (last_r % Lq)[:, None] * stride_mm)
    start = pid_s * keys_per_split
    end = tl.minimum(start + keys_per_split, Lk)
    if CAUSAL:
        end = tl.minimum(end, tl.maximum(Lq + causal_offset, 0))
    acc = tl.zeros((BLOCK_M, BLOCK_D), ACC_DTYPE)
    m_i = tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE)
    l_i = tl.zeros((BLOCK_M,), ACC_DTYPE)
    acc, m_i, l_i = _fwd_key_loop(acc, m_i, l_i, q, offs_m, k_base, v_base, K, V, b, hk,
                                  mask_rows, start, end, Lk, stride_kn, stride_vn, stride_mn,
                                  causal_offset, qk_scale, D, BLOCK_M, BLOCK_N, BLOCK_D, CAUSAL,
                                  True, HAS_MASK, UPCAST, PRECISION, False, SCALED_MAX)
    rows = pid_s * n_rows + (b * H + h) * Lq + offs_m                       # (S, B, H, Lq) index
    _store_rows(PartO + rows[:, None] * D + offs_d[None, :], acc, rows_ok, D, BLOCK_D)
    tl.store(PartM + rows, m_i, mask=rows_ok)
    tl.store(PartL + rows, l_i, mask=rows_ok)


@triton.jit
def _attn_fwd_combine_kernel(PartO, PartM, PartL, Out, Lse, n_rows, num_splits,
                             D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                             CHUNK_S: tl.constexpr, UPCAST: tl.constexpr):
    """out = sum_s w_s acc_s / sum_s w_s l_s with w_s = exp2(m2_s - max m2): grid (B*H*Lq,).
    The partial accumulators are read CHUNK_S splits at a time."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    splits_ok = offs_s < num_splits
    m_s = tl.load(PartM + offs_s * n_rows + row, mask=splits_ok, other=float("-inf"))
    l_s = tl.load(PartL + offs_s * n_rows + row, mask=splits_ok, other=0.0)  # (BLOCK_S,)
    m_max = tl.max(m_s, 0)
    m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
    l_i = tl.sum(tl.exp2(m_s - m_ref) * l_s, 0)
    acc = tl.zeros((BLOCK_D,), m_s.dtype)
    for s0 in tl.range(0, num_splits, CHUNK_S):
        offs_c = s0 + tl.arange(0, CHUNK_S)
        chunk_ok = offs_c < num_splits
        parts = offs_c * n_rows + row
        w = tl.exp2(tl.load(PartM + parts, mask=chunk_ok, other=float("-inf")) - m_ref)
        acc_c = tl.load(PartO + parts[:, None] * D + offs_d[None, :],
                        mask=chunk_ok[:, None] & (offs_d < D)[None, :], other=0.0)
        acc += tl.sum(w[:, None] * acc_c, 0)                               # (BLOCK_D,)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    tl.store(Out + row * D + offs_d, _to(acc / l_safe, Out.dtype.element_ty, UPCAST),
             mask=offs_d < D)
    tl.store(Lse + row, tl.where(empty, float("inf"), (m_ref + tl.log2(l_safe)) * _LN2))


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_delta_kernel(Out, dO, Delta, stride_ob, stride_oh, stride_om,
                           stride_dob, stride_doh, stride_dom, H, Lq,
                           D: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
                           BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * out) for a query tile: grid (cdiv(Lq, BLOCK_M), B * H)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows_ok = offs_m < Lq
    o = _load_rows(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
                   + offs_d[None, :], rows_ok, D, BLOCK_D, True)
    do = _load_rows(dO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                    + offs_d[None, :], rows_ok, D, BLOCK_D, True)
    delta = tl.sum(o.to(ACC_DTYPE) * do.to(ACC_DTYPE), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * Lq + offs_m, delta, mask=rows_ok)


@triton.jit
def _key_tile(H, GROUP, BLOCK_N: tl.constexpr):
    """This dK/dV program's (batch x kv head) index, batch b, kv head hk, first key n0 and key
    indices (BLOCK_N,): grid (cdiv(Lk, BLOCK_N), B * Hkv)."""
    pid_bk = tl.program_id(1)
    hkv = H // GROUP
    n0 = tl.program_id(0) * BLOCK_N
    return (pid_bk, (pid_bk // hkv).to(tl.int64), (pid_bk % hkv).to(tl.int64), n0,
            n0 + tl.arange(0, BLOCK_N))


@triton.jit
def _dkdv_update(dk, dv, s_t, q, do, v, lse, delta, offs_n, offs_m, causal_offset,
                 CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dk, dv (BLOCK_N, BLOCK_D) plus one query tile's share, from its scores S2^T (s_t,
    (BLOCK_N, BLOCK_M), log2 domain, mask added): P^T = exp2(S2^T - lse2), dv += P^T dO,
    dS^T = P^T * (dP^T - delta) with dP^T = v dO^T, dk += dS^T q (scale applied by the caller)."""
    p_t = tl.exp2(s_t - (lse * _LOG2E)[None, :])
    if CAUSAL:
        p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_offset, p_t, 0.0)
    dv = _mma(_to(p_t, do.dtype, UPCAST), do, dv, UPCAST, PRECISION)
    dp_t = _mma(v, tl.trans(do), tl.zeros(s_t.shape, dk.dtype), UPCAST, PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = _mma(_to(ds_t, q.dtype, UPCAST), q, dk, UPCAST, PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, Mask, dO, Lse, Delta, dK, dV,
                          stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn,
                          stride_mb, stride_mh, stride_mm, stride_mn,
                          stride_dob, stride_doh, stride_dom,
                          H, GROUP, Lq, Lk, causal_offset, qk_scale, scale,
                          D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                          HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
                          PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          TMA: tl.constexpr = False):
    """dk, dv of one key tile of one (batch, kv head), summed over the GROUP query heads that
    share it: grid (cdiv(Lk, BLOCK_N), B * Hkv).

    One flat loop over (query head of the group, query tile that sees the key tile), computed
    transposed: P^T = exp2(S2^T - lse2) is (BLOCK_N, BLOCK_M). A single code path for every tile
    (rows past Lq and, if CAUSAL, pairs j > i + offset masked) keeps the register use low.
    With TMA, Q, K, V and dO are 4-D TMA descriptors (see _attn_fwd_kernel).
    """
    pid_bk, b, hk, n0, offs_n = _key_tile(H, GROUP, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    cols_ok = offs_n < Lk
    k, v = _load_pair(K, V, b, hk, n0, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                      stride_vn, cols_ok, D, BLOCK_D, BLOCK_N, TMA)       # (BLOCK_N, BLOCK_D)
    dk = tl.zeros((BLOCK_N, BLOCK_D), ACC_DTYPE)
    dv = tl.zeros((BLOCK_N, BLOCK_D), ACC_DTYPE)
    start = 0
    if CAUSAL:  # the first query that sees key n0 is i = n0 - causal_offset
        start = (tl.maximum(n0 - causal_offset, 0) // BLOCK_M) * BLOCK_M
    n_tiles = tl.cdiv(tl.maximum(Lq - start, 0), BLOCK_M)
    for it in tl.range(0, GROUP * n_tiles):
        g = it // n_tiles
        m_start = start + (it - g * n_tiles) * BLOCK_M
        offs_m = m_start + offs_m0
        h = hk * GROUP + g
        rows_ok = offs_m < Lq
        q, do = _load_pair(Q, dO, b, h, m_start, stride_qb, stride_qh, stride_qm, stride_dob,
                           stride_doh, stride_dom, rows_ok, D, BLOCK_D, BLOCK_M,
                           TMA)                                             # (BLOCK_M, BLOCK_D)
        rows = (b * H + h) * Lq + offs_m
        lse = tl.load(Lse + rows, mask=rows_ok, other=float("inf"))      # p = 0 past Lq
        delta = tl.load(Delta + rows, mask=rows_ok, other=0.0)
        s_t = _mma(k, tl.trans(q), tl.zeros((BLOCK_N, BLOCK_M), ACC_DTYPE), UPCAST, PRECISION)
        s_t = s_t * qk_scale                                                # (BLOCK_N, BLOCK_M)
        if HAS_MASK:
            bias_t = tl.load(Mask + b * stride_mb + h * stride_mh + offs_n[:, None] * stride_mn
                             + _clamp(offs_m, Lq)[None, :] * stride_mm,
                             mask=cols_ok[:, None], other=0.0)
            s_t += _mask_log2(bias_t.to(s_t.dtype))
        dk, dv = _dkdv_update(dk, dv, s_t, q, do, v, lse, delta, offs_n, offs_m, causal_offset,
                              CAUSAL, UPCAST, PRECISION)
    rows_kv = (pid_bk.to(tl.int64) * Lk + offs_n)[:, None] * D + offs_d[None, :]
    _store_rows(dK + rows_kv, _to(dk * scale, dK.dtype.element_ty, UPCAST), cols_ok, D, BLOCK_D)
    _store_rows(dV + rows_kv, _to(dv, dV.dtype.element_ty, UPCAST), cols_ok, D, BLOCK_D)


@triton.jit
def _attn_bwd_dkdv_ws_kernel(Q, K, V, dO, Lse, Delta, dK, dV,
                             stride_qb, stride_qm, stride_kb, stride_kh, stride_kn,
                             stride_vb, stride_vh, stride_vn, stride_dob, stride_dom,
                             H, GROUP, Lq, Lk, causal_offset, qk_scale, scale,
                             D: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dk, dv as _attn_bwd_dkdv_kernel without a mask, 16-bit, power-of-2 D, Lq a multiple of
    BLOCK_M, Q and dO (B, H, Lq, D) with their heads' rows back to back: its one loop
    warp-specialized. On Hopper a producer warp group streams the Q and dO tiles through TMA
    (device-side 2-D descriptors of this batch's H * Lq rows: no tile straddles two heads)
    while two consumer warp groups each own half of the key rows."""
    pid_bk, b, hk, n0, offs_n = _key_tile(H, GROUP, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    k_desc = tl.make_tensor_descriptor(K + b * stride_kb + hk * stride_kh, [Lk, D],
                                       [stride_kn, 1], [BLOCK_N, D])
    v_desc = tl.make_tensor_descriptor(V + b * stride_vb + hk * stride_vh, [Lk, D],
                                       [stride_vn, 1], [BLOCK_N, D])
    q_desc = tl.make_tensor_descriptor(Q + b * stride_qb, [H * Lq, D], [stride_qm, 1],
                                       [BLOCK_M, D])
    do_desc = tl.make_tensor_descriptor(dO + b * stride_dob, [H * Lq, D], [stride_dom, 1],
                                        [BLOCK_M, D])
    k = k_desc.load([n0, 0])                               # (BLOCK_N, D), rows past Lk zero
    v = v_desc.load([n0, 0])
    dk = tl.zeros((BLOCK_N, D), tl.float32)
    dv = tl.zeros((BLOCK_N, D), tl.float32)
    start = 0
    if CAUSAL:  # the first query that sees key n0 is i = n0 - causal_offset
        start = (tl.maximum(n0 - causal_offset, 0) // BLOCK_M) * BLOCK_M
    n_tiles = tl.cdiv(tl.maximum(Lq - start, 0), BLOCK_M)
    for it in tl.range(0, GROUP * n_tiles, warp_specialize=True):
        g = it // n_tiles
        m_start = start + (it - g * n_tiles) * BLOCK_M
        offs_m = m_start + offs_m0
        h = hk * GROUP + g
        row0 = (h * Lq + m_start).to(tl.int32)
        q = q_desc.load([row0, 0])                                          # (BLOCK_M, D)
        do = do_desc.load([row0, 0])
        rows = (b * H + h) * Lq + offs_m
        lse = tl.load(Lse + rows)
        delta = tl.load(Delta + rows)
        s_t = _mma(k, tl.trans(q), tl.zeros((BLOCK_N, BLOCK_M), tl.float32), UPCAST, "tf32")
        dk, dv = _dkdv_update(dk, dv, s_t * qk_scale, q, do, v, lse, delta, offs_n, offs_m,
                              causal_offset, CAUSAL, UPCAST, "tf32")
    rows_kv = (pid_bk.to(tl.int64) * Lk + offs_n)[:, None] * D + tl.arange(0, D)[None, :]
    cols_ok = offs_n < Lk
    _store_rows(dK + rows_kv, _to(dk * scale, dK.dtype.element_ty, UPCAST), cols_ok, D, D)
    _store_rows(dV + rows_kv, _to(dv, dV.dtype.element_ty, UPCAST), cols_ok, D, D)


@triton.jit
def _dq_key_loop(dq, q, do, lse2, delta, offs_m, k_base, v_base, KD, VD, b, hk, mask_rows,
                 start, end, Lk, stride_kn, stride_vn, stride_mn, causal_offset, qk_scale,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, BOUNDARY: tl.constexpr,
                 HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                 TMA: tl.constexpr):
    """dq += dS k over the key tiles [start, end), P = exp2(S2 - lse2) recomputed per tile;
    K/V tiles read as in _fwd_key_loop."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for n0 in tl.range(start, end, BLOCK_N):
        offs_n = n0 + offs_n0
        cols_ok = offs_n < Lk
        k = _load_tile(k_base, KD, b, hk, n0, stride_kn, cols_ok, D, BLOCK_D, BLOCK_N, BOUNDARY,
                       TMA)                                                 # (BLOCK_N, BLOCK_D)
        v = _load_tile(v_base, VD, b, hk, n0, stride_vn, cols_ok, D, BLOCK_D, BLOCK_N, BOUNDARY,
                       TMA)
        s = _mma(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), dq.dtype), UPCAST, PRECISION)
        s = s * qk_scale                                                    # (BLOCK_M, BLOCK_N)
        if HAS_MASK:
            bias = _load_bias(mask_rows + offs_n[None, :] * stride_mn, cols_ok, BOUNDARY)
            s += _mask_log2(bias.to(s.dtype))
        p = tl.exp2(s - lse2[:, None])
        if BOUNDARY:
            keep = cols_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
            p = tl.where(keep, p, 0.0)
        dp = _mma(do, tl.trans(v), tl.zeros((BLOCK_M, BLOCK_N), dq.dtype), UPCAST, PRECISION)
        ds = p * (dp - delta[:, None])
        dq = _mma(_to(ds, k.dtype, UPCAST), k, dq, UPCAST, PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, Mask, dO, Lse, Delta, dQ,
                        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                        stride_vb, stride_vh, stride_vn,
                        stride_mb, stride_mh, stride_mm, stride_mn,
                        stride_dob, stride_doh, stride_dom,
                        H, GROUP, Lq, Lk, causal_offset, qk_scale, scale,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                        HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                        ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        TMA: tl.constexpr = False):
    """dq of one query tile of one (batch, head): grid (cdiv(Lq, BLOCK_M), B * H). With TMA,
    Q, K, V and dO are 4-D TMA descriptors (see _attn_fwd_kernel)."""
    pid_bh, b, h, hk, m0 = _query_head_tile(H, GROUP, BLOCK_M, CAUSAL)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows_ok = offs_m < Lq
    q, do = _load_pair(Q, dO, b, h, m0, stride_qb, stride_qh, stride_qm, stride_dob, stride_doh,
                       stride_dom, rows_ok, D, BLOCK_D, BLOCK_M, TMA)     # (BLOCK_M, BLOCK_D)
    if TMA:
        k_base, v_base = K, V
    else:
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
    rows = pid_bh.to(tl.int64) * Lq + offs_m
    lse2 = tl.load(Lse + rows, mask=rows_ok, other=float("inf")) * _LOG2E
    delta = tl.load(Delta + rows, mask=rows_ok, other=0.0)
    mask_rows = Mask + b * stride_mb + h * stride_mh + _clamp(offs_m, Lq)[:, None] * stride_mm
    dq = tl.zeros((BLOCK_M, BLOCK_D), ACC_DTYPE)
    full_end, end = _key_range(m0, Lk, causal_offset, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _dq_key_loop(dq, q, do, lse2, delta, offs_m, k_base, v_base, K, V, b, hk, mask_rows,
                      0, full_end, Lk, stride_kn, stride_vn, stride_mn, causal_offset, qk_scale,
                      D, BLOCK_M, BLOCK_N, BLOCK_D, CAUSAL, False, HAS_MASK, UPCAST, PRECISION,
                      TMA)
    dq = _dq_key_loop(dq, q, do, lse2, delta, offs_m, k_base, v_base, K, V, b, hk, mask_rows,
                      full_end, end, Lk, stride_kn, stride_vn, stride_mn, causal_offset,
                      qk_scale, D, BLOCK_M, BLOCK_N, BLOCK_D, CAUSAL, True, HAS_MASK, UPCAST,
                      PRECISION, TMA)
    _store_rows(dQ + rows[:, None] * D + offs_d[None, :],
                _to(dq * scale, dQ.dtype.element_ty, UPCAST), rows_ok, D, BLOCK_D)




@triton.jit
def _attn_bwd_dq_ws_kernel(Q, K, V, dO, Lse, Delta, dQ,
                           stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                           stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                           H, GROUP, Lq, Lk, causal_offset, qk_scale, scale,
                           D: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq as _attn_bwd_dq_kernel without a mask, 16-bit, power-of-2 D, Lq a multiple of 4, in
    one warp-specialized key loop (every tile masks the key tail and, if CAUSAL, j > i +
    offset): on Hopper a producer warp group streams K/V tiles through TMA while two consumer
    warp groups each own half of the query rows. Every operand, lse and delta too, is read
    through device-side descriptors (lse and delta read by pointer make triton 3.6's warp
    specialization fail to compile)."""
    pid_bh, b, h, hk, m0 = _query_head_tile(H, GROUP, BLOCK_M, CAUSAL)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q_desc = tl.make_tensor_descriptor(Q + b * stride_qb + h * stride_qh, [Lq, D],
                                       [stride_qm, 1], [BLOCK_M, D])
    do_desc = tl.make_tensor_descriptor(dO + b * stride_dob + h * stride_doh, [Lq, D],
                                        [stride_dom, 1], [BLOCK_M, D])
    k_desc = tl.make_tensor_descriptor(K + b * stride_kb + hk * stride_kh, [Lk, D],
                                       [stride_kn, 1], [BLOCK_N, D])
    v_desc = tl.make_tensor_descriptor(V + b * stride_vb + hk * stride_vh, [Lk, D],
                                       [stride_vn, 1], [BLOCK_N, D])
    lse_desc = tl.make_tensor_descriptor(Lse + pid_bh.to(tl.int64) * Lq, [Lq], [1], [BLOCK_M])
    delta_desc = tl.make_tensor_descriptor(Delta + pid_bh.to(tl.int64) * Lq, [Lq], [1],
                                           [BLOCK_M])
    q = q_desc.load([m0, 0])                               # (BLOCK_M, D), rows past Lq zero
    do = do_desc.load([m0, 0])
    lse2 = lse_desc.load([m0]) * _LOG2E                    # (BLOCK_M,), past Lq 0
    delta = delta_desc.load([m0])
    dq = tl.zeros((BLOCK_M, D), tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)
    _, end = _key_range(m0, Lk, causal_offset, BLOCK_M, BLOCK_N, CAUSAL)
    for n0 in tl.range(0, end, BLOCK_N, warp_specialize=True):
        offs_n = n0 + offs_n0
        k = k_desc.load([n0, 0])                           # (BLOCK_N, D), rows past Lk zero
        v = v_desc.load([n0, 0])
        s = _mma(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), UPCAST, "tf32")
        keep = (offs_n < Lk)[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
        p = tl.where(keep, tl.exp2(s * qk_scale - lse2[:, None]), 0.0)    # (BLOCK_M, BLOCK_N)
        dp = _mma(do, tl.trans(v), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), UPCAST, "tf32")
        ds = p * (dp - delta[:, None])
        dq = _mma(_to(ds, k.dtype, UPCAST), k, dq, UPCAST, "tf32")
    rows = pid_bh.to(tl.int64) * Lq + offs_m
    _store_rows(dQ + rows[:, None] * D + tl.arange(0, D)[None, :],
                _to(dq * scale, dQ.dtype.element_ty, UPCAST), offs_m < Lq, D, D)

# ----------------------------------------------------------------------------------------------
# Launch settings
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Launch:
    """One launch configuration: tile sizes, warps per program, software-pipelining depth."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def meta(self) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}


# Launch settings per kernel, keyed on (BLOCK_D, bytes per element) of 16-bit (2) and 32-bit (4)
# inputs, sized for H100 (228 KB shared memory per SM, 64K registers): the first entry of each
# list is the default, the others are autotuning candidates. Bigger head dims get smaller tiles.
# "split" is the decode forward (BLOCK_M there is the rows tile: G * Lq, not tuned).
_TABLE: dict[str, dict[tuple[int, int], list[Launch]]] = {
    "fwd": {
        (16, 2): [Launch(128, 64, 4, 3), Launch(128, 128, 4, 3), Launch(64, 64, 4, 4)],
        (32, 2): [Launch(128, 64, 4, 3), Launch(128, 128, 4, 3), Launch(64, 64, 4, 4)],
        (64, 2): [Launch(128, 64, 4, 3), Launch(128, 128, 8, 3), Launch(64, 64, 4, 4)],
        (128, 2): [Launch(128, 64, 8, 3), Launch(128, 128, 8, 2), Launch(64, 64, 4, 3)],
        (256, 2): [Launch(64, 64, 8, 2), Launch(64, 32, 4, 2), Launch(128, 32, 8, 2)],
        (16, 4): [Launch(64, 32, 8, 2), Launch(64, 64, 8, 2)],
        (32, 4): [Launch(64, 32, 8, 2), Launch(64, 64, 8, 2)],
        (64, 4): [Launch(32, 32, 8, 2), Launch(64, 32, 8, 2)],
        (128, 4): [Launch(32, 16, 8, 2), Launch(16, 32, 8, 2)],
        (256, 4): [Launch(32, 16, 8, 2), Launch(16, 32, 8, 2)],
    },
    # The warp-specialized forward (16-bit only): num_warps is each of its three warp groups'
    # (a producer, two consumers of BLOCK_M / 2 rows each).
    "fwd_ws": {
        (64, 2): [Launch(128, 128, 4, 2), Launch(128, 64, 4, 3), Launch(128, 128, 4, 3)],
        (128, 2): [Launch(128, 128, 4, 2), Launch(128, 64, 4, 3), Launch(128, 64, 4, 2)],
    },
    # The warp-specialized dK/dV kernel (16-bit only): BLOCK_M divides WS_DKDV_LQ_MULTIPLE. At
    # D = 128, BLOCK_M = 64 spills 56-64 bytes a thread: the last candidate, for the autotuner
    # to weigh against the narrower tiles.
    "dkdv_ws": {
        (64, 2): [Launch(64, 128, 4, 2), Launch(32, 128, 4, 2), Launch(64, 128, 4, 3)],
        (128, 2): [Launch(32, 128, 4, 2), Launch(32, 128, 4, 3), Launch(64, 128, 4, 2)],
    },
    # The warp-specialized dQ kernel (16-bit only).
    "dq_ws": {
        (64, 2): [Launch(128, 64, 4, 2), Launch(128, 128, 4, 2), Launch(128, 64, 4, 3)],
        (128, 2): [Launch(128, 64, 4, 2), Launch(128, 64, 4, 3), Launch(128, 128, 4, 2)],
    },
    # The forward with an additive mask (one more (BLOCK_M, BLOCK_N) tile per step): candidates
    # that do not spill on sm_90 with triton 3.6 (scripts/check_triton_compile.py); "fwd" for
    # the other keys.
    "fwd_mask": {
        (16, 2): [Launch(64, 32, 4, 3), Launch(128, 32, 8, 3), Launch(64, 64, 8, 3)],
        (32, 2): [Launch(64, 32, 4, 3), Launch(128, 32, 8, 3), Launch(64, 64, 8, 3)],
        (64, 2): [Launch(128, 64, 8, 3), Launch(64, 64, 4, 3), Launch(64, 64, 8, 3)],
        (128, 2): [Launch(32, 64, 4, 3), Launch(64, 64, 8, 2), Launch(64, 128, 8, 2)],
    },
    "split": {
        (16, 2): [Launch(16, 128, 4, 3), Launch(16, 64, 4, 4)],
        (32, 2): [Launch(16, 128, 4, 3), Launch(16, 64, 4, 4)],
        (64, 2): [Launch(16, 128, 4, 3), Launch(16, 64, 4, 4)],
        (128, 2): [Launch(16, 64, 4, 3), Launch(16, 128, 4, 2), Launch(16, 64, 8, 4)],
        (256, 2): [Launch(16, 64, 4, 2), Launch(16, 32, 4, 3)],
        (16, 4): [Launch(16, 32, 4, 2), Launch(16, 64, 8, 2)],
        (32, 4): [Launch(16, 32, 4, 2), Launch(16, 64, 8, 2)],
        (64, 4): [Launch(16, 32, 4, 2), Launch(16, 64, 8, 2)],
        (128, 4): [Launch(16, 32, 8, 2), Launch(16, 16, 4, 2)],
        (256, 4): [Launch(16, 32, 8, 2), Launch(16, 16, 4, 2)],
    },
    "dkdv": {
        (16, 2): [Launch(32, 128, 4, 3), Launch(64, 128, 8, 3), Launch(32, 64, 4, 3)],
        (32, 2): [Launch(32, 128, 4, 3), Launch(64, 128, 8, 3), Launch(32, 64, 4, 3)],
        (64, 2): [Launch(64, 128, 8, 3), Launch(32, 64, 4, 3), Launch(64, 64, 4, 3)],
        (128, 2): [Launch(32, 128, 8, 3), Launch(64, 64, 8, 2), Launch(32, 64, 8, 3)],
        (256, 2): [Launch(32, 64, 8, 2), Launch(32, 32, 8, 2), Launch(64, 32, 8, 2)],
        (16, 4): [Launch(32, 32, 8, 2), Launch(16, 32, 8, 2)],
        (32, 4): [Launch(32, 32, 8, 2), Launch(16, 32, 8, 2)],
        (64, 4): [Launch(32, 32, 8, 2), Launch(16, 32, 8, 2)],
        (128, 4): [Launch(32, 32, 8, 2), Launch(16, 16, 8, 2)],
        (256, 4): [Launch(16, 32, 8, 2), Launch(16, 16, 8, 2)],
    },
    "dq": {
        (16, 2): [Launch(128, 32, 4, 3), Launch(128, 64, 8, 3), Launch(64, 32, 4, 3)],
        (32, 2): [Launch(128, 32, 4, 3), Launch(128, 64, 8, 3), Launch(64, 32, 4, 3)],
        (64, 2): [Launch(128, 32, 4, 3), Launch(128, 64, 8, 3), Launch(64, 32, 4, 3)],
        (128, 2): [Launch(128, 64, 8, 2), Launch(128, 32, 8, 3), Launch(64, 64, 4, 3)],
        (256, 2): [Launch(64, 32, 8, 2), Launch(32, 32, 4, 2)],
        (16, 4): [Launch(32, 32, 8, 2), Launch(32, 16, 8, 2)],
        (32, 4): [Launch(32, 32, 8, 2), Launch(32, 16, 8, 2)],
        (64, 4): [Launch(32, 32, 8, 2), Launch(32, 16, 8, 2)],
        (128, 4): [Launch(32, 16, 8, 2), Launch(16, 16, 8, 2)],
        (256, 4): [Launch(32, 16, 8, 2), Launch(16, 16, 8, 2)],
    },
}
# Under the interpreter: one small config, so that short test sequences still span several tiles.
_INTERPRETER_LAUNCH = Launch(32, 32, 1, 1)
_DELTA_BLOCK_M = 64
_COMBINE_CHUNK = 16  # partial accumulators the combine kernel reads at a time
_TUNE_KEYS = ["D", "CAUSAL", "HAS_MASK"]


def block_d(d: int) -> int:
    """The head dim padded to a power of 2 (at least 16, the smallest tl.dot dim)."""
    return max(16, next_power_of_2(d))


def launches(kernel: str, d: int, dtype: torch.dtype, masked: bool = False) -> list[Launch]:
    """The candidate launch settings of ``kernel`` (with an additive mask when ``masked``) for
    head dim ``d`` and ``dtype``; the first is the default. One fixed config under the
    interpreter."""
    if interpreting():
        return [_INTERPRETER_LAUNCH]
    key = (block_d(d), 2 if dtype.itemsize <= 2 else 4)
    if masked and key in _TABLE.get(kernel + "_mask", {}):
        return _TABLE[kernel + "_mask"][key]
    return _TABLE[kernel][key]


def _autotune_enabled() -> bool:
    return not interpreting() and os.environ.get(AUTOTUNE_ENV, "1") != "0"


_TUNERS: list = []  # every autotuner _tuned has made, for tuned_kernels()


def _set_tma_blocks(nargs: dict) -> None:
    """Launch pre-hook of the TMA kernels: the descriptors' tiles for this launch's blocks,
    BLOCK_M rows of Q (and dO), BLOCK_N rows of K and V, BLOCK_D wide."""
    bm, bn, bd = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_D"]
    for name, rows in (("Q", bm), ("dO", bm), ("K", bn), ("V", bn)):
        if isinstance(nargs.get(name), TensorDescriptor):
            nargs[name].block_shape = [1, 1, rows, bd]


@functools.lru_cache(maxsize=None)
def _tuned(kernel, candidates: tuple[Launch, ...], tune_block_m: bool, tma: bool = False):
    configs = [triton.Config(c.meta() if tune_block_m else {"BLOCK_N": c.block_n},
                             num_warps=c.num_warps, num_stages=c.num_stages,
                             pre_hook=_set_tma_blocks if tma else None) for c in candidates]
    keys = _TUNE_KEYS + ([] if tune_block_m else ["BLOCK_M"])
    tuner = triton.autotune(configs=configs, key=keys)(kernel)
    _TUNERS.append(tuner)
    return tuner


def tuned_kernels() -> list:
    """The attention kernels' autotuners made so far (their ``cache``: key -> chosen config)."""
    return list(_TUNERS)


def _launch(kernel, grid: Callable[[dict], tuple], candidates: list[Launch], args: tuple,
            constexprs: dict, tune_block_m: bool = True,
            descriptors: Optional[dict] = None) -> None:
    """Launch ``kernel``: autotuned over ``candidates`` on a GPU, else with the first one.
    ``descriptors`` ({"Q", "K", "V": TensorDescriptor}, the TMA forward): their tiles are set
    for the launch's blocks."""
    tma = descriptors is not None
    if _autotune_enabled() and len(candidates) > 1:
        key = tuple(constexprs.get(k) for k in _TUNE_KEYS) + dtypes(args)  # as the tuner: a
        # key the kernel lacks (HAS_MASK of the warp-specialized ones) is left out
        if not tune_block_m:
            key += (constexprs["BLOCK_M"],)
        launch_tuned(_tuned(kernel, tuple(candidates), tune_block_m, tma), grid, args,
                     constexprs, key)
        return
    launch = candidates[0]
    meta = launch.meta() if tune_block_m else {"BLOCK_N": launch.block_n}
    if tma:
        _set_tma_blocks({**descriptors, **constexprs, **meta})
    kernel[grid({**constexprs, **meta})](*args, **constexprs, **meta,
                                         num_warps=launch.num_warps,
                                         num_stages=launch.num_stages)


# ----------------------------------------------------------------------------------------------
# Launchers (the ops of llm_kernels._ops)
# ----------------------------------------------------------------------------------------------

def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _common(q: torch.Tensor, causal: bool, mask: Optional[torch.Tensor]) -> dict:
    """The constexprs shared by every attention kernel."""
    d = q.shape[-1]
    wide = q.dtype in (torch.float32, torch.float64)
    return {"D": d, "BLOCK_D": block_d(d), "CAUSAL": bool(causal), "HAS_MASK": mask is not None,
            "UPCAST": interpreting() and q.dtype == torch.bfloat16,
            "PRECISION": "ieee" if wide else "tf32", "ACC_DTYPE": _acc_dtype(q.dtype)}


def _mask_args(mask: Optional[torch.Tensor], q: torch.Tensor) -> tuple:
    """The mask pointer and its 4 strides (a dummy pointer and zeros when there is none)."""
    if mask is None:
        return (q, 0, 0, 0, 0)
    return (mask, *mask.stride())


def _strides3(t: torch.Tensor) -> tuple:
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SM_COUNT
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@dataclass(frozen=True)
class SplitPlan:
    """Flash-decoding layout: rows tile (of the G * Lq rows of a kv head) and key splits."""

    block_m: int
    row_tiles: int
    num_splits: int
    keys_per_split: int


def split_plan(batch: int, kv_heads: int, group: int, lq: int, lk: int,
               sm_count: int) -> Optional[SplitPlan]:
    """The flash-decoding plan when few queries (Lq <= DECODE_MAX_LQ) meet enough keys to fill
    the GPU by splitting them (at least 2 splits of DECODE_MIN_KEYS_PER_SPLIT keys), else None."""
    if lq > DECODE_MAX_LQ:
        return None
    rows = group * lq
    block_m = min(64, max(16, next_power_of_2(rows)))
    row_tiles = cdiv(rows, block_m)
    programs = batch * kv_heads * row_tiles
    wanted = cdiv(DECODE_PROGRAMS_PER_SM * sm_count, programs)
    splits = min(wanted, cdiv(lk, DECODE_MIN_KEYS_PER_SPLIT), DECODE_MAX_SPLITS)
    if splits < 2:
        return None
    keys_per_split = cdiv(cdiv(lk, splits), DECODE_KEY_CHUNK) * DECODE_KEY_CHUNK
    return SplitPlan(block_m, row_tiles, cdiv(lk, keys_per_split), keys_per_split)


def _forward_split(q, k, v, mask, out, lse, causal_offset, qk_scale, common, plan: SplitPlan):
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    n_rows = b * h * lq
    part_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    part_o = torch.empty((plan.num_splits, n_rows, d), dtype=part_dtype, device=q.device)
    part_m = torch.empty((plan.num_splits, n_rows), dtype=part_dtype, device=q.device)
    part_l = torch.empty_like(part_m)
    mask_ptr, *mask_strides = _mask_args(mask, q)
    args = (q, k, v, mask_ptr, part_o, part_m, part_l, *_strides3(q), *_strides3(k),
            *_strides3(v), *mask_strides, h, h // hkv, lq, lk, causal_offset, qk_scale,
            plan.keys_per_split, n_rows)
    constexprs = {**common, "BLOCK_M": plan.block_m}
    _launch(_attn_fwd_split_kernel, lambda meta: (plan.num_splits, plan.row_tiles, b * hkv),
            launches("split", d, q.dtype), args, constexprs, tune_block_m=False)
    _attn_fwd_combine_kernel[(n_rows,)](
        part_o, part_m, part_l, out, lse, n_rows, plan.num_splits, D=d,
        BLOCK_D=common["BLOCK_D"], BLOCK_S=next_power_of_2(plan.num_splits),
        CHUNK_S=_COMBINE_CHUNK, UPCAST=common["UPCAST"], num_warps=4)


def attention_forward(q, k, v, mask, causal, causal_offset, scale):
    """(out, lse): out (B, H, Lq, D) contiguous in q's dtype, lse (B, H, Lq) float32 (+inf for
    a row that sees no key). q (B, H, Lq, D), k/v (B, Hkv, Lk, D), mask None or an additive
    (B, H, Lq, Lk) view with any strides; causal: query i sees key j iff j <= i + causal_offset."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out = torch.empty((b, h, lq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    qk_scale = float(scale) * LOG2E
    common = {**_common(q, causal, mask), "SCALED_MAX": qk_scale > 0 and mask is None}
    plan = split_plan(b, hkv, h // hkv, lq, lk, _device_sm_count(q.device))
    if plan is not None:
        _forward_split(q, k, v, mask, out, lse, causal_offset, qk_scale, common, plan)
        return out, lse
    if use_warp_specialized(q, k, v, mask, qk_scale):
        _forward_ws(q, k, v, out, lse, causal, causal_offset, qk_scale)
        return out, lse
    mask_ptr, *mask_strides = _mask_args(mask, q)
    descriptors = _descriptors(Q=q, K=k, V=v) if use_tma(q, k, v) else None
    if descriptors is not None:
        common = {**common, "TMA": True}
    qkv = (q, k, v) if descriptors is None else tuple(descriptors.values())
    args = (*qkv, mask_ptr, out, lse, *_strides3(q), *_strides3(k), *_strides3(v),
            *mask_strides, h, h // hkv, lq, lk, causal_offset, qk_scale)
    _launch(_attn_fwd_kernel, lambda meta: (cdiv(lq, meta["BLOCK_M"]), b * h),
            launches("fwd", d, q.dtype, masked=mask is not None), args, common,
            descriptors=descriptors)
    return out, lse


def use_warp_specialized(q, k, v, mask, qk_scale: float) -> bool:
    """Whether the dense forward runs _attn_fwd_ws_kernel: only when $LLM_KERNELS_ATTENTION_WS
    is 1 (off by default until timed against _attn_fwd_kernel), without mask, for scale > 0
    and 16-bit tensors of head dim 64 or 128 (Lq, Lk > 0) on a Hopper or newer GPU (or the
    interpreter) that TMA can address."""
    if os.environ.get(WS_ENV, "0") != "1" or mask is not None or not qk_scale > 0:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in (64, 128):
        return False
    if q.shape[2] == 0 or k.shape[2] == 0:
        return False
    return tma_device(q) and all(_tma_readable(t) for t in (q, k, v))


def _forward_ws(q, k, v, out, lse, causal: bool, causal_offset: int, qk_scale: float) -> None:
    """out, lse by _attn_fwd_ws_kernel (see use_warp_specialized)."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    args = (q, k, v, out, lse, h, h // hkv, lq, lk, causal_offset, qk_scale, *_strides3(q),
            *_strides3(k), *_strides3(v))
    constexprs = {"D": d, "CAUSAL": bool(causal),
                  "UPCAST": interpreting() and q.dtype == torch.bfloat16}
    with descriptor_scratch(q.device):
        _launch(_attn_fwd_ws_kernel, lambda meta: (cdiv(lq, meta["BLOCK_M"]), b * h),
                launches("fwd_ws", d, q.dtype), args, constexprs)


def use_warp_specialized_dq(q, k, v, grad_out, lse, mask) -> bool:
    """Whether the backward's dQ runs _attn_bwd_dq_ws_kernel: only when $LLM_KERNELS_ATTENTION_WS
    is 1, without mask, for 16-bit tensors of head dim 64 or 128 on a Hopper or newer GPU (or
    the interpreter) that TMA can address, Lq a multiple of 4 and lse 16-byte aligned (its
    (B * H, Lq) rows read by TMA)."""
    if os.environ.get(WS_ENV, "0") != "1" or mask is not None:
        return False
    lq, d = q.shape[2], q.shape[3]
    if q.dtype not in (torch.float16, torch.bfloat16) or d not in (64, 128):
        return False
    if lq == 0 or k.shape[2] == 0 or lq % 4 or lse.data_ptr() % 16:
        return False
    return tma_device(q) and all(_tma_readable(t) for t in (q, k, v, grad_out))


def use_warp_specialized_dkdv(q, k, v, grad_out, mask) -> bool:
    """Whether the backward's dK/dV run _attn_bwd_dkdv_ws_kernel: only when
    $LLM_KERNELS_ATTENTION_WS is 1, without mask, for 16-bit tensors of head dim 64 or 128 on a
    Hopper or newer GPU (or the interpreter) that TMA can address, Lq a multiple of
    WS_DKDV_LQ_MULTIPLE (every BLOCK_M), q and grad_out with their heads' rows back to back."""
    if os.environ.get(WS_ENV, "0") != "1" or mask is not None:
        return False
    b, h, lq, d = q.shape
    if q.dtype not in (torch.float16, torch.bfloat16) or d not in (64, 128):
        return False
    if lq == 0 or lq % WS_DKDV_LQ_MULTIPLE:
        return False
    if h > 1 and any(t.stride(1) != lq * t.stride(2) for t in (q, grad_out)):
        return False
    return tma_device(q) and all(_tma_readable(t) for t in (q, k, v, grad_out))


def _dq_ws(q, k, v, grad_out, lse, delta, dq, causal: bool, causal_offset: int,
           scale: float) -> None:
    """dq by _attn_bwd_dq_ws_kernel (see use_warp_specialized_dq); lse and delta (B, H, Lq)
    contiguous float32."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    args = (q, k, v, grad_out, lse, delta, dq, *_strides3(q), *_strides3(k), *_strides3(v),
            *_strides3(grad_out), h, h // hkv, lq, lk, causal_offset, float(scale) * LOG2E,
            float(scale))
    constexprs = {"D": d, "CAUSAL": bool(causal),
                  "UPCAST": interpreting() and q.dtype == torch.bfloat16}
    with descriptor_scratch(q.device):
        _launch(_attn_bwd_dq_ws_kernel, lambda meta: (cdiv(lq, meta["BLOCK_M"]), b * h),
                launches("dq_ws", d, q.dtype), args, constexprs)


def _dkdv_ws(q, k, v, grad_out, lse, delta, dk, dv, causal: bool, causal_offset: int,
             scale: float) -> None:
    """dk, dv by _attn_bwd_dkdv_ws_kernel (see use_warp_specialized_dkdv)."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    args = (q, k, v, grad_out, lse, delta, dk, dv, q.stride(0), q.stride(2), *_strides3(k),
            *_strides3(v), grad_out.stride(0), grad_out.stride(2), h, h // hkv, lq, lk,
            causal_offset, float(scale) * LOG2E, float(scale))
    constexprs = {"D": d, "CAUSAL": bool(causal),
                  "UPCAST": interpreting() and q.dtype == torch.bfloat16}
    with descriptor_scratch(q.device):
        _launch(_attn_bwd_dkdv_ws_kernel, lambda meta: (cdiv(lk, meta["BLOCK_N"]), b * hkv),
                launches("dkdv_ws", d, q.dtype), args, constexprs)


def use_tma(*tensors: torch.Tensor) -> bool:
    """Whether the dense forward and the backward read their (B, heads, L, D) operands (q, k,
    v, and grad_out) through TMA descriptors: only when $LLM_KERNELS_ATTENTION_TMA is 1 (off
    by default until timed against the pointer loads), for 16-bit tensors on a Hopper or newer
    GPU (or the interpreter) that TMA can address."""
    dtype = tensors[0].dtype
    if os.environ.get(TMA_ENV, "0") != "1" or dtype not in (torch.float16, torch.bfloat16):
        return False
    return tma_device(tensors[0]) and all(_tma_readable(t) for t in tensors)


def _descriptors(**tensors: torch.Tensor) -> dict:
    """{name: 4-D TMA descriptor of the tensor}; the tiles are set per launch (_set_tma_blocks)."""
    return {name: TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, 16])
            for name, t in tensors.items()}


def tma_device(t: torch.Tensor) -> bool:
    """Whether t's device reads through TMA: a Hopper or newer GPU, or the interpreter."""
    return interpreting() or (t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9)


def _tma_readable(t: torch.Tensor) -> bool:
    """A (B, heads, L, D) tensor a TMA descriptor can describe: contiguous last dim of at least
    16 bytes, start and every other stride positive multiples of 16 bytes."""
    e = t.element_size()
    return (t.stride(3) == 1 and t.shape[3] * e >= 16 and t.data_ptr() % 16 == 0
            and all(t.stride(i) > 0 and t.stride(i) * e % 16 == 0 for i in range(3)))


def attention_backward(grad_out, q, k, v, out, lse, mask, causal, causal_offset, scale):
    """(dq, dk, dv), contiguous in the inputs' dtypes; deterministic (no atomics)."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    q, k, v, out, grad_out = (_last_dim_contiguous(t) for t in (q, k, v, out, grad_out))
    lse = lse.contiguous()
    common = _common(q, causal, mask)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    delta = torch.empty((b, h, lq), dtype=acc_dtype, device=q.device)
    _attn_bwd_delta_kernel[(cdiv(lq, _DELTA_BLOCK_M), b * h)](
        out, grad_out, delta, *_strides3(out), *_strides3(grad_out), h, lq, D=d,
        BLOCK_D=common["BLOCK_D"], ACC_DTYPE=common["ACC_DTYPE"], BLOCK_M=_DELTA_BLOCK_M,
        num_warps=4)
    dq = torch.empty((b, h, lq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, hkv, lk, d), dtype=k.dtype, device=q.device)
    dv = torch.empty((b, hkv, lk, d), dtype=v.dtype, device=q.device)
    mask_ptr, *mask_strides = _mask_args(mask, q)
    strides = (*_strides3(q), *_strides3(k), *_strides3(v), *mask_strides, *_strides3(grad_out),
               h, h // hkv, lq, lk, causal_offset, float(scale) * LOG2E, float(scale))
    operands = {"Q": q, "K": k, "V": v, "dO": grad_out}
    ws = use_warp_specialized_dkdv(q, k, v, grad_out, mask)
    descriptors = _descriptors(**operands) if use_tma(*operands.values()) else None
    if descriptors is not None:
        common = {**common, "TMA": True}
        operands = descriptors
    inputs = (operands["Q"], operands["K"], operands["V"], mask_ptr, operands["dO"], lse, delta)
    if ws:
        _dkdv_ws(q, k, v, grad_out, lse, delta, dk, dv, causal, causal_offset, scale)
    else:
        _launch(_attn_bwd_dkdv_kernel, lambda meta: (cdiv(lk, meta["BLOCK_N"]), b * hkv),
                launches("dkdv", d, q.dtype), (*inputs, dk, dv, *strides), common,
                descriptors=descriptors)
    if use_warp_specialized_dq(q, k, v, grad_out, lse, mask):
        _dq_ws(q, k, v, grad_out, lse, delta, dq, causal, causal_offset, scale)
    else:
        _launch(_attn_bwd_dq_kernel, lambda meta: (cdiv(lq, meta["BLOCK_M"]), b * h),
                launches("dq", d, q.dtype), (*inputs, dq, *strides), common,
                descriptors=descriptors)
    return dq, dk, dv


__all__ = ["attention_forward", "attention_backward", "split_plan", "launches", "block_d",
           "use_tma", "Launch", "SplitPlan"]
