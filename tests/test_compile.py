"""torch.compile support: opcheck of every kernel op, and a compiled block with no graph break.

The ops of both kernel backends (torch.ops.llm_kernels.* from the compiled extension,
torch.ops.llm_kernels_triton.* from kernels/) go through torch.library.opcheck with small valid
inputs. A block calling lk.attention, lk.layer_norm and lk.feed_forward compiles with
fullgraph=True and gives eager's output and gradients, and so does lk.cross_entropy with its
in-place backward (a mutating op).
"""
import pytest
import torch

import llm_kernels as lk
from llm_kernels import _ops
from llm_kernels.backends import extension_status, load_extension
from llm_kernels.numerics import assert_close

# test_autograd_registration is left out on purpose: the ops are plain kernels without an
# autograd formula; llm_kernels/*.py wrap each forward/backward pair in a
# torch.autograd.Function outside the op, so the ops are always called without grad.
OPCHECK_UTILS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


def family(op):
    return _ops.op_family(op)


def namespace(backend, op):
    """The op namespace of ``backend`` holding ``op``, or skip with the reason it is missing."""
    if backend == "cuda":
        if load_extension() is None:
            pytest.skip(extension_status()[1])
        return getattr(torch.ops, _ops.CUDA_NAMESPACE)
    reason = _ops.triton_kernel_reason(family(op))
    if reason is not None:
        pytest.skip(reason)
    return _ops.triton_ops()


def attention_cases(ns, device):
    q = torch.randn(1, 5, 4, 16, device=device).transpose(1, 2)  # (B, H, Lq, D), strided
    k = torch.randn(1, 2, 7, 16, device=device)  # (B, Hkv, Lk, D)
    v = torch.randn(1, 2, 7, 16, device=device)
    mask = torch.randn(1, 1, 5, 7, device=device).expand(1, 4, 5, 7)  # additive, 0 strides
    forward = [(q, k, v, None, True, 2, 0.25), (q, k, v, mask, False, 0, 0.3)]
    backward = []
    for args in forward:
        out, lse = ns.attention_forward(*args)
        backward.append((torch.randn_like(out), q, k, v, out, lse, *args[3:]))
    return forward, backward


def layer_norm_cases(ns, device):
    x = torch.randn(7, 33, device=device)
    w, b, r = torch.randn(33, device=device), torch.randn(33, device=device), torch.randn_like(x)
    forward = [(x, w, b, r, 1e-5, False), (x, w, None, None, 1e-6, True),
               (x, None, None, None, 1e-5, False)]
    backward = []
    for x_, w_, b_, r_, _, rms in forward:
        y, h, mean, rstd = ns.layer_norm_forward(x_, w_, b_, r_, 1e-5, rms)
        grad_h = torch.randn_like(h) if r_ is not None else None
        backward.append((torch.randn_like(y), grad_h, h if r_ is not None else x_, w_, b_, mean,
                         rstd, rms))
    return forward, backward


def softmax_cases(ns, device):
    x = torch.randn(7, 33, device=device)
    return [(x,)], [(torch.randn_like(x), ns.softmax_forward(x))]


def feed_forward_cases(ns, device):
    x = torch.randn(7, 16, device=device)
    w1, w2 = torch.randn(24, 16, device=device), torch.randn(16, 24, device=device)
    b1, b2 = torch.randn(24, device=device), torch.randn(16, device=device)
    forward = [(x, w1, b1, w2, b2, "gelu"), (x, w1, None, w2, None, "silu")]
    backward = []
    for args in forward:
        out, pre = ns.feed_forward_forward(*args)
        backward.append((torch.randn_like(out), *args[:5], pre, args[5]))
    return forward, backward


def swiglu_cases(ns, device):
    x = torch.randn(7, 16, device=device)
    w_gate, w_up = torch.randn(24, 16, device=device), torch.randn(24, 16, device=device)
    w_down = torch.randn(16, 24, device=device)
    out, gate, up = ns.swiglu_forward(x, w_gate, w_up, w_down)
    return ([(x, w_gate, w_up, w_down)],
            [(torch.randn_like(out), x, w_gate, w_up, w_down, gate, up)])


