"""lk.patch_torch(): torch's SDPA and norm modules through lk while active, torch's own after."""
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F

import llm_kernels as lk
from llm_kernels.numerics import assert_close
from llm_kernels.reference import layer_norm_ref, rms_norm_ref, sdpa_ref

TORCH_SDPA = F.scaled_dot_product_attention
LAYER_NORM_FORWARD = torch.nn.LayerNorm.forward
RMS_NORM_FORWARD = torch.nn.RMSNorm.forward


def assert_torch_untouched():
    assert F.scaled_dot_product_attention is TORCH_SDPA
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    assert torch.nn.LayerNorm.forward is LAYER_NORM_FORWARD
    assert torch.nn.RMSNorm.forward is RMS_NORM_FORWARD
    assert lk.patch.patched_features() == frozenset()


@pytest.fixture(autouse=True)
def untouched_before_and_after():
    assert_torch_untouched()
    yield
    assert_torch_untouched()


def ops_logged():
    return [entry["op"] for entry in lk.dispatch_log()]


def qkv(b=2, h=3, lq=17, lk_=17, d=16, hkv=None):
    q = torch.randn(b, h, lq, d)
    k = torch.randn(b, hkv or h, lk_, d)
    v = torch.randn(b, hkv or h, lk_, d)
    return q, k, v


@pytest.mark.parametrize("kwargs", [dict(is_causal=True), dict(), dict(scale=0.3)])
def test_sdpa_goes_through_lk_with_torch_semantics(kwargs):
    q, k, v = qkv(lq=17, lk_=17)
    lk.dispatch_log(clear=True)
    with lk.patch_torch():
        assert F.scaled_dot_product_attention is not TORCH_SDPA
        out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert ops_logged() == ["scaled_dot_product_attention"]
    ref = sdpa_ref(q, k, v, upcast=True, **kwargs)
    assert_close(out, ref, TORCH_SDPA(q, k, v, **kwargs), torch.float32, "sdpa")


def test_sdpa_gqa_and_bool_mask_with_gradients():
    q, k, v = (t.requires_grad_() for t in qkv(h=4, hkv=2, lq=5, lk_=97))
    mask = torch.rand(2, 1, 5, 97) > 0.3
    with lk.patch_torch():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    torch_out = TORCH_SDPA(q, k, v, attn_mask=mask, enable_gqa=True)
    torch_grads = torch.autograd.grad(torch_out, (q, k, v), grad)
    ref = sdpa_ref(q, k, v, attn_mask=mask, enable_gqa=True, upcast=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad.double())
    assert_close(out, ref, torch_out, torch.float32, "sdpa out")
    for name, g, g_ref, g_torch in zip("qkv", grads, ref_grads, torch_grads):
        assert_close(g, g_ref, g_torch, torch.float32, f"d{name}")


