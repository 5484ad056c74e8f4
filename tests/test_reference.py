"""The pure-torch references against torch's own ops in float64."""
import pytest
import torch
import torch.nn.functional as F

from llm_kernels import reference as ref


def _d(*shape):
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("lq,lk", [(17, 17), (5, 23), (23, 5), (1, 300)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_ref_bottom_right_causal(lq, lk, causal):
    q, k, v = _d(2, 3, lq, 16), _d(2, 3, lk, 16), _d(2, 3, lk, 16)
    out = ref.attention_ref(q, k, v, causal=causal, upcast=True)
    mask = None
    if causal:  # bottom-right: query i sees key j iff j <= i + lk - lq
        mask = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    rows_seeing_nothing = ~mask.any(-1) if causal else torch.zeros(lq, dtype=torch.bool)
    expected[..., rows_seeing_nothing, :] = 0
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_attention_ref_decode_sees_whole_cache():
    q, k, v = _d(1, 2, 1, 8), _d(1, 2, 40, 8), _d(1, 2, 40, 8)
    torch.testing.assert_close(ref.attention_ref(q, k, v, causal=True, upcast=True),
                               F.scaled_dot_product_attention(q, k, v))


def test_attention_ref_gqa_mask_scale():
    q, k, v = _d(2, 6, 9, 8), _d(2, 2, 11, 8), _d(2, 2, 11, 8)
    bias = _d(1, 6, 9, 11)
    out = ref.attention_ref(q, k, v, attn_mask=bias, scale=0.3, upcast=True)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_attention_ref_fully_masked_row_is_zero_with_zero_grads():
    q, k, v = (_d(1, 1, 4, 8).requires_grad_() for _ in range(3))
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[2] = False
    out = ref.attention_ref(q, k, v, attn_mask=mask, upcast=True)
    assert torch.equal(out[0, 0, 2], torch.zeros(8, dtype=torch.float64))
    out.sum().backward()
    assert (torch.isfinite(q.grad).all()
            and torch.equal(q.grad[0, 0, 2], torch.zeros(8, dtype=torch.float64)))


@pytest.mark.parametrize("lq,lk", [(7, 7), (4, 9), (9, 4)])
def test_sdpa_ref_matches_torch_top_left(lq, lk):
    q, k, v = _d(2, 4, lq, 8), _d(2, 2, lk, 8), _d(2, 2, lk, 12)
    for kwargs in ({"is_causal": True}, {"attn_mask": torch.rand(lq, lk) > 0.3}, {"scale": 0.7}):
        out = ref.sdpa_ref(q, k, v, enable_gqa=True, upcast=True, **kwargs)
        expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("with_residual", [False, True])
def test_layer_norm_ref(with_residual):
    x, r, w, b = _d(37, 97), _d(37, 97), _d(97), _d(97)
    out = ref.layer_norm_ref(x, w, b, 1e-5, residual=r if with_residual else None, upcast=True)
    h = x + r if with_residual else x
    expected = F.layer_norm(h, (97,), w, b, 1e-5)
    if with_residual:
        out, h_out = out
        torch.testing.assert_close(h_out, h)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_ref(with_residual):
    x, r, w = _d(5, 1, 17), _d(5, 1, 17), _d(17)
    out = ref.rms_norm_ref(x, w, 1e-6, residual=r if with_residual else None, upcast=True)
    h = x + r if with_residual else x
    if with_residual:
        out, h_out = out
        torch.testing.assert_close(h_out, h)
    torch.testing.assert_close(out, F.rms_norm(h, (17,), w, 1e-6))


def test_softmax_ref_any_dim_and_all_minus_inf_rows():
    x = _d(3, 5, 7)
    torch.testing.assert_close(ref.softmax_ref(x, dim=1, upcast=True), torch.softmax(x, dim=1))
    x[1, :, 2] = float("-inf")
    out = ref.softmax_ref(x, dim=1, upcast=True)
    assert torch.equal(out[1, :, 2], torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu"])
def test_feed_forward_ref(activation):
    x, w1, b1, w2, b2 = _d(3, 7, 16), _d(33, 16), _d(33), _d(16, 33), _d(16)
    acts = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
            "relu": F.relu, "silu": F.silu}
    expected = acts[activation](x @ w1.T + b1) @ w2.T + b2
    torch.testing.assert_close(ref.feed_forward_ref(x, w1, b1, w2, b2, activation=activation,
                                                    upcast=True), expected)
    torch.testing.assert_close(ref.feed_forward_ref(x, w1, None, w2, None, activation=activation,
                                                    upcast=True), acts[activation](x @ w1.T) @ w2.T)


def test_swiglu_ref():
    x, wg, wu, wd = _d(9, 16), _d(40, 16), _d(40, 16), _d(16, 40)
    expected = (F.silu(x @ wg.T) * (x @ wu.T)) @ wd.T
    torch.testing.assert_close(ref.swiglu_ref(x, wg, wu, wd, upcast=True), expected)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_ref(reduction):
    logits = _d(37, 101)
    target = torch.randint(0, 101, (37,))
    target[::4] = -100
    out = ref.cross_entropy_ref(logits, target, reduction=reduction, upcast=True)
    lse = logits.logsumexp(-1)
    per_row = torch.where(target == -100, torch.zeros(()), lse - logits.gather(
        1, target.clamp(min=0)[:, None])[:, 0])
    expected = {"none": per_row, "sum": per_row.sum(),
                "mean": per_row.sum() / (target != -100).sum()}[reduction]
    torch.testing.assert_close(out, expected)


def test_upcast_false_keeps_dtype():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert ref.softmax_ref(x).dtype == torch.bfloat16
    assert ref.layer_norm_ref(x).dtype == torch.bfloat16
    assert ref.softmax_ref(x, upcast=True).dtype == torch.float64
