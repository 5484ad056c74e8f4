"""What the per-call shortcuts of the public ops must not change: the environment is read on
every call, cached dispatch answers follow $TRITON_INTERPRET, autocast is still seen, and the
reshapes skipped for inputs already in shape give the same results."""
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

import llm_kernels as lk
from llm_kernels import _amp, _ops

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _last_backend():
    return lk.dispatch_log()[-1]["backend"]


def test_env_var_is_read_on_every_call(monkeypatch):
    x = torch.randn(3, 8)
    monkeypatch.setenv("LLM_KERNELS_BACKEND", "torch")
    lk.softmax(x)
    assert lk.dispatch_log()[-1] == {"op": "softmax", "backend": "torch", "reason": "requested"}
    monkeypatch.setenv("LLM_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LLM_KERNELS_BACKEND"):
        lk.softmax(x)
    monkeypatch.delenv("LLM_KERNELS_BACKEND")
    lk.softmax(x)
    assert lk.dispatch_log()[-1]["reason"].startswith("auto")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_on_cpu_follows_triton_interpret(monkeypatch):
    """Only the cached answer for Triton on CPU depends on the environment: it is not cached."""
    x = torch.randn(3, 8)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for _ in range(2):
        with pytest.raises(lk.BackendUnavailableError, match="TRITON_INTERPRET"):
            lk.softmax(x, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not lk.available_backends()["triton"][0]:
        pytest.skip(lk.available_backends()["triton"][1])
    lk.softmax(x, backend="triton")
    assert _last_backend() == "triton"


def test_kernel_ops_namespace_is_stable():
    if not lk.available_backends()["cuda"][0]:
        pytest.skip(lk.available_backends()["cuda"][1])
    assert _ops.ops("cuda") is _ops.ops("cuda") is torch.ops.llm_kernels
    with pytest.raises(ValueError, match="no kernel ops for backend"):
        _ops.ops("torch")


def test_autocast_is_seen_on_every_call():
    x = torch.randn(3, 8)
    assert _amp.dtype_for(x) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _amp.dtype_for(x) is torch.bfloat16
        w = torch.randn(16, 8)
        out = lk.feed_forward(x, w, None, w.t().contiguous(), None, backend="torch")
    assert out.dtype is torch.bfloat16
    assert _amp.dtype_for(x) is None and _amp.dtype_for(None) is None


@pytest.mark.parametrize("backend", ["torch", "cuda"])
@pytest.mark.parametrize("shape", [(8,), (3, 8), (2, 3, 8)])
def test_ops_keep_any_leading_shape(backend, shape):
    if not lk.available_backends()[backend][0]:
        pytest.skip(lk.available_backends()[backend][1])
    x, r, w = torch.randn(shape), torch.randn(shape), torch.randn(8)
    y, h = lk.layer_norm(x, w, None, residual=r, backend=backend)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x + r, (8,), w))
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(lk.softmax(x, 0, backend=backend), torch.softmax(x, 0))
    w1, w2 = torch.randn(5, 8), torch.randn(8, 5)
    out = lk.feed_forward(x, w1, None, w2, None, activation="relu", backend=backend)
    torch.testing.assert_close(out, torch.relu(x @ w1.t()) @ w2.t())


def test_norm_module_reshapes_a_residual_of_another_shape():
    """A residual with x's number of elements is still flattened like x, as before."""
    norm = lk.nn.LayerNorm(8, backend="torch")
    x, residual = torch.randn(4, 8), torch.randn(2, 2, 8)
    y, h = norm(x, residual)
    torch.testing.assert_close(h, x + residual.reshape(4, 8))
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(h, (8,), norm.weight, norm.bias))


def test_host_overhead_bench_times_every_provider():
    """``python -m llm_kernels.bench.host_overhead`` runs each op and mode on every provider
    that can take it and prints positive per-call microseconds."""
    proc = subprocess.run([sys.executable, "-m", "llm_kernels.bench.host_overhead", "--device",
                           "cpu", "--ops", "softmax,layer_norm", "--repeat", "2", "--number", "5",
                           "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert {(r["op"], r["mode"]) for r in rows} == {
        (op, mode) for op in ("softmax", "layer_norm") for mode in ("fwd", "fwd+bwd")}
    assert all(r[p] > 0 for r in rows for p in ("torch", "lk-torch", "lk-cuda"))
