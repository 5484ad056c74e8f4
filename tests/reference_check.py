"""One public op on one backend, forward and backward, against its float64 reference.

Shared by the hardening tests (test_properties, test_extremes, test_determinism). An op call is
``call(backend, **tensors)`` returning a tensor or a tuple of tensors; its reference is
``reference(**tensors64)``, a ``*_ref(..., upcast=True)`` call. Every output and the gradient of
``sum_i <out_i, grad_out_i>`` with respect to every input tensor goes through the pass rule,
with the same computation by ``backend="torch"`` in the input dtype setting the error budget.
"""
from __future__ import annotations

from typing import Callable, Optional

import pytest
import torch

import llm_kernels as lk
from llm_kernels.backends import interpreting
from llm_kernels.numerics import assert_close


def require_cpu_backend(backend: str) -> None:
    """Skip, with the reason, unless ``backend`` runs CPU tensors here (the Triton kernels do
    only under TRITON_INTERPRET=1; on a GPU machine the tests marked cuda cover them)."""
    ok, why = lk.available_backends()[backend]
    if ok and backend == "triton" and not interpreting():
        ok, why = False, "TRITON_INTERPRET is not 1, so Triton does not run CPU tensors"
    if not ok:
        pytest.skip(f"backend {backend!r} cannot run CPU tensors here: {why}")


def randn(gen: torch.Generator, *shape, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    """Standard normal samples times ``scale`` from ``gen``, rounded to ``dtype``."""
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)


def as_tuple(outs) -> tuple:
    return outs if isinstance(outs, tuple) else (outs,)


def leaves(tensors: dict, upcast: bool = False) -> dict:
    """Fresh autograd leaves with the same values and strides (float64 when ``upcast``)."""
    out = {}
    for name, t in tensors.items():
        t = t.detach()
        out[name] = (t.double() if upcast else t).requires_grad_()
    return out


def forward(fn: Callable, tensors: dict, upcast: bool = False):
    """(leaves, outputs) of ``fn(**leaves)``, the leaves fresh copies of ``tensors``."""
    inputs = leaves(tensors, upcast)
    return inputs, as_tuple(fn(**inputs))


def backward(inputs: dict, outs: tuple, grad_outs: list) -> dict:
    """{name: gradient of sum_i <outs_i, grad_outs_i> w.r.t. inputs[name]}."""
    upcast = outs[0].dtype == torch.float64
    grads = [g.double() if upcast else g for g in grad_outs]
    return dict(zip(inputs, torch.autograd.grad(outs, list(inputs.values()), grads)))


def random_grads(gen: torch.Generator, outs) -> list:
    """One standard normal cotangent per output, in the output's dtype and on its device."""
    return [randn(gen, *o.shape, dtype=o.dtype).to(o.device) for o in outs]


def check_against_reference(call: Callable, reference: Callable, tensors: dict, dtype,
                            backend: str, gen: torch.Generator, what: str = "",
                            backward_pass: bool = True,
                            compared_grads: Optional[tuple] = None) -> dict:
    """Assert the pass rule for every output and gradient of ``call`` on ``backend``
    (only the gradients of the inputs named in ``compared_grads`` when given).

    Returns ``{"out0": ..., "d<name>": ...}`` of the backend under test (every gradient).
    """
    inputs, outs = forward(lambda **t: call(backend, **t), tensors)
    torch_inputs, torch_outs = forward(lambda **t: call("torch", **t), tensors)
    ref_inputs, ref_outs = forward(reference, tensors, upcast=True)
    results = {}
    for i, (o, t, r) in enumerate(zip(outs, torch_outs, ref_outs, strict=True)):
        assert o.dtype == dtype, f"{what} out{i}: dtype {o.dtype}, expected {dtype}"
        assert_close(o, r, t, dtype, f"{what} out{i} [{backend}]")
        results[f"out{i}"] = o
    if not backward_pass:
        return results
    grad_outs = random_grads(gen, outs)
    grads = backward(inputs, outs, grad_outs)
    torch_grads = backward(torch_inputs, torch_outs, grad_outs)
    ref_grads = backward(ref_inputs, ref_outs, grad_outs)
    for name, g in grads.items():
        assert g.dtype == tensors[name].dtype, f"{what} d{name}: dtype {g.dtype}"
        if compared_grads is None or name in compared_grads:
            assert_close(g, ref_grads[name], torch_grads[name], dtype,
                         f"{what} d{name} [{backend}]")
        results["d" + name] = g
    return results