def test_sdpa_with_dropout_still_reaches_torch():
    q, k, v = qkv()
    lk.dispatch_log(clear=True)
    with lk.patch_torch(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(1)
    assert torch.equal(out, TORCH_SDPA(q, k, v, dropout_p=0.5))
    assert lk.dispatch_log()[-1]["reason"].startswith("fallback: dropout_p=0.5")


def test_multihead_attention_module_uses_patched_sdpa():
    # Training mode (dropout 0) keeps MultiheadAttention off its fused inference fast path,
    # which calls no SDPA.
    mha = torch.nn.MultiheadAttention(48, 3, batch_first=True).train()
    x = torch.randn(2, 17, 48)
    lk.dispatch_log(clear=True)
    with lk.patch_torch():
        out, _ = mha(x, x, x, need_weights=False)
    assert "scaled_dot_product_attention" in ops_logged()
    torch_out, _ = mha(x, x, x, need_weights=False)
    ref, _ = mha.double()(x.double(), x.double(), x.double(), need_weights=False)
    assert_close(out, ref, torch_out, torch.float32, "MultiheadAttention")


def test_layer_norm_module_forward_goes_through_lk():
    norm = torch.nn.LayerNorm(97)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(3, 5, 97, requires_grad=True)
    lk.dispatch_log(clear=True)
    with lk.patch_torch(sdpa=False, layer_norm=True):
        assert F.scaled_dot_product_attention is TORCH_SDPA
        out = norm(x)
    assert ops_logged() == ["layer_norm"]
    grad = torch.randn_like(out)
    dx, dw, db = torch.autograd.grad(out, (x, norm.weight, norm.bias), grad)
    torch_out = F.layer_norm(x, (97,), norm.weight, norm.bias, norm.eps)
    torch_grads = torch.autograd.grad(torch_out, (x, norm.weight, norm.bias), grad)
    ref = layer_norm_ref(x, norm.weight, norm.bias, norm.eps, upcast=True)
    ref_grads = torch.autograd.grad(ref, (x, norm.weight, norm.bias), grad.double())
    assert_close(out, ref, torch_out, torch.float32, "layer_norm")
    for name, g, g_ref, g_torch in zip(("dx", "dweight", "dbias"), (dx, dw, db), ref_grads,
                                       torch_grads):
        assert_close(g, g_ref, g_torch, torch.float32, name)


def test_layer_norm_over_two_dims_keeps_torch_forward():
    norm = torch.nn.LayerNorm((5, 17))
    x = torch.randn(3, 5, 17)
    lk.dispatch_log(clear=True)
    with lk.patch_torch(sdpa=False, layer_norm=True):
        out = norm(x)
    assert ops_logged() == []
    assert torch.equal(out, LAYER_NORM_FORWARD(norm, x))


@pytest.mark.parametrize("eps", [None, 1e-5])
def test_rms_norm_module_forward_goes_through_lk(eps):
    norm = torch.nn.RMSNorm(127, eps=eps)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(4, 127)
    lk.dispatch_log(clear=True)
    with lk.patch_torch(sdpa=False, rms_norm=True):
        out = norm(x)
    assert ops_logged() == ["rms_norm"]
    used_eps = torch.finfo(x.dtype).eps if eps is None else eps
    ref = rms_norm_ref(x, norm.weight, used_eps, upcast=True)
    assert_close(out, ref, RMS_NORM_FORWARD(norm, x), torch.float32, "rms_norm")


def test_norm_with_noncontiguous_input_keeps_torch_forward():
    norm = torch.nn.RMSNorm(17)
    x = torch.randn(17, 6).t()  # (6, 17) with stride(-1) == 6
    lk.dispatch_log(clear=True)
    with lk.patch_torch(sdpa=False, rms_norm=True):
        out = norm(x)
    assert ops_logged() == []
    assert torch.equal(out, RMS_NORM_FORWARD(norm, x))


def test_handle_undo_restores_and_is_idempotent():
    handle = lk.patch_torch(layer_norm=True, rms_norm=True)
    assert handle.active
    assert lk.patch.patched_features() == {"sdpa", "layer_norm", "rms_norm"}
    assert torch.nn.LayerNorm.forward is not LAYER_NORM_FORWARD
    handle.undo()
    assert not handle.active
    assert_torch_untouched()
    handle.undo()
    assert_torch_untouched()


def test_nested_patches_restore_in_layers():
    with lk.patch_torch() as outer:
        patched_sdpa = F.scaled_dot_product_attention
        with lk.patch_torch(layer_norm=True):
            assert F.scaled_dot_product_attention is patched_sdpa
            assert lk.patch.patched_features() == {"sdpa", "layer_norm"}
        assert lk.patch.patched_features() == {"sdpa"}
        assert torch.nn.LayerNorm.forward is LAYER_NORM_FORWARD
        assert outer.active


def test_undo_out_of_order_keeps_the_other_handle_working():
    first = lk.patch_torch(backend="torch")
    second = lk.patch_torch(layer_norm=True)
    first.undo()
    assert lk.patch.patched_features() == {"sdpa", "layer_norm"}
    second.undo()


def test_innermost_handle_backend_applies():
    q, k, v = qkv(lq=1, lk_=17)
    lk.dispatch_log(clear=True)
    with lk.patch_torch(backend="torch"):
        F.scaled_dot_product_attention(q, k, v)
        with lk.patch_torch():
            F.scaled_dot_product_attention(q, k, v)
    reasons = [entry["reason"] for entry in lk.dispatch_log()]
    assert reasons[0] == "requested" and reasons[1].startswith("auto")


def test_exception_inside_context_still_restores():
    with pytest.raises(ZeroDivisionError):
        with lk.patch_torch(layer_norm=True, rms_norm=True):
            1 / 0


def test_reentering_an_undone_handle_patches_again():
    handle = lk.patch_torch()
    handle.undo()
    with handle:
        assert F.scaled_dot_product_attention is not TORCH_SDPA
    assert not handle.active


def test_unknown_backend_is_rejected_before_patching():
    with pytest.raises(ValueError, match="backend must be one of"):
        lk.patch_torch(backend="tensorrt")


def test_concurrent_patches_leave_torch_untouched():
    def work():
        for _ in range(50):
            with lk.patch_torch(layer_norm=True):
                pass

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
