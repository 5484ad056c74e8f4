"""Where the lk functions must behave like the torch ops they replace, beyond the numbers:
autocast, double backward, empty inputs, gradient storage, strides, and the nn modules inside
torch's own containers. Runs on every backend this machine has (triton under the interpreter).
"""
import pytest
import torch
import torch.nn.functional as F

import llm_kernels as lk
from llm_kernels import nn as lknn
from llm_kernels.numerics import assert_close
from llm_kernels.reference import (attention_ref, cross_entropy_ref, feed_forward_ref,
                                   layer_norm_ref, rms_norm_ref, softmax_ref, swiglu_ref)

BACKENDS = [name for name, (ok, _) in lk.available_backends().items() if ok]
BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def on_device(device):
    """Every tensor of these tests on the test device (the GPU when there is one)."""
    with torch.device(device):
        yield device


def _ffn_args(n=5, d=24, d_ff=40):
    return (torch.randn(n, d), torch.randn(d_ff, d) / 5, torch.randn(d_ff),
            torch.randn(d, d_ff) / 6, torch.randn(d))


# ---- autocast ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_matmul_ops_take_the_autocast_dtype_like_torch(backend, on_device):
    """attention, sdpa, feed_forward and swiglu under autocast: float32 inputs are cast to bf16
    (as torch casts SDPA's and F.linear's); the result is the bf16 computation's."""
    x, w1, b1, w2, b2 = _ffn_args()
    q, k, v = torch.randn(1, 4, 9, 16), torch.randn(1, 2, 11, 16), torch.randn(1, 2, 11, 16)
    with torch.autocast(on_device.type, dtype=BF16):
        ff = lk.feed_forward(x, w1, b1, w2, b2, backend=backend)
        sw = lk.swiglu(x, w1, w1.flip(0), w2, backend=backend)
        att = lk.attention(q, k.to(BF16), v, causal=True, backend=backend)  # mixed dtypes too
        with lk.use_backend(backend):
            sdpa = lk.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        torch_sdpa = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert (ff.dtype, sw.dtype, att.dtype, sdpa.dtype) == (BF16,) * 4 == (torch_sdpa.dtype,) * 4
    low = [t.to(BF16) for t in (x, w1, b1, w2, b2)]
    assert_close(ff, feed_forward_ref(*low, upcast=True), feed_forward_ref(*low), BF16)
    assert_close(sw, swiglu_ref(low[0], low[1], low[1].flip(0), low[3], upcast=True),
                 swiglu_ref(low[0], low[1], low[1].flip(0), low[3]), BF16)
    ql, kl, vl = (t.to(BF16) for t in (q, k, v))
    assert_close(att, attention_ref(ql, kl, vl, causal=True, upcast=True),
                 attention_ref(ql, kl, vl, causal=True), BF16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_norms_promote_and_cross_entropy_returns_float32_under_autocast(backend, on_device):
    """Norms: bf16 activations with float32 parameters give float32 (torch's CUDA autocast
    result), all-bf16 stays bf16; softmax keeps its dtype; the loss is float32 like torch's."""
    x, r, w, b = torch.randn(6, 33).to(BF16), torch.randn(6, 33), torch.randn(33), torch.randn(33)
    logits, target = torch.randn(7, 50).to(BF16), torch.randint(0, 50, (7,))
    with torch.autocast(on_device.type, dtype=BF16):
        normed, h = lk.layer_norm(x, w, b, residual=r, backend=backend)
        low = lk.rms_norm(x, w.to(BF16), backend=backend)
        soft = lk.softmax(x, backend=backend)
        loss = lk.cross_entropy(logits, target, backend=backend)
        torch_loss = F.cross_entropy(logits, target)
    assert (normed.dtype, h.dtype, low.dtype, soft.dtype) == (torch.float32, torch.float32, BF16,
                                                             BF16)
    assert loss.dtype == torch_loss.dtype == torch.float32
    xf = x.float()
    assert_close(normed, layer_norm_ref(xf, w, b, residual=r, upcast=True)[0],
                 layer_norm_ref(xf, w, b, residual=r)[0], torch.float32)
    assert_close(loss, cross_entropy_ref(logits.float(), target, upcast=True),
                 F.cross_entropy(logits.float(), target), torch.float32)
    assert_close(soft, softmax_ref(x, -1, upcast=True), softmax_ref(x, -1), BF16)
    assert_close(low, rms_norm_ref(x, w.to(BF16), upcast=True), rms_norm_ref(x, w.to(BF16)), BF16)


def test_validation_errors_survive_autocast(on_device):
    """The autocast casting steps leave bad input to the checks that name it."""
    with torch.autocast(on_device.type, dtype=BF16):
        for call in (lambda: lk.layer_norm(torch.ones(3, 4, dtype=torch.long)),
                     lambda: lk.rms_norm(torch.ones(3, 4, dtype=torch.long)),
                     lambda: lk.softmax(torch.ones(3, 4, dtype=torch.long)),
                     lambda: lk.attention(*(torch.ones(1, 1, 2, 8, dtype=torch.long),) * 3)):
            with pytest.raises(TypeError, match="must be float16"):
                call()


def test_compiled_ops_run_in_their_inputs_dtype_under_autocast(on_device):
    """The C++ feed-forward ops called directly under autocast: their GEMMs stay in the inputs'
    dtype (autocast used to turn them bf16 under kernels that read float32: heap corruption)."""
    if not lk.available_backends()["cuda"][0]:
        pytest.skip(lk.available_backends()["cuda"][1])
    ops = torch.ops.llm_kernels
    x, w1, b1, w2, b2 = _ffn_args()
    with torch.autocast(on_device.type, dtype=BF16):
        out, pre = ops.feed_forward_forward(x, w1, b1, w2, b2, "gelu")
        grads = ops.feed_forward_backward(torch.ones_like(out), x, w1, b1, w2, b2, pre, "gelu")
        sw, gate, up = ops.swiglu_forward(x, w1, w1, w2)
        sw_grads = ops.swiglu_backward(torch.ones_like(sw), x, w1, w1, w2, gate, up)
    for t in (out, pre, sw, gate, up, *grads, *sw_grads):
        assert t.dtype == torch.float32
    assert_close(out, feed_forward_ref(x, w1, b1, w2, b2, upcast=True),
                 feed_forward_ref(x, w1, b1, w2, b2), torch.float32)


# ---- double backward ---------------------------------------------------------------------------

def _gradient_penalty_calls(backend):
    """(name, f(x) -> a scalar) for each op, differentiable in x."""
    w = torch.randn(12)
    _, w1, b1, w2, b2 = _ffn_args(d=12, d_ff=20)
    target = torch.randint(0, 12, (6,))
    return [
        ("attention", lambda x: lk.attention(x.view(1, 2, 3, 12), x.view(1, 2, 3, 12),
                                             x.view(1, 2, 3, 12), backend=backend).sum()),
        ("layer_norm", lambda x: (lk.layer_norm(x, w, backend=backend) ** 3).sum()),
        ("rms_norm", lambda x: (lk.rms_norm(x, w, backend=backend) ** 3).sum()),
        ("softmax", lambda x: (lk.softmax(x, backend=backend) * w).pow(2).sum()),
        ("feed_forward", lambda x: lk.feed_forward(x, w1, b1, w2, b2, backend=backend).sum()),
        ("swiglu", lambda x: lk.swiglu(x, w1, w1.flip(0), w2, backend=backend).sum()),
        ("cross_entropy", lambda x: lk.cross_entropy(x, target, backend=backend)),
    ]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_double_backward_through_the_kernels_raises(backend):
    """A gradient penalty (the incoming gradient requires no grad, so torch's
    once_differentiable would hand back constants and drop the penalty's gradient silently)
    and a Hessian-vector product both raise with the way out in the message."""
    for name, f in _gradient_penalty_calls(backend):
        x = torch.randn(6, 12, requires_grad=True)
        (g,) = torch.autograd.grad(f(x), x, create_graph=True)
        with pytest.raises(RuntimeError, match="backend='torch'"):
            (g ** 2).sum().backward()
        (g,) = torch.autograd.grad(f(x), x, create_graph=True)
        with pytest.raises(RuntimeError, match="not differentiable"):
            torch.autograd.grad((g * torch.randn_like(g)).sum(), x)
        assert name


def test_double_backward_on_the_torch_backend_matches_torch():
    """The way out the error names works: backend='torch' gives torch's second derivative."""
    w = torch.randn(12)
    x = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad((lk.layer_norm(x, w.double(), backend="torch") ** 3).sum(), x,
                               create_graph=True)
    (h,) = torch.autograd.grad((g ** 2).sum(), x)
    xr = x.detach().requires_grad_()
    (gr,) = torch.autograd.grad((F.layer_norm(xr, (12,), w.double()) ** 3).sum(), xr,
                                create_graph=True)
    (hr,) = torch.autograd.grad((gr ** 2).sum(), xr)
    torch.testing.assert_close(h, hr)


# ---- empty inputs ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs_give_torchs_result_on_every_backend(backend):
    """Zero rows, zero keys, zero hidden units: torch's result, whichever backend is asked for
    (an MoE expert that gets no tokens must not stop training), with gradients."""
    x = torch.randn(0, 9, requires_grad=True)
    q, kv = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 0, 16)
    _, w1, b1, w2, b2 = _ffn_args(d=9, d_ff=7)
    with lk.use_backend(backend):
        outs = {
            "layer_norm": (lk.layer_norm(x, torch.ones(9)), F.layer_norm(x, (9,), torch.ones(9))),
            "softmax": (lk.softmax(x), torch.softmax(x, -1)),
            "feed_forward": (lk.feed_forward(x, w1, b1, w2, b2),
                             F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)),
            "no_keys": (lk.attention(q, kv, kv), F.scaled_dot_product_attention(q, kv, kv)),
            "no_queries": (lk.attention(kv, q, q), F.scaled_dot_product_attention(kv, q, q)),
            "ce_sum": (lk.cross_entropy(x, torch.zeros(0, dtype=torch.long), reduction="sum"),
                       F.cross_entropy(x, torch.zeros(0, dtype=torch.long), reduction="sum")),
        }
        mean = lk.cross_entropy(x, torch.zeros(0, dtype=torch.long))
    for name, (ours, theirs) in outs.items():
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, name
        torch.testing.assert_close(ours, theirs, msg=name)
    assert torch.isnan(mean)  # torch's mean over no rows
    for q_, kv_ in ((q[..., :0], q[..., :0]), (q[:, :0], q[:, :0])):  # D = 0; H = Hkv = 0
        with lk.use_backend(backend):
            got = lk.attention(q_, kv_, kv_)
        assert got.shape == F.scaled_dot_product_attention(q_, kv_, kv_).shape
    assert lk.dispatch_log()[-1]["backend"] == "torch"
    sum(o.sum() for o, _ in outs.values() if o.requires_grad).backward()
    assert x.grad.shape == x.shape


