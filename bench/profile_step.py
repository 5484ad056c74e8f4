"""Where a training step's time goes: the kernels of one GPT training step, per provider.

    python -m llm_kernels.bench.profile_step                      # GPU: GPT-2 small, bf16
    python -m llm_kernels.bench.profile_step --providers lk-triton,torch-sdpa --top 12

Builds the step of ``bench/gpt_train.py`` (the same model, batch and optimizer), runs
``--warmup`` steps (Triton autotuning happens there), then profiles ``--steps`` steps with
``torch.profiler`` and prints, per provider, the step time (with and without the profiler), the
``--top`` kernels by device time per step (name, launches per step, ms per step, share of the
step's kernel time) and the ``--top`` host ops by CPU time (a step whose kernels keep the
device busy for much less than the step is bound by the host: Python, autograd, launches);
last, every provider's kernel time by category (attention, matmul, layer norm, ...) side by
side. On a CPU it profiles the tiny model's CPU ops instead (a smoke run, not a measurement).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings

import torch

from llm_kernels.bench import gpt_train
from llm_kernels.bench.common import Options
from llm_kernels.bench.harness import Skip, free_memory, host_time_ms

NAME_WIDTH = 78
# What each kernel of a step does, by its name (the first pattern that matches, ignoring case):
# the per-category totals put providers' kernel time side by side.
CATEGORIES = [
    ("attention", r"attn|attention|flash|fmha|sdpa"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|matmul|cublas|gate_up|^aten::(mm|addmm|bmm)$"),
    ("layer norm", r"layer_?norm|rms_?norm|GammaBeta|RowwiseMoments|ComputeInternalGradients|"
                   r"ComputeGradientFusedParams"),
    ("activation", r"activation|swiglu|gelu|silu"),
    ("softmax / loss", r"softmax|cross_entropy|nll_loss"),
    ("optimizer", r"multi_tensor_apply|adam"),
    ("cast / copy", r"copy|cast")]
OTHER = "other"


def kernel_rows(prof, steps: int, on_gpu: bool) -> list[tuple[str, float, float]]:
    """[(name, launches per step, ms per step)], largest first: the device's kernels on a GPU
    (not the spans of user annotations such as ``Optimizer.step``, which would count their
    kernels twice), the ops' own CPU time on a CPU."""
    rows = []
    for event in prof.key_averages():
        us = event.self_device_time_total if on_gpu else event.self_cpu_time_total
        if us <= 0 or (on_gpu and (event.device_type != torch.autograd.DeviceType.CUDA
                                   or getattr(event, "is_user_annotation", False))):
            continue
        rows.append((event.key, event.count / steps, us / 1e3 / steps))
    rows.sort(key=lambda r: -r[2])
    return rows


def category(name: str) -> str:
    """The CATEGORIES entry of kernel ``name`` (OTHER when none matches)."""
    return next((title for title, pattern in CATEGORIES if re.search(pattern, name, re.I)),
                OTHER)


def category_ms(rows) -> dict[str, float]:
    """ms per step of each category (CATEGORIES order, then OTHER) of ``kernel_rows``."""
    totals = dict.fromkeys([title for title, _ in CATEGORIES] + [OTHER], 0.0)
    for name, _, ms in rows:
        totals[category(name)] += ms
    return totals


def category_table(per_provider: dict[str, dict[str, float]]) -> list[str]:
    """Kernel ms per step by category, a column per provider, and the totals."""
    providers = list(per_provider)
    lines = ["kernel ms/step by category " + " ".join(f"{p:>12}" for p in providers)]
    titles = list(next(iter(per_provider.values()))) if per_provider else []
    for title in titles + ["total"]:
        cells = [sum(t.values()) if title == "total" else t[title]
                 for t in per_provider.values()]
        lines.append(f"  {title:<25}" + " ".join(f"{ms:>12.3f}" for ms in cells))
    return lines


