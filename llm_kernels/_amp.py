"""How the lk ops behave under ``torch.autocast``.

The kernels are not autocast ops: every lk function runs its backend with autocast off, on
inputs of one dtype, so all backends compute the same thing. Under autocast it first casts its
inputs the way torch's own op would:
- ``attention``, ``scaled_dot_product_attention``, ``feed_forward``, ``swiglu`` (matmuls): the
  floating inputs to the autocast dtype, as torch does for SDPA and ``F.linear``;
- ``layer_norm``, ``rms_norm``: x, residual, weight and bias to their promoted dtype (16-bit
  activations with float32 parameters: float32, the result torch gives on CUDA; all-16-bit
  inputs stay 16-bit, the fused low-precision norm of Apex, where torch would upcast);
- ``softmax``: x's dtype (computed in float32 inside; torch returns float32 on CUDA);
- ``cross_entropy``: the logits keep their dtype (the kernels compute in float32 and never
  copy them), the loss is float32 (float64 for float64 logits), as torch's.
"""
from __future__ import annotations

from typing import Optional

import torch


def dtype_for(t) -> Optional[torch.dtype]:
    """The autocast dtype in effect for tensors on ``t``'s device, or None (autocast off, or
    ``t`` not a tensor)."""
    if not isinstance(t, torch.Tensor):
        return None
    if (t.is_cpu or t.is_cuda) and not torch._C._is_any_autocast_enabled():
        return None  # the common case, cheaply (the check misses autocast on some device types)
    device_type = t.device.type
    if not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def cast(dtype: torch.dtype, *tensors):
    """``tensors`` with the 16/32-bit floating ones in ``dtype`` (autocast leaves float64,
    integers and bools alone, and so does this)."""
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _ELIGIBLE else t
                 for t in tensors)


def promote(*tensors):
    """The floating tensors among ``tensors`` in their promoted dtype."""
    floating = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not floating:
        return tensors
    dtype = floating[0].dtype
    for t in floating[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return cast(dtype, *tensors)


def disabled(t: torch.Tensor) -> torch.autocast:
    """A context with autocast off for ``t``'s device type."""
    return torch.autocast(t.device.type, enabled=False)
