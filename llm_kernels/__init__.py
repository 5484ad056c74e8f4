"""llm_kernels: fused Triton and CUDA C++ kernels for softmax attention, layer norm, the
feed-forward block and cross-entropy, as differentiable torch functions.

    import llm_kernels as lk
    out = lk.attention(q, k, v, causal=True)           # (B, H, L, D)
    with lk.use_backend("triton"):
        y = lk.layer_norm(x, weight, bias)
"""
from llm_kernels.attention import attention, scaled_dot_product_attention
from llm_kernels.backends import (BACKENDS, BackendUnavailableError, available_backends,
                                  dispatch_log, use_backend, use_deterministic)
from llm_kernels.cross_entropy import cross_entropy
from llm_kernels.feed_forward import feed_forward, swiglu
from llm_kernels.layer_norm import layer_norm, rms_norm
from llm_kernels import nn  # noqa: E402  (LayerNorm, RMSNorm, FeedForward, SwiGLU, convert)
from llm_kernels.patch import patch_torch
from llm_kernels.softmax import softmax

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "BackendUnavailableError", "attention", "available_backends", "cross_entropy",
    "dispatch_log", "feed_forward", "layer_norm", "nn", "patch_torch", "rms_norm",
    "scaled_dot_product_attention", "softmax", "swiglu", "use_backend", "use_deterministic",
]
