"""Triton cross-entropy (chunked over V) against the float64 reference by the pass rule, and
the in-place backward (``inplace_backward=True``) of the triton and cuda backends."""
import pytest
import torch

import llm_kernels as lk
from llm_kernels import _ops
from llm_kernels.backends import extension_status
from llm_kernels.kernels import cross_entropy as kernels
from llm_kernels.numerics import assert_close
from llm_kernels.reference import cross_entropy_ref

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
IGNORE = -100


def _id(value):
    """Readable test ids: 37x1000, float32."""
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value).removeprefix("torch.")


def _targets(n, v, device, ignored_fraction=0.3, ignore_index=IGNORE):
    """Random classes, a fraction of rows (never all of them) set to ignore_index."""
    target = torch.randint(0, v, (n,), device=device)
    ignored = torch.rand(n, device=device) < ignored_fraction
    ignored[0] = False
    return torch.where(ignored, torch.full_like(target, ignore_index), target)


def _check(logits, target, reduction, ignore_index=IGNORE, what="cross_entropy"):
    """Loss and dlogits (for a random upstream gradient) against the fp64 reference."""
    shape = () if reduction != "none" else target.shape
    grad_out = torch.randn(shape, device=logits.device).to(logits.dtype)
    results = {}
    for backend in ("triton", "torch", None):
        lb = (logits.double() if backend is None else logits).detach().clone().requires_grad_()
        kwargs = dict(ignore_index=ignore_index, reduction=reduction)
        loss = (cross_entropy_ref(lb, target, upcast=True, **kwargs) if backend is None
                else lk.cross_entropy(lb, target, backend=backend, **kwargs))
        results[backend] = (loss, *torch.autograd.grad(loss, lb, grad_out.to(loss.dtype)))
    for name, ours, torch_out, ref in zip(("loss", "dlogits"), *results.values()):
        assert ours.dtype == logits.dtype
        assert_close(ours, ref, torch_out, logits.dtype,
                     f"{what} {name} {tuple(logits.shape)} {reduction}")
    return results["triton"]


@pytest.mark.parametrize("shape,dtype,reduction", [
    ((37, 1000), F32, "mean"), ((37, 1000), F32, "sum"), ((37, 1000), F32, "none"),
    ((1, 17), F32, "mean"), ((37, 1), F32, "sum"), ((37, 127), F32, "none"),
    ((1, 1025), F32, "none"), ((37, 5003), F32, "mean"),
    ((37, 1025), F16, "mean"), ((1, 5003), F16, "none"), ((37, 17), F16, "sum"),
    ((37, 5003), BF16, "sum"), ((37, 1000), BF16, "none"), ((1, 127), BF16, "mean"),
], ids=_id)
def test_matches_reference(shape, dtype, reduction, device):
    n, v = shape
    logits = (2 * torch.randn(shape, device=device)).to(dtype)
    _check(logits, _targets(n, v, device), reduction)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_all_rows_ignored(reduction, device):
    logits = torch.randn(37, 1000, device=device, requires_grad=True)
    target = torch.full((37,), IGNORE, device=device)
    loss = lk.cross_entropy(logits, target, reduction=reduction, backend="triton")
    assert torch.equal(loss, torch.zeros_like(loss))
    loss.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("dtype", [F32, BF16], ids=_id)
def test_ignore_index_that_is_a_class(dtype, device):
    """ignore_index = 3, a valid class: rows targeting 3 are ignored, the others are not."""
    logits = torch.randn(37, 127, device=device).to(dtype)
    target = _targets(37, 127, device, ignore_index=3)
    target[1] = 3
    for reduction in ("mean", "none"):
        _check(logits, target, reduction, ignore_index=3, what="cross_entropy ignore_index=3")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=_id)
def test_chunked_with_masked_vocab(dtype, device, monkeypatch):
    """V = 5003 in chunks of 1024; half the rows have -inf logits over the first 4200 classes
    (whole chunks of -inf before any finite logit)."""
    monkeypatch.setattr(kernels, "BLOCK_V", 1024)
    logits = 2 * torch.randn(37, 5003, device=device)
    target = _targets(37, 5003, device)
    masked = torch.arange(37, device=device) % 2 == 0
    logits[masked, :4200] = float("-inf")
    target[masked & (target != IGNORE)] = 4200 + target[masked & (target != IGNORE)] % 803
    for reduction in ("mean", "none"):
        loss, dlogits = _check(logits.to(dtype), target, reduction, what="masked vocab")
        assert torch.equal(dlogits[masked, :4200], torch.zeros_like(dlogits[masked, :4200]))


def test_lse_and_row_losses_are_float32(device):
    logits = torch.randn(37, 1025, device=device, dtype=BF16)
    target = _targets(37, 1025, device)
    loss, lse = _ops.triton_ops().cross_entropy_forward(logits, target, IGNORE)
    assert loss.dtype == lse.dtype == F32 and loss.shape == lse.shape == (37,)
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits.double(), -1),
                               rtol=1e-6, atol=1e-6)
    ignored = target == IGNORE
    assert torch.equal(loss[ignored], torch.zeros_like(loss[ignored]))


