"""llm_kernels.nn modules against the torch.nn modules they replace, by the pass rule.

The float64 reference is the torch module itself, copied to float64; the allowance is set by
the torch module in the test dtype. Module plumbing (state_dicts, masks, layouts) is checked on
the ``torch`` backend, and the drop-in path on ``triton`` too (tiny shapes: the interpreter is
slow); FeedForward and SwiGLU run ``triton``.
"""
import copy
import math
import warnings
from collections import OrderedDict

import pytest
import torch

import llm_kernels.nn as lknn
from llm_kernels.numerics import assert_close
from llm_kernels.reference import rms_norm_ref


def _randomize(module):
    """Non-trivial parameters (torch's defaults are ones/zeros for norms)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) / math.sqrt(max(p.shape[-1], 1)) + (p == 1).to(p.dtype))
    return module


def _outputs_and_grads(module, inputs, grad_out, upcast=False):
    """module(*inputs) (first element if a tuple), and the gradients of <out, grad_out> w.r.t.
    the floating inputs and the parameters."""
    if upcast:
        module = copy.deepcopy(module).double()
    leaves = [t.detach().double() if upcast and t.is_floating_point() else t.detach().clone()
              for t in inputs]
    for t in leaves:
        t.requires_grad_(t.is_floating_point())
    out = module(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    wrt = [t for t in leaves if t.requires_grad] + list(module.parameters())
    return out, torch.autograd.grad(out, wrt, grad_out.to(out.dtype))


def _assert_matches_torch(lk_module, torch_module, inputs, dtype, torch_inputs=None):
    """lk_module(*inputs) and its gradients pass the rule against torch_module in float64."""
    torch_inputs = inputs if torch_inputs is None else torch_inputs
    with torch.no_grad():
        probe = torch_module(*torch_inputs)
    grad_out = torch.randn_like(probe[0] if isinstance(probe, tuple) else probe)
    out, grads = _outputs_and_grads(lk_module, inputs, grad_out)
    torch_out, torch_grads = _outputs_and_grads(torch_module, torch_inputs, grad_out)
    ref, ref_grads = _outputs_and_grads(torch_module, torch_inputs, grad_out, upcast=True)
    assert out.dtype == dtype
    assert_close(out, ref, torch_out, dtype, "output")
    assert len(grads) == len(ref_grads)
    for i, (g, tg, rg) in enumerate(zip(grads, torch_grads, ref_grads)):
        assert_close(g, rg, tg, dtype, f"gradient {i}")


def _loaded(lk_module, torch_module):
    """lk_module with torch_module's state_dict (strict: same names and shapes)."""
    assert lk_module.state_dict().keys() == torch_module.state_dict().keys()
    lk_module.load_state_dict(torch_module.state_dict())
    return lk_module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kwargs", [{}, {"bias": False}, {"elementwise_affine": False},
                                    {"eps": 1e-3}], ids=str)
def test_layer_norm_from_state_dict(kwargs, dtype, device):
    torch_ln = _randomize(torch.nn.LayerNorm(97, **kwargs)).to(device, dtype)
    lk_ln = _loaded(lknn.LayerNorm(97, backend="torch", **kwargs), torch_ln).to(device, dtype)
    x = torch.randn(3, 37, 97, device=device).to(dtype)
    _assert_matches_torch(lk_ln, torch_ln, [x], dtype)


def test_layer_norm_multi_dim_shape_and_residual(device):
    dtype = torch.float32
    torch_ln = _randomize(torch.nn.LayerNorm((5, 17))).to(device)
    lk_ln = _loaded(lknn.LayerNorm((5, 17), backend="torch"), torch_ln).to(device)
    x, residual = torch.randn(2, 3, 5, 17, device=device), torch.randn(2, 3, 5, 17, device=device)
    _assert_matches_torch(lk_ln, torch_ln, [x], dtype)
    normed, summed = lk_ln(x, residual)
    assert torch.equal(summed, x + residual)
    assert_close(normed, copy.deepcopy(torch_ln).double()((x + residual).double()),
                 torch_ln(x + residual), dtype, "normed with residual")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kwargs", [{"eps": 1e-6}, {"elementwise_affine": False, "eps": 1e-5}],
                         ids=str)
