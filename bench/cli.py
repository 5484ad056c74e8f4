"""``llm-kernels bench``: microbenchmarks of every op against the baselines, in one run.

    llm-kernels bench [OP ...] [--dtype bf16] [--causal | --no-causal] [--head-dim 128]
                      [--seq-lens 1024,4096] [--hidden-sizes 4096,8192] [--modes fwd,bwd]
                      [--providers lk-triton,sdpa-flash] [--quick] [--device cuda]
                      [--suite standard] [--time-budget SECONDS]
                      [--csv PATH] [--json PATH] [--plot DIR] [--plot-grid PNG]

Also runnable as ``python -m llm_kernels.bench``. ``llm_kernels.cli`` calls :func:`register`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from types import ModuleType
from typing import Optional

import torch

from llm_kernels.bench import (attention, cross_entropy, feed_forward, gpt_train, harness,
                               layer_norm, report, rms_norm, softmax, swiglu)
from llm_kernels.bench.common import DTYPES, MODES, Options
from llm_kernels.bench.runner import DeviceFault, PlanItem, Runner

OPS = {m.NAME: m for m in (attention, layer_norm, rms_norm, softmax, feed_forward, swiglu,
                           cross_entropy, gpt_train)}
# What a run without OP names measures (gpt_train, a whole training step, only when named).
DEFAULT_OPS = [name for name, m in OPS.items() if getattr(m, "IN_DEFAULT_RUN", True)]
EXIT_DEVICE_FAULT = 3
INTERPRETER_NOTE = ("note: no GPU, so lk-triton is not timed (the Triton interpreter is not "
                    "benchmarked); CPU providers: torch, torch SDPA, and lk-cuda's C++ kernels "
                    "when llm_kernels._C is built")


DESCRIPTION = ("Time every op's providers (llm_kernels' Triton and CUDA backends, eager torch, "
               "torch SDPA per backend, torch.compile, flash-attn and liger-kernel when "
               "installed) in one run: median ms with 20th/80th percentiles, TFLOP/s or GB/s, "
               "peak memory and the ratio to the best baseline.")


class UsageError(ValueError):
    """A bad command-line value (exit code 2)."""


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}")
    if not value > 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ops", nargs="*", metavar="OP",
                        help=f"ops to benchmark (default: {', '.join(DEFAULT_OPS)}); also: "
                             f"{', '.join(sorted(set(OPS) - set(DEFAULT_OPS)))}")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="default: bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction,
                        help="attention variants: causal only (--causal) or non-causal only "
                             "(--no-causal); default both")
    parser.add_argument("--head-dim", type=int, help="attention head dim (default 128 GPU, 64 CPU)")
    parser.add_argument("--seq-lens", type=_int_list,
                        help="attention sequence lengths, e.g. 1024,4096")
    parser.add_argument("--hidden-sizes", type=_int_list,
                        help="hidden sizes of the row-wise and feed-forward ops (vocab sizes "
                             "for cross_entropy)")
    parser.add_argument("--modes", type=_name_list,
                        help=f"subset of {','.join(MODES)} (decode: attention only; train: "
                             "gpt_train's only mode, a whole training step)")
    parser.add_argument("--providers", type=_name_list,
                        help="subset of providers, e.g. lk-triton,lk-cuda,torch,sdpa-flash")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and shorter timing")
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        help="default: cuda when a GPU is visible, else cpu")
    parser.add_argument("--suite", choices=("standard",),
                        help="the fixed GPU suite of bench/gpu_check.sh (ignores the size "
                        "options; OPs, --modes and --providers pick items of it)")
    parser.add_argument("--time-budget", type=_seconds, metavar="SECONDS",
                        help="skip what is left once this much time has passed (default: no limit)")
    parser.add_argument("--csv", metavar="PATH", help="write the rows as CSV")
    parser.add_argument("--json", metavar="PATH", help="write rows, skips and checks as JSON")
    parser.add_argument("--plot", metavar="DIR", help="write one PNG per op into DIR")
    parser.add_argument("--plot-grid", metavar="PNG", help="write every op's plots into one PNG")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run whose --json file exists (after exit code 3: a "
                             "kernel fault broke the CUDA context), skipping what it measured")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to ``llm-kernels``' subparsers."""
    parser = subparsers.add_parser("bench",
                                   help="microbenchmarks against torch and other baselines",
                                   description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def _device(args) -> torch.device:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible")
    if args.device:
        return torch.device(args.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def options(args) -> Options:
    if args.modes and set(args.modes) - set(MODES):
        raise UsageError(f"--modes: unknown {sorted(set(args.modes) - set(MODES))}; "
                         f"choose from {', '.join(MODES)}")
    if args.head_dim is not None and not 1 <= args.head_dim <= 256:
        raise UsageError(f"--head-dim must be in 1..256, got {args.head_dim}")
    causal = {True: "on", False: "off", None: "both"}[args.causal]
    return Options(dtype=DTYPES[args.dtype] if args.dtype else None, causal=causal,
                   head_dim=args.head_dim, seq_lens=args.seq_lens, hidden_sizes=args.hidden_sizes,
                   modes=args.modes, quick=args.quick)


def build_plan(args, opts: Options, device: torch.device) -> list[PlanItem]:
    """The (op, case, providers) items of an ordinary run, or the standard suite; raises
    UsageError when an op named explicitly, or the whole run, has nothing to measure."""
    if args.suite == "standard":
        if device.type != "cuda":
            raise UsageError("--suite standard is sized for an H100/H200: it needs a CUDA GPU")
        from llm_kernels.bench.suite import standard_plan
        _check_names(args)
        plan = [i for i in _filtered(standard_plan(), args.providers)
                if (not args.ops or i.module.NAME in args.ops)
                and (not opts.modes or i.case.mode in opts.modes)]
        if not plan:
            named = " ".join(args.ops)
            raise UsageError("the standard suite has no item for "
                             f"{named} {_filters_text(opts, args.providers)}".rstrip())
        return plan
    _check_names(args)
    plan = []
    for name in args.ops or DEFAULT_OPS:
        items = _op_plan(OPS[name], opts, device, args.providers)
        if not items and name in args.ops:
            raise UsageError(_why_nothing(OPS[name], opts, device, args.providers))
        plan += items
    if not plan:
        named_only = sorted(set(OPS) - set(DEFAULT_OPS))
        raise UsageError(f"nothing to measure: no case of {', '.join(DEFAULT_OPS)} matches "
                         f"{_filters_text(opts, args.providers)} ({', '.join(named_only)} run "
                         "only when named)")
    return plan


def _filters_text(opts: Options, providers: Optional[tuple[str, ...]]) -> str:
    """'--modes a,b --providers c' (the filters given)."""
    given = [("--modes", opts.modes), ("--providers", providers)]
    return " ".join(f"{option} {','.join(names)}" for option, names in given if names)


def _check_names(args) -> None:
    unknown = set(args.ops) - set(OPS)
    if unknown:
        raise UsageError(f"unknown op(s) {sorted(unknown)}; choose from {', '.join(OPS)}")
    known = {p for m in OPS.values() for p in m.PROVIDERS}
    if args.providers and set(args.providers) - known:
        raise UsageError(f"--providers: unknown {sorted(set(args.providers) - known)}; "
                         f"choose from {', '.join(sorted(known))}")


def _op_plan(module: ModuleType, opts: Options, device: torch.device,
             providers: Optional[tuple[str, ...]]) -> list[PlanItem]:
    """One op's items: its cases in the modes asked for, with the providers asked for."""
    cases = [c for c in module.cases(opts, device) if not opts.modes or c.mode in opts.modes]
    return _filtered([PlanItem(module, case, list(module.PROVIDERS)) for case in cases], providers)


def _filtered(plan: list[PlanItem], providers: Optional[tuple[str, ...]]) -> list[PlanItem]:
    if not providers:
        return plan
    items = [PlanItem(i.module, i.case, [p for p in i.providers if p in providers]) for i in plan]
    return [i for i in items if i.providers]


def _why_nothing(module: ModuleType, opts: Options, device: torch.device,
                 providers: Optional[tuple[str, ...]]) -> str:
    """Why the op named explicitly has no item: no case in --modes, or none of --providers."""
    all_modes = dataclasses.replace(opts, modes=MODES)
    modes = dict.fromkeys(c.mode for c in module.cases(all_modes, device))
    if opts.modes and not set(modes) & set(opts.modes):
        return (f"--modes {','.join(opts.modes)}: {module.NAME} has no such case (its modes: "
                f"{', '.join(modes)})")
    if providers and not set(providers) & set(module.PROVIDERS):
        return (f"--providers {','.join(providers)}: none is a provider of {module.NAME} (its "
                f"providers: {', '.join(module.PROVIDERS)})")
    return f"{module.NAME} has no case for {_filters_text(opts, providers) or 'these options'}"


def write_outputs(args, runner: Runner) -> None:
    results = runner.results
    report.add_ratios(results.rows)
    for kernel, chosen in harness.autotuned_configs().items():
        results.autotune.setdefault(kernel, {}).update(chosen)
    if args.csv:
        report.write_csv(results.rows, args.csv)
    if args.json:
        report.write_json(results.as_dict(), args.json)


def write_plots(args, rows: list[dict]) -> list[str]:
    """The PNGs asked for; a plotting failure is reported, never fatal (the CSV/JSON exist)."""
    paths = []
    try:
        if args.plot:
            paths += report.plot_ops(rows, args.plot)
        if args.plot_grid:
            path = report.plot_grid(rows, args.plot_grid)
            paths += [path] if path else []
    except Exception as exc:  # matplotlib missing or broken: the numbers matter more
        print(f"plots not written: {type(exc).__name__}: {exc}", flush=True)
    return paths


OUTPUT_FILES = ("csv", "json", "plot_grid")


def _check_outputs(args) -> None:
    """Raise UsageError when an output path cannot be written (before anything is measured)."""
    for option in OUTPUT_FILES + ("plot",):
        path = getattr(args, option)
        if path is None:
            continue
        problem = report.output_problem(path, folder=option == "plot")
        if problem:
            raise UsageError(f"--{option.replace('_', '-')} {path}: {problem}")


def _skip_reasons(skipped: list[dict]) -> str:
    """The distinct ``provider: reason`` of the skipped provider runs, on one line."""
    return "; ".join(dict.fromkeys(f"{s['op']} {s['provider']}: {s['reason']}" for s in skipped))


def _resumed(args) -> Optional[dict]:
    """The JSON of the run to continue (``--resume``), else None."""
    if not args.resume:
        return None
    if not args.json:
        raise UsageError("--resume needs --json PATH (the results to continue)")
    try:
        with open(args.json) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # nothing written yet: start from the beginning


def run(args) -> int:
    """Run the benchmarks the parsed arguments ask for; returns the exit code."""
    start = time.monotonic()
    try:
        device = _device(args)
        opts = options(args)
        _check_outputs(args)
        plan = build_plan(args, opts, device)
        resume = _resumed(args)
    except UsageError as exc:
        print(f"llm-kernels bench: error: {exc}", file=sys.stderr)
        return 2
    deadline = start + args.time_budget if args.time_budget else None
    timer = harness.QUICK_TIMER if (args.quick or args.suite) else harness.TimerConfig()
    echo = lambda s: print(s, flush=True)  # noqa: E731
    runner = Runner(device, opts, timer, deadline, echo=echo, resume=resume)
    env = runner.results.environment
    print(f"llm-kernels bench on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
          f"commit {env['commit']}), {len(plan)} cases"
          + (f", resuming after {len(runner.results.rows)} rows" if args.resume else ""),
          flush=True)
    if device.type != "cuda":
        print(INTERPRETER_NOTE, flush=True)
    code = 0
    try:
        runner.measure_copy()
        if args.suite == "standard":  # cheap and a correctness check: before the timings
            from llm_kernels.bench.suite import determinism_checks
            determinism_checks(device, runner.results.checks, echo=echo)
        runner.run(plan, after_item=lambda: write_outputs(args, runner))
    except DeviceFault as exc:
        print(f"device fault ({exc}): the CUDA context is unusable; results so far are "
              f"written, rerun with --resume to continue", flush=True)
        write_outputs(args, runner)
        write_plots(args, runner.results.rows)
        if device.type == "cuda":  # skip the CUDA teardown of a broken context
            sys.stdout.flush()
            os._exit(EXIT_DEVICE_FAULT)
        return EXIT_DEVICE_FAULT
    except KeyboardInterrupt:
        print("interrupted: writing the results measured so far", flush=True)
        code = 130
    write_outputs(args, runner)
    rows = runner.results.rows
    print(report.format_table(rows))
    for path in write_plots(args, rows):
        print(f"plot: {path}")
    skipped = runner.results.skipped
    print(f"{len(rows)} rows measured, {len(skipped)} provider runs skipped "
          f"({sum(s['kind'] == 'error' for s in skipped)} errors) in "
          f"{time.monotonic() - start:.0f} s")
    if code == 0 and all(r["op"] == "copy" for r in rows):
        print(f"llm-kernels bench: error: nothing could run: {_skip_reasons(skipped)}",
              file=sys.stderr)
        return 2
    return code


def main(argv: Optional[list[str]] = None) -> int:
    from llm_kernels.cli import backend_env_error
    parser = argparse.ArgumentParser(prog="llm-kernels bench", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    problem = backend_env_error()
    if problem:
        print(f"llm-kernels bench: error: {problem}", file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