def cross_entropy_cases(ns, device):
    logits = torch.randn(7, 33, device=device)
    target = torch.randint(0, 33, (7,), device=device)
    target[2] = -100
    loss, lse = ns.cross_entropy_forward(logits, target, -100)
    return ([(logits, target, -100)],
            [(torch.randn(7, device=device), logits, target, lse, -100)])


CASES = {"attention": attention_cases, "layer_norm": layer_norm_cases, "softmax": softmax_cases,
         "feed_forward": feed_forward_cases, "swiglu": swiglu_cases,
         "cross_entropy": cross_entropy_cases}


def test_every_schema_has_cases():
    assert {family(op) for op in _ops.SCHEMAS} == set(CASES)


@pytest.mark.parametrize("op", sorted(_ops.SCHEMAS))
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_opcheck(backend, op, device):
    ns = namespace(backend, op)
    forward, backward = CASES[family(op)](ns, device)
    cases = forward if op.endswith("_forward") else backward
    for args in cases:
        torch.library.opcheck(getattr(ns, op).default, args, test_utils=OPCHECK_UTILS)


HEADS = 2


def block(x, w_qkv, weight, bias, w1, b1, w2, b2, backend):
    """Pre-norm transformer block: attention then a GELU feed-forward, x (B, L, C)."""
    b, seq_len, c = x.shape
    qkv = (x @ w_qkv.t()).view(b, seq_len, 3, HEADS, c // HEADS)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, D) strided views
    a = lk.attention(q, k, v, causal=True, backend=backend)
    h = a.transpose(1, 2).reshape(b, seq_len, c) + x
    n = lk.layer_norm(h, weight, bias, backend=backend)
    return lk.feed_forward(n, w1, b1, w2, b2, activation="gelu", backend=backend) + h


def block_inputs(device, b, seq_len, c, d_ff):
    """x ~ N(0, 1); the matrices scaled like nn.Linear's init (std 1/sqrt(fan_in)), so the
    attention logits are O(1) as in a real model rather than a saturated softmax; the vectors
    ~ N(0, 1/4)."""
    x = torch.randn(b, seq_len, c, device=device)
    mats = [torch.randn(shape, device=device) / shape[1] ** 0.5
            for shape in ((3 * c, c), (d_ff, c), (c, d_ff))]
    vecs = [torch.randn(n, device=device) / 2 for n in (c, c, d_ff, c)]
    w_qkv, w1, w2 = mats
    weight, bias, b1, b2 = vecs
    return [t.requires_grad_() for t in (x, w_qkv, weight, bias, w1, b1, w2, b2)]


def run(fn, inputs, backend):
    """(out, gradient of mean(out) for every input)."""
    out = fn(*inputs, backend=backend)
    grad = torch.ones_like(out) / out.numel()
    return (out, *torch.autograd.grad(out, inputs, grad))


def run_eager_or_skip(inputs, backend):
    try:
        return run(block, inputs, backend)
    except lk.BackendUnavailableError as exc:
        pytest.skip(str(exc))


NAMES = ("out", "dx", "dw_qkv", "dweight", "dbias", "dw1", "db1", "dw2", "db2")


# ids other than a bare "cuda": conftest skips items whose keywords include "cuda" on CPU.
BACKEND_IDS = {"ids": lambda name: f"{name}_backend"}


@pytest.mark.parametrize("backend", ["cuda", "triton"], **BACKEND_IDS)
def test_compiled_block_matches_eager_without_graph_break(backend):
    """aot_eager runs dynamo with fullgraph, the fake kernels and AOT autograd (the parts the
    ops and their autograd Functions must support) without inductor's slow C++ codegen; it
    runs the same kernels as eager, so results are identical."""
    inputs = block_inputs("cpu", 2, 9, 32, 48)
    expected = run_eager_or_skip(inputs, backend)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block)(*inputs, backend=backend)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    for name, got, want in zip(NAMES, run(compiled, inputs, backend), expected):
        assert torch.equal(got, want), f"{name} differs between compiled and eager"


