"""Triton layer norm and RMSNorm over the rows of a contiguous (N, C) tensor, fused residual add.

Forward, per row, with h = round(x + residual) (rounded to x's dtype) or h = x:
    layer norm: xhat = (h - mean) * rstd,  rstd = 1 / sqrt(var(h) + eps)
    rms norm:   xhat = h * rstd,           rstd = 1 / sqrt(mean(h^2) + eps)
    y = xhat * weight + bias
Backward, with g = dy * weight (g = dy without weight):
    layer norm: dx = rstd * (g - xhat * mean(g * xhat) - mean(g)) + dh
    rms norm:   dx = rstd * (g - xhat * mean(g * xhat)) + dh
    dweight = sum_rows(dy * xhat), dbias = sum_rows(dy)
The statistics are float32. A row of at most ``MAX_BLOCK`` elements is read once and kept in
registers; a longer row loops over chunks of ``MAX_BLOCK`` (mean and variance merged chunk by
chunk, Chan et al.), then reads the row again to normalize it. dweight and dbias are reduced
deterministically: each backward program sums a fixed set of rows into its own float32 row of a
(programs, C) buffer, which is then summed over dim 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llm_kernels.backends import interpreting
from llm_kernels.kernels._rounding import to_dtype
from ._host import next_power_of_2

# Longest row kept in registers; longer rows loop over chunks of this many elements.
MAX_BLOCK = 8192
# Warps per SM the backward is sized for. A program gets _backward_warps(block) warps (a thread
# keeps 8 elements of each row tensor) or twice as many, whichever leaves more warps resident
# per SM once compiled, and as many programs are launched per SM as its registers, warps and
# shared memory let one SM hold at once: all of them resident, as a second wave would wait for
# the first one's whole loop over rows (H100, triton 3.6, hidden 4096: 16 warps x 82 registers
# fit once per SM; two per SM ran in two waves at 0.3 of the copy bandwidth). Each program
# reduces its rows' dweight/dbias into one partial row.
BWD_WARPS_PER_SM = 32
# An SM's limits (sm_80/sm_90): registers, resident warps, resident programs.
SM_REGISTERS = 65536
SM_MAX_WARPS = 64
SM_MAX_PROGRAMS = 32
# Software-pipelining depth of the backward's loop over rows (the next row's loads are issued
# while this row is reduced); 1 turns it off.
BWD_STAGES = 2
# Backward programs when interpreting (CPU tensors).
INTERPRETER_BWD_PROGRAMS = 4


@triton.jit
def _load_h(X, R, H, offs, mask, HAS_R: tl.constexpr, STORE_H: tl.constexpr,
            INTERPRET: tl.constexpr):
    """h = x + residual rounded to x's dtype (or x), as float32; stores h when STORE_H."""
    x = tl.load(X + offs, mask=mask, other=0.0)
    if HAS_R:
        x = (x.to(tl.float32) + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32))
        x = to_dtype(x, X.dtype.element_ty, INTERPRET)
        if STORE_H:
            tl.store(H + offs, x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def _chunk_stats(h, mask, count):
    """(mean, sum((h - mean)^2)) of the ``count`` unmasked values of h, by the corrected
    two-pass formula: accurate even when |mean| >> std."""
    rough = tl.sum(h, axis=0) / count
    centered = tl.where(mask, h - rough, 0.0)
    correction = tl.sum(centered, axis=0)
    m2 = tl.sum(centered * centered, axis=0) - correction * correction / count
    return rough + correction / count, tl.maximum(m2, 0.0)


@triton.jit
def _normalize(h, mean, rstd, RMS: tl.constexpr):
    if RMS:
        return h * rstd
    return (h - mean) * rstd


@triton.jit
def _affine(xhat, W, B, cols, mask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    y = xhat
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    return y


@triton.jit
def _layer_norm_fwd_kernel(X, R, W, B, Y, H, MEAN, RSTD, C, eps,
                           HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                           RMS: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr,
                           INTERPRET: tl.constexpr):
    """One program per row: statistics, then y (and h with a residual)."""
    row = tl.program_id(0)
    start = tl.cast(row, tl.int64) * C
    if SINGLE:
        cols = tl.arange(0, BLOCK)
        mask = cols < C
        h = _load_h(X + start, R + start, H + start, cols, mask, HAS_R, True, INTERPRET)
        if RMS:
            mean = 0.0
            m2 = tl.sum(h * h, axis=0)
        else:
            mean, m2 = _chunk_stats(h, mask, C)
        rstd = 1.0 / tl.sqrt(m2 / C + eps)
        y = _affine(_normalize(h, mean, rstd, RMS), W, B, cols, mask, HAS_W, HAS_B)
        tl.store(Y + start + cols, to_dtype(y, Y.dtype.element_ty, INTERPRET), mask=mask)
    else:
        count = 0.0
        mean = 0.0
        m2 = 0.0
        for c0 in range(0, C, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            mask = cols < C
            h = _load_h(X + start, R + start, H + start, cols, mask, HAS_R, True, INTERPRET)
            if RMS:
                m2 += tl.sum(h * h, axis=0)
            else:
                n_chunk = tl.minimum(C - c0, BLOCK).to(tl.float32)
                mean_chunk, m2_chunk = _chunk_stats(h, mask, n_chunk)
                delta = mean_chunk - mean
                total = count + n_chunk
                mean += delta * (n_chunk / total)
                m2 += m2_chunk + delta * delta * (count * n_chunk / total)
                count = total
        rstd = 1.0 / tl.sqrt(m2 / C + eps)
        for c0 in range(0, C, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            mask = cols < C
            h = _load_h(X + start, R + start, H + start, cols, mask, HAS_R, False, INTERPRET)
            y = _affine(_normalize(h, mean, rstd, RMS), W, B, cols, mask, HAS_W, HAS_B)
            tl.store(Y + start + cols, to_dtype(y, Y.dtype.element_ty, INTERPRET), mask=mask)
    if not RMS:
        tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _row_terms(DY, Hs, W, cols, mask, mean, rstd, HAS_W: tl.constexpr, RMS: tl.constexpr):
    """(dy, xhat, g = dy * weight) of one chunk of a row, float32, zero past the row's end."""
    dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(Hs + cols, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, _normalize(h, mean, rstd, RMS), 0.0)
    g = dy
    if HAS_W:
        g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    return dy, xhat, g


@triton.jit
def _add_pairs(a1, b1, a2, b2):
    return a1 + a2, b1 + b2


@triton.jit
def _row_sums(xhat, g, RMS: tl.constexpr):
    """(sum(xhat * g), sum(g)) of a chunk: one block-wide reduction for both (one exchange
    through shared memory instead of two); RMSNorm needs only the first (the second is 0)."""
    if RMS:
        return tl.sum(xhat * g, axis=0), 0.0
    return tl.reduce((xhat * g, g), 0, _add_pairs)


@triton.jit
def _input_grad(xhat, g, c1, c2, rstd, DH, cols, mask, HAS_DH: tl.constexpr,
                RMS: tl.constexpr):
    """rstd * (g - xhat * c1 - c2) (no c2 for RMSNorm), plus the residual stream's gradient."""
    dx = g - xhat * c1
    if not RMS:
        dx = dx - c2
    dx = dx * rstd
    if HAS_DH:
        dx += tl.load(DH + cols, mask=mask, other=0.0).to(tl.float32)
    return dx


@triton.jit
def _layer_norm_bwd_kernel(DY, DH, Hs, W, MEAN, RSTD, DX, PARTIAL_W, PARTIAL_B, N, C,
                           HAS_DH: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                           RMS: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr,
                           STAGES: tl.constexpr, INTERPRET: tl.constexpr):
    """Program p handles rows p, p + P, p + 2P, ... and writes its dweight/dbias partial sums
    to row p of PARTIAL_W/PARTIAL_B (P, C) float32."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    partial = pid.to(tl.int64) * C
    if SINGLE:
        cols = tl.arange(0, BLOCK)
        mask = cols < C
        acc_w = tl.zeros((BLOCK,), tl.float32)
        acc_b = tl.zeros((BLOCK,), tl.float32)
        for row in tl.range(pid, N, programs, num_stages=STAGES):
            start = tl.cast(row, tl.int64) * C
            rstd = tl.load(RSTD + row)
            mean = 0.0 if RMS else tl.load(MEAN + row)
            dy, xhat, g = _row_terms(DY + start, Hs + start, W, cols, mask, mean, rstd,
                                     HAS_W, RMS)
            sum_xg, sum_g = _row_sums(xhat, g, RMS)
            c1 = sum_xg / C
            c2 = sum_g / C
            dx = _input_grad(xhat, g, c1, c2, rstd, DH + start, cols, mask, HAS_DH, RMS)
            tl.store(DX + start + cols, to_dtype(dx, DX.dtype.element_ty, INTERPRET), mask=mask)
            acc_w += dy * xhat
            acc_b += dy
        if HAS_W:
            tl.store(PARTIAL_W + partial + cols, acc_w, mask=mask)
        if HAS_B:
            tl.store(PARTIAL_B + partial + cols, acc_b, mask=mask)
    else:
        for row in range(pid, N, programs):
            start = tl.cast(row, tl.int64) * C
            rstd = tl.load(RSTD + row)
            mean = 0.0 if RMS else tl.load(MEAN + row)
            sum_xg = 0.0
            sum_g = 0.0
            for c0 in range(0, C, BLOCK):
                cols = c0 + tl.arange(0, BLOCK)
                mask = cols < C
                dy, xhat, g = _row_terms(DY + start, Hs + start, W, cols, mask, mean, rstd,
                                         HAS_W, RMS)
                chunk_xg, chunk_g = _row_sums(xhat, g, RMS)
                sum_xg += chunk_xg
                sum_g += chunk_g
            c1 = sum_xg / C
            c2 = sum_g / C
            for c0 in range(0, C, BLOCK):
                cols = c0 + tl.arange(0, BLOCK)
                mask = cols < C
                dy, xhat, g = _row_terms(DY + start, Hs + start, W, cols, mask, mean, rstd,
                                         HAS_W, RMS)
                dx = _input_grad(xhat, g, c1, c2, rstd, DH + start, cols, mask, HAS_DH, RMS)
                tl.store(DX + start + cols, to_dtype(dx, DX.dtype.element_ty, INTERPRET), mask=mask)
                # This program alone owns its partial row: read-add-write, no atomics.
                if HAS_W:
                    acc_w = tl.load(PARTIAL_W + partial + cols, mask=mask, other=0.0)
                    tl.store(PARTIAL_W + partial + cols, acc_w + dy * xhat, mask=mask)
                if HAS_B:
                    acc_b = tl.load(PARTIAL_B + partial + cols, mask=mask, other=0.0)
                    tl.store(PARTIAL_B + partial + cols, acc_b + dy, mask=mask)


def _config(c: int) -> tuple[int, bool, int]:
    """(block, single, num_warps) of the forward for rows of ``c`` elements."""
    single = next_power_of_2(c) <= MAX_BLOCK
    block = next_power_of_2(c) if single else MAX_BLOCK
    # 16-byte accesses need >= 8 (16-bit) elements per thread; 512 per warp keeps registers low.
    return block, single, min(max(block // 512, 1), 16)


def _backward_warps(block: int) -> int:
    """Warps per backward program: 8 elements of a row per thread (see BWD_WARPS_PER_SM)."""
    return min(max(block // 256, 1), BWD_WARPS_PER_SM)


# (device index, compile-time key) -> (warps per program, programs per SM) of the backward.
_backward_plans: dict = {}


def resident_programs(regs: int, shared: int, num_warps: int, sm_shared: int) -> int:
    """Programs of a kernel (``regs`` registers a thread, ``shared`` bytes, ``num_warps``) that
    one SM holds at once; registers are allocated per warp in units of 256."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = SM_REGISTERS // (regs_per_warp * num_warps)
    by_shared = sm_shared // shared if shared else SM_MAX_PROGRAMS
    return max(1, min(by_regs, SM_MAX_WARPS // num_warps, by_shared, SM_MAX_PROGRAMS))


def _compiled_per_sm(args, constexprs: dict, num_warps: int, device: torch.device) -> int:
    """Compile the backward with ``num_warps`` (no launch) and size its residency per SM."""
    compiled = _layer_norm_bwd_kernel.warmup(*args, grid=(1,), **constexprs, num_warps=num_warps)
    compiled.run  # loads the binary, which fills in n_regs
    props = torch.cuda.get_device_properties(device)
    sm_shared = getattr(props, "shared_memory_per_multiprocessor", 233472)
    return resident_programs(compiled.n_regs, compiled.metadata.shared, num_warps, sm_shared)


def _backward_plan(args, constexprs: dict, block: int, device: torch.device) -> tuple[int, int]:
    """(warps per program, programs per SM): of _backward_warps(block) and twice as many warps
    (fewer registers a thread), the one with more warps resident per SM, as compiled for this
    GPU. Fixed per kernel variant and GPU, so the partial sums, and dweight/dbias, are the same
    bits from run to run."""
    key = (device.index, block, *constexprs.values(), *(a.dtype for a in args[:4]))
    plan = _backward_plans.get(key)
    if plan is None:
        warps = _backward_warps(block)
        options = [(w, _compiled_per_sm(args, constexprs, w, device))
                   for w in dict.fromkeys((warps, min(2 * warps, BWD_WARPS_PER_SM)))]
        plan = _backward_plans[key] = max(options, key=lambda o: o[0] * o[1])
    return plan


def _backward_launch(n: int, args, constexprs: dict, block: int,
                     device: torch.device) -> tuple[int, int]:
    """(warps per program, programs): on a GPU one program per resident slot of every SM."""
    if device.type != "cuda":
        return _backward_warps(block), min(n, INTERPRETER_BWD_PROGRAMS if interpreting() else 1)
    warps, per_sm = _backward_plan(args, constexprs, block, device)
    return warps, min(n, torch.cuda.get_device_properties(device).multi_processor_count * per_sm)


def _partial_buffer(programs: int, c: int, device, single: bool) -> torch.Tensor:
    """(programs, C) float32; zeroed for the chunked backward, which accumulates into it."""
    alloc = torch.empty if single else torch.zeros
    return alloc((programs, c), dtype=torch.float32, device=device)


def layer_norm_forward(x, weight, bias, residual, eps, rms):
    """(y, h, mean, rstd): y and h (x + residual; empty without residual) in x's dtype,
    mean (N,) float32 (empty for RMSNorm) and rstd (N,) float32. x (N, C) contiguous."""
    x = x.contiguous()
    n, c = x.shape
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else x.new_empty((0,))
    mean = x.new_empty((0 if rms else n,), dtype=torch.float32)
    rstd = x.new_empty((n,), dtype=torch.float32)
    block, single, num_warps = _config(c)
    _layer_norm_fwd_kernel[(n,)](
        x, residual.contiguous() if residual is not None else x,
        weight if weight is not None else x, bias if bias is not None else x,
        y, h if residual is not None else y, mean if not rms else rstd, rstd, c, eps,
        HAS_R=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        RMS=rms, BLOCK=block, SINGLE=single, INTERPRET=interpreting(),
        num_warps=num_warps)
    return y, h, mean, rstd


def layer_norm_backward(grad_y, grad_h, h, weight, bias, mean, rstd, rms):
    """(dx, dweight, dbias) in h's dtype; dx includes grad_h (the residual stream's gradient);
    dweight/dbias are empty when weight/bias is None. h (N, C) is the normalized input."""
    h = h.contiguous()
    grad_y = grad_y.contiguous()
    n, c = h.shape
    dx = torch.empty_like(h)
    block, single, _ = _config(c)
    constexprs = dict(HAS_DH=grad_h is not None, HAS_W=weight is not None,
                      HAS_B=bias is not None, RMS=rms, BLOCK=block, SINGLE=single,
                      STAGES=BWD_STAGES, INTERPRET=interpreting())
    grad_h = grad_h.contiguous() if grad_h is not None else grad_y
    head = (grad_y, grad_h, h, weight if weight is not None else h, mean if not rms else rstd,
            rstd, dx)
    num_warps, programs = _backward_launch(n, head + (rstd, rstd, n, c), constexprs, block,
                                           h.device)
    partial_w = _partial_buffer(programs, c, h.device, single) if weight is not None else None
    partial_b = _partial_buffer(programs, c, h.device, single) if bias is not None else None
    _layer_norm_bwd_kernel[(programs,)](
        *head, partial_w if partial_w is not None else rstd,
        partial_b if partial_b is not None else rstd, n, c, **constexprs,
        num_warps=num_warps)
    dweight = partial_w.sum(0).to(h.dtype) if partial_w is not None else h.new_empty((0,))
    dbias = partial_b.sum(0).to(h.dtype) if partial_b is not None else h.new_empty((0,))
    return dx, dweight, dbias
