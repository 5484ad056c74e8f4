"""Backend registry and dispatch rules, and the pass rule itself."""
import math
import os
import subprocess
import sys

import pytest
import torch

import llm_kernels as lk
from llm_kernels import backends, numerics


def test_available_backends_shape():
    avail = lk.available_backends()
    assert set(avail) == {"torch", "triton", "cuda"}
    assert avail["torch"] == (True, "")
    for ok, why in avail.values():
        assert isinstance(ok, bool) and (ok or why)


def test_use_backend_nests_and_restores():
    assert backends.default_backend() == "auto"
    with lk.use_backend("torch"):
        assert backends.default_backend() == "torch"
        with lk.use_backend("auto"):
            assert backends.default_backend() == "auto"
        assert backends.default_backend() == "torch"
    assert backends.default_backend() == "auto"


def test_use_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        with lk.use_backend("tensorrt"):
            pass


def test_explicit_torch_backend_is_logged():
    lk.dispatch_log(clear=True)
    x = torch.randn(3, 17)
    lk.softmax(x, backend="torch")
    assert lk.dispatch_log() == [{"op": "softmax", "backend": "torch", "reason": "requested"}]


def test_named_unavailable_backend_raises_with_reason():
    x = torch.randn(3, 17, dtype=torch.float64)  # no kernel takes float64
    for name in ("triton", "cuda"):
        with pytest.raises(lk.BackendUnavailableError, match=f"backend '{name}' cannot run"):
            lk.softmax(x, backend=name)


def test_auto_records_its_fallback():
    lk.dispatch_log(clear=True)
    x = torch.randn(2, 5, dtype=torch.float64)  # no kernel takes float64
    out = lk.rms_norm(x)
    torch.testing.assert_close(out, torch.nn.functional.rms_norm(x, (5,), eps=1e-6))
    entry = lk.dispatch_log()[-1]
    assert entry["backend"] == "torch" and entry["reason"].startswith("auto")
    assert "cuda:" in entry["reason"]  # the skipped backend and why


@pytest.mark.parametrize("op, kernel, device, expected", [
    ("attention", None, "cuda", "triton"), ("softmax", None, "cuda", "triton"),
    ("cross_entropy", None, "cuda", "triton"), ("swiglu", None, "cuda", "triton"),
    ("layer_norm", None, "cuda", "cuda"), ("rms_norm", "layer_norm", "cuda", "cuda"),
    ("feed_forward", None, "cuda", "torch"),
    ("attention", None, "cpu", "cuda"), ("layer_norm", None, "cpu", "torch"),
    ("feed_forward", None, "cpu", "torch")])
def test_auto_takes_the_measured_fastest_backend_per_op(monkeypatch, op, kernel, device, expected):
    """With every backend able to run the call, auto picks the one measured fastest for the op
    on that device type (the H100 and 2-core CPU results in bench/results/)."""
    monkeypatch.setattr(backends, "_why_not", lambda *args: None)
    chosen = backends.select(op, None, torch.device(device, 0) if device == "cuda"
                             else torch.device(device), lambda name: None, kernel=kernel)
    assert chosen == expected


