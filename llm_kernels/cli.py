"""The ``llm-kernels`` command (also ``python -m llm_kernels``).

Subcommands: ``info`` (versions, device, backends), ``verify`` (every op x backend against the
fp64 reference), ``bench`` (microbenchmarks), ``train`` and ``generate`` (the reference model).
A bad argument exits with code 2 and a one-line message.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from typing import Optional

import torch


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def build_info() -> dict:
    """What setup.py recorded about the extension build (empty when not installed by it)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _info(args) -> int:
    import llm_kernels as lk
    from llm_kernels.backends import default_backend, interpreting
    lines = [f"llm_kernels {lk.__version__} (commit {_git_commit()})",
             f"python {platform.python_version()}, torch {torch.__version__} "
             f"(CUDA {torch.version.cuda or 'none'})"]
    try:
        import triton
        lines.append(f"triton {triton.__version__}" + (" (interpreter)" if interpreting() else ""))
    except ImportError as exc:
        lines.append(f"triton: not importable ({exc})")
    if torch.cuda.is_available():
        lines.append(f"device: {torch.cuda.get_device_name()} (cuda), "
                     f"{torch.cuda.device_count()} visible")
    else:
        lines.append(f"device: {device_name(torch.device('cpu'))} (no CUDA device)")
    info = build_info()
    if info:
        built = "built" if info.get("built") else "not built"
        lines.append(f"extension llm_kernels._C: {built}"
                     + (f", CUDA kernels for {info.get('cuda_archs')}" if info.get("cuda") else "")
                     + (f" ({info['reason']})" if info.get("reason") else ""))
    lines.append(f"default backend: {default_backend()}")
    lines.append("backends:")
    for name, (ok, why) in lk.available_backends().items():
        lines.append(f"  {name:<7} {'available' if ok else 'unavailable: ' + why}")
    log = lk.dispatch_log()
    if log:
        lines.append("recent dispatch decisions:")
        lines += [f"  {e['op']}: {e['backend']} ({e['reason']})" for e in log[-10:]]
    print("\n".join(lines))
    return 0


def _verify(args) -> int:
    from llm_kernels import verify as v
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    unknown = set(args.ops or []) - set(v.CASE_BUILDERS)
    if unknown:
        print(f"error: unknown op(s) {sorted(unknown)}; choose from {sorted(v.CASE_BUILDERS)}",
              file=sys.stderr)
        return 2
    print(f"verifying on {device_name(device)} ({device.type}); backends: "
          f"{', '.join(args.backends or v.runnable_backends(device))}")
    rows = v.verify(str(device), ops=args.ops, backends=args.backends, big=args.big or None,
                    seed=args.seed, progress=print if args.progress else None)
    print(v.format_table(rows))
    failed = [r for r in rows if not r.passed]
    checked = [r for r in rows if not r.note]
    print(f"\n{len(checked) - len(failed)} passed, {len(failed)} failed "
          f"({len(rows) - len(checked)} skipped)")
    if args.json:
        meta = {"device": device_name(device), "torch": torch.__version__,
                "commit": _git_commit(), "date": datetime.datetime.now().isoformat(timespec="seconds")}
        v.write_json(rows, args.json, meta)
        print(f"wrote {args.json}")
    return 1 if failed else 0


def _backend_list(text: str) -> list[str]:
    from llm_kernels.backends import BACKENDS
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in BACKENDS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {bad}; choose from {BACKENDS}")
    return names


def build_parser() -> argparse.ArgumentParser:
    from llm_kernels import train
    from llm_kernels.bench import cli as bench_cli
    parser = argparse.ArgumentParser(prog="llm-kernels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, device, backends and why not")
    info.set_defaults(func=_info)
    verify = sub.add_parser("verify", help="check every op x backend against the fp64 reference")
    verify.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    verify.add_argument("--ops", nargs="+", metavar="OP", help="subset of ops (default: all)")
    verify.add_argument("--backends", type=_backend_list, help="comma-separated (default: all available)")
    verify.add_argument("--big", action="store_true", help="add the large shapes (default on CUDA)")
    verify.add_argument("--seed", type=int, default=0)
    verify.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    verify.add_argument("--progress", action="store_true", help="print each case as it runs")
    verify.set_defaults(func=_verify)
    bench_cli.register(sub)
    train.register(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
