"""Input validation shared by the public functions: every check runs before any kernel.

They run on every call, so each is a few attribute reads when the input is fine; the error
messages are built only when one is raised.
"""
from __future__ import annotations

from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLOAT_DTYPES = frozenset(FLOAT_DTYPES)
_KERNEL_DTYPES = frozenset(KERNEL_DTYPES)


def can_read_values(t: torch.Tensor) -> bool:
    """Whether a check may read t's values on the host: only a CPU tensor's, and not while
    torch.compile traces. Reading a GPU tensor's values waits for the device (a sync that stops
    the host from queueing work ahead, and breaks CUDA graph capture), which torch's own ops
    never do to validate: for GPU tensors the kernels instead give a documented result for bad
    values (a NaN loss for a target outside [0, V)) and torch's ops their device-side asserts.
    Skipped checks are the ones on values only (token ids, targets); every check on shapes,
    dtypes and devices always runs."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def tensor(name: str, t, *, ndim: Optional[int] = None, min_ndim: Optional[int] = None,
           floating: bool = True) -> torch.Tensor:
    """Check that ``t`` is a tensor of the expected rank (and floating dtype)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    if floating and t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def same_dtype_device(ref_name: str, ref: torch.Tensor, *named) -> None:
    """Every ``(name, tensor)`` pair of ``named`` (tensor None allowed) has ``ref``'s dtype and
    device."""
    device, dtype = ref.device, ref.dtype
    for name, t in named:
        if t is None:
            continue
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {device}: "
                             "all tensors must be on one device")
        if t.dtype != dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {dtype}: "
                            "all floating tensors must share one dtype")


def last_dim_contiguous(name: str, t: Optional[torch.Tensor]) -> None:
    if t is not None and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim (stride(-1) == 1), "
                         f"got strides {t.stride()}")


def shape(name: str, t: Optional[torch.Tensor], expected: tuple) -> None:
    """``t`` (None allowed) has shape ``expected`` (a tuple or torch.Size)."""
    if t is not None and tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def empty_reason(**tensors) -> Optional[str]:
    """Why the kernels skip a call with an empty tensor (torch computes its empty or reduced
    result, as for any shape), or None when no tensor is empty."""
    for name, t in tensors.items():
        if t is not None and t.numel() == 0:
            return f"{name} is empty (shape {tuple(t.shape)})"
    return None


def kernel_dtype_reason(dtype: torch.dtype) -> Optional[str]:
    """None when the Triton/CUDA kernels take ``dtype``, else why not."""
    if dtype not in _KERNEL_DTYPES:
        return f"kernels take float16, bfloat16 and float32, got {dtype}"
    return None