def test_out_of_range_target_gives_nan_rows(device):
    """The Triton kernels never read past a row: a target outside [0, V) gives that row a NaN
    loss and gradient (what lk.cross_entropy returns for GPU targets, which it does not read
    on the host), an ignored row 0; the other rows are exact. V = 5003: several chunks, the
    out-of-range targets just past the end and far before the start."""
    v = 5003
    logits = torch.randn(5, v, device=device)
    target = torch.tensor([3, v, IGNORE, -5, v - 1], device=device)
    ops = _ops.triton_ops()
    loss, lse = ops.cross_entropy_forward(logits, target, IGNORE)
    assert torch.isnan(loss[1]) and torch.isnan(loss[3]) and loss[2] == 0
    good = torch.tensor([0, 4], device=device)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1))
    torch.testing.assert_close(loss[good], lse[good] - logits[good, target[good]])
    grad = ops.cross_entropy_backward(torch.ones(5, device=device), logits, target, lse, IGNORE)
    assert torch.isnan(grad[1]).all() and torch.isnan(grad[3]).all()
    assert torch.equal(grad[2], torch.zeros_like(grad[2]))
    expected = torch.softmax(logits[good], -1)
    expected[torch.arange(2), target[good]] -= 1
    torch.testing.assert_close(grad[good], expected)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"], ids=lambda b: f"{b}_backend")
def test_out_of_range_gpu_target_gives_nan_loss_without_a_sync_cuda(backend, device):
    """lk.cross_entropy on GPU tensors does not read the targets on the host: no sync, and a
    target outside [0, V) gives a NaN loss instead of a ValueError."""
    _kernel_backend(backend)
    logits = torch.randn(37, 1025, device=device, requires_grad=True)
    target = _targets(37, 1025, device)
    target[5] = 1025
    lk.cross_entropy(logits, target, backend=backend).backward()  # compiles, tunes: may sync
    logits.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = lk.cross_entropy(logits, target, backend=backend)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isnan(loss) and torch.isnan(logits.grad[5]).all()
    assert torch.isfinite(logits.grad[target == IGNORE]).all()


def _kernel_backend(backend):
    """``backend`` ("triton" or "cuda"), or skip when the compiled extension is not built."""
    if backend == "cuda":
        ok, why = extension_status()
        if not ok:
            pytest.skip(why)
    return backend


def _loss_and_grad(logits, target, reduction, grad_out, **kwargs):
    """(loss, dlogits) for a leaf copy of ``logits``, and that leaf (overwritten in place)."""
    leaf = logits.detach().clone().requires_grad_()
    loss = lk.cross_entropy(leaf, target, reduction=reduction, **kwargs)
    return loss, torch.autograd.grad(loss, leaf, grad_out.to(loss.dtype))[0], leaf


INPLACE_CASES = [((37, 1025), F32, "mean"), ((1, 17), F32, "none"), ((17, 5003), F32, "sum"),
                 ((37, 1025), F16, "none"), ((17, 127), F16, "sum"), ((1, 5003), F16, "mean"),
                 ((37, 1025), BF16, "sum"), ((17, 127), BF16, "mean"), ((37, 1), BF16, "none")]


@pytest.mark.parametrize("backend", ["triton", "cuda"], ids=lambda b: f"{b}_backend")
@pytest.mark.parametrize("shape,dtype,reduction", INPLACE_CASES, ids=_id)
def test_inplace_backward_overwrites_logits_with_the_same_gradient(backend, shape, dtype,
                                                                    reduction, device):
    """Bit for bit the default backward's loss and dlogits, stored in the logits' own storage
    (also on ignored rows), and within the pass rule of the float64 reference."""
    backend = _kernel_backend(backend)
    n, v = shape
    logits = (2 * torch.randn(shape, device=device)).to(dtype)
    target = _targets(n, v, device)
    grad_out = torch.randn(() if reduction != "none" else (n,), device=device)
    loss, grad, _ = _loss_and_grad(logits, target, reduction, grad_out, backend=backend)
    loss_in, grad_in, leaf = _loss_and_grad(logits, target, reduction, grad_out, backend=backend,
                                            inplace_backward=True)
    assert torch.equal(loss_in, loss) and torch.equal(grad_in, grad)
    assert grad_in.data_ptr() == leaf.data_ptr() and torch.equal(leaf.detach(), grad)
    ref = _loss_and_grad(logits.double(), target, reduction, grad_out.double(),
                         backend="torch")[1]
    torch_grad = _loss_and_grad(logits, target, reduction, grad_out, backend="torch")[1]
    assert_close(grad_in, ref, torch_grad, dtype, f"in-place dlogits {shape} {reduction}")


