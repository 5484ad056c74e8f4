"""The ``llm-kernels`` command (also ``python -m llm_kernels``).

Subcommands: ``info`` (versions, device, backends, what auto dispatch picks), ``verify`` (every
op x backend against the fp64 reference), ``bench`` (microbenchmarks), ``train`` and
``generate`` (the reference model). A bad argument exits with code 2 and a one-line message.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from typing import Callable, Optional

import torch

from llm_kernels.bench.harness import device_name, git_commit

DESCRIPTION = ("llm_kernels' command line: versions and backends (info), every op against the "
               "fp64 reference (verify), microbenchmarks (bench), and the reference transformer "
               "(train, generate).")


def build_info() -> dict:
    """What setup.py recorded about the extension build (empty when not installed by it)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def backend_env_error() -> Optional[str]:
    """Why ``$LLM_KERNELS_BACKEND`` is not a backend name, or None when it is (or unset)."""
    from llm_kernels.backends import default_backend
    try:
        default_backend()
    except ValueError as exc:
        return str(exc)
    return None


def _error(message: str) -> int:
    print(f"llm-kernels: error: {message}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------- info

def representative_calls(device: torch.device) -> dict[str, Callable[[], object]]:
    """One small call per public op on ``device`` (bf16 on CUDA, fp32 on CPU), default backend."""
    import llm_kernels as lk
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    q, x, w = rand(1, 2, 16, 32), rand(4, 64), rand(64)
    target = torch.randint(0, 64, (4,), device=device)
    return {
        "attention": lambda: lk.attention(q, q, q, causal=True),
        "scaled_dot_product_attention":
            lambda: lk.scaled_dot_product_attention(q, q, q, is_causal=True),
        "layer_norm": lambda: lk.layer_norm(x, w, w),
        "rms_norm": lambda: lk.rms_norm(x, w),
        "softmax": lambda: lk.softmax(x),
        "feed_forward":
            lambda: lk.feed_forward(x, rand(128, 64), rand(128), rand(64, 128), rand(64)),
        "swiglu": lambda: lk.swiglu(x, rand(128, 64), rand(128, 64), rand(64, 128)),
        "cross_entropy": lambda: lk.cross_entropy(x, target),
    }


def dispatch_choice(op: str, call: Callable[[], object]) -> str:
    """'backend (reason)' that dispatch records for ``call`` of public function ``op``."""
    import llm_kernels as lk
    lk.dispatch_log(clear=True)
    try:
        call()
    except Exception as exc:  # shown, not raised: info reports what cannot run and why
        return f"cannot run: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    entries = lk.dispatch_log(clear=True)
    entry = next((e for e in entries if e["op"] == op), entries[-1] if entries else None)
    if entry is None:
        return "no dispatch decision recorded"
    return f"{entry['backend']} ({entry['reason'] or 'no reason given'})"


def dispatch_lines(device: torch.device) -> list[str]:
    """A header and one 'op  backend (reason)' line per public op on ``device``."""
    from llm_kernels.backends import default_backend
    dtype = "bf16" if device.type == "cuda" else "fp32"
    lines = [f"dispatch on {device.type} (default backend {default_backend()}; one small {dtype} "
             "call per op):"]
    for op, call in representative_calls(device).items():
        lines.append(f"  {op:<29} {dispatch_choice(op, call)}")
    return lines


def _switches(title: str, env_name: str) -> str:
    """The opt-in Triton paths (Hopper and newer) of attention and the feed-forward matmuls
    switched by each kernel module's ``env_name`` variable, on or off."""
    from llm_kernels.kernels import attention, feed_forward
    states = []
    for what, module in (("attention", attention), ("feed-forward", feed_forward)):
        env = getattr(module, env_name)
        states.append(f"{what} {'on' if os.environ.get(env) == '1' else 'off'} (${env})")
    return f"{title}: " + ", ".join(states)


def _cuda_attention_switch() -> str:
    """Query rows per warp of the CUDA attention forward and dQ kernels (16 unless set)."""
    from llm_kernels._ops import CUDA_ATTENTION_WARP_ROWS_ENV
    rows = os.environ.get(CUDA_ATTENTION_WARP_ROWS_ENV) or "16"
    what = f"{rows} query rows per warp" if rows in ("16", "32") else \
        f"{rows!r} query rows per warp is invalid (16 or 32)"
    return f"cuda attention forward and dQ: {what} (${CUDA_ATTENTION_WARP_ROWS_ENV})"


def _info(args) -> int:
    import llm_kernels as lk
    from llm_kernels.backends import default_backend, interpreting
    lines = [f"llm_kernels {lk.__version__} (commit {git_commit()})",
             f"python {platform.python_version()}, torch {torch.__version__} "
             f"(CUDA {torch.version.cuda or 'none'})"]
    try:
        import triton
        lines.append(f"triton {triton.__version__}" + (" (interpreter)" if interpreting() else ""))
        lines.append(_switches("triton TMA reads", "TMA_ENV"))
        lines.append(_switches("triton warp-specialized loops", "WS_ENV"))
    except ImportError as exc:
        lines.append(f"triton: not importable ({exc})")
    if torch.cuda.is_available():
        lines.append(f"device: {device_name(torch.device('cuda'))} (cuda), "
                     f"{torch.cuda.device_count()} visible")
    else:
        lines.append(f"device: {device_name(torch.device('cpu'))} (no CUDA device)")
    info = build_info()
    if info:
        built = "built" if info.get("built") else "not built"
        lines.append(f"extension llm_kernels._C: {built}"
                     + (f", CUDA kernels for {info.get('cuda_archs')}" if info.get("cuda") else "")
                     + (f" ({info['reason']})" if info.get("reason") else ""))
        if info.get("cuda"):
            lines.append(_cuda_attention_switch())
    lines.append(f"default backend: {default_backend()}")
    lines.append("backends:")
    for name, (ok, why) in lk.available_backends().items():
        lines.append(f"  {name:<7} {'available' if ok else 'unavailable: ' + why}")
    print("\n".join(lines), flush=True)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        print("\n".join(dispatch_lines(device)), flush=True)
    return 0


# ----------------------------------------------------------------------------- verify

def _device(text: str) -> torch.device:
    """``--device``: cpu, cuda or cuda:N of a visible GPU."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device is visible")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} CUDA "
                                         "device(s) visible")
    return device


def _verify_usage_error(args) -> Optional[str]:
    """The one-line complaint about verify's arguments, or None."""
    from llm_kernels import verify as v
    from llm_kernels.bench.report import output_problem
    unknown = set(args.ops or []) - set(v.OPS)
    if unknown:
        return f"unknown op(s) {sorted(unknown)}; choose from {', '.join(v.OPS)}"
    for name in args.backends or []:
        problem = v.backend_problem(name, args.device)
        if problem:
            return f"--backends {name}: cannot run on {args.device}: {problem}"
    if args.json and output_problem(args.json):
        return f"--json {args.json}: {output_problem(args.json)}"
    return None


def _skip_reasons(rows) -> str:
    return "; ".join(dict.fromkeys(f"{r.op} {r.backend}: {r.note}" for r in rows))


def _verify(args) -> int:
    from llm_kernels import verify as v
    problem = _verify_usage_error(args)
    if problem:
        return _error(problem)
    device = args.device
    print(f"verifying on {device_name(device)} ({device.type}); backends: "
          f"{', '.join(args.backends or v.runnable_backends(device))}")
    interrupted = False
    try:
        rows = v.verify(str(device), ops=args.ops, backends=args.backends, big=args.big,
                        seed=args.seed, progress=print if args.progress else None)
    except v.VerifyInterrupted as exc:
        rows, interrupted = exc.rows, True
    print(v.format_table(rows))
    failed = [r for r in rows if not r.passed]
    checked = [r for r in rows if not r.note]
    print(f"\n{len(checked) - len(failed)} passed, {len(failed)} failed "
          f"({len(rows) - len(checked)} skipped)")
    if args.json:
        meta = {"device": device_name(device), "torch": torch.__version__, "commit": git_commit(),
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "interrupted": interrupted}
        v.write_json(rows, args.json, meta)
        print(f"wrote {args.json}")
    if interrupted:
        print("error: interrupted: the rows above are the cases that finished", file=sys.stderr)
        return 130
    if failed:
        return 1
    if not checked:
        return _error(f"nothing was checked, every case was skipped: {_skip_reasons(rows)}")
    return 0


def _backend_list(text: str) -> list[str]:
    from llm_kernels.backends import BACKENDS
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated backends of {BACKENDS}")
    bad = [n for n in names if n not in BACKENDS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {bad}; choose from {BACKENDS}")
    return names


def _add_verify(sub) -> None:
    from llm_kernels.verify import OPS
    verify = sub.add_parser("verify", help="check every op x backend against the fp64 reference")
    verify.add_argument("--device", type=_device,
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)")
    verify.add_argument("--ops", nargs="+", metavar="OP",
                        help=f"subset of ops (default: all): {', '.join(OPS)}")
    verify.add_argument("--backends", type=_backend_list,
                        help="comma-separated (default: every backend that can run on --device)")
    verify.add_argument("--big", action=argparse.BooleanOptionalAction,
                        help="add the large shapes (default: on for CUDA, off for CPU)")
    verify.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    verify.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    verify.add_argument("--progress", action="store_true", help="print each case as it runs")
    verify.set_defaults(func=_verify)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, ``PROG: error: MESSAGE (see PROG --help)``,
    exit code 2 (the stock parser prints the whole usage block first). Subcommand parsers
    inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from llm_kernels import train
    from llm_kernels.bench import cli as bench_cli
    parser = OneLineErrorParser(prog="llm-kernels", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, device, backends and what auto dispatch picks")
    info.set_defaults(func=_info)
    _add_verify(sub)
    bench_cli.register(sub)
    train.register(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    problem = backend_env_error()
    if problem:
        return _error(problem)
    return args.func(args)
