"""Backend registry and dispatch.

Three backends serve every public op:

- ``torch``: the pure-torch reference (always available).
- ``triton``: Triton kernels from ``llm_kernels.kernels``; CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1``.
- ``cuda``: the compiled extension ``llm_kernels._C``; CUDA kernels for CUDA tensors, C++
  kernels for CPU tensors.

``backend=None`` (or ``"auto"``) picks the first backend of the op's preference order that
supports the call; every choice and every fallback is recorded in :func:`dispatch_log`.
A backend named explicitly that cannot run the call raises with the reason.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import importlib.util
import os
import threading
import warnings
from typing import Callable, Iterator, Optional

import torch

BACKENDS = ("torch", "triton", "cuda")
AUTO = "auto"
ENV_VAR = "LLM_KERNELS_BACKEND"
_NAMES = frozenset(BACKENDS + (AUTO,))

# Order tried by "auto", per device type. The Triton interpreter is far too slow to be chosen
# automatically on CPU: it runs only when named.
_AUTO_ORDER = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cuda", "torch"),
}
# Per-op exceptions, measured with `llm-kernels bench` on the 2-core CPU machine (2026-11-26,
# bench/results/2026-11-26-cpu-2core.md): torch's own CPU kernels beat the C++ ones for these
# ops (feed_forward 0.64x, swiglu 0.61x; layer_norm since its 4K-aliasing fix 1.06-1.17x
# forward+backward at hidden 1024-4096 but level or 0.94x on small rows), while the C++ RMSNorm
# (1.35-3.2x) and attention (1.03-1.23x) win, and since the vectorized exp (2026-11-27, fp32,
# fwd and fwd+bwd, interleaved A/B) softmax (1.1-3.6x the torch backend, which checks for -inf
# rows; 0.86-1.15x bare torch.softmax) and cross_entropy (1.3-6.1x F.cross_entropy) too.
# On CUDA, measured on an H100 (2026-11-27, bf16,
# bench/results/2026-11-27-nvidia-h100-80gb-hbm3.md):
# the CUDA C++ norms beat the Triton ones (layer norm fwd+bwd 0.50 / 0.70 ms against 1.12 / 1.21
# at hidden 4096 / 8192, RMSNorm 0.69 against 0.98 ms at 8192), and torch's cuBLAS block beats
# both feed-forward kernels (fwd 2.93 ms against 3.06 cuda and 3.69 triton; fwd+bwd 10.13
# against 10.38 and 10.83 at 8192 x 4096 x 16384). Triton keeps attention (2.5x the CUDA C++
# kernel), softmax, cross-entropy and SwiGLU (level with both).
_AUTO_ORDER_OVERRIDES: dict[tuple[str, str], tuple[str, ...]] = {
    **{(op, "cpu"): ("torch",) for op in ("layer_norm", "feed_forward", "swiglu")},
    **{(op, "cuda"): ("cuda", "triton", "torch") for op in ("layer_norm", "rms_norm")},
    ("feed_forward", "cuda"): ("torch",),
}

_state = threading.local()
_LOG: collections.deque = collections.deque(maxlen=1000)
_LOG_LOCK = threading.Lock()


def _constant_under_compile(fn):
    """Mark ``fn`` as torch.compiler.assume_constant_result does (the same attribute), without
    importing torch._dynamo (seconds) here: torch.compile calls ``fn`` while tracing and bakes
    the result in, so the backend choice is fixed per compiled graph and never graph-breaks."""
    fn._dynamo_marked_constant = True
    return fn


class BackendUnavailableError(RuntimeError):
    """Raised when a backend named explicitly cannot run a call."""


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in _NAMES:
        raise ValueError(f"backend must be one of {BACKENDS + (AUTO,)}, got {name!r}")
    return name


def default_backend() -> str:
    """The backend in force: the innermost ``use_backend`` or ``$LLM_KERNELS_BACKEND``."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get(ENV_VAR, AUTO).strip() or AUTO
    if env not in _NAMES:
        raise ValueError(f"${ENV_VAR} must be one of {BACKENDS + (AUTO,)}, got {env!r}")
    return env


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Context manager selecting the default backend for calls made inside it."""
    _check_name(name)
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield name
    finally:
        stack.pop()


def interpreting() -> bool:
    """True when Triton kernels run through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_status() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if not (torch.cuda.is_available() or interpreting()):
        return False, "no CUDA device and TRITON_INTERPRET is not 1"
    return True, ""


@functools.lru_cache(maxsize=None)
def load_extension():
    """Import ``llm_kernels._C`` (registers the ``torch.ops.llm_kernels`` ops); None if absent."""
    try:
        module = importlib.import_module("llm_kernels._C")
    except ImportError as exc:
        _extension_error.append(f"llm_kernels._C could not be imported ({exc}); "
                                "reinstall with `pip install --no-build-isolation -e .`")
        return None
    from llm_kernels._ops import missing_cuda_ops, register_cuda_fakes
    missing = missing_cuda_ops()
    if missing:
        _extension_error.append(f"llm_kernels._C is older than the Python package (it lacks "
                                f"{', '.join(missing)}): rebuild it with "
                                "`pip install --no-build-isolation -e .`")
        return None
    register_cuda_fakes()
    return module


_extension_error: list[str] = []


def extension_status() -> tuple[bool, str]:
    """(built, why_not) for the compiled extension."""
    if load_extension() is None:
        return False, _extension_error[0]
    return True, ""


@_constant_under_compile
def available_backends() -> dict[str, tuple[bool, str]]:
    """``{"torch": (True, ""), "triton": (ok, why_not), "cuda": (ok, why_not)}``."""
    return {"torch": (True, ""), "triton": _triton_status(), "cuda": extension_status()}


_UNKNOWN = object()
_setup_reasons: dict = {}


