"""Attention of the compiled backend ``cuda`` (csrc/attention_cpu.cpp on CPU tensors,
csrc/attention_cuda.cu on CUDA tensors) against the float64 reference, by the pass rule.

Every case runs ``lk.attention(..., backend="cuda")`` forward and backward and compares the
output and the gradients of q, k, v with ``attention_ref(..., upcast=True)``; the same-dtype torch
backend sets the error budget. The unmarked tests run the C++ CPU kernels (skipped with the
reason when llm_kernels._C is not built); the tests marked ``cuda`` run the CUDA kernels at
realistic sizes: the tensor-core paths (fp16/bf16, D padded to 64/128/256), and the float32
SIMT path (float32, D % 8 != 0, and the backward at D > 128).
"""
import pytest
import torch

import attention_check
import llm_kernels as lk
from attention_check import make_qkv
from llm_kernels._ops import CUDA_ATTENTION_WARP_ROWS_ENV
from llm_kernels.backends import extension_status

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def needs_extension():
    ok, why = extension_status()
    if not ok:
        pytest.skip(f"the cuda backend is not built: {why}")


def check_attention(q, k, v, **kwargs):
    """Forward and backward of the cuda backend against the fp64 reference."""
    return attention_check.check_attention("cuda", q, k, v, **kwargs)


def assert_rows_zero(t, rows):
    """t[b, h, i] == 0 exactly for every (b, h, i) in rows."""
    for b, h, i in rows:
        assert torch.equal(t[b, h, i], torch.zeros_like(t[b, h, i]))


def backward_twice(q, k, v, causal, attn_mask=None):
    grad_out = None
    grads = []
    for _ in range(2):
        out = lk.attention(q, k, v, causal=causal, attn_mask=attn_mask, backend="cuda")
        grad_out = torch.randn_like(out) if grad_out is None else grad_out
        grads.append(torch.autograd.grad(out, (q, k, v), grad_out))
    return grads


# ---------------------------------------------------------------------------------------------
# C++ CPU kernels
# ---------------------------------------------------------------------------------------------

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("length,causal,d", [(1, False, 16), (1, True, 64), (17, True, 40),
                                              (17, False, 80), (97, True, 64), (97, False, 128),
                                              (128, True, 80), (128, False, 40)])
def test_cpu_self_attention(length, causal, d, dtype):
    q, k, v = make_qkv(2, 4, 2, length, length, d, dtype, CPU)
    check_attention(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lq,lk_,causal", [(17, 97, True), (97, 17, True), (64, 33, False),
                                           (1, 300, False), (1, 300, True), (200, 600, True),
                                           (300, 600, False)])
def test_cpu_cross_attention(lq, lk_, causal, dtype):
    """Lq != Lk both ways (causal is bottom-right aligned), decode (Lq = 1) over a cache, and
    several query and key tiles with tails (Lq 200 / 300 over the CPU forward's 128 causal /
    256 query rows, Lk = 600 over its 512-key tile)."""
    q, k, v = make_qkv(2, 2, 1, lq, lk_, 40, dtype, CPU)
    out, dq, _, _ = check_attention(q, k, v, causal=causal)
    if causal and lq > lk_:
        blind = [(b, h, i) for b in range(2) for h in range(2) for i in range(lq - lk_)]
        assert_rows_zero(out, blind)
        assert_rows_zero(dq, blind)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hkv", [1, 2])
def test_cpu_gqa(hkv, dtype):
    q, k, v = make_qkv(2, 4, hkv, 45, 45, 32, dtype, CPU)
    check_attention(q, k, v, causal=True)


@pytest.mark.parametrize("d", [8, 20, 256])
def test_cpu_head_dims(d):
    q, k, v = make_qkv(1, 2, 1, 33, 33, d, torch.float16, CPU)
    check_attention(q, k, v, causal=True, scale=0.7 / d ** 0.5)