# ---- gradients, strides, contiguity ------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("route", ["leaves", "residual_clone", "x_plus_zero"])
def test_x_and_residual_leaves_get_separate_grad_tensors(backend, route):
    """dx is the gradient of x and of the residual: the two leaves must not end up sharing a
    .grad storage (directly, or through ops that pass the gradient on unchanged), or a later
    accumulation into one (micro-batches) changes the other."""
    a, r = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16, requires_grad=True)
    x, res = {"leaves": (a, r), "residual_clone": (a, r.clone()), "x_plus_zero": (a + 0, r)}[route]
    y, h = lk.rms_norm(x, residual=res, backend=backend)
    (y.sum() + h.pow(2).sum()).backward()
    assert a.grad.untyped_storage().data_ptr() != r.grad.untyped_storage().data_ptr()
    expected = r.grad.clone()
    (a * 5).sum().backward()
    a.grad.mul_(0.5)
    torch.testing.assert_close(r.grad, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_parameters_and_softmax_layout(backend):
    """Strided 1-D weights/biases are taken (as torch takes them); softmax over a middle dim
    returns a contiguous tensor, as torch's does."""
    x = torch.randn(3, 32)
    w, b = torch.randn(64)[::2], torch.randn(64)[1::2]
    assert_close(lk.layer_norm(x, w, b, backend=backend), layer_norm_ref(x, w, b, upcast=True),
                 layer_norm_ref(x, w, b), torch.float32)
    xf, w1, b1, w2, b2 = _ffn_args(d=32, d_ff=20)
    b1s, b2s = torch.randn(40)[::2], torch.randn(64)[::2]
    assert_close(lk.feed_forward(xf, w1, b1s, w2, b2s, backend=backend),
                 feed_forward_ref(xf, w1, b1s, w2, b2s, upcast=True),
                 feed_forward_ref(xf, w1, b1s, w2, b2s), torch.float32)
    t = torch.randn(2, 7, 5)
    y = lk.softmax(t, dim=1, backend=backend)
    assert y.is_contiguous() and y.stride() == torch.softmax(t, 1).stride()
    assert y.view(2, 35).shape == (2, 35)


# ---- nn modules inside torch containers --------------------------------------------------------

def test_norm_modules_take_a_transposed_input_and_no_rows():
    """A Conv1d output transposed to (B, L, C) and an empty batch: what torch's modules take."""
    conv_out = torch.randn(2, 6, 11)                         # (B, C, L)
    t = conv_out.transpose(1, 2)                             # (B, L, C), strided last dim
    for ours, theirs in ((lknn.LayerNorm(6), torch.nn.LayerNorm(6)),
                         (lknn.RMSNorm(6), torch.nn.RMSNorm(6))):
        ours.load_state_dict(theirs.state_dict())
        torch.testing.assert_close(ours(t), theirs(t))
        assert ours(torch.randn(0, 6)).shape == (0, 6)


def test_norm_modules_reset_parameters():
    for module in (lknn.LayerNorm(5), lknn.RMSNorm(5)):
        for p in module.parameters():
            p.data.fill_(3.0)
        module.reset_parameters()
        assert torch.equal(module.weight, torch.ones(5))
        if getattr(module, "bias", None) is not None:
            assert torch.equal(module.bias, torch.zeros(5))


@pytest.mark.parametrize("nested", [True, False], ids=["nested", "not_nested"])
@pytest.mark.parametrize("kwargs", [{}, {"src_key_padding_mask": True}], ids=["plain", "padding"])
def test_converted_transformer_encoder_in_inference_mode(kwargs, nested):
    """torch's TransformerEncoder takes a fused fast path under no_grad in eval mode that reads
    the attention module's internals, and packs a padded batch into a nested tensor; a converted
    encoder runs the lk modules on plain tensors there instead."""
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested).eval()
    converted = lknn.convert(__import__("copy").deepcopy(encoder)).eval()
    src = torch.randn(3, 10, 32)
    mask = {}
    if kwargs:
        padding = torch.zeros(3, 10, dtype=torch.bool)
        padding[1, 7:] = True
        mask = {"src_key_padding_mask": padding}
    with torch.no_grad():
        expected = encoder(src, **mask)
        lk.dispatch_log(clear=True)
        got = converted(src, **mask)
    assert any(e["op"] == "scaled_dot_product_attention" for e in lk.dispatch_log())
    keep = ~mask["src_key_padding_mask"] if mask else torch.ones(3, 10, dtype=torch.bool)
    torch.testing.assert_close(got[keep], expected[keep], atol=2e-5, rtol=2e-5)
