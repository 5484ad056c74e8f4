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
