"""``lk.patch_torch()``: route torch's own attention and norms through llm_kernels while active.

    with lk.patch_torch():                       # F.scaled_dot_product_attention -> lk
        out = model(x)
    handle = lk.patch_torch(layer_norm=True, rms_norm=True)
    ...
    handle.undo()                                # every patched attribute restored exactly

This is the only place the package monkey-patches torch, and only while a handle is active.
Patched attributes are installed once, however many handles are active, and each call reads
its options from the innermost active handle that enables it; the originals come back when the
last such handle is undone. Calls the kernels cannot take go to the original torch code.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from llm_kernels import _amp, _checks
from llm_kernels.attention import scaled_dot_product_attention as lk_sdpa
from llm_kernels.backends import _check_name, use_backend
from llm_kernels.layer_norm import layer_norm as lk_layer_norm
from llm_kernels.layer_norm import rms_norm as lk_rms_norm

_lock = threading.RLock()
_active: list["TorchPatch"] = []
_installed: set[str] = set()
# feature -> the attribute value found when it was last installed (torch's original).
_originals: dict[str, object] = {}


def _backend_of(feature: str) -> Optional[str]:
    """The backend of the innermost active handle that patches ``feature`` (None: default)."""
    for handle in reversed(_active):
        if feature in handle.features:
            return handle.backend
    return None


def _call_with_backend(backend: Optional[str], fn: Callable, *args, **kwargs):
    if backend is None:
        return fn(*args, **kwargs)
    with use_backend(backend):
        return fn(*args, **kwargs)


def _patched_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention through lk (torch's semantics)."""
    return _call_with_backend(_backend_of("sdpa"), lk_sdpa, query, key, value,
                              attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale, enable_gqa=enable_gqa)


def _norm_input_reason(module: torch.nn.Module, x) -> Optional[str]:
    """None when lk can normalize ``x`` exactly as ``module`` would, else why not."""
    if len(module.normalized_shape) != 1:
        return "normalized_shape spans more than the last dim"
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != module.normalized_shape[0]:
        return "input's last dim does not match normalized_shape"
    if x.dtype not in _checks.FLOAT_DTYPES or x.numel() == 0:
        return "input is empty or not floating"
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        return "input's last dim is not contiguous"
    if _amp.dtype_for(x) is not None:
        return "autocast is enabled (torch's own autocast rule for norms)"
    params = [p for p in (module.weight, getattr(module, "bias", None)) if p is not None]
    if any(p.dtype != x.dtype or p.device != x.device for p in params):
        return "parameters differ from the input in dtype or device"
    return None


def _patched_layer_norm_forward(self, input):
    """torch.nn.LayerNorm.forward through lk.layer_norm when it normalizes the last dim only."""
    if _norm_input_reason(self, input) is not None:
        return _originals["layer_norm"](self, input)
    return _call_with_backend(_backend_of("layer_norm"), lk_layer_norm, input,
                              self.weight, self.bias, self.eps)


def _patched_rms_norm_forward(self, x):
    """torch.nn.RMSNorm.forward through lk.rms_norm when it normalizes the last dim only."""
    if _norm_input_reason(self, x) is not None:
        return _originals["rms_norm"](self, x)
    eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
    return _call_with_backend(_backend_of("rms_norm"), lk_rms_norm, x, self.weight, eps)


# feature -> (owner, attribute, replacement)
_TARGETS = {
    "sdpa": (F, "scaled_dot_product_attention", _patched_sdpa),
    "layer_norm": (torch.nn.LayerNorm, "forward", _patched_layer_norm_forward),
    "rms_norm": (torch.nn.RMSNorm, "forward", _patched_rms_norm_forward),
}


def _sync() -> None:
    """Install each feature some active handle enables; restore every other one."""
    wanted = {feature for handle in _active for feature in handle.features}
    for feature, (owner, attr, replacement) in _TARGETS.items():
        if feature in wanted and feature not in _installed:
            _originals[feature] = owner.__dict__[attr]
            setattr(owner, attr, replacement)
            _installed.add(feature)
        elif feature not in wanted and feature in _installed:
            setattr(owner, attr, _originals[feature])
            _installed.remove(feature)


def patched_features() -> frozenset:
    """The features installed right now (``sdpa``, ``layer_norm``, ``rms_norm``)."""
    with _lock:
        return frozenset(_installed)


class TorchPatch:
    """An active ``patch_torch`` handle: ``undo()`` it, or use it as a context manager."""

    def __init__(self, features: frozenset, backend: Optional[str]):
        self.features = features
        self.backend = backend

    @property
    def active(self) -> bool:
        with _lock:
            return any(handle is self for handle in _active)

    def activate(self) -> "TorchPatch":
        """Install the patches (no-op when already active)."""
        with _lock:
            if not self.active:
                _active.append(self)
                _sync()
        return self

    def undo(self) -> None:
        """Remove this handle's patches; torch's originals return with the last handle.
        Idempotent."""
        with _lock:
            _active[:] = [handle for handle in _active if handle is not self]
            _sync()

    def __enter__(self) -> "TorchPatch":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return f"TorchPatch({sorted(self.features)}, backend={self.backend!r}, {state})"


def patch_torch(sdpa: bool = True, layer_norm: bool = False, rms_norm: bool = False,
                backend: Optional[str] = None) -> TorchPatch:
    """Route torch.nn.functional.scaled_dot_product_attention (and optionally the forwards of
    torch.nn.LayerNorm / torch.nn.RMSNorm) through llm_kernels, starting now.

    Returns an active handle: ``handle.undo()`` or ``with lk.patch_torch(): ...`` restores every
    patched attribute exactly. ``backend`` names the lk backend for the patched calls (None:
    the default in force at each call).
    """
    if backend is not None:
        _check_name(backend)
    features = frozenset(name for name, on in (("sdpa", sdpa), ("layer_norm", layer_norm),
                                               ("rms_norm", rms_norm)) if on)
    return TorchPatch(features, backend).activate()
