"""Triton kernels for the feed-forward block ``act(x @ w1.T + b1) @ w2.T + b2``.

One tiled matmul ``C = A @ B`` with fp32 accumulation does all the work; its epilogue fuses
the elementwise math around the products:

- forward:  ``pre = x @ w1.T + b1`` and ``h = act(pre)`` written by one epilogue (pre is saved
  for the backward, h feeds the second matmul), then ``out = h @ w2.T + b2``;
- backward: ``dpre = (grad_out @ w2) * act'(pre)`` by one epilogue, which also writes
  ``h = act(pre)`` again from the pre tile it reads; ``dx = dpre @ w1``, ``dw1 = dpre.T @ x``,
  ``dw2 = (h.T @ grad_out).T`` (written transposed), ``db = column sums`` (two deterministic
  passes, fp32 partial sums in a fixed order). Summing db1 and db2 inside the dw1 / dw2 loops
  instead (the K-sums of their operands) is miscompiled by Triton when the summed tile also
  feeds the dot (triton-lang/triton#6691: wrong dw1 at 4096 x 4096 bf16 on an H100), and as a
  dot with a ones tile it made the H100 forward+backward 12.6 ms against 11.6. Recomputing h
  inside the loads of the dw2 product instead ran 3x slower on an H100 (the act runs once per
  tile column, and the operand takes a register round trip), so it is written once here.

Operands are strided views (a transposed operand is a stride swap, never a copy); tiles are
masked, so any M, N, K work. Programs are ordered in groups of ``GROUP_M`` row blocks so that
neighbouring programs reuse the same tiles from L2. Results are written in the input dtype.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from llm_kernels.backends import interpreting

from ._rounding import to_dtype
from ._host import cdiv, descriptor_scratch, dtypes, launch_tuned

# Activation codes: a run-time kernel argument (one compiled kernel serves every activation;
# the branch is uniform across the program).
ACT_GELU = tl.constexpr(1)
ACT_GELU_TANH = tl.constexpr(2)
ACT_RELU = tl.constexpr(3)
ACT_SILU = tl.constexpr(4)
ACTIVATION_CODES = {"gelu": 1, "gelu_tanh": 2, "relu": 3, "silu": 4}
# "1": the 16-bit matmuls on Hopper and newer read A and B through TMA descriptors.
TMA_ENV = "LLM_KERNELS_MATMUL_TMA"
# "1": those TMA reads in a warp-specialized K loop (a producer warp group issuing the loads,
# two consumer warp groups of BLOCK_M / 2 rows each running the wgmma) for the products with
# the plain and activation epilogues; implies TMA_ENV.
WS_ENV = "LLM_KERNELS_MATMUL_WS"

# Epilogue applied to the fp32 accumulator c (+ bias); E1, E2 are inputs read by it, AUX and
# AUX2 extra outputs, all (M, N).
EPI_NONE = tl.constexpr(0)         # C <- c
EPI_ACT = tl.constexpr(1)          # C <- act(c), AUX <- c
EPI_ACT_GRAD = tl.constexpr(2)     # C <- c * act'(E1), AUX <- act(E1)
EPI_SWIGLU_GRAD = tl.constexpr(3)  # C <- c * E2 * silu'(E1), AUX <- c * silu(E1),
#                                    AUX2 <- silu(E1) * E2

SQRT_HALF = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
GELU_TANH_C = tl.constexpr(0.044715)


@triton.jit
def _tanh(u):
    """tanh(u) = 1 - 2 / (exp(2u) + 1), finite for any u."""
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _activation(x, act):
    """act(x) in fp32 (x itself for code 0)."""
    y = x
    if act == ACT_GELU:
        y = 0.5 * x * (1.0 + tl.math.erf(x * SQRT_HALF))
    elif act == ACT_GELU_TANH:
        y = 0.5 * x * (1.0 + _tanh((x + x * x * x * GELU_TANH_C) * SQRT_2_OVER_PI))
    elif act == ACT_RELU:
        y = tl.where(x < 0.0, 0.0, x)  # NaN stays NaN, as in torch
    elif act == ACT_SILU:
        y = x * tl.sigmoid(x)
    return y


@triton.jit
def _activation_grad(x, act):
    """act'(x) in fp32 (1 for code 0)."""
    g = tl.full(x.shape, 1.0, tl.float32)
    if act == ACT_GELU:
        g = 0.5 * (1.0 + tl.math.erf(x * SQRT_HALF)) + x * tl.exp(-0.5 * x * x) * INV_SQRT_2PI
    elif act == ACT_GELU_TANH:
        t = _tanh((x + x * x * x * GELU_TANH_C) * SQRT_2_OVER_PI)
        g = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (
            1.0 + x * x * (3.0 * GELU_TANH_C))
    elif act == ACT_RELU:
        g = tl.where(x > 0.0, 1.0, 0.0)
    elif act == ACT_SILU:
        s = tl.sigmoid(x)
        g = s * (1.0 + x * (1.0 - s))
    return g