@pytest.mark.parametrize("backend", ["cuda", "triton"], **BACKEND_IDS)
def test_compiled_block_without_gradients(backend):
    """Under no_grad the ops run their forward kernels without an autograd node; that path
    compiles with fullgraph as well, to eager's bits."""
    inputs = [t.detach() for t in block_inputs("cpu", 2, 9, 32, 48)]
    run_eager_or_skip([t.clone().requires_grad_() for t in inputs], backend)
    with torch.no_grad():
        expected = block(*inputs, backend=backend)
        torch._dynamo.reset()
        got = torch.compile(block, fullgraph=True, backend="aot_eager")(*inputs, backend=backend)
    assert got.grad_fn is None and torch.equal(got, expected)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"], **BACKEND_IDS)
def test_compiled_block_on_gpu_with_inductor(backend):
    """The default inductor backend on a GPU: output and gradients pass the rule against the
    float64 reference block (torch backend on float64 inputs)."""
    inputs = block_inputs("cuda", 4, 257, 256, 1024)
    run_eager_or_skip(inputs, backend)
    torch._dynamo.reset()
    results = run(torch.compile(block, fullgraph=True), inputs, backend)
    ref = run(block, [t.detach().double().requires_grad_() for t in inputs], "torch")
    torch_out = run(block, inputs, "torch")
    for name, got, want, base in zip(NAMES, results, ref, torch_out):
        assert_close(got, want, base, torch.float32, f"compiled block {name}")



def lm_head_loss(h, w, target, backend, inplace_backward):
    return lk.cross_entropy(h @ w, target, backend=backend, inplace_backward=inplace_backward)


@pytest.mark.parametrize("backend", ["cuda", "triton"], **BACKEND_IDS)
def test_compiled_inplace_cross_entropy_matches_eager_without_graph_break(backend):
    """The mutating cross_entropy_backward_inplace op under aot_eager with fullgraph: the loss
    and the gradients of h and w are eager's (default backward) bit for bit."""
    h = torch.randn(37, 16).requires_grad_()
    w = (torch.randn(16, 101) / 4).requires_grad_()
    target = torch.randint(0, 101, (37,))
    target[3] = -100

    def loss_and_grads(fn, inplace_backward):
        loss = fn(h, w, target, backend, inplace_backward)
        return (loss, *torch.autograd.grad(loss, (h, w)))

    try:
        expected = loss_and_grads(lm_head_loss, False)
    except lk.BackendUnavailableError as exc:
        pytest.skip(str(exc))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lm_head_loss)(h, w, target, backend, True)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(lm_head_loss, fullgraph=True, backend="aot_eager")
    for name, got, want in zip(("loss", "dh", "dw"), loss_and_grads(compiled, True), expected):
        assert torch.equal(got, want), f"{name} differs between compiled in-place and eager"


def test_compiled_torch_fallbacks_and_default_scale_under_dynamic_shapes():
    """fullgraph compiles of what falls back to torch (dropout, float64: the once-per-reason
    warning must not break the graph) and of lk.attention's default scale 1/sqrt(D) with
    dynamic shapes (a symbolic float)."""
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))

    def dropout_sdpa(q, k, v):
        return lk.scaled_dot_product_attention(q, k, v, dropout_p=0.5)

    def default_scale(q, k, v):
        return lk.attention(q, k, v, causal=True)

    torch._dynamo.reset()
    out = torch.compile(dropout_sdpa, fullgraph=True, backend="aot_eager")(q, k, v)
    assert out.shape == q.shape and torch.isfinite(out).all()
    qd, kd, vd = (t.double() for t in (q, k, v))
    torch.testing.assert_close(
        torch.compile(lk.scaled_dot_product_attention, fullgraph=True, backend="aot_eager")(
            qd, kd, vd), torch.nn.functional.scaled_dot_product_attention(qd, kd, vd))
    compiled = torch.compile(default_scale, fullgraph=True, dynamic=True, backend="aot_eager")
    assert torch.equal(compiled(q, k, v), default_scale(q, k, v))
