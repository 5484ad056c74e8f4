"""Host-side cost per call of the public lk ops: ``python -m llm_kernels.bench.host_overhead``.

The inputs are small (``CPU_DIMS``, ``GPU_DIMS``), so what is timed is the work around the
kernels (Python, validation, dispatch, autograd, the torch dispatcher), not the kernels. Per
op, two modes: ``fwd`` (the forward under ``torch.no_grad``) and ``fwd+bwd`` (the forward,
then ``torch.autograd.grad`` of every input). Providers: ``torch`` (the plain torch
equivalent, e.g. ``F.layer_norm``), ``lk-torch``, ``lk-cuda`` (on CPU tensors the C++
kernels) and, on a GPU, ``lk-triton``.
Each provider's loop runs inside ``lk.use_backend(<its backend>)``; the ops that take
``backend=`` get it too. The providers of one row run interleaved, ``--repeat`` blocks of
``--number`` calls each (a block ends with a CUDA synchronize on a GPU); the table shows the
median block's microseconds per call.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

import llm_kernels as lk

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "fwd+bwd")
DECODE_LK = 512


class Dims(NamedTuple):
    """Rows and widths of the row ops, attention's (B, H, L, D)."""

    rows: int
    c: int
    d_ff: int
    b: int
    h: int
    seq_len: int
    d: int


# Tiny on a CPU (its kernels compute there). On a GPU, GPT-2 small's widths on 16 rows: the
# device time is still a few microseconds, and the Triton kernels that the training-step
# profile compiled just before (the same widths, block sizes and divisibility) come from the
# cache instead of being compiled inside this step's time limit.
CPU_DIMS = Dims(rows=4, c=64, d_ff=128, b=1, h=2, seq_len=16, d=16)
GPU_DIMS = Dims(rows=16, c=768, d_ff=3072, b=1, h=12, seq_len=64, d=64)


def _dims(device) -> Dims:
    return GPU_DIMS if device.type == "cuda" else CPU_DIMS


class Case(NamedTuple):
    """One op: the inputs to differentiate, the plain torch call and the lk call."""

    inputs: tuple
    plain: Callable[[], object]
    lk: Callable[[str], object]


def _randn(device, dtype, *shape, grad=True):
    return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)


def _layer_norm(device, dtype):
    n, c = _dims(device).rows, _dims(device).c
    x, w, b = _randn(device, dtype, n, c), _randn(device, dtype, c), _randn(device, dtype, c)
    return Case((x, w, b), lambda: F.layer_norm(x, (c,), w, b, 1e-5),
                lambda name: lk.layer_norm(x, w, b, 1e-5, backend=name))


def _rms_norm(device, dtype):
    n, c = _dims(device).rows, _dims(device).c
    x, w = _randn(device, dtype, n, c), _randn(device, dtype, c)
    return Case((x, w), lambda: F.rms_norm(x, (c,), w, 1e-6),
                lambda name: lk.rms_norm(x, w, 1e-6, backend=name))


def _softmax(device, dtype):
    x = _randn(device, dtype, _dims(device).rows, _dims(device).c)
    return Case((x,), lambda: torch.softmax(x, -1), lambda name: lk.softmax(x, -1, backend=name))


def _cross_entropy(device, dtype):
    n, c = _dims(device).rows, _dims(device).c
    logits = _randn(device, dtype, n, c)
    target = torch.randint(c, (n,), device=device)
    return Case((logits,), lambda: F.cross_entropy(logits, target),
                lambda name: lk.cross_entropy(logits, target, backend=name))


def _feed_forward(device, dtype):
    n, c, d_ff = _dims(device)[:3]
    x = _randn(device, dtype, n, c)
    w1, b1 = _randn(device, dtype, d_ff, c), _randn(device, dtype, d_ff)
    w2, b2 = _randn(device, dtype, c, d_ff), _randn(device, dtype, c)
    return Case((x, w1, b1, w2, b2), lambda: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2),
                lambda name: lk.feed_forward(x, w1, b1, w2, b2, backend=name))


def _swiglu(device, dtype):
    n, c, d_ff = _dims(device)[:3]
    x = _randn(device, dtype, n, c)
    wg, wu, wd = (_randn(device, dtype, d_ff, c), _randn(device, dtype, d_ff, c),
                  _randn(device, dtype, c, d_ff))
    return Case((x, wg, wu, wd), lambda: F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd),
                lambda name: lk.swiglu(x, wg, wu, wd, backend=name))


def _qkv(device, dtype):
    s = _dims(device)
    return tuple(_randn(device, dtype, s.b, s.h, s.seq_len, s.d) for _ in range(3))


def _attention(device, dtype):
    q, k, v = _qkv(device, dtype)
    return Case((q, k, v), lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                lambda name: lk.attention(q, k, v, causal=True, backend=name))


