"""lk.feed_forward and lk.swiglu (Triton backend) against the float64 reference, by the pass rule.

Every output and every gradient is compared with ``*_ref(upcast=True)``; the allowance is set
by the same computation through the torch backend in the same dtype.
"""
import math

import pytest
import torch

import llm_kernels as lk
from llm_kernels.kernels import feed_forward as ff_kernels
from llm_kernels.kernels import swiglu as swiglu_kernels
from llm_kernels.numerics import assert_close
from llm_kernels.reference import ACTIVATIONS, feed_forward_ref, swiglu_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _linear_weight(out_features, in_features, dtype, device):
    """nn.Linear-like scale, so pre-activations are O(1)."""
    return (torch.randn(out_features, in_features, device=device)
            / math.sqrt(in_features)).to(dtype)


def _ff_inputs(shape, d_ff, d_out, dtype, device, bias=True):
    """x (*shape), w1 (d_ff, d), b1 (d_ff,), w2 (d_out, d_ff), b2 (d_out,) (biases maybe None)."""
    d = shape[-1]
    x = torch.randn(shape, device=device).to(dtype)
    w1 = _linear_weight(d_ff, d, dtype, device)
    w2 = _linear_weight(d_out, d_ff, dtype, device)
    b1 = (0.5 * torch.randn(d_ff, device=device)).to(dtype) if bias else None
    b2 = (0.5 * torch.randn(d_out, device=device)).to(dtype) if bias else None
    return [x, w1, b1, w2, b2]


def _swiglu_inputs(shape, d_ff, d_out, dtype, device):
    """x (*shape), w_gate (d_ff, d), w_up (d_ff, d), w_down (d_out, d_ff)."""
    d = shape[-1]
    return [torch.randn(shape, device=device).to(dtype), _linear_weight(d_ff, d, dtype, device),
            _linear_weight(d_ff, d, dtype, device), _linear_weight(d_out, d_ff, dtype, device)]


def _run(fn, tensors, grad_out=None, upcast=False):
    """fn(*leaves) and the gradients of <out, grad_out> w.r.t. every tensor that is not None."""
    leaves = [None if t is None else
              (t.detach().double() if upcast else t.detach().clone()).requires_grad_()
              for t in tensors]
    out = fn(*leaves)
    if grad_out is None:
        return out, []
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, present, grad_out.to(out.dtype))
    return out, list(grads)


def _check(kernel_fn, torch_fn, ref_fn, tensors, dtype, names):
    """Forward and backward of kernel_fn pass the rule against ref_fn, allowance from torch_fn."""
    with torch.no_grad():
        grad_out = torch.randn_like(torch_fn(*tensors))
    out, grads = _run(kernel_fn, tensors, grad_out)
    torch_out, torch_grads = _run(torch_fn, tensors, grad_out)
    ref, ref_grads = _run(ref_fn, tensors, grad_out, upcast=True)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, torch_out, dtype, "output")
    present = [n for n, t in zip(names, tensors) if t is not None]
    assert len(grads) == len(present)
    for name, g, tg, rg in zip(present, grads, torch_grads, ref_grads):
        assert g.dtype == dtype and g.shape == rg.shape
        assert_close(g, rg, tg, dtype, "grad " + name)


FF_NAMES = ("x", "w1", "b1", "w2", "b2")
SWIGLU_NAMES = ("x", "w_gate", "w_up", "w_down")


def _check_ff(tensors, activation, dtype):
    def kernel(*t):
        return lk.feed_forward(*t, activation=activation, backend="triton")

    def torch_backend(*t):
        return lk.feed_forward(*t, activation=activation, backend="torch")

    def ref(*t):
        return feed_forward_ref(*t, activation=activation, upcast=True)

    _check(kernel, torch_backend, ref, tensors, dtype, FF_NAMES)


