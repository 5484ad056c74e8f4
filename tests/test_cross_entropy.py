"""Triton cross-entropy (chunked over V) against the float64 reference by the pass rule."""
import pytest
import torch

import llm_kernels as lk
from llm_kernels import _ops
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