def test_rms_norm_from_state_dict(kwargs, dtype, device):
    torch_rms = _randomize(torch.nn.RMSNorm(127, **kwargs)).to(device, dtype)
    lk_rms = _loaded(lknn.RMSNorm(127, backend="torch", **kwargs), torch_rms).to(device, dtype)
    x = torch.randn(37, 127, device=device).to(dtype)
    _assert_matches_torch(lk_rms, torch_rms, [x], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_default_eps_is_torchs(dtype, device):
    """eps=None: torch uses float32's epsilon for 16-bit inputs; inputs of RMS ~1e-3 make any
    other choice visible."""
    torch_rms = _randomize(torch.nn.RMSNorm(64)).to(device, dtype)
    lk_rms = _loaded(lknn.RMSNorm(64, backend="torch"), torch_rms).to(device, dtype)
    x = (1e-3 * torch.randn(17, 64, device=device)).to(dtype)
    ref = rms_norm_ref(x.double(), torch_rms.weight.double(), torch.finfo(torch.float32).eps,
                       upcast=True)
    assert_close(lk_rms(x), ref, torch_rms(x), dtype, "output")
    normed, summed = lk_rms(x, x)
    assert_close(normed, rms_norm_ref(summed.double(), torch_rms.weight.double(),
                                      torch.finfo(torch.float32).eps, upcast=True),
                 torch_rms(summed), dtype, "normed with residual")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_norm_modules_on_triton_with_residual(dtype, device):
    torch_ln = _randomize(torch.nn.LayerNorm(97)).to(device, dtype)
    torch_rms = _randomize(torch.nn.RMSNorm(97)).to(device, dtype)
    lk_ln = _loaded(lknn.LayerNorm(97, backend="triton"), torch_ln).to(device, dtype)
    lk_rms = _loaded(lknn.RMSNorm(97, backend="triton"), torch_rms).to(device, dtype)
    x, residual = (torch.randn(5, 7, 97, device=device).to(dtype) for _ in range(2))
    for lk_module, torch_module in ((lk_ln, torch_ln), (lk_rms, torch_rms)):
        _assert_matches_torch(lk_module, torch_module, [x], dtype)
        normed, summed = lk_module(x, residual)
        assert torch.equal(summed, x + residual)
        ref = copy.deepcopy(torch_module).double()(summed.double())
        assert_close(normed, ref, torch_module(summed), dtype, "normed with residual")


class _TorchFeedForward(torch.nn.Sequential):
    def __init__(self, d, d_ff, act, bias):
        super().__init__(OrderedDict(fc1=torch.nn.Linear(d, d_ff, bias=bias), act=act,
                                     fc2=torch.nn.Linear(d_ff, d, bias=bias)))


@pytest.mark.parametrize("activation,act,bias", [
    ("gelu", torch.nn.GELU(), True), ("gelu_tanh", torch.nn.GELU(approximate="tanh"), False),
    ("relu", torch.nn.ReLU(), True), ("silu", torch.nn.SiLU(), True)])
def test_feed_forward_module_from_state_dict(activation, act, bias, device):
    torch_ff = _TorchFeedForward(17, 37, act, bias).to(device)
    lk_ff = _loaded(lknn.FeedForward(17, 37, activation, bias=bias, backend="triton"),
                    torch_ff).to(device)
    _assert_matches_torch(lk_ff, torch_ff, [torch.randn(2, 5, 17, device=device)], torch.float32)


class _TorchSwiGLU(torch.nn.Module):
    def __init__(self, d, d_ff):
        super().__init__()
        self.w_gate = torch.nn.Linear(d, d_ff, bias=False)
        self.w_up = torch.nn.Linear(d, d_ff, bias=False)
        self.w_down = torch.nn.Linear(d_ff, d, bias=False)

    def forward(self, x):
        return self.w_down(torch.nn.functional.silu(self.w_gate(x)) * self.w_up(x))


def test_swiglu_module_from_state_dict(device):
    dtype = torch.bfloat16
    torch_sw = _TorchSwiGLU(33, 97).to(device, dtype)
    lk_sw = _loaded(lknn.SwiGLU(33, 97, backend="triton"), torch_sw).to(device, dtype)
    _assert_matches_torch(lk_sw, torch_sw, [torch.randn(7, 33, device=device).to(dtype)], dtype)


def test_modules_reject_bad_arguments():
    with pytest.raises(ValueError, match="activation"):
        lknn.FeedForward(8, 16, activation="tanh")
    with pytest.raises(ValueError, match="normalized_shape"):
        lknn.LayerNorm(8, backend="torch")(torch.randn(2, 9))
    with pytest.raises(ValueError, match="divisible"):
        lknn.MultiheadAttention(10, 3)


def _mha_pair(batch_first, device, bias=True, dtype=torch.float32, backend="torch"):
    torch_mha = torch.nn.MultiheadAttention(32, 4, bias=bias, batch_first=batch_first)
    _randomize(torch_mha).to(device, dtype)
    lk_mha = _loaded(lknn.MultiheadAttention(32, 4, bias=bias, batch_first=batch_first,
                                             backend=backend), torch_mha).to(device, dtype)
    return lk_mha, torch_mha


class _Call(torch.nn.Module):
    """Calls an attention module with fixed keyword arguments; self-attention when only x is
    given, cross-attention on (x, memory)."""

    def __init__(self, mha, **kwargs):
        super().__init__()
        self.mha, self.kwargs = mha, kwargs

    def forward(self, x, memory=None):
        kv = x if memory is None else memory
        return self.mha(x, kv, kv, need_weights=False, **self.kwargs)[0]


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_multihead_attention_from_state_dict(batch_first, bias, device):
    lk_mha, torch_mha = _mha_pair(batch_first, device, bias)
    x = torch.randn(3, 17, 32, device=device)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    _assert_matches_torch(_Call(lk_mha), _Call(torch_mha), [x], torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mask_kind", ["bool", "float", "causal_hint", "padding", "both", "3d"])
def test_multihead_attention_masks(mask_kind, backend, device):
    b, length, heads = 2, 13, 4
    lk_mha, torch_mha = _mha_pair(True, device, backend=backend)
    causal = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)  # True = hidden
    padding = torch.zeros(b, length, dtype=torch.bool, device=device)
    padding[0, -4:] = True
    kwargs = {
        "bool": {"attn_mask": causal},
        "float": {"attn_mask": torch.randn(length, length, device=device)},
        "causal_hint": {"attn_mask": causal, "is_causal": True},
        "padding": {"key_padding_mask": padding},
        "both": {"attn_mask": causal, "key_padding_mask": padding, "is_causal": True},
        "3d": {"attn_mask": torch.randn(b * heads, length, length, device=device)},
    }[mask_kind]
    x = torch.randn(b, length, 32, device=device)
    _assert_matches_torch(_Call(lk_mha, **kwargs), _Call(torch_mha, **kwargs), [x],
                          torch.float32)


def test_multihead_attention_cross_and_unbatched(device):
    lk_mha, torch_mha = _mha_pair(False, device)
    x, memory = torch.randn(7, 2, 32, device=device), torch.randn(11, 2, 32, device=device)
    _assert_matches_torch(_Call(lk_mha), _Call(torch_mha), [x, memory], torch.float32)
    _assert_matches_torch(_Call(lk_mha), _Call(torch_mha), [x[:, 0]], torch.float32)
    q, k, v = (torch.randn(5, 2, 32, device=device) for _ in range(3))
    out = lk_mha(q, k, v, need_weights=False)[0]
    assert_close(out, copy.deepcopy(torch_mha).double()(
        q.double(), k.double(), v.double(), need_weights=False)[0],
        torch_mha(q, k, v, need_weights=False)[0], torch.float32, "distinct q, k, v")


def test_multihead_attention_need_weights_falls_back_to_torch(device):
    lk_mha, torch_mha = _mha_pair(True, device)
    x = torch.randn(2, 9, 32, device=device)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        out, weights = lk_mha(x, x, x)
    torch_out, torch_weights = torch_mha(x, x, x)
    assert torch.equal(out, torch_out) and torch.equal(weights, torch_weights)


class _Block(torch.nn.Module):
    """Pre-norm transformer block from torch.nn parts; x is (B, L, E) or (L, B, E)."""

    def __init__(self, d, heads, batch_first):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(d)
        self.attn = torch.nn.MultiheadAttention(d, heads, batch_first=batch_first)
        self.norm2 = torch.nn.RMSNorm(d, eps=1e-6)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.GELU(),
                                       torch.nn.Linear(2 * d, d))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class _Model(torch.nn.Module):
    def __init__(self, d=32, heads=4):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Block(d, heads, True), _Block(d, heads, False)])
        self.final = torch.nn.ModuleDict({"norm": torch.nn.LayerNorm(d, bias=False)})

    def forward(self, x):  # (B, L, E)
        x = self.blocks[0](x)
        x = self.blocks[1](x.transpose(0, 1)).transpose(0, 1)
        return self.final["norm"](x)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_convert_keeps_outputs_and_shares_parameters(backend, device):
    model = _randomize(_Model()).to(device)
    params = dict(model.named_parameters())
    reference = copy.deepcopy(model)
    x = torch.randn(2, 11, 32, device=device)
    converted = lknn.convert(model, backend=backend)
    assert converted is model
    kinds = {type(m) for m in model.modules()}
    assert {lknn.LayerNorm, lknn.RMSNorm, lknn.MultiheadAttention} <= kinds
    assert not kinds & {torch.nn.LayerNorm, torch.nn.RMSNorm, torch.nn.MultiheadAttention}
    assert all(params[name] is p for name, p in model.named_parameters())
    assert dict(model.named_parameters()).keys() == params.keys()
    _assert_matches_torch(model, reference, [x], torch.float32)
    assert model.blocks[1].attn.batch_first is False and model.blocks[0].attn.batch_first


def test_convert_leaves_what_it_cannot_convert_with_a_warning(device):
    model = torch.nn.Sequential(torch.nn.MultiheadAttention(16, 2, add_bias_kv=True),
                                torch.nn.LayerNorm(16))
    with pytest.warns(UserWarning, match="add_bias_kv"):
        lknn.convert(model)
    assert type(model[0]) is torch.nn.MultiheadAttention and type(model[1]) is lknn.LayerNorm


def test_convert_replaces_a_root_norm(device):
    norm = _randomize(torch.nn.RMSNorm(17, eps=1e-5)).to(device)
    converted = lknn.convert(norm, backend="torch")
    assert type(converted) is lknn.RMSNorm and converted.weight is norm.weight
    x = torch.randn(4, 17, device=device)
    _assert_matches_torch(converted, norm, [x], torch.float32)
