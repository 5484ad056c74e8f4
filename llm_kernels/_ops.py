"""The kernel-level ops shared by the ``triton`` and ``cuda`` backends.

Both backends implement the same ops with the same schemas: ``torch.ops.llm_kernels_triton.*``
(Python launchers from ``llm_kernels.kernels``, defined here on first use) and
``torch.ops.llm_kernels.*`` (the compiled extension, ``csrc/bindings.cpp``). The autograd
Functions in this package call either namespace, so the math around the kernels is shared.
Every op returns freshly allocated contiguous tensors; an absent optional output (no residual,
no weight, no bias) is an empty tensor. The one exception, ``cross_entropy_backward_inplace``,
writes the gradient over its logits (declared ``Tensor(a!)``) and returns nothing. Fake
implementations make the ops traceable by ``torch.compile``.

Conventions: attention ``q (B, H, Lq, D)``, ``k/v (B, Hkv, Lk, D)``, stride(-1) == 1, any other
strides; ``mask`` None or a floating additive mask of shape ``(B, H, Lq, Lk)`` with any strides
(0 on broadcast dims); ``causal`` means query ``i`` sees key ``j`` iff ``j <= i + causal_offset``;
``lse (B, H, Lq)`` float32. Norms, softmax, feed-forward and cross-entropy take contiguous 2D
``(N, C)`` inputs; statistics (``mean``, ``rstd``, ``lse``, per-row ``loss``) are float32.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import re
import threading

import torch

SCHEMAS = {
    "attention_forward": "(Tensor q, Tensor k, Tensor v, Tensor? mask, bool causal, "
                         "int causal_offset, float scale) -> (Tensor, Tensor)",
    "attention_backward": "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
                          "Tensor lse, Tensor? mask, bool causal, int causal_offset, "
                          "float scale) -> (Tensor, Tensor, Tensor)",
    "layer_norm_forward": "(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, "
                          "float eps, bool rms) -> (Tensor, Tensor, Tensor, Tensor)",
    "layer_norm_backward": "(Tensor grad_y, Tensor? grad_h, Tensor h, Tensor? weight, "
                           "Tensor? bias, Tensor mean, Tensor rstd, bool rms) "
                           "-> (Tensor, Tensor, Tensor)",
    "softmax_forward": "(Tensor x) -> Tensor",
    "softmax_backward": "(Tensor grad_y, Tensor y) -> Tensor",
    "feed_forward_forward": "(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, "
                            "str activation) -> (Tensor, Tensor)",
    "feed_forward_backward": "(Tensor grad_out, Tensor x, Tensor w1, Tensor? b1, Tensor w2, "
                             "Tensor? b2, Tensor pre, str activation) "
                             "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "swiglu_forward": "(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down) "
                      "-> (Tensor, Tensor, Tensor)",
    "swiglu_backward": "(Tensor grad_out, Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down, "
                       "Tensor gate, Tensor up) -> (Tensor, Tensor, Tensor, Tensor)",
    "cross_entropy_forward": "(Tensor logits, Tensor target, int ignore_index) "
                             "-> (Tensor, Tensor)",
    "cross_entropy_backward": "(Tensor grad_loss, Tensor logits, Tensor target, Tensor lse, "
                              "int ignore_index) -> Tensor",
    "cross_entropy_backward_inplace": "(Tensor grad_loss, Tensor(a!) logits, Tensor target, "
                                      "Tensor lse, int ignore_index) -> ()",
}

TRITON_NAMESPACE = "llm_kernels_triton"
CUDA_NAMESPACE = "llm_kernels"
# Query rows per warp of the CUDA tensor-core attention forward (and dQ at D <= 64), read by the
# extension at each call: 16 (the default) or 32 (two m-tiles share each K/V fragment; opt-in
# until timed).
CUDA_ATTENTION_WARP_ROWS_ENV = "LLM_KERNELS_CUDA_ATTENTION_WARP_ROWS"


def contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t.contiguous()``, None for an absent optional input."""
    return None if t is None else t.contiguous()


def rows(t: torch.Tensor) -> torch.Tensor:
    """``t (..., C)`` as a contiguous ``(N, C)`` tensor (``t`` itself when it is one)."""
    return (t if t.dim() == 2 else t.reshape(-1, t.shape[-1])).contiguous()