def test_env_var_sets_default_backend():
    code = ("import torch, llm_kernels as lk; lk.softmax(torch.randn(2, 3)); "
            "print(lk.dispatch_log()[-1]['backend'], lk.dispatch_log()[-1]['reason'])")
    env = dict(os.environ, LLM_KERNELS_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["torch", "requested"]
    env["LLM_KERNELS_BACKEND"] = "nonsense"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "LLM_KERNELS_BACKEND" in bad.stderr


def test_torch_backend_is_differentiable_everywhere():
    x = torch.randn(5, 33, requires_grad=True)
    w = torch.randn(33, requires_grad=True)
    y, h = lk.rms_norm(x, w, residual=x * 2, backend="torch")
    (y.sum() + h.sum()).backward()
    assert x.grad is not None and w.grad is not None and torch.isfinite(x.grad).all()


def test_pass_rule_accepts_torch_level_error_and_rejects_worse():
    ref = torch.randn(1000, dtype=torch.float64)
    torch_out = ref.to(torch.bfloat16)
    assert numerics.compare(torch_out, ref, torch_out, torch.bfloat16).passed
    noisy = (ref + 0.05 * torch.randn_like(ref)).to(torch.bfloat16)
    result = numerics.compare(noisy, ref, torch_out, torch.bfloat16)
    assert not result.passed and result.rel > result.bound
    with pytest.raises(AssertionError, match="max_abs"):
        numerics.assert_close(noisy, ref, torch_out, torch.bfloat16)


def test_pass_rule_never_passes_nan_and_caps_fp32():
    ref = torch.randn(100, dtype=torch.float64)
    out = ref.float().clone()
    out[3] = math.nan
    assert not numerics.compare(out, ref, ref.float(), torch.float32).passed
    sloppy = (ref * (1 + 2e-5)).float()
    assert not numerics.compare(sloppy, ref, sloppy, torch.float32).passed  # over 1e-5


def _direct_comparison(out, ref, torch_out, dtype):
    """The pass rule's numbers computed on whole float64 tensors in one go."""
    out64, ref64, torch64 = (t.double() for t in (out, ref, torch_out))
    both = torch.isfinite(out64) & torch.isfinite(ref64)
    diff = torch.where(both, (out64 - ref64).abs(), 0.0)
    clean = [torch.nan_to_num(t, 0, 0, 0) for t in (out64, ref64, torch64)]
    norm = clean[1].norm().item()
    rel, torch_rel = ((c - clean[1]).norm().item() / (norm or 1.0) for c in (clean[0], clean[2]))
    bound = 2 * torch_rel + numerics.FLOOR[dtype]
    if dtype == torch.float32:
        bound = min(bound, numerics.FP32_MAX_REL)
    nonfinite = ~torch.isfinite(out64)
    finite = not nonfinite.any() or (torch.equal(nonfinite, ~torch.isfinite(ref64)) and
                                     torch.equal(out64[nonfinite], ref64[nonfinite]))
    passed = finite and not torch.isnan(out64).any() and rel <= bound
    return diff.max().item(), diff.mean().item(), rel, torch_rel, bound, bool(passed)


@pytest.mark.parametrize("case", ["clean", "out_nan", "shared_inf", "inf_mismatch", "zero_ref",
                                  "fail"])
@pytest.mark.parametrize("chunk", [1, 7, 1000, numerics.CHUNK])
def test_pass_rule_streams_in_chunks_with_the_same_numbers(case, chunk):
    """compare() over chunks gives the numbers and verdict of the whole-tensor computation:
    NaN in the output, infinities where the reference has them (and where it has not), an
    all-zero reference, an output over the bound."""
    gen = torch.Generator().manual_seed(len(case) * 1000 + chunk % 1000)
    ref = torch.randn(37, 29, generator=gen, dtype=torch.float64)
    if case == "zero_ref":
        ref.zero_()
    torch_out = ref.to(torch.bfloat16)
    noise = 0.05 if case == "fail" else 0.002
    out = (ref + noise * torch.randn(ref.shape, generator=gen, dtype=torch.float64)).bfloat16()
    if case == "out_nan":
        out[5, 3] = math.nan
    if case in ("shared_inf", "inf_mismatch"):
        ref[2, 2], out[2, 2], torch_out[2, 2] = math.inf, math.inf, math.inf
        ref[30, 1], out[30, 1] = -math.inf, -math.inf
    if case == "inf_mismatch":
        out[11, 7] = math.inf
    got = numerics.compare(out, ref, torch_out, torch.bfloat16, chunk=chunk)
    want = _direct_comparison(out, ref, torch_out, torch.bfloat16)
    assert got.passed == want[5]
    assert got.passed == (case in ("clean", "shared_inf"))  # zero_ref: absolute error 0.06
    assert [got.max_abs, got.mean_abs, got.rel, got.torch_rel, got.bound] == pytest.approx(
        want[:5], rel=1e-12, abs=1e-300)


def test_pass_rule_on_empty_outputs():
    empty = torch.empty(0, 3, dtype=torch.float64)
    result = numerics.compare(empty.float(), empty, empty.float(), torch.float32)
    assert result.passed and result.rel == 0 and result.max_abs == 0 and result.mean_abs == 0


def test_triton_ops_run_on_their_tensors_gpu(monkeypatch):
    """A triton launch goes to the current CUDA device: an op on tensors of another GPU makes
    theirs current for the call (and only then), then restores the previous one."""
    from llm_kernels import _ops
    current = [0]
    switches = []

    class Switch:
        def __init__(self, device):
            self.index = device.index

        def __enter__(self):
            switches.append(self.index)
            self.previous, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.previous

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", Switch)

    def seen(x):
        return current[0], x

    assert _ops.on_device(torch.device("cuda", 1), seen, "a") == (1, "a")
    assert current[0] == 0 and switches == [1]
    assert _ops.on_device(torch.device("cuda", 0), seen, "b") == (0, "b")
    assert _ops.on_device(torch.device("cpu"), seen, "c") == (0, "c")
    assert switches == [1]


def _op_calls(backend: str, gen: torch.Generator) -> dict:
    """Each public op's call on fresh inputs with odd sizes (results as a tuple of tensors)."""
    from reference_check import randn
    x, r = randn(gen, 5, 37), randn(gen, 5, 37)
    w, b = randn(gen, 37), randn(gen, 37)
    w1, w2, w3 = randn(gen, 19, 37), randn(gen, 23, 19), randn(gen, 19, 37)
    q, kv = randn(gen, 2, 4, 7, 16), randn(gen, 2, 2, 9, 16)
    target = torch.randint(0, 37, (5,), generator=gen)
    return {
        "layer_norm": (lambda: lk.layer_norm(x, w, b, 1e-5, residual=r, backend=backend),
                       (x, w, b, r)),
        "rms_norm": (lambda: lk.rms_norm(x, w, 1e-6, backend=backend), (x, w)),
        "softmax": (lambda: lk.softmax(x, dim=0, backend=backend), (x,)),
        "cross_entropy": (lambda: lk.cross_entropy(x, target, backend=backend), (x,)),
        "feed_forward": (lambda: lk.feed_forward(x, w1, None, w2, None, backend=backend),
                         (x, w1, w2)),
        "swiglu": (lambda: lk.swiglu(x, w1, w3, w2, backend=backend), (x, w1, w3, w2)),
        "attention": (lambda: lk.attention(q, kv, kv, causal=True, backend=backend), (q, kv)),
    }


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_ops_without_gradients_skip_the_autograd_node(backend):
    """Where no gradient can flow (no_grad, inference_mode, or no input requiring grad) an op
    runs its kernels without recording a node: the same bits as with the node, no grad_fn."""
    from reference_check import require_cpu_backend
    require_cpu_backend(backend)
    calls = _op_calls(backend, torch.Generator().manual_seed(7))
    for name, (call, inputs) in calls.items():
        plain = _as_tuple(call())
        assert all(t.grad_fn is None for t in plain), name
        with torch.no_grad():
            no_grad = _as_tuple(call())
        with torch.inference_mode():
            inference = _as_tuple(call())
        for t in inputs:
            t.requires_grad_(True)
        tracked = _as_tuple(call())
        assert tracked[0].grad_fn is not None, name
        for t in inputs:
            t.requires_grad_(False)
        for outs in (plain, no_grad, inference):
            assert all(o.grad_fn is None and not o.requires_grad for o in outs), name
            assert all(torch.equal(o, t.detach()) for o, t in zip(outs, tracked)), name