def host_table(prof, steps: int, top: int) -> list[tuple[str, float, float]]:
    """[(host op, calls per step, ms per step)] by host time including children, largest
    first: where the CPU spends a step (Python dispatch, autograd, kernel launches)."""
    rows = [(event.key, event.count / steps, event.cpu_time_total / 1e3 / steps)
            for event in prof.key_averages()
            if event.device_type == torch.autograd.DeviceType.CPU and event.cpu_time_total > 0
            and not event.key.startswith("ProfilerStep")]
    rows.sort(key=lambda r: -r[2])
    return rows[:top]


def timed_steps(step, steps: int, sync) -> float:
    """Wall ms per step without the profiler."""
    sync()
    began = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - began) * 1e3 / steps


def sync_points(step) -> dict[str, int]:
    """Where one step makes the host wait for the device (torch's CUDA sync debug mode):
    {source location: times}."""
    counts: dict[str, int] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            where = f"{os.path.relpath(w.filename)}:{w.lineno}"
            counts[where] = counts.get(where, 0) + 1
    return counts


def _sync_lines(counts: dict[str, int]) -> list[str]:
    lines = [f"host waits for the device {sum(counts.values())} times a step"]
    by_count = sorted(counts.items(), key=lambda kv: -kv[1])
    return lines + [f"  {n} x {where}" for where, n in by_count]


def _table(title: str, rows, step_ms: float) -> list[str]:
    lines = [f"{title:<{NAME_WIDTH}} {'calls':>6} {'ms/step':>8} {'share':>6}"]
    for name, calls, ms in rows:
        short = name if len(name) <= NAME_WIDTH else name[:NAME_WIDTH - 3] + "..."
        lines.append(f"{short:<{NAME_WIDTH}} {calls:>6.0f} {ms:>8.3f} {100 * ms / step_ms:>5.1f}%")
    return lines


def profile_provider(provider: str, case, device: torch.device, warmup: int, steps: int,
                     top: int) -> tuple[list[str], dict[str, float] | None]:
    """The report lines of one provider (a Skip gives one line saying why) and its kernel ms
    per step by category (None when skipped)."""
    try:
        step = gpt_train.PROVIDERS[provider](case, device, Options())
    except Skip as skip:
        return [f"== {provider}: skipped ({skip})"], None
    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    plain_ms = timed_steps(step, steps, sync)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    began = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    step_ms = (time.perf_counter() - began) * 1e3 / steps
    rows = kernel_rows(prof, steps, device.type == "cuda")
    total = sum(r[2] for r in rows)
    tokens = case.extra["tokens"]
    lines = [f"== {provider}: {plain_ms:.2f} ms/step ({tokens / plain_ms * 1e3:.0f} tokens/s), "
             f"{step_ms:.2f} under the profiler, kernels {total:.2f} ms/step "
             f"(device busy {100 * total / step_ms:.0f}% of the profiled step)"]
    lines += _table("kernel", rows[:top], total)
    lines += _table("host op (time including children; share of the profiled step)",
                    host_table(prof, steps, top), step_ms)
    if device.type == "cuda":
        lines.append(f"host time to issue a step (device idle before it): "
                     f"{host_time_ms(step, device, calls=3):.2f} ms")
        lines += _sync_lines(sync_points(step))
    return lines, category_ms(rows)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m llm_kernels.bench.profile_step",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--providers", default="lk-triton,lk-cuda,torch-sdpa",
                        help=f"comma-separated, from {', '.join(gpt_train.PROVIDERS)}")
    parser.add_argument("--top", type=int, default=15, help="kernels listed per provider")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    args = parser.parse_args(argv)
    unknown = [p for p in args.providers.split(",") if p not in gpt_train.PROVIDERS]
    if unknown:
        parser.error(f"unknown providers {unknown}; choose from {list(gpt_train.PROVIDERS)}")
    if min(args.top, args.warmup + 1, args.steps) < 1:
        parser.error("--top and --steps must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    case = gpt_train.cases(Options(quick=True), device)[0]
    print(f"profile of one training step: {case.variant} {case.shape}, "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}")
    categories = {}
    for provider in args.providers.split(","):
        lines, categories[provider] = profile_provider(provider, case, device, args.warmup,
                                                       args.steps, args.top)
        print("\n".join(lines), flush=True)
        free_memory(device)
    measured = {p: c for p, c in categories.items() if c is not None}
    if measured:
        print("\n".join(category_table(measured)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