@_constant_under_compile
def _setup_reason(backend: str, kernel: str, device: torch.device) -> Optional[str]:
    """Why kernel backend ``backend`` cannot run ``kernel`` on ``device`` whatever the
    arguments (not built, no kernel for the device), or None; cached per (backend, kernel,
    device) where the answer cannot change."""
    key = (backend, kernel, device)
    reason = _setup_reasons.get(key, _UNKNOWN)
    if reason is _UNKNOWN:
        ok, why = available_backends()[backend]
        reason = _device_reason(backend, kernel, device) if ok else why
        if _fixed(backend, device):
            _setup_reasons[key] = reason
    return reason


def _fixed(backend: str, device: torch.device) -> bool:
    """False where _setup_reason can change: Triton on CPU (``$TRITON_INTERPRET``, read on
    each call) and a CUDA device without an index (the current device)."""
    if backend == "triton" and device.type == "cpu":
        return False
    return device.type != "cuda" or device.index is not None


def _device_reason(backend: str, kernel: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` has no ``kernel`` for tensors on ``device``, or None."""
    reason = _device_type_reason(backend, kernel, device.type, interpreting())
    if reason is None and backend == "cuda" and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        reason = _cuda_capability_reason(index)
    return reason


@functools.lru_cache(maxsize=None)
def _cuda_capability_reason(index: int) -> Optional[str]:
    """The CUDA kernels use sm_80 instructions (cp.async, bf16 mma.sync)."""
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        return (f"the cuda backend needs a GPU of compute capability 8.0 or newer, cuda:{index} "
                f"is {major}.{minor}")
    return None


@functools.lru_cache(maxsize=None)
def _device_type_reason(backend: str, kernel: str, device_type: str,
                        interpret: bool) -> Optional[str]:
    """_device_reason, cached per device type (a dispatcher lookup per call costs ~5 us)."""
    from llm_kernels import _ops
    if backend == "triton":
        if device_type not in ("cuda", "cpu") or (device_type == "cpu" and not interpret):
            return ("triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
                    f"got {device_type}")
        reason = _ops.triton_kernel_reason(kernel)
        if reason is None:
            _ops.triton_ops()  # defined before torch.compile traces a call to them
        return reason
    if backend == "cuda":
        key = {"cuda": "CUDA", "cpu": "CPU"}.get(device_type)
        name = f"{_ops.CUDA_NAMESPACE}::{kernel}_forward"
        if key is None or not torch._C._dispatch_has_kernel_for_dispatch_key(name, key):
            return f"llm_kernels._C has no {kernel} kernel for {device_type} tensors"
    return None


def record(op: str, backend: str, reason: str = "") -> None:
    """Append a dispatch decision to the log (not while torch.compile traces: the lock would
    break the graph, and a compiled graph replays its choice without re-deciding)."""
    if torch.compiler.is_compiling():
        return
    with _LOG_LOCK:
        _LOG.append({"op": op, "backend": backend, "reason": reason})


_warned: set[str] = set()


def warn_once(message: str, stacklevel: int = 2) -> None:
    """``warnings.warn(message)`` the first time this message comes; never while torch.compile
    traces (a warning would break the graph)."""
    if torch.compiler.is_compiling() or message in _warned:
        return
    _warned.add(message)
    warnings.warn(message, stacklevel=stacklevel + 1)


def dispatch_log(clear: bool = False) -> list[dict]:
    """The recent dispatch decisions, oldest first: dicts with op, backend and reason."""
    with _LOG_LOCK:
        entries = list(_LOG)
        if clear:
            _LOG.clear()
    return entries


def select(op: str, backend: Optional[str], device: torch.device,
           supports: Callable[[str], Optional[str]], kernel: Optional[str] = None,
           empty: Optional[str] = None) -> str:
    """Choose the backend for one call of public function ``op``.

    ``kernel`` names the kernel family it runs (``rms_norm`` runs ``layer_norm``);
    ``supports(name)`` returns None when kernel backend ``name`` can run the call's arguments, else
    the reason. ``empty`` (which input is empty) means there is nothing for a kernel to do: torch
    computes the empty or reduced result, whichever backend was asked for.
    """
    kernel = kernel or op
    name = _check_name(backend) if backend is not None else default_backend()
    if empty is not None:
        record(op, "torch", empty)
        return "torch"
    if name != AUTO:
        reason = _why_not(name, kernel, device, supports)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend {name!r} cannot run this call: {reason}")
        record(op, name, "requested")
        return name
    order = _AUTO_ORDER_OVERRIDES.get((op, device.type), _AUTO_ORDER.get(device.type, ("torch",)))
    skipped = []
    for candidate in order:
        reason = _why_not(candidate, kernel, device, supports)
        if reason is None:
            record(op, candidate, "auto" + (": " + "; ".join(skipped) if skipped else ""))
            return candidate
        skipped.append(f"{candidate}: {reason}")
    raise BackendUnavailableError(f"{op}: no backend can run this call ({'; '.join(skipped)})")


def _why_not(name: str, kernel: str, device: torch.device,
             supports: Callable[[str], Optional[str]]) -> Optional[str]:
    if name == "torch":
        return None
    return _setup_reason(name, kernel, device) or supports(name)


_deterministic = [False]


def use_deterministic(enabled: bool = True) -> None:
    """Make every backward bit-identical from run to run (no float atomics anywhere).

    The default backwards are already deterministic; this also rules out any faster
    non-deterministic variant a kernel offers. ``torch.use_deterministic_algorithms(True)``
    has the same effect.
    """
    _deterministic[0] = bool(enabled)


def deterministic() -> bool:
    """True when backwards must be bit-identical across runs."""
    return _deterministic[0] or torch.are_deterministic_algorithms_enabled()