def _check_swiglu(tensors, dtype):
    _check(lambda *t: lk.swiglu(*t, backend="triton"), lambda *t: lk.swiglu(*t, backend="torch"),
           lambda *t: swiglu_ref(*t, upcast=True), tensors, dtype, SWIGLU_NAMES)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_feed_forward_matches_reference(activation, bias, dtype, device):
    _check_ff(_ff_inputs((37, 17), 97, 17, dtype, device, bias), activation, dtype)


@pytest.mark.parametrize("n,d,d_ff,d_out", [(1, 64, 127, 64), (37, 64, 97, 17),
                                            (1, 17, 127, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_feed_forward_odd_sizes(n, d, d_ff, d_out, dtype, device):
    _check_ff(_ff_inputs((n, d), d_ff, d_out, dtype, device), "gelu", dtype)


def test_feed_forward_3d_input(device):
    dtype = torch.float16
    _check_ff(_ff_inputs((2, 5, 17), 97, 17, dtype, device), "gelu_tanh", dtype)


def test_feed_forward_backward_is_deterministic(device):
    tensors = _ff_inputs((37, 64), 127, 64, torch.bfloat16, device)
    grad_out = torch.randn(37, 64, device=device).to(torch.bfloat16)

    def grads():
        return _run(lambda *t: lk.feed_forward(*t, activation="silu", backend="triton"),
                    tensors, grad_out)[1]

    first, second = grads(), grads()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d,d_ff,d_out", [(37, 17, 97, 17), (1, 64, 127, 33)])
def test_swiglu_matches_reference(n, d, d_ff, d_out, dtype, device):
    _check_swiglu(_swiglu_inputs((n, d), d_ff, d_out, dtype, device), dtype)


def test_swiglu_3d_input_and_determinism(device):
    dtype = torch.bfloat16
    tensors = _swiglu_inputs((2, 5, 64), 127, 64, dtype, device)
    _check_swiglu(tensors, dtype)
    grad_out = torch.randn(2, 5, 64, device=device).to(dtype)

    def grads():
        return _run(lambda *t: lk.swiglu(*t, backend="triton"), tensors, grad_out)[1]

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


def test_absent_biases_give_empty_gradients_from_the_op(device):
    """The kernel op returns empty tensors for absent biases (op convention)."""
    x, w1, _, w2, _ = _ff_inputs((5, 17), 33, 17, torch.float32, device, bias=False)
    ops = lk._ops.ops("triton")
    out, pre = ops.feed_forward_forward(x, w1, None, w2, None, "relu")
    assert pre.shape == (5, 33) and out.shape == (5, 17)
    grads = ops.feed_forward_backward(torch.randn_like(out), x, w1, None, w2, None, pre, "relu")
    assert grads[2].numel() == 0 and grads[4].numel() == 0
    assert [tuple(g.shape) for g in (grads[0], grads[1], grads[3])] == [(5, 17), (33, 17), (17, 33)]


# Realistic sizes, run by bench/gpu_check.sh on an H100.
@pytest.mark.cuda
@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_feed_forward_realistic_cuda(activation):
    dtype = torch.bfloat16
    _check_ff(_ff_inputs((4096, 1024), 4096, 1024, dtype, "cuda"), activation, dtype)


@pytest.mark.cuda
def test_feed_forward_realistic_fp32_cuda():
    dtype = torch.float32
    _check_ff(_ff_inputs((1025, 1024), 4097, 1024, dtype, "cuda"), "gelu_tanh", dtype)


@pytest.mark.cuda
def test_swiglu_realistic_cuda():
    dtype = torch.bfloat16
    _check_swiglu(_swiglu_inputs((4096, 1024), 4096, 1024, dtype, "cuda"), dtype)


@pytest.mark.cuda
def test_feed_forward_odd_realistic_cuda():
    dtype = torch.float16
    _check_ff(_ff_inputs((2, 2049, 1000), 4001, 1000, dtype, "cuda"), "relu", dtype)



def _only_config(monkeypatch, tuner, tiles, index):
    """Make autotuner ``tuner`` run the 16-bit config ``tiles[index]`` alone."""
    m, n, k, stages, warps = tiles[index]
    config = next(c for c in tuner.configs
                  if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages,
                      c.num_warps) == (m, n, k, stages, warps))
    monkeypatch.setattr(tuner, "configs", [config])
    monkeypatch.setattr(tuner, "cache", {})


@pytest.mark.cuda
@pytest.mark.parametrize("index", range(len(ff_kernels.MATMUL_TILES)))
def test_every_matmul_config_cuda(index, monkeypatch):
    """Each 16-bit matmul config alone (the autotuner may pick any on a GPU), the feed-forward
    forward and backward (every epilogue) at odd sizes against the fp64 reference."""
    _only_config(monkeypatch, ff_kernels._matmul_kernel, ff_kernels.MATMUL_TILES, index)
    dtype = torch.bfloat16
    _check_ff(_ff_inputs((1000, 520), 1544, 500, dtype, "cuda"), "gelu", dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("index", range(len(swiglu_kernels.GATE_UP_TILES)))
def test_every_gate_up_config_cuda(index, monkeypatch):
    """Each config of swiglu's fused gate/up matmul alone, forward and backward."""
    _only_config(monkeypatch, swiglu_kernels._gate_up_kernel, swiglu_kernels.GATE_UP_TILES, index)
    dtype = torch.bfloat16
    _check_swiglu(_swiglu_inputs((1000, 520), 1544, 500, dtype, "cuda"), dtype)


@pytest.mark.parametrize("shape", [(1, 7), (300, 129), (513, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_column_sum(shape, dtype, device):
    """column_sum (the bias gradients) over one, two and three chunks of rows, a strided view
    too, against float64 by the pass rule; the same bits twice."""
    x = torch.randn(shape[0], shape[1] + 3, device=device).to(dtype)[:, 2:-1]    # strided rows
    out = ff_kernels.column_sum(x)
    assert out.dtype == dtype and out.shape == (shape[1],)
    assert_close(out, x.double().sum(0), x.sum(0), dtype, "column sums")
    assert torch.equal(out, ff_kernels.column_sum(x))


# ---- the matmul reading its operands through TMA descriptors ($LLM_KERNELS_MATMUL_TMA=1) ----

class _PointerKernelCalled:
    """Stands in for the pointer-load matmul kernel where the TMA one must run instead."""

    def __getitem__(self, grid):
        raise AssertionError("the pointer-load matmul ran where the TMA one should have")


@pytest.fixture
def tma_only(monkeypatch):
    """TMA reads switched on, and the pointer-load kernel made to fail if it is launched."""
    monkeypatch.setenv(ff_kernels.TMA_ENV, "1")
    monkeypatch.setattr(ff_kernels, "_matmul_kernel", _PointerKernelCalled())


def test_tma_reads_only_where_tma_can_read(monkeypatch, device):
    """use_tma: off unless switched on; 16-bit operands, each row-major or transposed with rows
    on 16-byte boundaries (on a GPU, Hopper or newer)."""
    a = torch.randn(37, 72, device=device).to(torch.bfloat16)
    b = torch.randn(104, 72, device=device).to(torch.bfloat16).t()      # (72, 104) transposed
    assert not ff_kernels.use_tma(a, b)
    monkeypatch.setenv(ff_kernels.TMA_ENV, "1")
    hopper = device.type == "cpu" or torch.cuda.get_device_capability(device)[0] >= 9
    assert ff_kernels.use_tma(a, b) == hopper
    a_t = torch.randn(72, 40, device=device).to(torch.bfloat16).t()     # (40, 72) transposed
    assert ff_kernels.use_tma(a_t, b) == hopper
    assert not ff_kernels.use_tma(a.t().contiguous().t(), b)             # rows of 37: 74 bytes
    assert not ff_kernels.use_tma(a.float(), b.float())                  # fp32: FMA configs
    assert not ff_kernels.use_tma(a[:, 1:], b[1:])                       # rows off 16 bytes
    assert not ff_kernels.use_tma(a[::2, ::2], b[::2])                   # no unit stride


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_feed_forward_through_tma(activation, dtype, device, tma_only):
    """Forward and backward with every matmul reading A and B by TMA, every operand layout
    (x @ w1.T, dpre @ w1, dpre.T @ x, h.T @ grad_out) at sizes with tails in M, N and K
    (TMA reads zeros past the ends) and the bias sums, against the fp64 reference."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        pytest.skip("TMA needs a Hopper or newer GPU")
    _check_ff(_ff_inputs((37, 72), 104, 40, dtype, device), activation, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("index", range(len(ff_kernels.MATMUL_TILES)))
def test_every_tma_matmul_config_cuda(index, monkeypatch, tma_only):
    """Each TMA matmul config alone (the autotuner may pick any), the feed-forward forward and
    backward at odd sizes whose rows are 16-byte aligned, against the fp64 reference."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs a Hopper or newer GPU")
    _only_config(monkeypatch, ff_kernels._matmul_tma_kernel, ff_kernels.MATMUL_TILES, index)
    dtype = torch.bfloat16
    _check_ff(_ff_inputs((1000, 520), 1544, 504, dtype, "cuda"), "gelu", dtype)


def test_swiglu_with_tma_reads(monkeypatch, device):
    """SwiGLU's plain matmuls (down projection, its gradients) read by TMA, the two-pair dx
    product by pointers, forward and backward against the fp64 reference."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        pytest.skip("TMA needs a Hopper or newer GPU")
    monkeypatch.setenv(ff_kernels.TMA_ENV, "1")
    dtype = torch.bfloat16
    _check_swiglu(_swiglu_inputs((37, 72), 104, 40, dtype, device), dtype)


@pytest.mark.cuda
def test_feed_forward_tma_autotuned_cuda(tma_only):
    """A size large enough for the TMA matmul to autotune over every config (each one's tiles
    set by its pre-hook), forward and backward against the fp64 reference."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs a Hopper or newer GPU")
    dtype = torch.bfloat16
    _check_ff(_ff_inputs((2048, 1024), 4096, 1024, dtype, "cuda"), "gelu", dtype)


# ---- the TMA matmul with a warp-specialized K loop ($LLM_KERNELS_MATMUL_WS=1) ----------------

@pytest.fixture
def ws_on(monkeypatch):
    """The warp-specialized matmul switched on (alone: it implies the TMA reads); returns the
    set of matmul autotuners launched, filled as the test runs."""
    monkeypatch.delenv(ff_kernels.TMA_ENV, raising=False)
    monkeypatch.setenv(ff_kernels.WS_ENV, "1")
    launched = set()

    def spy(tuner, *args):
        launched.add(tuner)
        return launch_tuned(tuner, *args)
    launch_tuned = ff_kernels.launch_tuned
    monkeypatch.setattr(ff_kernels, "launch_tuned", spy)
    return launched


def _skip_before_hopper(device):
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        pytest.skip("TMA needs a Hopper or newer GPU")


def test_ws_configs_split_the_tile_between_two_consumer_groups():
    """A warp-specialized config's accumulator per thread counts both consumer warp groups:
    128 x 256 tiles with 4 warps fit the plain and activation epilogues (128 a thread), the
    only ones the warp-specialized kernel takes."""
    import triton

    def config(m, n, k, stages, warps, ws=True):
        kwargs = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}
        return triton.Config({**kwargs, "WS": True} if ws else kwargs, num_warps=warps,
                             num_stages=stages)
    assert ff_kernels._acc_per_thread(config(128, 256, 64, 3, 4)) == 128
    assert ff_kernels._acc_per_thread(config(128, 256, 64, 3, 4, ws=False)) == 256
    candidates = [config(*tile) for tile in ff_kernels.WS_TILES]
    large = {"a_ptr": torch.empty(1, dtype=torch.bfloat16), "M": 4096, "N": 4096, "K": 4096}
    for epilogue in ff_kernels.WS_EPILOGUES:
        assert ff_kernels.prune_configs(candidates, large, EPILOGUE=epilogue) == candidates


def test_ws_switch_implies_tma_reads(monkeypatch, device):
    a = torch.randn(37, 72, device=device).to(torch.bfloat16)
    b = torch.randn(72, 104, device=device).to(torch.bfloat16)
    monkeypatch.delenv(ff_kernels.TMA_ENV, raising=False)
    assert not ff_kernels.use_tma(a, b)
    monkeypatch.setenv(ff_kernels.WS_ENV, "1")
    hopper = device.type == "cpu" or torch.cuda.get_device_capability(device)[0] >= 9
    assert ff_kernels.use_tma(a, b) == hopper


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_feed_forward_through_ws_matmul(activation, dtype, device, ws_on):
    """Forward and backward with the plain and activation products in the warp-specialized
    kernel (the gradient epilogue's by the TMA one, none by pointer loads), every operand
    layout, tails in M, N and K, against the fp64 reference."""
    _skip_before_hopper(device)
    _check_ff(_ff_inputs((37, 72), 104, 40, dtype, device), activation, dtype)
    assert ws_on == {ff_kernels._matmul_ws_kernel, ff_kernels._matmul_tma_kernel}


def test_swiglu_with_ws_matmul(device, ws_on):
    """SwiGLU's plain matmuls in the warp-specialized kernel, its gradient epilogue in the TMA
    one, the two-pair dx product by pointers, forward and backward against the fp64
    reference."""
    _skip_before_hopper(device)
    dtype = torch.bfloat16
    _check_swiglu(_swiglu_inputs((37, 72), 104, 40, dtype, device), dtype)
    assert ff_kernels._matmul_ws_kernel in ws_on


# A kernel never run on a GPU yet: a hang ends the test (its worker) after 2 minutes, not the
# GPU check's whole cuda step.
WS_GPU_TIMEOUT = pytest.mark.timeout(120, method="thread")


@pytest.mark.cuda
@WS_GPU_TIMEOUT
@pytest.mark.parametrize("index", range(len(ff_kernels.WS_TILES)))
def test_every_ws_matmul_config_cuda(index, monkeypatch, ws_on):
    """Each warp-specialized config alone, the feed-forward forward and backward at odd sizes
    whose rows are 16-byte aligned, against the fp64 reference."""
    _skip_before_hopper(torch.device("cuda"))
    _only_config(monkeypatch, ff_kernels._matmul_ws_kernel, ff_kernels.WS_TILES, index)
    dtype = torch.bfloat16
    _check_ff(_ff_inputs((1000, 520), 1544, 504, dtype, "cuda"), "gelu", dtype)


@pytest.mark.cuda
@WS_GPU_TIMEOUT
def test_ws_matmul_autotuned_cuda(ws_on):
    """Large enough for the warp-specialized matmul to autotune over every candidate, forward
    and backward against the fp64 reference."""
    _skip_before_hopper(torch.device("cuda"))
    dtype = torch.bfloat16
    _check_ff(_ff_inputs((2048, 1024), 4096, 1024, dtype, "cuda"), "gelu", dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("index", range(len(ff_kernels.MATMUL_TILES)))
def test_matmul_aligned_transposed_cuda(index, monkeypatch):
    """Each 16-bit config alone on dw1's layout (A a transposed view) at sizes that are
    multiples of every tile, so the loads are vectorized as in a GPT backward, against
    float64 (triton-lang/triton#6691 broke this product when A was also summed in the loop)."""
    _only_config(monkeypatch, ff_kernels._matmul_kernel, ff_kernels.MATMUL_TILES, index)
    dtype = torch.bfloat16
    a = torch.randn(2048, 1024, device="cuda").to(dtype).t()             # (1024, 2048) transposed
    b = torch.randn(2048, 512, device="cuda").to(dtype)
    out = ff_kernels.matmul(a, b, torch.empty(1024, 512, device="cuda", dtype=dtype))
    assert_close(out, a.double() @ b.double(), a @ b, dtype, "matmul")