@triton.jit
def _tile_position(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, row blocks taken GROUP_M at a time for L2 reuse."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _k_step(acc, a, b, BF16_INTERPRETED: tl.constexpr):
    """One K step of a tile: acc += a @ b in fp32."""
    if BF16_INTERPRETED:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)


@triton.jit
def _accumulate(acc, a_ptr, b_ptr, row0, col0, M, N, K,
                stride_am, stride_ak, stride_bk, stride_bn, BF16_INTERPRETED: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) += A[row0:, :] @ B[:, col0:] over all of K."""
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = (row0 + rm) < M
    n_ok = (col0 + rn) < N
    a_tile = a_ptr + row0.to(tl.int64) * stride_am + (rm[:, None] * stride_am +
                                                      rk[None, :] * stride_ak)  # (BM, BK)
    b_tile = b_ptr + col0.to(tl.int64) * stride_bn + (rk[:, None] * stride_bk +
                                                      rn[None, :] * stride_bn)  # (BK, BN)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        a = tl.load(a_tile, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_tile, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _k_step(acc, a, b, BF16_INTERPRETED)
        a_tile += BLOCK_K * stride_ak
        b_tile += BLOCK_K * stride_bk
    return acc


@triton.jit
def _accumulate_tma(acc, a_desc, b_desc, row0, col0, K, A_T: tl.constexpr,
                    B_T: tl.constexpr, BF16_INTERPRETED: tl.constexpr, BLOCK_K: tl.constexpr,
                    WS: tl.constexpr):
    """_accumulate with the tiles read by TMA (rows and columns past the ends read as zeros).
    a_desc describes A (M, K), or with A_T its transpose (K, M) (A a transposed view); b_desc
    B (K, N), or with B_T its transpose (N, K). WS: the loop warp-specialized."""
    for k0 in tl.range(0, K, BLOCK_K, warp_specialize=WS):
        if A_T:
            a = tl.trans(a_desc.load([k0, row0]))                           # (BM, BK)
        else:
            a = a_desc.load([row0, k0])
        if B_T:
            b = tl.trans(b_desc.load([col0, k0]))                           # (BK, BN)
        else:
            b = b_desc.load([k0, col0])
        acc = _k_step(acc, a, b, BF16_INTERPRETED)
    return acc


@triton.jit
def _tile_offsets(row0, col0, M, N, stride_m, stride_n,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Offsets (int64 base + local) and mask of the [row0:, col0:] tile of an (M, N) view."""
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    offs = (row0.to(tl.int64) * stride_m + col0.to(tl.int64) * stride_n +
            (rm[:, None] * stride_m + rn[None, :] * stride_n))
    mask = ((row0 + rm) < M)[:, None] & ((col0 + rn) < N)[None, :]
    return offs, mask


