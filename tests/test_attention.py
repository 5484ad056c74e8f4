"""Triton flash attention (kernels/attention.py) against the float64 reference, by the pass rule.

Every case runs ``lk.attention(..., backend="triton")`` forward and backward and compares the
output and the gradients of q, k, v with ``attention_ref(..., upcast=True)``; the same-dtype torch
backend sets the error budget. Shapes are tiny on CPU (the kernels run under the Triton
interpreter there); the tests marked ``cuda`` repeat them at realistic sizes on a GPU.
"""
import pytest
import torch
import torch.nn.functional as F

import attention_check
import llm_kernels as lk
from attention_check import leaf64, make_qkv
from llm_kernels.attention import AttentionFunction
from llm_kernels.backends import dispatch_log, interpreting
from llm_kernels.kernels import attention as kernels
from llm_kernels.numerics import assert_close
from llm_kernels.reference import sdpa_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check_attention(q, k, v, **kwargs):
    """Forward and backward of the triton backend against the fp64 reference."""
    return attention_check.check_attention("triton", q, k, v, **kwargs)


# ---------------------------------------------------------------------------------------------
# Interpreter-sized tests (also run on a GPU)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("length,causal,d", [(1, False, 16), (17, True, 40), (64, False, 64),
                                              (97, True, 80), (128, True, 128)])
