"""Input validation shared by the public functions: every check runs before any kernel."""
from __future__ import annotations

from typing import Iterable, Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def tensor(name: str, t, *, ndim: Optional[int] = None, min_ndim: Optional[int] = None,
           floating: bool = True) -> torch.Tensor:
    """Check that ``t`` is a tensor of the expected rank (and floating dtype)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def optional(name: str, t, **kwargs) -> Optional[torch.Tensor]:
    return None if t is None else tensor(name, t, **kwargs)


def same_dtype_device(ref_name: str, ref: torch.Tensor, **others) -> None:
    """Every tensor in ``others`` (None allowed) has ``ref``'s dtype and device."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}: "
                             "all tensors must be on one device")
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}: "
                            "all floating tensors must share one dtype")


def last_dim_contiguous(**tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride(-1) == 1), "
                             f"got strides {t.stride()}")


def shape(name: str, t: Optional[torch.Tensor], expected: Iterable[int]) -> None:
    expected = tuple(expected)
    if t is not None and tuple(t.shape) != expected:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")


def empty_reason(**tensors) -> Optional[str]:
    """Why the kernels skip a call with an empty tensor (torch computes its empty or reduced
    result, as for any shape), or None when no tensor is empty."""
    for name, t in tensors.items():
        if t is not None and t.numel() == 0:
            return f"{name} is empty (shape {tuple(t.shape)})"
    return None


def kernel_dtype_reason(dtype: torch.dtype) -> Optional[str]:
    """None when the Triton/CUDA kernels take ``dtype``, else why not."""
    if dtype not in KERNEL_DTYPES:
        return f"kernels take float16, bfloat16 and float32, got {dtype}"
    return None
