"""Pieces shared by the per-op benchmark modules: cases, options, providers, timed steps.

An op module (``bench/<op>.py``) defines ``NAME``, ``cases(opts, device)`` returning
:class:`Case` s and ``PROVIDERS``: provider name -> ``build(case, device, opts)`` returning the
zero-argument callable to time (inputs already made; an optional ``note`` attribute
ends up in the row), or raising :class:`Skip` with the reason.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch

from llm_kernels.bench.harness import Skip

LK_PROVIDERS = ("lk-triton", "lk-cuda")
MODES = ("fwd", "bwd", "fwd+bwd", "decode", "train")  # train: gpt_train's whole step
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Options:
    """What the command line asked for; None means the op's default for the device."""

    dtype: Optional[torch.dtype] = None
    causal: str = "both"                       # "on", "off" or "both"
    head_dim: Optional[int] = None
    seq_lens: Optional[tuple[int, ...]] = None
    hidden_sizes: Optional[tuple[int, ...]] = None
    modes: Optional[tuple[str, ...]] = None
    quick: bool = False


@dataclass(frozen=True)
class Case:
    """One benchmarked configuration: a shape, a dtype and a mode.

    ``params`` holds the shape (e.g. B, H, Lq, Lk, D); ``x`` is the value plotted on the x axis
    (sequence length, hidden size or vocabulary size); ``flops``/``nbytes`` the work of one call.
    """

    op: str
    mode: str
    dtype: torch.dtype
    params: dict
    x_name: str
    x: int
    variant: str = ""
    flops: Optional[float] = None
    nbytes: Optional[float] = None
    extra: dict = field(default_factory=dict)

    @property
    def shape(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.params.items())


def default_dtype(opts: Options, device: torch.device) -> torch.dtype:
    """bf16 on a GPU, fp32 on a CPU (bf16 math on CPUs is slow and not what they run)."""
    if opts.dtype is not None:
        return opts.dtype
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def pick_modes(opts: Options, default: Sequence[str], supported: Sequence[str]) -> list[str]:
    """The modes asked for (those this op supports), else ``default``."""
    if opts.modes is None:
        return list(default)
    return [m for m in opts.modes if m in supported]


def randn(shape, dtype, device, *, scale: float = 1.0, requires_grad: bool = False):
    """Fresh standard-normal inputs (never zeros: they hide bugs and can time faster)."""
    t = torch.randn(shape, device=device, dtype=torch.float32).mul_(scale).to(dtype)
    return t.requires_grad_(requires_grad)


def timed_step(forward: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
               mode: str) -> Callable[[], object]:
    """The callable to time for ``mode``.

    fwd (and decode): ``forward(*inputs)`` without autograd. bwd: the gradients of one forward
    output, its graph built once outside the timing and retained. fwd+bwd: both. Gradients
    are taken for the inputs that require grad; the output gradient is random.
    """
    if mode in ("fwd", "decode"):
        def run_forward():
            with torch.no_grad():
                return forward(*inputs)
        return run_forward
    targets = [t for t in inputs if t.requires_grad]
    if not targets:
        raise Skip(f"mode {mode} needs inputs that require grad")
    if mode == "bwd":
        out = forward(*inputs)
        grad_out = torch.randn_like(out)
        return lambda: torch.autograd.grad(out, targets, grad_out, retain_graph=True)
    if mode == "fwd+bwd":
        probe = forward(*inputs)
        grad_out = torch.randn_like(probe)
        del probe
        return lambda: torch.autograd.grad(forward(*inputs), targets, grad_out)
    raise ValueError(f"unknown mode {mode!r}")


def lk_backend(provider: str) -> str:
    """'lk-triton' -> 'triton'."""
    return provider.split("-", 1)[1]


def check_lk_available(provider: str, device: torch.device) -> None:
    """Raise Skip when the llm_kernels backend behind ``provider`` cannot run on ``device``."""
    import llm_kernels as lk
    backend = lk_backend(provider)
    if backend == "triton" and device.type != "cuda":
        raise Skip("the Triton interpreter is not benchmarked (Triton is timed on GPUs only)")
    ok, why = lk.available_backends()[backend]
    if not ok:
        raise Skip(why)


@contextlib.contextmanager
def env_var(name: str, value: str) -> Iterator[None]:
    """$name = value for the duration, then its previous value (or none) again."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


def with_tma(fn: Callable[[], object], kernels, device: torch.device,
             switch: str = "") -> Callable[[], object]:
    """``fn`` run with an opt-in Hopper path of the Triton kernels module ``kernels`` switched
    on (the environment variable ``switch``, by default its TMA reads' $<kernels.TMA_ENV>, set
    to 1 around each call); Skip where the device has no TMA."""
    if device.type != "cuda" or not kernels.tma_device(torch.empty(0, device=device)):
        raise Skip("TMA needs a Hopper or newer GPU")
    switch = switch or kernels.TMA_ENV

    def run():
        with env_var(switch, "1"):
            return fn()
    return run


def check_importable(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise Skip(f"{module} is not installed")


def compiled(fn: Callable, device: torch.device, opts: Options) -> Callable:
    """``torch.compile`` of a reference function (raises Skip on CPU with --quick: too slow)."""
    if device.type != "cuda" and opts.quick:
        raise Skip("torch.compile is not benchmarked on CPU with --quick (compile time)")
    return torch.compile(fn, dynamic=False)


def quiet(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with warnings silenced (torch's SDPA explains every refused backend at length)."""
    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()
    return run