def test_self_attention(length, causal, d, dtype, device):
    q, k, v = make_qkv(2, 2, 2, length, length, d, dtype, device)
    check_attention(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lq,lk_,causal", [(17, 97, True), (97, 17, True), (64, 33, False)])
def test_cross_attention(lq, lk_, causal, dtype, device):
    """Lq != Lk both ways; causal is bottom-right aligned, so with Lq > Lk the first Lq - Lk
    queries see no key: zero output and zero gradient there."""
    q, k, v = make_qkv(2, 2, 1, lq, lk_, 32, dtype, device)
    out, dq, _, _ = check_attention(q, k, v, causal=causal)
    if causal and lq > lk_:
        blind = slice(0, lq - lk_)
        assert torch.equal(out[:, :, blind], torch.zeros_like(out[:, :, blind]))
        assert torch.equal(dq[:, :, blind], torch.zeros_like(dq[:, :, blind]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lq,causal", [(1, False), (4, True)])
def test_decode_split_keys(lq, causal, dtype, device):
    """Few queries against a long cache run the flash-decoding path (keys split across
    programs, GQA group rows together), checked here to be the path taken."""
    b, h, hkv, lk_ = 1, 4, 2, 300
    assert kernels.split_plan(b, hkv, h // hkv, lq, lk_, kernels._device_sm_count(device))
    q, k, v = make_qkv(b, h, hkv, lq, lk_, 64, dtype, device)
    check_attention(q, k, v, causal=causal)


def test_decode_split_masked(device):
    """Flash-decoding with a padding mask: a key split that sees nothing for batch 0 (keys 150+
    masked) and a row that sees no key at all (batch 1) combine to the right result, zeros (and
    zero gradients) for the blind row."""
    b, h, hkv, lk_ = 2, 4, 2, 300
    assert kernels.split_plan(b, hkv, h // hkv, 1, lk_, kernels._device_sm_count(device))
    q, k, v = make_qkv(b, h, hkv, 1, lk_, 32, torch.bfloat16, device)
    keep = torch.zeros(b, 1, 1, lk_, dtype=torch.bool, device=device)
    keep[0, ..., :150] = True
    out, dq, dk, dv = check_attention(q, k, v, attn_mask=keep)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    for g in (dq[1], dk[1], dv[1], dk[0, :, 150:], dv[0, :, 150:]):
        assert torch.equal(g, torch.zeros_like(g))


def test_decode_many_splits(monkeypatch, device):
    """More key splits than the combine kernel reads at once (its loop over chunks of splits)."""
    monkeypatch.setattr(kernels, "INTERPRETER_SM_COUNT", 64)
    b, h, hkv, lk_ = 1, 2, 1, 4500
    plan = kernels.split_plan(b, hkv, h // hkv, 1, lk_, kernels._device_sm_count(device))
    assert plan.num_splits > kernels._COMBINE_CHUNK
    q, k, v = make_qkv(b, h, hkv, 1, lk_, 16, torch.float32, device)
    check_attention(q, k, v)


def test_split_plan():
    """Decode shapes split the keys (more splits when fewer programs), others do not."""
    plan = kernels.split_plan(batch=8, kv_heads=8, group=4, lq=1, lk=16384, sm_count=132)
    assert plan is not None and plan.num_splits >= 4 and plan.block_m == 16
    assert plan.num_splits * plan.keys_per_split >= 16384
    assert (plan.num_splits - 1) * plan.keys_per_split < 16384
    assert plan.keys_per_split % kernels.DECODE_KEY_CHUNK == 0
    fewer = kernels.split_plan(batch=1, kv_heads=1, group=1, lq=1, lk=16384, sm_count=132)
    assert fewer.num_splits > plan.num_splits
    assert kernels.split_plan(batch=8, kv_heads=8, group=4, lq=1, lk=200, sm_count=132) is None
    assert kernels.split_plan(batch=1, kv_heads=1, group=1, lq=64, lk=16384, sm_count=132) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hkv", [1, 2])
def test_gqa(hkv, dtype, device):
    q, k, v = make_qkv(2, 4, hkv, 45, 45, 32, dtype, device)
    check_attention(q, k, v, causal=True)


@pytest.mark.parametrize("d", [8, 96, 160, 256])
def test_head_dims(d, device):
    q, k, v = make_qkv(1, 2, 1, 33, 33, d, torch.float16, device)
    check_attention(q, k, v, causal=True, scale=0.7 / d ** 0.5)


@pytest.mark.parametrize("scale", [-0.3, 0.0], ids=["negative", "zero"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_non_positive_scale(scale, causal, device):
    """scale <= 0 (torch allows any float): the forward keeps the scores scaled before the row
    max (max(c s) != c max(s) for c < 0, and 0 * -inf is NaN); at 0 every visible key weighs
    the same. Lq = 37 over Lk = 50 keys: several tiles, a key tail, rows past the diagonal."""
    q, k, v = make_qkv(2, 2, 1, 37, 50, 24, torch.float16, device)
    check_attention(q, k, v, causal=causal, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_padding_mask(dtype, device):
    """Bool key-padding mask (B, 1, 1, Lk): batch 1 attends to its first 23 keys only."""
    b, lq, lk_ = 2, 37, 50
    q, k, v = make_qkv(b, 2, 2, lq, lk_, 32, dtype, device)
    keep = torch.ones(b, 1, 1, lk_, dtype=torch.bool, device=device)
    keep[1, ..., 23:] = False
    _, _, dk, dv = check_attention(q, k, v, attn_mask=keep)
    assert torch.equal(dk[1, :, 23:], torch.zeros_like(dk[1, :, 23:]))
    assert torch.equal(dv[1, :, 23:], torch.zeros_like(dv[1, :, 23:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_additive_bias(causal, dtype, device):
    """A float bias (1, H, Lq, Lk) in q's dtype, with causal on top."""
    lq, lk_ = 40, 40
    q, k, v = make_qkv(2, 2, 1, lq, lk_, 32, dtype, device)
    bias = torch.randn(1, 2, lq, lk_, dtype=dtype, device=device)
    check_attention(q, k, v, causal=causal, attn_mask=bias)


@pytest.mark.parametrize("shape,kind", [((50,), "bool"), ((21, 50), "float32"),
                                        ((2, 1, 21, 1), "bfloat16"), ((1, 2, 1, 50), "bool"),
                                        ((2, 2, 21, 50), "float32")], ids=str)
def test_broadcast_masks(shape, kind, device):
    """Masks of every broadcastable shape are read through 0 strides; a bfloat16 bias with
    float16 inputs (the mask keeps its own dtype)."""
    q, k, v = make_qkv(2, 2, 1, 21, 50, 16, torch.float16, device)
    if kind == "bool":
        mask = torch.rand(shape, device=device) > 0.3
        mask[..., 0] = True  # every row sees a key (fully masked rows: below)
    else:
        mask = torch.randn(shape, device=device).to(getattr(torch, kind))
    check_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fully_masked_rows(dtype, device):
    """A query row that sees no key (bool mask all False, or an additive row of -inf) gives
    exactly 0 output and 0 gradient, never NaN; the other rows are unaffected."""
    b, h, lq, lk_ = 2, 2, 19, 70
    q, k, v = make_qkv(b, h, h, lq, lk_, 32, dtype, device)
    keep = torch.rand(b, h, lq, lk_, device=device) > 0.2
    keep[0, 1, 5] = False
    keep[1, 0, 18] = False
    out, dq, dk, dv = check_attention(q, k, v, attn_mask=keep)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    for bi, hi, row in ((0, 1, 5), (1, 0, 18)):
        assert torch.equal(out[bi, hi, row], torch.zeros_like(out[bi, hi, row]))
        assert torch.equal(dq[bi, hi, row], torch.zeros_like(dq[bi, hi, row]))
    bias = torch.zeros(lq, lk_, dtype=dtype, device=device)
    bias[3] = float("-inf")
    out, dq, _, _ = check_attention(q, k, v, attn_mask=bias, causal=True)
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
    assert torch.equal(dq[:, :, 3], torch.zeros_like(dq[:, :, 3]))


@pytest.mark.parametrize("causal", [False, True])
def test_non_contiguous_inputs(causal, device):
    """(B, L, H, D) tensors transposed to (B, H, L, D) and an expanded (stride 0) grad_out."""
    q, k, v = make_qkv(2, 4, 2, 29, 41, 48, torch.float16, device, seq_major=True)
    assert not q.is_contiguous() and q.stride(-1) == 1
    check_attention(q, k, v, causal=causal)
    grad_out = torch.randn(1, 1, 1, 48, dtype=torch.float16, device=device).expand(2, 4, 29, 48)
    check_attention(q, k, v, causal=causal, grad_out=grad_out)


@pytest.mark.parametrize("lq,lk_,causal,masked", [(3, 5, True, False), (4, 4, False, True),
                                                 (1, 6, False, False)])
def test_gradcheck_float64(lq, lk_, causal, masked, device):
    """torch.autograd.gradcheck of the Triton ops in float64 (the kernels accumulate in the
    input's float type when it is float64; the public API takes fp16/bf16/fp32 only)."""
    if device.type == "cuda":
        pytest.skip("float64 runs through the interpreter only (the kernels target fp16/bf16/fp32 "
                    "on a GPU)")
    q, k, v = (leaf64(t) for t in make_qkv(1, 2, 1, lq, lk_, 8, torch.float32, device))
    mask = None
    if masked:
        mask = torch.randn(1, 1, lq, lk_, dtype=torch.float64, device=device).expand(1, 2, lq, lk_)
    offset = lk_ - lq

    def attention(q_, k_, v_):
        return AttentionFunction.apply(q_, k_, v_, mask, causal, offset, 0.4, "triton")
    assert torch.autograd.gradcheck(attention, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-4,
                                    fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["causal_lq_lt_lk", "causal_lq_gt_lk", "gqa_scale",
                                  "bool_mask", "float_mask"])
def test_sdpa_drop_in(case, dtype, device):
    """lk.scaled_dot_product_attention with the triton backend forced equals torch's sdpa
    (is_causal top-left aligned even when Lq != Lk), forward and backward."""
    b, h, hkv, lq, lk_, d = 2, 2, 2, 23, 40, 32
    kwargs = {}
    if case == "causal_lq_gt_lk":
        lq, lk_ = 40, 23
    if case.startswith("causal"):
        kwargs["is_causal"] = True
    if case == "gqa_scale":
        h, kwargs["enable_gqa"], kwargs["scale"] = 4, True, 0.3
    q, k, v = make_qkv(b, h, hkv, lq, lk_, d, dtype, device)
    if case == "bool_mask":
        kwargs["attn_mask"] = torch.rand(lq, lk_, device=device) > 0.5
        kwargs["attn_mask"][:, 0] = True
    if case == "float_mask":
        kwargs["attn_mask"] = torch.randn(b, 1, lq, lk_, dtype=dtype, device=device)
    dispatch_log(clear=True)
    with lk.use_backend("triton"):
        out = lk.scaled_dot_product_attention(q, k, v, **kwargs)
    assert dispatch_log()[-1]["backend"] == "triton"
    torch_out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    q64, k64, v64 = leaf64(q), leaf64(k), leaf64(v)
    ref = sdpa_ref(q64, k64, v64, upcast=True, **kwargs)
    assert_close(out, ref, torch_out, dtype, "out")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    torch_grads = torch.autograd.grad(torch_out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    for name, g, tg, rg in zip(("dq", "dk", "dv"), grads, torch_grads, ref_grads):
        assert_close(g, rg, tg, dtype, name)


def backward_twice(q, k, v, causal):
    out = lk.attention(q, k, v, causal=causal, backend="triton")
    grad_out = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), grad_out)
    out = lk.attention(q, k, v, causal=causal, backend="triton")
    second = torch.autograd.grad(out, (q, k, v), grad_out)
    return first, second


def test_backward_deterministic(device):
    q, k, v = make_qkv(1, 4, 2, 97, 97, 32, torch.bfloat16, device)
    first, second = backward_twice(q, k, v, causal=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_launch_table():
    """The GPU launch table (read directly: under the interpreter launches() gives its one
    config): every head dim 8..256 and dtype has settings for every kernel, tiles fit tl.dot
    (>= 16), and the masked forward's table covers only keys the forward has."""
    table = kernels._TABLE
    for kernel in ("fwd", "split", "dkdv", "dq"):
        for d in (8, 16, 40, 64, 80, 96, 128, 160, 256):
            for dtype in DTYPES:
                configs = table[kernel][(kernels.block_d(d), 2 if dtype.itemsize <= 2 else 4)]
                assert configs and all(c.block_m >= 16 and c.block_n >= 16 for c in configs)
    assert set(table["fwd_mask"]) <= set(table["fwd"])
    assert all(c.block_m >= 16 and c.block_n >= 16 for cs in table["fwd_mask"].values()
               for c in cs)
    masked = kernels.launches("fwd", 64, torch.bfloat16, masked=True)
    if interpreting():
        assert masked == [kernels._INTERPRETER_LAUNCH]
    else:
        assert masked == table["fwd_mask"].get((64, 2), table["fwd"][(64, 2)])
    assert kernels.block_d(8) == 16 and kernels.block_d(80) == 128 and kernels.block_d(160) == 256


# ---------------------------------------------------------------------------------------------
# GPU-sized tests
# ---------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("b,h,hkv,lq,lk_,d,causal", [
    (2, 8, 8, 2048, 2048, 128, False),
    (2, 8, 8, 2048, 2048, 128, True),
    (1, 4, 4, 8192, 8192, 64, True),
    (1, 2, 2, 8192, 8192, 128, False),
    (2, 8, 2, 4096, 4096, 128, True),
    (2, 4, 1, 1000, 3000, 64, True),
    (2, 4, 4, 3001, 1999, 128, True),
])
def test_cuda_bf16_realistic(b, h, hkv, lq, lk_, d, causal, device):
    q, k, v = make_qkv(b, h, hkv, lq, lk_, d, torch.bfloat16, device)
    check_attention(q, k, v, causal=causal)


@pytest.mark.cuda
@pytest.mark.parametrize("lq,d,padded", [(1, 128, False), (1, 64, True), (8, 128, False)])
def test_cuda_decode_long_cache(lq, d, padded, device):
    """One decode step (and a few speculative tokens) over a 16k cache, GQA 32/8; with
    ``padded``, ragged caches through a bool key-padding mask."""
    b, h, hkv, lk_ = 4, 32, 8, 16384
    assert kernels.split_plan(b, hkv, h // hkv, lq, lk_, kernels._device_sm_count(device))
    q, k, v = make_qkv(b, h, hkv, lq, lk_, d, torch.bfloat16, device)
    keep = None
    if padded:
        keep = torch.arange(lk_, device=device) < torch.tensor([lk_, 9000, 5, 16000],
                                                               device=device)[:, None]
        keep = keep[:, None, None, :]
    check_attention(q, k, v, causal=True, attn_mask=keep)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("d", [8, 40, 96, 256])
def test_cuda_dtypes_head_dims(d, dtype, device):
    q, k, v = make_qkv(2, 4, 2, 1031, 1031, d, dtype, device)
    check_attention(q, k, v, causal=True)


def _table_candidates():
    """(kernel, head dim, index) of every bf16 launch-table candidate at head dims 64 and 128:
    the autotuner may pick any of them on a GPU, so each must compute the right answer."""
    return [(kernel, d, i) for kernel in ("fwd", "fwd_mask", "split", "dkdv", "dq")
            for d in (64, 128)
            for i in range(len(kernels._TABLE[kernel].get((kernels.block_d(d), 2), [])))]


@pytest.mark.cuda
@pytest.mark.parametrize("kernel,d,index", _table_candidates())
def test_cuda_every_autotune_candidate(kernel, d, index, device, monkeypatch):
    """Each launch-table candidate alone (autotuning off), forward and backward against the
    fp64 reference: causal with tails, an additive mask for fwd_mask, a decode step over a
    split key range for split."""
    key = (kernels.block_d(d), 2)
    monkeypatch.setenv(kernels.AUTOTUNE_ENV, "0")
    monkeypatch.setitem(kernels._TABLE[kernel], key, [kernels._TABLE[kernel][key][index]])
    if kernel == "split":
        q, k, v = make_qkv(2, 8, 2, 3, 4099, d, torch.bfloat16, device)
        assert kernels.split_plan(2, 2, 4, 3, 4099, kernels._device_sm_count(device))
        check_attention(q, k, v, causal=True)
        return
    q, k, v = make_qkv(1, 4, 2, 301, 333, d, torch.bfloat16, device)
    mask = None
    if kernel == "fwd_mask":
        mask = torch.randn(1, 1, 301, 333, dtype=torch.bfloat16, device=device)
    check_attention(q, k, v, causal=True, attn_mask=mask)


@pytest.mark.cuda
def test_cuda_masks(device):
    b, h, lq, lk_ = 2, 8, 1500, 2100
    q, k, v = make_qkv(b, h, 2, lq, lk_, 128, torch.bfloat16, device)
    keep = torch.ones(b, 1, 1, lk_, dtype=torch.bool, device=device)
    keep[1, ..., 1700:] = False
    check_attention(q, k, v, attn_mask=keep)
    bias = torch.randn(1, h, lq, lk_, dtype=torch.bfloat16, device=device)
    bias[0, 3, 7] = float("-inf")
    out, dq, _, _ = check_attention(q, k, v, attn_mask=bias, causal=True)
    assert torch.equal(out[:, 3, 7], torch.zeros_like(out[:, 3, 7]))
    assert torch.equal(dq[:, 3, 7], torch.zeros_like(dq[:, 3, 7]))


@pytest.mark.cuda
def test_cuda_sdpa_drop_in(device):
    q, k, v = make_qkv(2, 16, 4, 1024, 1536, 128, torch.bfloat16, device)
    kwargs = dict(is_causal=True, enable_gqa=True)
    with lk.use_backend("triton"):
        out = lk.scaled_dot_product_attention(q, k, v, **kwargs)
    torch_out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    ref = sdpa_ref(q.detach(), k.detach(), v.detach(), upcast=True, **kwargs)
    assert_close(out, ref, torch_out, torch.bfloat16, "out")


@pytest.mark.cuda
def test_cuda_backward_deterministic(device):
    q, k, v = make_qkv(1, 8, 2, 4096, 4096, 128, torch.bfloat16, device)
    first, second = backward_twice(q, k, v, causal=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# The dense forward and the backward reading Q, K, V (and dO) through TMA descriptors
# ($LLM_KERNELS_ATTENTION_TMA=1)
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def tma_reads(monkeypatch, device):
    """TMA reads switched on and watched: the test fails unless every forward and backward
    took them."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        pytest.skip("TMA needs a Hopper or newer GPU")
    monkeypatch.setenv(kernels.TMA_ENV, "1")
    taken = []
    use_tma = kernels.use_tma
    monkeypatch.setattr(kernels, "use_tma", lambda *t: taken.append(use_tma(*t)) or taken[-1])
    yield
    assert taken and all(taken), taken


def test_tma_reads_only_where_tma_can_read(monkeypatch, device):
    """Off unless switched on; 16-bit (B, H, L, D) tensors whose start and strides are 16-byte
    multiples and whose rows are at least 16 bytes."""
    q, k, v = make_qkv(1, 2, 2, 17, 33, 40, torch.bfloat16, device, seq_major=True)
    assert not kernels.use_tma(q, k, v)
    monkeypatch.setenv(kernels.TMA_ENV, "1")
    hopper = device.type == "cpu" or torch.cuda.get_device_capability(device)[0] >= 9
    assert kernels.use_tma(q, k, v) == hopper
    assert not kernels.use_tma(*(t.float() for t in (q, k, v)))         # fp32
    q12, k12, v12 = make_qkv(1, 2, 2, 17, 33, 12, torch.bfloat16, device)
    assert not kernels.use_tma(q12, k12, v12)                            # rows of 24 bytes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b,h,hkv,lq,lk_,d,causal,seq_major", [
    (2, 2, 2, 97, 97, 80, True, False), (1, 4, 2, 17, 45, 40, False, True),
    (2, 4, 1, 64, 33, 128, True, False), (1, 2, 2, 33, 70, 16, False, False)])
def test_forward_through_tma(b, h, hkv, lq, lk_, d, causal, seq_major, dtype, device,
                             tma_reads):
    """Forward and backward with Q, K, V and dO read by TMA: tails in L and in the head dim
    read as zeros, GQA, causal, (B, L, H, D) views, against fp64."""
    q, k, v = make_qkv(b, h, hkv, lq, lk_, d, dtype, device, seq_major=seq_major)
    check_attention(q, k, v, causal=causal)


def test_forward_through_tma_with_a_mask(device, tma_reads):
    """The additive mask still read by pointers next to the TMA reads."""
    q, k, v = make_qkv(2, 2, 2, 30, 50, 64, torch.bfloat16, device)
    bias = torch.randn(2, 1, 30, 50, dtype=torch.bfloat16, device=device)
    check_attention(q, k, v, attn_mask=bias, causal=True)


# ---------------------------------------------------------------------------------------------
# The warp-specialized dense forward ($LLM_KERNELS_ATTENTION_WS=1)
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def warp_specialized(monkeypatch, device):
    """The warp-specialized forward switched on and watched: the test fails unless every
    forward took it."""
    yield from _watched(monkeypatch, device, "use_warp_specialized")


def _watched(monkeypatch, device, *choices: str):
    """$LLM_KERNELS_ATTENTION_WS=1, and the kernels.<choice> functions recorded: fails the test
    unless each was called and always answered yes (skips below Hopper)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        pytest.skip("the warp-specialized kernels need a Hopper or newer GPU")
    monkeypatch.setenv(kernels.WS_ENV, "1")
    taken = {choice: [] for choice in choices}
    for choice in choices:
        use_ws = getattr(kernels, choice)
        monkeypatch.setattr(kernels, choice, lambda *a, use_ws=use_ws, seen=taken[choice]:
                            seen.append(use_ws(*a)) or seen[-1])
    yield
    assert all(seen and all(seen) for seen in taken.values()), taken


def test_warp_specialized_forward_only_where_it_applies(monkeypatch, device):
    """Off unless switched on; then only without mask, for scale > 0 and 16-bit tensors of
    head dim 64 or 128 that TMA can read."""
    q, k, v = make_qkv(1, 4, 2, 17, 33, 64, torch.bfloat16, device, seq_major=True)
    assert not kernels.use_warp_specialized(q, k, v, None, 1.0)
    monkeypatch.setenv(kernels.WS_ENV, "1")
    hopper = device.type == "cpu" or torch.cuda.get_device_capability(device)[0] >= 9
    assert kernels.use_warp_specialized(q, k, v, None, 1.0) == hopper
    mask = torch.zeros(1, 4, 17, 33, dtype=q.dtype, device=device)
    assert not kernels.use_warp_specialized(q, k, v, mask, 1.0)
    assert not kernels.use_warp_specialized(q, k, v, None, 0.0)
    assert not kernels.use_warp_specialized(*(t.float() for t in (q, k, v)), None, 1.0)
    assert not kernels.use_warp_specialized(*make_qkv(1, 2, 2, 17, 33, 80, torch.bfloat16,
                                                       device), None, 1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b,h,hkv,lq,lk_,d,causal,seq_major", [
    (2, 2, 2, 97, 97, 64, False, False), (1, 4, 2, 17, 45, 128, False, True),
    (2, 3, 1, 64, 33, 64, False, False), (1, 2, 2, 1, 70, 128, False, False),
    (2, 2, 1, 97, 97, 128, True, False), (1, 4, 2, 70, 33, 64, True, True)])
def test_warp_specialized_forward(b, h, hkv, lq, lk_, d, causal, seq_major, dtype, device,
                                  warp_specialized):
    """Forward (then the backward) with tails in Lq and Lk, GQA, (B, L, H, D) views, one query
    row, causal with Lk < Lq (rows that see no key), against fp64."""
    q, k, v = make_qkv(b, h, hkv, lq, lk_, d, dtype, device, seq_major=seq_major)
    check_attention(q, k, v, causal=causal)


@pytest.fixture
def warp_specialized_backward(monkeypatch, device):
    """The warp-specialized kernels switched on; the test fails unless every backward's dK/dV
    and dQ took them."""
    yield from _watched(monkeypatch, device, "use_warp_specialized_dkdv",
                        "use_warp_specialized_dq")


def test_warp_specialized_backward_only_where_it_applies(monkeypatch, device):
    """Off unless switched on; then only without mask, for 16-bit tensors of head dim 64 or
    128 that TMA can read; dK/dV's needs Lq a multiple of 64 and q and grad_out with their
    heads' rows back to back, dQ's Lq a multiple of 4 and a 16-byte aligned lse."""
    q, k, v = make_qkv(1, 4, 2, 128, 33, 64, torch.bfloat16, device)
    g = torch.randn_like(q)
    assert not kernels.use_warp_specialized_dkdv(q, k, v, g, None)
    monkeypatch.setenv(kernels.WS_ENV, "1")
    hopper = device.type == "cpu" or torch.cuda.get_device_capability(device)[0] >= 9
    assert kernels.use_warp_specialized_dkdv(q, k, v, g, None) == hopper
    mask = torch.zeros(1, 4, 128, 33, dtype=q.dtype, device=device)
    assert not kernels.use_warp_specialized_dkdv(q, k, v, g, mask)
    assert not kernels.use_warp_specialized_dkdv(*(t.float() for t in (q, k, v, g)), None)
    q_seq, k_seq, v_seq = make_qkv(1, 4, 2, 128, 33, 64, torch.bfloat16, device,
                                   seq_major=True)
    assert not kernels.use_warp_specialized_dkdv(q_seq, k_seq, v_seq, g, None)  # (B, L, H, D)
    q97, k97, v97 = make_qkv(1, 4, 2, 97, 33, 64, torch.bfloat16, device)
    assert not kernels.use_warp_specialized_dkdv(q97, k97, v97, torch.randn_like(q97), None)
    q80, k80, v80 = make_qkv(1, 2, 2, 128, 33, 80, torch.bfloat16, device)
    assert not kernels.use_warp_specialized_dkdv(q80, k80, v80, torch.randn_like(q80), None)
    lse = torch.zeros(1, 4, 128, device=device)
    assert kernels.use_warp_specialized_dq(q_seq, k_seq, v_seq, g, lse, None) == hopper
    assert not kernels.use_warp_specialized_dq(q, k, v, g, lse, mask)
    assert not kernels.use_warp_specialized_dq(q, k, v, g, lse.view(-1)[1:].view(1, 1, 511),
                                               None)                     # lse 4-byte aligned
    q5, k5, v5 = make_qkv(1, 4, 2, 5, 33, 64, torch.bfloat16, device)
    assert not kernels.use_warp_specialized_dq(q5, k5, v5, torch.randn_like(q5), lse, None)
    assert not kernels.use_warp_specialized_dq(q80, k80, v80, torch.randn_like(q80), lse, None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b,h,hkv,lq,lk_,d,causal", [
    (2, 2, 2, 64, 97, 64, False), (1, 4, 2, 128, 45, 128, True), (2, 3, 1, 64, 64, 64, True),
    (1, 2, 2, 128, 150, 128, False)])
def test_warp_specialized_backward(b, h, hkv, lq, lk_, d, causal, dtype, device,
                                   warp_specialized_backward):
    """dK/dV and dQ by the warp-specialized kernels (with the forward's where it applies): key
    tails, GQA summed over the group's heads, causal with Lk != Lq, against fp64."""
    q, k, v = make_qkv(b, h, hkv, lq, lk_, d, dtype, device)
    check_attention(q, k, v, causal=causal)


def test_warp_specialized_backward_with_tiny_row_sums(device, warp_specialized_backward):
    """Scores near -128 in every row (lse about -125): the zero rows a key tile reads past Lk
    get P = exp(-lse) = inf, which dQ's kernel must mask and dK/dV's keep in those rows (never
    stored)."""
    q, k, v = make_qkv(1, 2, 1, 64, 45, 64, torch.bfloat16, device)
    with torch.no_grad():
        q.mul_(0.1).add_(4.0)
        k.mul_(0.1).sub_(4.0)
    check_attention(q, k, v)


@pytest.fixture
def warp_specialized_dq(monkeypatch, device):
    """The warp-specialized kernels switched on; the test fails unless every backward's dQ
    took its kernel."""
    yield from _watched(monkeypatch, device, "use_warp_specialized_dq")


@pytest.mark.parametrize("b,h,hkv,lq,lk_,d,causal", [
    (1, 4, 2, 100, 45, 64, True), (2, 2, 1, 4, 70, 128, False), (1, 2, 2, 36, 36, 128, True)])
def test_warp_specialized_dq_any_length(b, h, hkv, lq, lk_, d, causal, device,
                                        warp_specialized_dq):
    """dQ by its warp-specialized kernel at query lengths dK/dV's does not take (query tails,
    causal rows that see no key), bf16, against fp64."""
    q, k, v = make_qkv(b, h, hkv, lq, lk_, d, torch.bfloat16, device)
    check_attention(q, k, v, causal=causal)


# Kernels never run on a GPU yet: a hang ends the test (its worker) after 2 minutes, not the
# GPU check's whole cuda step.
WS_GPU_TIMEOUT = pytest.mark.timeout(120, method="thread")


@pytest.mark.cuda
@WS_GPU_TIMEOUT
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_warp_specialized_forward_autotuned(d, device, warp_specialized):
    """The warp-specialized forward at a realistic size with autotuning on, bf16, against the
    fp64 reference."""
    q, k, v = make_qkv(1, 8, 2, 2049, 2049, d, torch.bfloat16, device)
    check_attention(q, k, v)


@pytest.mark.cuda
@WS_GPU_TIMEOUT
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_warp_specialized_backward_autotuned(causal, device, warp_specialized_backward):
    """The warp-specialized dK/dV and dQ at a realistic size with autotuning on, bf16, D 128,
    against the fp64 reference."""
    q, k, v = make_qkv(1, 8, 2, 2048, 2049, 128, torch.bfloat16, device)
    check_attention(q, k, v, causal=causal)


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_tma_reads_autotuned(causal, device, tma_reads):
    """The TMA forward and backward at a realistic size with autotuning on (each candidate's
    tiles set by the launch pre-hook), bf16, against the fp64 reference."""
    q, k, v = make_qkv(1, 8, 2, 2049, 2049, 128, torch.bfloat16, device)
    check_attention(q, k, v, causal=causal)