@pytest.mark.parametrize("backend", ["triton", "cuda"], ids=lambda b: f"{b}_backend")
def test_inplace_backward_through_a_matmul_and_into_leaf_grad(backend, device):
    """Logits from a matmul (the gradient flows on to h and w, bit for bit), and leaf logits
    whose .grad (set by .backward()) is their own storage."""
    backend = _kernel_backend(backend)
    h, w = torch.randn(37, 64, device=device), torch.randn(64, 1000, device=device) / 8
    target = _targets(37, 1000, device)
    grads = []
    for inplace in (False, True):
        leaves = [t.clone().requires_grad_() for t in (h, w)]
        loss = lk.cross_entropy(leaves[0] @ leaves[1], target, backend=backend,
                                inplace_backward=inplace)
        grads.append(torch.autograd.grad(loss, leaves))
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    logits = (h @ w).requires_grad_()
    expected = torch.autograd.grad(lk.cross_entropy(logits, target, backend=backend), logits)[0]
    lk.cross_entropy(logits, target, backend=backend, inplace_backward=True).backward()
    assert logits.grad.data_ptr() == logits.data_ptr() and torch.equal(logits.grad, expected)


def test_inplace_backward_of_strided_logits_overwrites_a_copy(device):
    """Logits with a row stride (a slice of wider rows) are copied: the copy is overwritten,
    the caller's logits are not, and the gradient is the default one."""
    wide = torch.randn(37, 1100, device=device)
    target = _targets(37, 1000, device)
    grads = []
    for inplace in (False, True):
        base = wide.clone().requires_grad_()
        loss = lk.cross_entropy(base[:, :1000], target, backend="triton",
                                inplace_backward=inplace)
        grads.append(torch.autograd.grad(loss, base)[0])
        assert torch.equal(base.detach(), wide)
    assert torch.equal(grads[0], grads[1])


def test_inplace_backward_raises_when_another_node_saved_the_logits(device):
    """sin saves its input: once the in-place backward (which runs first, its node being the
    newer) has overwritten the logits, sin's backward must refuse them, not use them."""
    x = torch.randn(37, 1000, device=device, requires_grad=True)
    target = _targets(37, 1000, device)
    logits = x * 2
    other = logits.sin().sum()
    loss = lk.cross_entropy(logits, target, backend="triton", inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


def test_inplace_backward_is_ignored_by_the_torch_backend(device):
    logits = torch.randn(37, 127, device=device)
    target = _targets(37, 127, device)
    loss, grad, leaf = _loss_and_grad(logits, target, "mean", torch.ones((), device=device),
                                      backend="torch", inplace_backward=True)
    assert torch.equal(leaf.detach(), logits) and grad.data_ptr() != leaf.data_ptr()


@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_inplace_backward_must_be_a_bool(value, device):
    logits = torch.randn(5, 7, device=device)
    target = torch.zeros(5, dtype=torch.long, device=device)
    with pytest.raises(TypeError, match="inplace_backward must be a bool"):
        lk.cross_entropy(logits, target, backend="triton", inplace_backward=value)


def test_inplace_launcher_refuses_non_contiguous_logits(device):
    logits = torch.randn(7, 10, device=device)[:, :5]
    target = torch.zeros(7, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="logits must be contiguous"):
        kernels.cross_entropy_backward_inplace(torch.ones(7, device=device), logits, target,
                                               torch.zeros(7, device=device), IGNORE)


@pytest.mark.cuda
def test_realistic_size_cuda(device):
    """N = 4096 rows of a 128256-word vocabulary (Llama 3), bf16, per-row upstream gradients."""
    logits = (2 * torch.randn(4096, 128256, device=device)).to(BF16)
    _check(logits, _targets(4096, 128256, device), "none")


def _peak_bytes_above(fn) -> int:
    """Peak memory allocated while running fn, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


@pytest.mark.cuda
def test_memory_cuda(device):
    """Forward + backward at N = 4096, V = 128k, bf16: beyond the gradient itself (which both
    must return), torch's log-softmax keeps (N, V) buffers alive while the kernels keep O(N)."""
    logits = torch.randn(4096, 131072, device=device, dtype=BF16, requires_grad=True)
    target = _targets(4096, 131072, device)
    grad_bytes = logits.numel() * logits.element_size()
    peaks = {}
    for backend in ("torch", "triton"):
        peaks[backend] = _peak_bytes_above(
            lambda: lk.cross_entropy(logits, target, backend=backend).backward())
        logits.grad = None
    print(f"peak above inputs: torch {peaks['torch'] / 2**20:.0f} MiB, "
          f"triton {peaks['triton'] / 2**20:.0f} MiB (gradient {grad_bytes / 2**20:.0f} MiB)")
    transient = {name: peak - grad_bytes for name, peak in peaks.items()}
    assert transient["triton"] * 3 < transient["torch"]
    assert transient["triton"] < grad_bytes // 100