def _decode(device, dtype):
    """One query per head against DECODE_LK cached keys (GQA 4:1): the flash-decoding path
    (a split kernel and a combine kernel)."""
    s = _dims(device)
    q = _randn(device, dtype, s.b, 4, 1, s.d)
    k, v = (_randn(device, dtype, s.b, 1, DECODE_LK, s.d) for _ in range(2))
    return Case((q, k, v), lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                lambda name: lk.attention(q, k, v, backend=name))


def _sdpa(device, dtype):
    q, k, v = _qkv(device, dtype)
    return Case((q, k, v), lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                lambda name: lk.scaled_dot_product_attention(q, k, v, is_causal=True))


def _layer_norm_module(device, dtype):
    n, c = _dims(device).rows, _dims(device).c
    x = _randn(device, dtype, n, c)
    plain = torch.nn.LayerNorm(c, device=device, dtype=dtype)
    modules = {name: lk.nn.LayerNorm.from_torch(plain, backend=name) for name in lk.BACKENDS}
    return Case((x, plain.weight, plain.bias), lambda: plain(x), lambda name: modules[name](x))


OPS = {"layer_norm": _layer_norm, "rms_norm": _rms_norm, "softmax": _softmax,
       "cross_entropy": _cross_entropy, "feed_forward": _feed_forward, "swiglu": _swiglu,
       "attention": _attention, "decode": _decode, "scaled_dot_product_attention": _sdpa,
       "nn.LayerNorm": _layer_norm_module}


def _call(case: Case, backend: Optional[str]) -> Callable[[], object]:
    return case.plain if backend is None else (lambda: case.lk(backend))


def _step(case: Case, backend: Optional[str], mode: str) -> Callable[[], object]:
    """One timed call of ``case`` with ``backend`` (None: plain torch) in ``mode``."""
    call = _call(case, backend)
    if mode == "fwd":
        return call
    grad = torch.ones_like(call())

    def fwd_bwd():
        return torch.autograd.grad(call(), case.inputs, grad)
    return fwd_bwd


def _block(step, backend: Optional[str], mode: str, number: int, sync) -> float:
    """Microseconds per call over ``number`` calls (under no_grad for ``fwd``)."""
    with lk.use_backend(backend or "auto"), torch.set_grad_enabled(mode != "fwd"):
        start = time.perf_counter()
        for _ in range(number):
            step()
        sync()
    return (time.perf_counter() - start) / number * 1e6


def measure(op: str, mode: str, providers: dict, device, dtype, repeat: int,
            number: int) -> dict[str, Optional[float]]:
    """Median microseconds per call of ``op`` per provider (None where it cannot run)."""
    case = OPS[op](device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    steps = {}
    for provider, backend in providers.items():
        try:
            with lk.use_backend(backend or "auto"):
                steps[provider] = _step(case, backend, mode)
                _block(steps[provider], backend, mode, 3, sync)
        except lk.BackendUnavailableError:
            continue
    times: dict[str, list[float]] = {p: [] for p in steps}
    for _ in range(repeat):
        for provider, step in steps.items():
            times[provider].append(_block(step, providers[provider], mode, number, sync))
    return {p: statistics.median(times[p]) if p in times else None for p in providers}


def _providers(device) -> dict[str, Optional[str]]:
    providers = {"torch": None, "lk-torch": "torch", "lk-cuda": "cuda"}
    if device.type == "cuda":
        providers["lk-triton"] = "triton"
    return providers


def _title(providers) -> list[str]:
    head = f"{'op':30} {'mode':8}" + "".join(f"{p:>11}" for p in providers)
    return [head, "-" * len(head)]


def _line(row: dict, providers) -> str:
    cells = "".join(f"{row[p]:11.1f}" if row[p] is not None else f"{'-':>11}"
                    for p in providers)
    return f"{row['op']:30} {row['mode']:8}{cells}"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_kernels.bench.host_overhead",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, help="default: bf16 on a GPU, fp32 on CPU")
    parser.add_argument("--ops", default=",".join(OPS),
                        help="comma-separated, of: " + ", ".join(OPS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--repeat", type=int, default=15, help="timed blocks per provider")
    parser.add_argument("--number", type=int, default=200, help="calls per timed block")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda"
                                                   else torch.float32)
    ops, modes = args.ops.split(","), args.modes.split(",")
    unknown = [o for o in ops if o not in OPS] + [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown ops/modes: {', '.join(unknown)}")
    torch.set_num_threads(args.threads)
    providers = _providers(device)
    if not args.json:  # the table row by row, so that a run cut short keeps what it measured
        print("\n".join(_title(providers)), flush=True)
    rows = []
    for op in ops:
        for mode in modes:
            rows.append({"op": op, "mode": mode, **measure(op, mode, providers, device, dtype,
                                                         args.repeat, args.number)})
            if not args.json:
                print(_line(rows[-1], providers), flush=True)
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
