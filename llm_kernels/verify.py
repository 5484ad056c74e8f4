"""``llm-kernels verify``: every op x every available backend against the float64 reference.

For each case the inputs are fresh random tensors; the op runs forward, then backward with a
random output gradient. Each output and each input gradient is compared with the fp64
reference by the pass rule of :mod:`llm_kernels.numerics`, next to the error of the same-dtype
torch computation.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

import llm_kernels as lk
from llm_kernels import reference as ref
from llm_kernels.backends import BackendUnavailableError, available_backends
from llm_kernels.numerics import compare

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Case:
    """One op call: named inputs, how to call it on a backend, how to compute the reference."""

    op: str
    shape: str
    inputs: dict
    call: Callable  # call(backend, **inputs) -> Tensor or tuple of Tensors
    reference: Callable  # reference(upcast, **inputs) -> same structure


@dataclass
class Row:
    op: str
    backend: str
    dtype: str
    shape: str
    output: str
    max_abs: float
    rel: float
    torch_rel: float
    passed: bool
    note: str = ""


def _rand(shape, dtype, device, scale=1.0, grad=True):
    t = (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype)
    return t.requires_grad_(grad)


def _attention_cases(dtype, device, big):
    specs = [(2, 4, 2, 97, 97, 64, True, None), (1, 4, 1, 17, 33, 40, False, "pad"),
             (2, 2, 2, 1, 300, 128, True, None)]
    if big:
        specs += [(2, 16, 16, 2048, 2048, 128, True, None),
                  (1, 8, 2, 1025, 1025, 96, False, "bias"),
                  (4, 32, 8, 1, 8191, 128, True, None)]  # a decode step over a GQA cache
    for b, h, hkv, lq, lk_, d, causal, mask_kind in specs:
        inputs = {"q": _rand((b, h, lq, d), dtype, device),
                  "k": _rand((b, hkv, lk_, d), dtype, device),
                  "v": _rand((b, hkv, lk_, d), dtype, device)}
        mask = None
        if mask_kind == "pad":
            mask = torch.rand(b, 1, 1, lk_, device=device) > 0.2
        elif mask_kind == "bias":
            mask = torch.randn(1, h, lq, lk_, device=device).to(dtype)

        def call(backend, q, k, v, causal=causal, mask=mask):
            return lk.attention(q, k, v, causal=causal, attn_mask=mask, backend=backend)

        def reference(upcast, q, k, v, causal=causal, mask=mask):
            return ref.attention_ref(q, k, v, causal=causal, attn_mask=mask, upcast=upcast)

        desc = f"B{b} H{h}/{hkv} Lq{lq} Lk{lk_} D{d}{' causal' if causal else ''}" + (
            f" mask={mask_kind}" if mask_kind else "")
        yield Case("attention", desc, inputs, call, reference)


def _norm_cases(dtype, device, big):
    # (3, 17), not (1, 17): a single row's dw is one rounded product per value, and with 17
    # fp16 values whether torch's rounding happens to cancel the residual's (h = x + r rounded)
    # decides the pass-rule bound (1 seed in 300 fails both backends, which agree bit for bit).
    for rows, width in ([(37, 1025), (3, 17)] + ([(4096, 4096)] if big else [])):
        for rms in (False, True):
            inputs = {"x": _rand((rows, width), dtype, device), "w": _rand((width,), dtype, device),
                      "r": _rand((rows, width), dtype, device)}
            if not rms:
                inputs["b"] = _rand((width,), dtype, device)
            if rms:
                def call(backend, x, w, r):
                    return lk.rms_norm(x, w, residual=r, backend=backend)

                def reference(upcast, x, w, r):
                    return ref.rms_norm_ref(x, w, residual=r, upcast=upcast)
            else:
                def call(backend, x, w, b, r):
                    return lk.layer_norm(x, w, b, residual=r, backend=backend)

                def reference(upcast, x, w, b, r):
                    return ref.layer_norm_ref(x, w, b, residual=r, upcast=upcast)
            yield Case("rms_norm" if rms else "layer_norm", f"{rows}x{width} +residual", inputs,
                       call, reference)


def _softmax_cases(dtype, device, big):
    for shape in ([(37, 1025), (3, 5, 127)] + ([(4096, 8192)] if big else [])):
        yield Case("softmax", "x".join(map(str, shape)), {"x": _rand(shape, dtype, device, 4.0)},
                   lambda backend, x: lk.softmax(x, backend=backend),
                   lambda upcast, x: ref.softmax_ref(x, upcast=upcast))


def _ffn_cases(dtype, device, big):
    n, d, dff = (4096, 1024, 4096) if big else (37, 64, 127)
    scale = 1.0 / math.sqrt(d)
    for act in ("gelu", "silu"):
        inputs = {"x": _rand((n, d), dtype, device), "w1": _rand((dff, d), dtype, device, scale),
                  "b1": _rand((dff,), dtype, device, 0.1),
                  "w2": _rand((d, dff), dtype, device, scale),
                  "b2": _rand((d,), dtype, device, 0.1)}
        yield Case("feed_forward", f"N{n} d{d} dff{dff} {act}", inputs,
                   lambda backend, act=act, **t: lk.feed_forward(
                       t["x"], t["w1"], t["b1"], t["w2"], t["b2"], activation=act, backend=backend),
                   lambda upcast, act=act, **t: ref.feed_forward_ref(
                       t["x"], t["w1"], t["b1"], t["w2"], t["b2"], activation=act, upcast=upcast))
    inputs = {"x": _rand((n, d), dtype, device), "wg": _rand((dff, d), dtype, device, scale),
              "wu": _rand((dff, d), dtype, device, scale),
              "wd": _rand((d, dff), dtype, device, scale)}
    yield Case("swiglu", f"N{n} d{d} dff{dff}", inputs,
               lambda backend, x, wg, wu, wd: lk.swiglu(x, wg, wu, wd, backend=backend),
               lambda upcast, x, wg, wu, wd: ref.swiglu_ref(x, wg, wu, wd, upcast=upcast))


def _cross_entropy_cases(dtype, device, big):
    n, v = (4096, 32768) if big else (37, 1003)
    target = torch.randint(0, v, (n,), device=device)
    target[::5] = -100
    for reduction in ("mean", "none"):
        yield Case("cross_entropy", f"N{n} V{v} {reduction}",
                   {"logits": _rand((n, v), dtype, device, 2.0)},
                   lambda backend, logits, r=reduction: lk.cross_entropy(
                       logits, target, reduction=r, backend=backend),
                   lambda upcast, logits, r=reduction: ref.cross_entropy_ref(
                       logits, target, reduction=r, upcast=upcast))


# Every op verify reports -> the builder of its cases (one builder makes the cases of two ops:
# layer_norm and rms_norm, feed_forward and swiglu).
CASE_BUILDERS = {"attention": _attention_cases, "layer_norm": _norm_cases, "rms_norm": _norm_cases,
                 "softmax": _softmax_cases, "feed_forward": _ffn_cases, "swiglu": _ffn_cases,
                 "cross_entropy": _cross_entropy_cases}
OPS = tuple(CASE_BUILDERS)


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _forward_backward(fn, inputs, grads_out):
    """Run fn on detached copies of the inputs; return (outputs, input grads)."""
    leaves = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    outs = _as_tuple(fn(**leaves))
    if grads_out is None:
        grads_out = [torch.randn_like(o, dtype=torch.float32).to(o.dtype) for o in outs]
    loss = sum((o.double() * g.double()).sum() for o, g in zip(outs, grads_out))
    diff = [t for t in leaves.values() if t.requires_grad]
    grads = torch.autograd.grad(loss, diff)
    names = [k for k, t in leaves.items() if t.requires_grad]
    return outs, dict(zip(names, grads)), grads_out


def run_case(case: Case, backend: str, dtype: torch.dtype) -> list[Row]:
    """Compare one case on one backend: outputs and gradients, each a Row."""
    upcast = {k: v.detach().double().requires_grad_(v.requires_grad)
              for k, v in case.inputs.items()}
    ref_outs, ref_grads, grads_out = _forward_backward(
        lambda **t: case.reference(True, **t), upcast, None)
    torch_outs, torch_grads, _ = _forward_backward(
        lambda **t: case.call("torch", **t), case.inputs, grads_out)
    try:
        outs, grads, _ = _forward_backward(lambda **t: case.call(backend, **t), case.inputs,
                                           grads_out)
    except BackendUnavailableError as exc:
        return [Row(case.op, backend, str(dtype).replace("torch.", ""), case.shape, "-", math.nan,
                    math.nan, math.nan, True, f"skipped: {exc}")]
    pairs = [(f"out{i}", o, r, t) for i, (o, r, t) in enumerate(zip(outs, ref_outs, torch_outs))]
    pairs += [(f"d{k}", grads[k], ref_grads[k], torch_grads[k]) for k in grads]
    rows = []
    for name, out, ref_out, torch_out in pairs:
        result = compare(out, ref_out, torch_out, dtype)
        rows.append(Row(case.op, backend, str(dtype).replace("torch.", ""), case.shape, name,
                        result.max_abs, result.rel, result.torch_rel, result.passed))
    return rows


def backend_problem(name: str, device: torch.device) -> Optional[str]:
    """Why backend ``name`` cannot run any call on ``device``, else None."""
    ok, why = available_backends()[name]
    if not ok:
        return why
    if name == "triton" and device.type != "cuda" and not lk.backends.interpreting():
        return "triton runs CPU tensors only under the interpreter (set TRITON_INTERPRET=1)"
    return None


def runnable_backends(device: torch.device) -> list[str]:
    """Backends available for tensors on ``device`` (the Triton interpreter only when set)."""
    return [name for name in available_backends() if backend_problem(name, device) is None]


def _verdict(rows: list[Row]) -> str:
    if all(r.note for r in rows):
        return "SKIP"
    return "PASS" if all(r.passed for r in rows) else "FAIL"


def _builder_groups(ops: Optional[list[str]]) -> dict[Callable, set[str]]:
    """Case builder -> the ops of ``ops`` (default: all) it makes cases for, in OPS order."""
    groups: dict[Callable, set[str]] = {}
    for op in OPS:
        if ops is None or op in ops:
            groups.setdefault(CASE_BUILDERS[op], set()).add(op)
    return groups


class VerifyInterrupted(KeyboardInterrupt):
    """Ctrl-C (or a time limit's SIGINT) during :func:`verify`; ``rows`` holds the finished rows."""

    def __init__(self, rows: list):
        super().__init__(f"interrupted after {len(rows)} rows")
        self.rows = rows


def verify(device: str = "cpu", ops: Optional[list[str]] = None,
           backends: Optional[list[str]] = None, big: Optional[bool] = None, seed: int = 0,
           progress=print) -> list[Row]:
    """Run the verification matrix; returns every row (skipped cases carry a note).

    A case's inputs and output gradient depend on ``seed``, its dtype and its place among its
    builder's cases only, not on ``ops`` or ``backends``: a subset reruns the same numbers.
    Ctrl-C raises :class:`VerifyInterrupted` carrying the rows finished so far."""
    dev = torch.device(device)
    big = dev.type == "cuda" if big is None else big
    backends = backends or runnable_backends(dev)
    rows: list[Row] = []
    try:
        _run_matrix(dev, ops, backends, big, seed, progress, rows)
    except KeyboardInterrupt as exc:
        raise VerifyInterrupted(rows) from exc
    return rows


def _run_matrix(dev: torch.device, ops, backends: list[str], big: bool, seed: int, progress,
                rows: list[Row]) -> None:
    """Append each case's rows to ``rows`` as it finishes."""
    for builder, wanted in _builder_groups(ops).items():
        for dtype in DTYPES:
            torch.manual_seed(seed)
            for index, case in enumerate(list(builder(dtype, dev, big))):
                if case.op not in wanted:
                    continue
                for backend in backends:
                    torch.manual_seed(seed + 1 + index)  # the output gradient run_case draws
                    start = time.perf_counter()
                    case_rows = run_case(case, backend, dtype)
                    rows += case_rows
                    if progress:
                        progress(f"  {case.op:<14} {backend:<7} {str(dtype)[6:]:<9} "
                                 f"{case.shape:<36} {_verdict(case_rows)} "
                                 f"({time.perf_counter() - start:.1f}s)")


def format_table(rows: list[Row]) -> str:
    head = (f"{'op':<14} {'backend':<7} {'dtype':<9} {'shape':<36} {'output':<7} "
            f"{'max_abs':>9} {'rel_err':>9} {'torch_rel':>9}  result")
    lines = [head, "-" * len(head)]
    for r in rows:
        verdict = "SKIP" if r.note else ("PASS" if r.passed else "FAIL")
        lines.append(f"{r.op:<14} {r.backend:<7} {r.dtype:<9} {r.shape:<36} {r.output:<7} "
                     f"{r.max_abs:>9.2e} {r.rel:>9.2e} {r.torch_rel:>9.2e}  {verdict}"
                     + (f"  {r.note}" if r.note else ""))
    return "\n".join(lines)


def _json_row(row: Row) -> dict:
    """The row as a dict, with null for the errors of a skipped case (strict JSON has no NaN)."""
    return {key: None if isinstance(value, float) and math.isnan(value) else value
            for key, value in asdict(row).items()}


def write_json(rows: list[Row], path: str, meta: dict) -> None:
    """``{"meta": meta, "rows": [...]}`` into ``path``, its folders created as needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": [_json_row(r) for r in rows]}, f, indent=1,
                  allow_nan=False)