@triton.jit
def _store_tile(ptr, value, row0, col0, M, N, stride_m, stride_n, BF16_INTERPRETED: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Write the fp32 tile ``value`` at [row0:, col0:] of an (M, N) view in ptr's dtype."""
    offs, mask = _tile_offsets(row0, col0, M, N, stride_m, stride_n, BLOCK_M, BLOCK_N)
    tl.store(ptr + offs, to_dtype(value, ptr.dtype.element_ty, BF16_INTERPRETED), mask=mask)


@triton.jit
def _load_tile(ptr, row0, col0, M, N, stride_m, stride_n,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The [row0:, col0:] tile of an (M, N) view, in its own dtype."""
    offs, mask = _tile_offsets(row0, col0, M, N, stride_m, stride_n, BLOCK_M, BLOCK_N)
    return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def _epilogue_inputs(e1_ptr, e2_ptr, row0, col0, M, N, stride_em, stride_en,
                     EPILOGUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The epilogue's input tiles (E1 for EPI_ACT_GRAD and EPI_SWIGLU_GRAD, E2 for the latter;
    an unused one is a zero scalar), loaded before the K loop so their latency hides behind it."""
    e1 = 0.0
    e2 = 0.0
    if EPILOGUE >= EPI_ACT_GRAD:
        e1 = _load_tile(e1_ptr, row0, col0, M, N, stride_em, stride_en, BLOCK_M, BLOCK_N)
    if EPILOGUE == EPI_SWIGLU_GRAD:
        e2 = _load_tile(e2_ptr, row0, col0, M, N, stride_em, stride_en, BLOCK_M, BLOCK_N)
    return e1, e2


@triton.jit
def _tile_start(e1_ptr, e2_ptr, M, N, stride_em, stride_en, EPILOGUE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's tile: (row0, col0), the epilogue's input tiles and a zero fp32
    accumulator."""
    pid_m, pid_n = _tile_position(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    e1, e2 = _epilogue_inputs(e1_ptr, e2_ptr, row0, col0, M, N, stride_em, stride_en, EPILOGUE,
                              BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    return row0, col0, e1, e2, acc


@triton.jit
def _finish_tile(acc, e1, e2, bias_ptr, c_ptr, aux_ptr, aux2_ptr, row0, col0, M, N,
                 stride_cm, stride_cn, stride_em, stride_en, act, EPILOGUE: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BF16_INTERPRETED: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Everything after the K loop of the [row0:, col0:] tile: the bias, the epilogue (e1, e2:
    its input tiles) and the stores."""
    if HAS_BIAS:
        cols = col0 + tl.arange(0, BLOCK_N)
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out = acc
    if EPILOGUE == EPI_ACT:
        _store_tile(aux_ptr, acc, row0, col0, M, N, stride_em, stride_en, BF16_INTERPRETED,
                    BLOCK_M, BLOCK_N)
        out = _activation(acc, act)
    elif EPILOGUE == EPI_ACT_GRAD:
        pre = e1.to(tl.float32)
        _store_tile(aux_ptr, _activation(pre, act), row0, col0, M, N, stride_em, stride_en,
                    BF16_INTERPRETED, BLOCK_M, BLOCK_N)
        out = acc * _activation_grad(pre, act)
    elif EPILOGUE == EPI_SWIGLU_GRAD:
        gate = e1.to(tl.float32)
        up = e2.to(tl.float32)
        sig = tl.sigmoid(gate)
        _store_tile(aux_ptr, acc * gate * sig, row0, col0, M, N, stride_em, stride_en,
                    BF16_INTERPRETED, BLOCK_M, BLOCK_N)
        _store_tile(aux2_ptr, gate * sig * up, row0, col0, M, N, stride_em, stride_en,
                    BF16_INTERPRETED, BLOCK_M, BLOCK_N)
        out = acc * up * sig * (1.0 + gate * (1.0 - sig))
    _store_tile(c_ptr, out, row0, col0, M, N, stride_cm, stride_cn, BF16_INTERPRETED,
                BLOCK_M, BLOCK_N)


def tile_configs(tensor_core, fp32):
    """Configs as (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps): one when interpreting; on a GPU
    the tensor-core ones (16-bit) and the BLOCK_K=32 ones (fp32, FMA), told apart by BLOCK_K."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4},
                              num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8},
                          num_stages=s, num_warps=w) for m, n, k, s, w in tensor_core + fp32]


# Problems under this many multiply-adds take the last (smallest) config without tuning.
TUNE_MIN_MACS = 1 << 30
# Accumulator elements per thread beyond which an epilogue spills (ptxas, sm_90): the plain
# and activation epilogues fit 128, the gradient epilogues (extra input tiles) 64.
MAX_ACC_PER_THREAD = {0: 128, 1: 128, 2: 64, 3: 64}


def _acc_per_thread(config) -> int:
    """Accumulator elements a thread holds: a warp-specialized config's two consumer warp
    groups of num_warps each share the tile."""
    holders = 32 * config.num_warps * (2 if config.kwargs.get("WS") else 1)
    return config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] // holders


def prune_configs(configs, named_args, **kwargs):
    """fp32 takes its first BLOCK_K=32 config; 16-bit types the tensor-core configs whose
    accumulator fits the epilogue's registers, all of them (autotuned) for large problems,
    the last one for small problems."""
    a = named_args["a_ptr"] if "a_ptr" in named_args else named_args["a_desc"].base
    fp32 = a.dtype == torch.float32
    kept = [c for c in configs if (c.kwargs["BLOCK_K"] == 32) == fp32] or configs
    if fp32:
        return kept[:1]
    limit = MAX_ACC_PER_THREAD[kwargs.get("EPILOGUE", 0)]
    kept = [c for c in kept if _acc_per_thread(c) <= limit] or kept[-1:]
    small = named_args["M"] * named_args["N"] * named_args["K"] < TUNE_MIN_MACS
    return kept[-1:] if small else kept


# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps) of the 16-bit matmul's autotuning candidates.
MATMUL_TILES = [(128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (256, 128, 64, 3, 8),
                (128, 128, 64, 4, 8), (128, 128, 64, 3, 4), (64, 128, 64, 4, 4)]
MATMUL_CONFIGS = tile_configs(tensor_core=MATMUL_TILES, fp32=[(64, 64, 32, 3, 4)])


@triton.autotune(configs=MATMUL_CONFIGS,
                 key=["M", "N", "K", "stride_am", "stride_bk", "EPILOGUE"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit(do_not_specialize=["act"])
def _matmul_kernel(a_ptr, b_ptr, a2_ptr, b2_ptr, bias_ptr, c_ptr, aux_ptr, aux2_ptr, e1_ptr,
                   e2_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                   stride_cm, stride_cn, stride_em, stride_en, act,
                   EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, SECOND_PAIR: tl.constexpr,
                   BF16_INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C (M, N) = epilogue(A @ B [+ A2 @ B2] + bias).

    A, A2 (M, K) and B, B2 (K, N) share their strides; C is written through (stride_cm,
    stride_cn), AUX/AUX2/E1/E2 (M, N) through (stride_em, stride_en). The epilogue inputs are
    loaded before the K loop, so their latency hides behind it.
    """
    row0, col0, e1, e2, acc = _tile_start(e1_ptr, e2_ptr, M, N, stride_em, stride_en,
                                          EPILOGUE, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _accumulate(acc, a_ptr, b_ptr, row0, col0, M, N, K,
                      stride_am, stride_ak, stride_bk, stride_bn,
                      BF16_INTERPRETED, BLOCK_M, BLOCK_N, BLOCK_K)
    if SECOND_PAIR:
        acc = _accumulate(acc, a2_ptr, b2_ptr, row0, col0, M, N, K,
                          stride_am, stride_ak, stride_bk, stride_bn,
                          BF16_INTERPRETED, BLOCK_M, BLOCK_N, BLOCK_K)
    _finish_tile(acc, e1, e2, bias_ptr, c_ptr, aux_ptr, aux2_ptr, row0, col0, M, N,
                 stride_cm, stride_cn, stride_em, stride_en, act, EPILOGUE, HAS_BIAS,
                 BF16_INTERPRETED, BLOCK_M, BLOCK_N)


def _set_tma_blocks(nargs):
    """Config pre-hook: the descriptors' tile shapes for this config's blocks."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bk, bm] if nargs["A_T"] else [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk] if nargs["B_T"] else [bk, bn]


TMA_CONFIGS = [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages,
                             pre_hook=_set_tma_blocks)
               for c in tile_configs(tensor_core=MATMUL_TILES, fp32=[])]
# The warp-specialized matmul's candidates: num_warps is each warp group's (triton 3.6
# specializes 4-warp kernels on Hopper), so 128 x 256 holds 128 accumulators a thread. With the
# activation epilogue the two large tiles spill 168-272 bytes a thread after the K loop (sm_90,
# triton 3.6 and 3.8); the gradient epilogues spill at every tile, so they stay unspecialized.
WS_TILES = [(128, 256, 64, 3, 4), (256, 128, 64, 3, 4), (128, 256, 64, 4, 4),
            (128, 128, 64, 4, 4), (128, 64, 64, 4, 4)]
WS_EPILOGUES = (0, 1)
WS_CONFIGS = [triton.Config({**c.kwargs, "WS": True}, num_warps=c.num_warps,
                            num_stages=c.num_stages)
              for c in tile_configs(tensor_core=WS_TILES, fp32=[])]


@triton.autotune(configs=TMA_CONFIGS, key=["M", "N", "K", "A_T", "B_T", "EPILOGUE"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit(do_not_specialize=["act"])
def _matmul_tma_kernel(a_desc, b_desc, bias_ptr, c_ptr, aux_ptr, aux2_ptr, e1_ptr, e2_ptr,
                       M, N, K, stride_cm, stride_cn, stride_em, stride_en, act,
                       EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
                       A_T: tl.constexpr, B_T: tl.constexpr, BF16_INTERPRETED: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr):
    """_matmul_kernel (without the second pair) with A and B read through TMA descriptors
    (16-bit operands, Hopper and newer): the same tiles, K order and epilogue."""
    row0, col0, e1, e2, acc = _tile_start(e1_ptr, e2_ptr, M, N, stride_em, stride_en,
                                          EPILOGUE, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _accumulate_tma(acc, a_desc, b_desc, row0, col0, K, A_T, B_T,
                          BF16_INTERPRETED, BLOCK_K, False)
    _finish_tile(acc, e1, e2, bias_ptr, c_ptr, aux_ptr, aux2_ptr, row0, col0, M, N,
                 stride_cm, stride_cn, stride_em, stride_en, act, EPILOGUE, HAS_BIAS,
                 BF16_INTERPRETED, BLOCK_M, BLOCK_N)


@triton.autotune(configs=WS_CONFIGS, key=["M", "N", "K", "A_T", "B_T", "EPILOGUE"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def _matmul_ws_kernel(a_ptr, b_ptr, bias_ptr, c_ptr, aux_ptr, aux2_ptr, e1_ptr, e2_ptr,
                      M, N, K, lda, ldb, stride_cm, stride_cn, stride_em, stride_en,
                      ACT: tl.constexpr, EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
                      A_T: tl.constexpr, B_T: tl.constexpr, BF16_INTERPRETED: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, WS: tl.constexpr):
    """_matmul_tma_kernel with its K loop warp-specialized (WS, set by every config; the
    activation a constexpr: a run-time branch after the loop stops the specialization): a
    producer warp group issues the TMA loads while two consumer warp groups each run the wgmma
    of half the tile's rows. A and B are the row-major matrices behind the operands (A (M, K),
    or with A_T its transpose (K, M); B (K, N), or with B_T (N, K)), row strides lda and ldb,
    read through device-side descriptors (triton 3.8 rejects host descriptors' tiles in a
    warp-specialized loop). The epilogue's input tiles are loaded after the loop: pointer
    loads beside it are what triton 3.6's token lowering rejects."""
    row0, col0, e1, e2, acc = _tile_start(e1_ptr, e2_ptr, M, N, stride_em, stride_en,
                                          EPI_NONE, BLOCK_M, BLOCK_N, GROUP_M)
    if A_T:
        a_desc = tl.make_tensor_descriptor(a_ptr, [K, M], [lda, 1], [BLOCK_K, BLOCK_M])
    else:
        a_desc = tl.make_tensor_descriptor(a_ptr, [M, K], [lda, 1], [BLOCK_M, BLOCK_K])
    if B_T:
        b_desc = tl.make_tensor_descriptor(b_ptr, [N, K], [ldb, 1], [BLOCK_N, BLOCK_K])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, [K, N], [ldb, 1], [BLOCK_K, BLOCK_N])
    acc = _accumulate_tma(acc, a_desc, b_desc, row0, col0, K, A_T, B_T,
                          BF16_INTERPRETED, BLOCK_K, WS)
    e1, e2 = _epilogue_inputs(e1_ptr, e2_ptr, row0, col0, M, N, stride_em, stride_en,
                              EPILOGUE, BLOCK_M, BLOCK_N)
    _finish_tile(acc, e1, e2, bias_ptr, c_ptr, aux_ptr, aux2_ptr, row0, col0, M, N,
                 stride_cm, stride_cn, stride_em, stride_en, ACT, EPILOGUE, HAS_BIAS,
                 BF16_INTERPRETED, BLOCK_M, BLOCK_N)


def bf16_interpreted(dtype: torch.dtype) -> bool:
    """bf16 under the interpreter: tl.dot gets fp32 operands (bf16 dots are wrong there) and
    casts to bf16 round explicitly (the interpreter truncates)."""
    return interpreting() and dtype == torch.bfloat16


def matmul(a, b, out, *, bias=None, activation=None, epilogue=EPI_NONE.value, aux=None,
           aux2=None, e1=None, e2=None, a2=None, b2=None):
    """out (M, N) <- epilogue(a @ b [+ a2 @ b2] + bias); any strides.

    a, a2 (M, K) and b, b2 (K, N) share strides; ``out`` may be a transposed view (written
    through its strides); aux, aux2, e1, e2 (M, N) share one set of strides.
    """
    m, k = a.shape
    n = b.shape[1]
    pairs = (("a2", a2, a), ("b2", b2, b)) + tuple(
        (name, t, aux) for name, t in (("aux2", aux2), ("e1", e1), ("e2", e2)))
    for name, t, like in pairs:
        if t is not None and like is not None and t.stride() != like.stride():
            raise ValueError(f"{name} must have the strides of its partner, got {t.stride()}")
    extra = aux if aux is not None else out
    bias = bias.contiguous() if bias is not None else None

    def grid(meta):
        return (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)

    def or_out(t):
        return out if t is None else t

    act = 0 if activation is None else ACTIVATION_CODES[activation]
    if a2 is None and use_tma(a, b):
        (a_matrix, a_t), (b_matrix, b_t) = _tma_layout(a), _tma_layout(b)
        constexprs = dict(EPILOGUE=epilogue, HAS_BIAS=bias is not None, A_T=a_t, B_T=b_t,
                          BF16_INTERPRETED=bf16_interpreted(a.dtype))
        tail = (or_out(bias), out, or_out(aux), or_out(aux2), or_out(e1), or_out(e2), m, n, k)
        strides = (out.stride(0), out.stride(1), extra.stride(0), extra.stride(1))
        if _switched_on(WS_ENV) and epilogue in WS_EPILOGUES:
            args = (a_matrix, b_matrix) + tail + (a_matrix.stride(0), b_matrix.stride(0))
            key = (m, n, k, a_t, b_t, epilogue, act) + dtypes(args)
            with descriptor_scratch(a.device):
                launch_tuned(_matmul_ws_kernel, grid, args + strides, {**constexprs, "ACT": act},
                             key)
            return out
        args = (_descriptor(a_matrix), _descriptor(b_matrix)) + tail
        key = (m, n, k, a_t, b_t, epilogue, a.dtype) + dtypes(args)
        launch_tuned(_matmul_tma_kernel, grid, args + strides + (act,), constexprs, key)
        return out
    args = (a, b, or_out(a2), or_out(b2), or_out(bias), out, or_out(aux), or_out(aux2),
            or_out(e1), or_out(e2), m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            out.stride(0), out.stride(1), extra.stride(0), extra.stride(1), act)
    constexprs = dict(EPILOGUE=epilogue, HAS_BIAS=bias is not None, SECOND_PAIR=b2 is not None,
                      BF16_INTERPRETED=bf16_interpreted(a.dtype))
    key = (m, n, k, a.stride(0), b.stride(0), epilogue) + dtypes(args)
    launch_tuned(_matmul_kernel, grid, args, constexprs, key)
    return out


def _switched_on(env: str) -> bool:
    return os.environ.get(env, "0") == "1"


def use_tma(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the product a @ b reads its operands through TMA descriptors: only when
    $LLM_KERNELS_MATMUL_TMA or $LLM_KERNELS_MATMUL_WS is 1 (off by default until timed against
    the pointer loads), for 16-bit operands on a Hopper or newer GPU (or the interpreter), each
    a row-major matrix or a transposed one whose rows start on 16-byte boundaries, as TMA
    requires."""
    switched_on = _switched_on(TMA_ENV) or _switched_on(WS_ENV)
    if not switched_on or a.dtype not in (torch.float16, torch.bfloat16):
        return False
    return tma_device(a) and all(_tma_layout(t) is not None for t in (a, b))


def tma_device(t: torch.Tensor) -> bool:
    """Whether t's device reads through TMA: a Hopper or newer GPU, or the interpreter."""
    return interpreting() or (t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9)


def _tma_layout(t: torch.Tensor):
    """(matrix, transposed) for a 2D view that TMA can read: the row-major matrix behind t
    (t itself, or t.T when t is a transposed view), or None."""
    if t.stride(1) == 1:
        matrix, transposed = t, False
    elif t.stride(0) == 1:
        matrix, transposed = t.t(), True
    else:
        return None
    row_bytes = matrix.stride(0) * matrix.element_size()
    if matrix.data_ptr() % 16 or row_bytes % 16 or matrix.shape[1] * matrix.element_size() < 16:
        return None
    return matrix, transposed


def _descriptor(matrix: torch.Tensor):
    """A host TMA descriptor of a row-major matrix; its tile shape is set per config by
    _set_tma_blocks."""
    return TensorDescriptor.from_tensor(matrix, [16, 16])


@triton.jit
def _column_sum_kernel(x_ptr, out_ptr, R, C, stride_r, rows_per_program,
                       BF16_INTERPRETED: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """out[p, c] = sum of x[r, c] over rows r of chunk p (fp32, fixed order)."""
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    rows = tl.arange(0, BLOCK_R)
    first = pid_r * rows_per_program
    last = tl.minimum(first + rows_per_program, R)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in range(first, last, BLOCK_R):
        mask = ((r0 + rows) < last)[:, None] & c_ok[None, :]
        ptrs = x_ptr + (r0 + rows)[:, None].to(tl.int64) * stride_r + cols[None, :]
        acc += tl.sum(tl.load(ptrs, mask=mask, other=0.0).to(tl.float32), axis=0)
    tl.store(out_ptr + pid_r * C + cols,
             to_dtype(acc, out_ptr.dtype.element_ty, BF16_INTERPRETED), mask=c_ok)


ROWS_PER_PROGRAM = 256


def column_sum(x: torch.Tensor) -> torch.Tensor:
    """x (R, C) with a contiguous last dim -> (C,) column sums in x's dtype, deterministic:
    fp32 partial sums over chunks of rows, then one pass over the partials."""
    r, c = x.shape
    block_r, block_c = (32, 64) if interpreting() else (32, 128)
    chunks = cdiv(r, ROWS_PER_PROGRAM)
    partial = torch.empty((chunks, c), dtype=torch.float32, device=x.device)  # (P, C)
    _column_sum_kernel[(cdiv(c, block_c), chunks)](
        x, partial, r, c, x.stride(0), ROWS_PER_PROGRAM, BF16_INTERPRETED=False,
        BLOCK_R=block_r, BLOCK_C=block_c)
    out = torch.empty((c,), dtype=x.dtype, device=x.device)
    _column_sum_kernel[(cdiv(c, block_c), 1)](
        partial, out, chunks, c, partial.stride(0), chunks,
        BF16_INTERPRETED=bf16_interpreted(x.dtype), BLOCK_R=block_r, BLOCK_C=block_c)
    return out


def _no_bias(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((0,))


def feed_forward_forward(x, w1, b1, w2, b2, activation: str):
    """x (N, d), w1 (d_ff, d), w2 (d_out, d_ff), biases or None -> out (N, d_out), pre (N, d_ff).

    pre = x @ w1.T + b1 and h = act(pre) come out of one epilogue; out = h @ w2.T + b2.
    """
    n, d_ff = x.shape[0], w1.shape[0]
    pre = x.new_empty((n, d_ff))
    h = x.new_empty((n, d_ff))
    matmul(x, w1.t(), h, bias=b1, activation=activation, epilogue=EPI_ACT.value, aux=pre)
    out = matmul(h, w2.t(), x.new_empty((n, w2.shape[0])), bias=b2)
    return out, pre


def feed_forward_backward(grad_out, x, w1, b1, w2, b2, pre, activation: str):
    """Gradients of act(x @ w1.T + b1) @ w2.T + b2 -> (dx, dw1, db1, dw2, db2).

    dpre = (grad_out @ w2) * act'(pre) and h = act(pre) from one epilogue; dx = dpre @ w1;
    dw1 = dpre.T @ x; dw2 = grad_out.T @ h, computed as (h.T @ grad_out).T;
    db1, db2 = column sums of dpre, grad_out (empty when the bias is absent).
    """
    dpre = pre.new_empty(pre.shape)                                     # (N, d_ff)
    h = pre.new_empty(pre.shape)                                        # (N, d_ff)
    matmul(grad_out, w2, dpre, activation=activation, epilogue=EPI_ACT_GRAD.value, aux=h, e1=pre)
    dx = matmul(dpre, w1, x.new_empty(x.shape))                         # (N, d)
    dw1 = matmul(dpre.t(), x, w1.new_empty(w1.shape))                   # (d_ff, d)
    dw2 = w2.new_empty(w2.shape)                                        # (d_out, d_ff)
    matmul(h.t(), grad_out, dw2.t())
    db1 = column_sum(dpre) if b1 is not None else _no_bias(x)           # (d_ff,)
    db2 = column_sum(grad_out) if b2 is not None else _no_bias(x)       # (d_out,)
    return dx, dw1, db1, dw2, db2