def unrows(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``y (N, F)``, computed from ``rows(like)``, viewed with ``like``'s leading dims."""
    return y if like.dim() == 2 else y.view(*like.shape[:-1], y.shape[-1])


class _NotDifferentiable(torch.autograd.Function):
    """A kernel backward run as a function of the tensors it depends on (the saved tensors and
    the incoming gradients), so that under ``create_graph=True`` its results stay connected to
    them; differentiating them raises."""

    @staticmethod
    def forward(ctx, compute, *inputs):
        return compute()

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("llm_kernels: the kernels' backward is not differentiable, so a double "
                           "backward (a gradient penalty, a Hessian-vector product) needs "
                           "backend='torch'")


class _ForwardOnly:
    """The autograd context a Function's ``forward`` gets from ``apply`` when no gradient can
    flow: what it saves or marks is not needed."""

    def save_for_backward(self, *tensors):
        pass

    def mark_non_differentiable(self, *tensors):
        pass

    def set_materialize_grads(self, value: bool):
        pass


def apply(function, *args):
    """``function.apply(*args)`` where a gradient can flow (grad mode on and a tensor argument
    requiring grad), else ``function.forward`` alone: the same outputs without recording an
    autograd node (a few microseconds a call, which decode steps and inference pay per op)."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad
                                       for a in args):
        return function.apply(*args)
    return function.forward(_ForwardOnly(), *args)


def first_order_backward(backward):
    """Decorates an autograd Function's ``backward(ctx, *grads)`` that runs kernels: with
    ``create_graph=True`` its gradients come out attached to a node that raises when they are
    differentiated, instead of as constants (``once_differentiable`` leaves them constant when
    no incoming gradient requires grad, as in a gradient penalty, dropping terms silently)."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)
        return _NotDifferentiable.apply(lambda: backward(ctx, *grads), *ctx.saved_tensors,
                                        *grads)
    return wrapper


def op_family(op: str) -> str:
    """``feed_forward_forward`` -> ``feed_forward``, ``cross_entropy_backward_inplace`` ->
    ``cross_entropy``."""
    return re.fullmatch(r"(.+)_(?:forward|backward)(?:_inplace)?", op).group(1)


def kernel_module_name(op: str) -> str:
    """``attention_forward`` -> ``llm_kernels.kernels.attention``."""
    return "llm_kernels.kernels." + op_family(op)


def triton_kernel_reason(op: str) -> str | None:
    """None when the Triton launchers of ``op`` exist, else why not."""
    name = kernel_module_name(op + "_forward")
    try:
        found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # llm_kernels.kernels itself is not installed
        found = False
    if not found:
        return (f"{name} is not importable: install the package "
                "(`pip install --no-build-isolation -e .`)")
    return None


def _empty(ref: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype or ref.dtype, device=ref.device)


def _empty_or(t, ref):
    return _empty(ref, (0,)) if t is None else _empty(t, t.shape)


def _fake_attention_forward(q, k, v, mask, causal, causal_offset, scale):
    return _empty(q, q.shape), _empty(q, q.shape[:-1], torch.float32)


def _fake_attention_backward(grad_out, q, k, v, out, lse, mask, causal, causal_offset, scale):
    return _empty(q, q.shape), _empty(k, k.shape), _empty(v, v.shape)


def _fake_layer_norm_forward(x, weight, bias, residual, eps, rms):
    n = x.shape[0]
    return (_empty(x, x.shape), _empty(x, x.shape if residual is not None else (0,)),
            _empty(x, (0,) if rms else (n,), torch.float32), _empty(x, (n,), torch.float32))


def _fake_layer_norm_backward(grad_y, grad_h, h, weight, bias, mean, rstd, rms):
    return _empty(h, h.shape), _empty_or(weight, h), _empty_or(bias, h)


def _fake_softmax_forward(x):
    return _empty(x, x.shape)


def _fake_softmax_backward(grad_y, y):
    return _empty(y, y.shape)


def _fake_feed_forward_forward(x, w1, b1, w2, b2, activation):
    return _empty(x, (x.shape[0], w2.shape[0])), _empty(x, (x.shape[0], w1.shape[0]))


def _fake_feed_forward_backward(grad_out, x, w1, b1, w2, b2, pre, activation):
    return (_empty(x, x.shape), _empty(w1, w1.shape), _empty_or(b1, x), _empty(w2, w2.shape),
            _empty_or(b2, x))


def _fake_swiglu_forward(x, w_gate, w_up, w_down):
    n, d_ff = x.shape[0], w_gate.shape[0]
    return _empty(x, (n, w_down.shape[0])), _empty(x, (n, d_ff)), _empty(x, (n, d_ff))


def _fake_swiglu_backward(grad_out, x, w_gate, w_up, w_down, gate, up):
    return tuple(_empty(t, t.shape) for t in (x, w_gate, w_up, w_down))


def _fake_cross_entropy_forward(logits, target, ignore_index):
    n = logits.shape[0]
    return _empty(logits, (n,), torch.float32), _empty(logits, (n,), torch.float32)


def _fake_cross_entropy_backward(grad_loss, logits, target, lse, ignore_index):
    return _empty(logits, logits.shape)


def _fake_cross_entropy_backward_inplace(grad_loss, logits, target, lse, ignore_index):
    return None


FAKES = {name: globals()["_fake_" + name] for name in SCHEMAS}

_lock = threading.Lock()
_triton_library = None


def on_device(device: torch.device, fn, *args):
    """``fn(*args)`` with ``device`` current: triton launches on the current CUDA device, so a
    call on tensors of another GPU switches to theirs for its duration."""
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            return fn(*args)
    return fn(*args)


def _launcher(op: str):
    """The CPU/CUDA implementation of triton op ``op``: its launcher in ``llm_kernels.kernels``
    (imported on the first call), run on the device of its first argument (a tensor in every
    schema)."""
    resolved = []

    def launch(*args):
        if not resolved:
            resolved.append(getattr(importlib.import_module(kernel_module_name(op)), op))
        return on_device(args[0].device, resolved[0], *args)
    launch.__name__ = op
    return launch


def triton_ops():
    """``torch.ops.llm_kernels_triton``, defining the ops on first use."""
    global _triton_library
    with _lock:
        if _triton_library is None:
            from llm_kernels.backends import interpreting
            if interpreting():
                from llm_kernels.kernels._interpreter import fix_index_conversion
                fix_index_conversion()
            lib = torch.library.Library(TRITON_NAMESPACE, "DEF")
            for op, schema in SCHEMAS.items():
                lib.define(op + schema)
                for key in ("CUDA", "CPU"):
                    lib.impl(op, _launcher(op), key)
                torch.library.register_fake(f"{TRITON_NAMESPACE}::{op}", FAKES[op], lib=lib)
            _triton_library = lib
    return getattr(torch.ops, TRITON_NAMESPACE)


def missing_cuda_ops() -> list[str]:
    """The ops of SCHEMAS that the loaded extension does not define: a build older than the
    Python package."""
    namespace = getattr(torch.ops, CUDA_NAMESPACE)
    return [op for op in SCHEMAS if not hasattr(namespace, op)]


def register_cuda_fakes() -> None:
    """Register the fake implementations of the compiled extension's ops (once)."""
    for op in SCHEMAS:
        torch.library.register_fake(f"{CUDA_NAMESPACE}::{op}", FAKES[op])


_namespaces: dict = {}


def ops(backend: str):
    """The op namespace of a kernel backend (``triton`` or ``cuda``)."""
    if torch.compiler.is_compiling():
        # backends.select() defined/loaded these ops before tracing got here; the lock and
        # the import below would break the graph.
        return getattr(torch.ops, TRITON_NAMESPACE if backend == "triton" else CUDA_NAMESPACE)
    namespace = _namespaces.get(backend)
    if namespace is None:
        namespace = _namespaces[backend] = _load_ops(backend)
    return namespace


def _load_ops(backend: str):
    if backend == "triton":
        return triton_ops()
    if backend == "cuda":
        from llm_kernels.backends import load_extension
        if load_extension() is None:
            raise RuntimeError("the cuda backend needs llm_kernels._C, which is not built")
        return getattr(torch.ops, CUDA_NAMESPACE)
    raise ValueError(f"no kernel ops for backend {backend!r}")