@pytest.mark.parametrize("scale", [-0.3, 0.0], ids=["negative", "zero"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cpu_non_positive_scale(scale, causal):
    q, k, v = make_qkv(2, 2, 1, 37, 50, 24, torch.float16, CPU)
    check_attention(q, k, v, causal=causal, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_padding_mask(dtype):
    """Bool key-padding mask (B, 1, 1, Lk): batch 1 attends to its first 23 keys only, so the
    other keys get exactly zero dk, dv there."""
    b, lq, lk_ = 2, 37, 50
    q, k, v = make_qkv(b, 2, 2, lq, lk_, 32, dtype, CPU)
    keep = torch.ones(b, 1, 1, lk_, dtype=torch.bool)
    keep[1, ..., 23:] = False
    _, _, dk, dv = check_attention(q, k, v, attn_mask=keep)
    assert torch.equal(dk[1, :, 23:], torch.zeros_like(dk[1, :, 23:]))
    assert torch.equal(dv[1, :, 23:], torch.zeros_like(dv[1, :, 23:]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_additive_mask(causal, dtype):
    """A float bias (B, H, Lq, Lk) in q's dtype, with causal on top."""
    q, k, v = make_qkv(2, 2, 1, 40, 52, 32, dtype, CPU)
    bias = torch.randn(2, 2, 40, 52, dtype=dtype)
    check_attention(q, k, v, causal=causal, attn_mask=bias)


@pytest.mark.parametrize("shape,kind", [((50,), "bool"), ((21, 50), "float32"),
                                        ((2, 1, 21, 1), "bfloat16"), ((1, 2, 1, 50), "bool"),
                                        ((2, 2, 21, 50), "float16")], ids=str)
def test_cpu_broadcast_masks(shape, kind):
    """Masks of every broadcastable shape are read through 0 strides, in their own dtype."""
    q, k, v = make_qkv(2, 2, 1, 21, 50, 16, torch.float32, CPU)
    if kind == "bool":
        mask = torch.rand(shape) > 0.3
        mask[..., 0] = True
    else:
        mask = torch.randn(shape).to(getattr(torch, kind))
    check_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_fully_masked_rows(dtype):
    """A query row that sees no key (bool mask all False, or an additive row of -inf) gives
    exactly 0 output and 0 gradient, never NaN."""
    b, h, lq, lk_ = 2, 2, 19, 70
    q, k, v = make_qkv(b, h, h, lq, lk_, 32, dtype, CPU)
    keep = torch.rand(b, h, lq, lk_) > 0.2
    keep[0, 1, 5] = False
    keep[1, 0, 18] = False
    out, dq, dk, dv = check_attention(q, k, v, attn_mask=keep)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert_rows_zero(out, [(0, 1, 5), (1, 0, 18)])
    assert_rows_zero(dq, [(0, 1, 5), (1, 0, 18)])
    bias = torch.zeros(lq, lk_, dtype=dtype)
    bias[3] = float("-inf")
    out, dq, _, _ = check_attention(q, k, v, attn_mask=bias, causal=True)
    assert_rows_zero(out, [(i, j, 3) for i in range(b) for j in range(h)])
    assert_rows_zero(dq, [(i, j, 3) for i in range(b) for j in range(h)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_non_contiguous_inputs(causal, dtype):
    """(B, L, H, D) tensors transposed to (B, H, L, D) and an expanded (stride 0) grad_out."""
    q, k, v = make_qkv(2, 4, 2, 29, 41, 48, dtype, CPU, seq_major=True)
    assert not q.is_contiguous() and q.stride(-1) == 1
    check_attention(q, k, v, causal=causal)
    grad_out = torch.randn(1, 1, 1, 48, dtype=dtype).expand(2, 4, 29, 48)
    check_attention(q, k, v, causal=causal, grad_out=grad_out)


@pytest.mark.parametrize("threads", [1, 64], ids=["one_pass", "two_passes"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cpu_backward_schedules(threads, causal):
    """The C++ backward runs in one pass (a task per batch x kv head) when there are at least
    two such tasks per thread, else in two (per query tile, per key tile): both by the pass
    rule, with GQA (group 3), a padding mask and tails of every tile."""
    q, k, v = make_qkv(2, 6, 2, 200, 300, 40, torch.bfloat16, CPU)
    keep = torch.ones(2, 1, 1, 300, dtype=torch.bool)
    keep[1, ..., 250:] = False
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_attention(q, k, v, causal=causal, attn_mask=keep)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_single_key_row_has_exactly_zero_dq(dtype):
    """Causal row 0 sees key 0 alone: its softmax has no gradient, and dP - delta is exactly 0
    because dP and delta come from the same dot-product sequence (a key tile of 128 columns and
    one of 44, the delta's single column)."""
    q, k, v = make_qkv(2, 4, 2, 300, 300, 64, dtype, CPU)
    out = lk.attention(q, k, v, causal=True, backend="cuda")
    dq, = torch.autograd.grad(out, (q,), torch.randn_like(out))
    assert torch.equal(dq[:, :, 0], torch.zeros_like(dq[:, :, 0]))
    assert dq[:, :, 1:].abs().amax() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_backward_deterministic(dtype):
    q, k, v = make_qkv(2, 4, 2, 200, 300, 64, dtype, CPU)
    first, second = backward_twice(q, k, v, causal=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_cpu_op_preconditions():
    """The C++ entry points reject bad inputs with a message naming the problem."""
    ops = torch.ops.llm_kernels
    q, k, v = (torch.randn(1, 4, 8, 16) for _ in range(3))
    with pytest.raises(RuntimeError, match="share one dtype"):
        ops.attention_forward(q, k.half(), v, None, False, 0, 0.25)
    with pytest.raises(RuntimeError, match="the query heads H=4 must be a multiple of the "
                                           "key/value heads Hkv=3"):
        ops.attention_forward(q, k[:, :3], v[:, :3], None, False, 0, 0.25)
    with pytest.raises(RuntimeError, match="contiguous last dim"):
        ops.attention_forward(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, None, False,
                              0, 0.25)
    with pytest.raises(RuntimeError, match=r"mask must have shape \(B, H, Lq, Lk\) = "
                                           r"\(1, 4, 8, 8\).*got \[1, 4, 8, 7\]"):
        ops.attention_forward(q, k, v, torch.zeros(1, 4, 8, 7), False, 0, 0.25)
    with pytest.raises(RuntimeError, match="head dim D must be in"):
        big = torch.randn(1, 1, 2, 257)
        ops.attention_forward(big, big, big, None, False, 0, 0.25)
    out, lse = ops.attention_forward(q, k, v, None, False, 0, 0.25)
    with pytest.raises(RuntimeError, match="lse must be float32"):
        ops.attention_backward(out, q, k, v, out, lse.double(), None, False, 0, 0.25)


# ---------------------------------------------------------------------------------------------
# CUDA kernels (realistic sizes)
# ---------------------------------------------------------------------------------------------

GPU = torch.device("cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("b,h,hkv,lq,lk_,d,causal", [
    (2, 8, 8, 1024, 1024, 64, False),
    (2, 8, 8, 1024, 1024, 128, True),
    (1, 4, 4, 4096, 4096, 64, True),
    (1, 4, 2, 4096, 4096, 128, False),
    (2, 4, 1, 1000, 3000, 64, True),
    (2, 4, 4, 3001, 1999, 128, True),
    (3, 4, 2, 1, 4097, 128, True),
])
def test_cuda_tensor_cores(b, h, hkv, lq, lk_, d, causal, dtype):
    """The fp16/bf16 fast paths (D = 64, 128) at realistic sizes: GQA, Lq != Lk, decode."""
    q, k, v = make_qkv(b, h, hkv, lq, lk_, d, dtype, GPU)
    check_attention(q, k, v, causal=causal)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("b,h,hkv,lq,lk_,d,causal", [
    (2, 8, 8, 1024, 1024, 64, False),
    (1, 4, 2, 4096, 4096, 128, True),
    (2, 4, 4, 3001, 1999, 128, True),
    (2, 4, 2, 777, 1031, 96, False),
    (3, 4, 2, 1, 4097, 64, True),
])
def test_cuda_two_m_tiles_per_warp(monkeypatch, b, h, hkv, lq, lk_, d, causal, dtype):
    """The tensor-core forward and (D <= 64) dQ with 32 query rows per warp (opt-in)."""
    monkeypatch.setenv(CUDA_ATTENTION_WARP_ROWS_ENV, "32")
    q, k, v = make_qkv(b, h, hkv, lq, lk_, d, dtype, GPU)
    check_attention(q, k, v, causal=causal)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("b,h,hkv,lq,lk_,d,causal", [
    (8, 32, 8, 1, 16384, 128, True),  # the benchmark's decode step: 64 kv heads, split 6 ways
    (4, 8, 1, 2, 5000, 64, True),  # MQA, 2 new tokens: 16 rows per kv head
    (2, 16, 16, 4, 3001, 256, True),  # D 256: key tiles of 32
    (1, 6, 2, 5, 700, 96, False),  # 15 rows, D padded to 128
    (64, 8, 8, 1, 100, 64, False),  # more kv heads than a wave holds: one split each
    (2, 32, 4, 4, 4097, 128, True),  # 4 draft tokens, group 8: 32 rows, two m-tiles
    (1, 16, 2, 3, 2000, 64, False),  # 24 rows
])
def test_cuda_decode(b, h, hkv, lq, lk_, d, causal, dtype):
    """Flash-decoding (group * Lq <= 32 query rows per kv head, 16 at D 256): the group's rows
    as one or two m-tiles, the keys split over blocks and warps, the splits merged."""
    q, k, v = make_qkv(b, h, hkv, lq, lk_, d, dtype, GPU)
    check_attention(q, k, v, causal=causal)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_decode_small_splits_masked(dtype):
    """Decode over a padded cache (small enough for compute-sanitizer): batch 1 sees its first
    300 keys, batch 2 none (zeros, whatever the split)."""
    b, h, hkv, lk_ = 3, 8, 2, 1500
    q, k, v = make_qkv(b, h, hkv, 1, lk_, 64, dtype, GPU)
    keep = torch.ones(b, 1, 1, lk_, dtype=torch.bool, device=GPU)
    keep[1, ..., 300:] = False
    keep[2] = False
    out, dq, dk, dv = check_attention(q, k, v, attn_mask=keep)
    assert_rows_zero(out, [(2, i, 0) for i in range(h)])
    assert_rows_zero(dq, [(2, i, 0) for i in range(h)])
    assert torch.equal(dk[1, :, 300:], torch.zeros_like(dk[1, :, 300:]))
    assert torch.equal(dv[2], torch.zeros_like(dv[2]))


@pytest.mark.cuda
def test_cuda_warp_rows_switch_is_checked(monkeypatch):
    monkeypatch.setenv(CUDA_ATTENTION_WARP_ROWS_ENV, "24")
    q, k, v = make_qkv(1, 2, 2, 64, 64, 64, torch.bfloat16, GPU)
    with pytest.raises(RuntimeError, match="LLM_KERNELS_CUDA_ATTENTION_WARP_ROWS must be 16 or "
                                           "32, got '24'"):
        lk.attention(q, k, v, backend="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [40, 96, 160, 256])
def test_cuda_padded_head_dims(d, dtype):
    """D padded to 64/128/256 in shared memory (the backward at D > 128 runs the SIMT path)."""
    q, k, v = make_qkv(2, 4, 2, 777, 1031, d, dtype, GPU)
    check_attention(q, k, v, causal=True)


@pytest.mark.cuda
@pytest.mark.parametrize("d,causal", [(64, True), (128, False), (20, True), (256, False)])
def test_cuda_float32(d, causal):
    q, k, v = make_qkv(2, 4, 2, 1031, 1031, d, torch.float32, GPU)
    check_attention(q, k, v, causal=causal)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_tiny_shapes(dtype):
    """Single rows and tails of every tile size, with GQA and causal."""
    for lq, lk_, d in ((1, 1, 64), (17, 17, 128), (97, 33, 40), (128, 129, 64)):
        q, k, v = make_qkv(2, 4, 2, lq, lk_, d, dtype, GPU)
        check_attention(q, k, v, causal=True)
        check_attention(q, k, v, causal=False)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_tiny_shapes_two_m_tiles(monkeypatch, dtype):
    """test_cuda_tiny_shapes with 32 query rows per warp in the tensor-core forward and dQ
    (small enough for compute-sanitizer)."""
    monkeypatch.setenv(CUDA_ATTENTION_WARP_ROWS_ENV, "32")
    for lq, lk_, d in ((1, 1, 64), (17, 17, 128), (97, 33, 40), (130, 129, 64)):
        q, k, v = make_qkv(2, 4, 2, lq, lk_, d, dtype, GPU)
        check_attention(q, k, v, causal=True)
        check_attention(q, k, v, causal=False)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_masks(dtype):
    """Key padding (bool), an additive bias in another dtype with a row of -inf (zero output and
    gradient), causal on top."""
    b, h, lq, lk_ = 2, 8, 1500, 2100
    q, k, v = make_qkv(b, h, 2, lq, lk_, 128, dtype, GPU)
    keep = torch.ones(b, 1, 1, lk_, dtype=torch.bool, device=GPU)
    keep[1, ..., 1700:] = False
    _, _, dk, dv = check_attention(q, k, v, attn_mask=keep)
    assert torch.equal(dk[1, :, 1700:], torch.zeros_like(dk[1, :, 1700:]))
    assert torch.equal(dv[1, :, 1700:], torch.zeros_like(dv[1, :, 1700:]))
    bias = torch.randn(1, h, lq, lk_, device=GPU).to(torch.bfloat16)
    bias[0, 3, 7] = float("-inf")
    out, dq, _, _ = check_attention(q, k, v, attn_mask=bias, causal=True)
    for t in (out, dq):
        assert torch.isfinite(t).all()
    assert_rows_zero(out, [(0, 3, 7), (1, 3, 7)])
    assert_rows_zero(dq, [(0, 3, 7), (1, 3, 7)])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_non_contiguous_inputs(dtype):
    """(B, L, H, D) views transposed (aligned strides: read in place) and views whose row stride
    is not a multiple of 16 bytes (copied), plus an expanded grad_out."""
    q, k, v = make_qkv(2, 8, 2, 700, 900, 64, dtype, GPU, seq_major=True)
    check_attention(q, k, v, causal=True)
    odd = torch.randn(2, 8, 700, 65, dtype=dtype, device=GPU)[..., :64].requires_grad_()
    grad_out = torch.randn(1, 1, 1, 64, dtype=dtype, device=GPU).expand(2, 8, 700, 64)
    check_attention(odd, k, v, causal=False, grad_out=grad_out)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_backward_deterministic(dtype):
    q, k, v = make_qkv(1, 8, 2, 2048, 2048, 128, dtype, GPU)
    first, second = backward_twice(q, k, v, causal=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
