"""Summarize a GPU check's output folder: steps, test counts, headline ratios and targets.

    python bench/summarize.py --out gpu-results --print               # the table (gpu_check.sh)
    python bench/summarize.py --out gpu-results --results-dir bench/results
        # writes bench/results/<date>-<gpu>.md and copies the CSV and the plot beside it

Reads ``gpu_check.log`` (``@@info``/``@@begin``/``@@step`` lines and pytest/sanitizer
summaries), ``verify.json`` and ``bench.json`` from the folder; writes ``summary.json`` there.
Standard library only: it runs even when the package failed to install.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from typing import Optional

PYTEST_WORDS = ("passed", "failed", "error", "errors", "skipped", "xfailed", "xpassed")
SDPA_PREFIX = "sdpa-"
ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
INPUT_FILES = ("gpu_check.log", "verify.json", "bench.json")
FAILED_STATUSES = ("failed", "timeout")
# Steps whose failure fails the check (profile and the backends probe only inform).
CHECKED_STEPS = ("build", "pytest-cuda", "pytest-cuda-rest", "verify", "bench", "memcheck",
                 "racecheck", "pytest-rest-core", "pytest-rest")
# Kinds of bench.json skips that are problems; "skip", "unavailable" (a provider not installed),
# "budget" and "excluded" (after a fault, which is listed itself) are normal.
PROBLEM_KINDS = ("fault", "error", "oom")


@dataclass
class Target:
    """One headline number: ``value`` compared with ``goal`` by ``cmp`` (">=" or "<=")."""

    issue: str
    what: str
    value: Optional[float]
    goal: Optional[float]
    cmp: str = ">="
    detail: str = ""

    @property
    def status(self) -> str:
        if self.value is None:
            return "n/a"
        if self.goal is None:
            return "info"
        met = self.value >= self.goal if self.cmp == ">=" else self.value <= self.goal
        return "MET" if met else "MISSED"


# ----------------------------------------------------------------------------- the log

def parse_log(text: str) -> dict:
    """``{"info": {...}, "steps": {name: [run, ...]}}``, each run ``{"status", "rc", "secs",
    "output"}`` in log order (a step runs more than once when the bench resumes after a fault)."""
    info: dict[str, str] = {}
    steps: dict[str, list[dict]] = {}
    current, lines = None, []
    for line in text.splitlines():
        if line.startswith("@@info "):
            key, _, value = line[7:].partition("=")
            info[key.strip()] = value.strip()
        elif line.startswith("@@begin "):
            current, lines = line[8:].split(":", 1)[0].strip(), []
        elif line.startswith("@@step "):
            fields = line[7:].split()
            name = fields[0]
            run = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
            run["output"] = "\n".join(lines) if name == current else ""
            steps.setdefault(name, []).append(run)
            current, lines = None, []
        elif current is not None:
            lines.append(line)
    return {"info": info, "steps": steps}


def pytest_counts(output: str) -> Optional[dict]:
    """Counts from pytest's last summary line ("3 failed, 40 passed in 9.1s"), else None."""
    for line in reversed(output.splitlines()):
        if re.search(r"\bin [\d.]+s\b", line) or "no tests ran" in line:
            counts = {w: int(n) for n, w in re.findall(r"(\d+) (" + "|".join(PYTEST_WORDS) + r")\b",
                                                        line)}
            if "errors" in counts:
                counts["error"] = counts.pop("errors") + counts.get("error", 0)
            return counts
    return None


def failures(output: str, limit: int = 8) -> list[str]:
    """pytest's "FAILED ..."/"ERROR ..." short-summary lines, else the first lines that read
    like an error (for a failed build or verify)."""
    found = [line for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    if not found and "KeyboardInterrupt" in output:
        return ["interrupted at its time limit (rerun with a larger budget)"]
    if not found:
        found = [line.strip() for line in output.splitlines()
                 if re.search(r"\berror\b|Error:|Traceback", line, re.IGNORECASE)]
    return [line[:200] for line in found[:limit]]


FAILURE_HEADER = re.compile(r"^=== FAILED (\S+) \((\w+), ([\d.]+) s\)$")


def test_failures(text: str) -> list[dict]:
    """The failures that ``tests/conftest.py`` wrote to ``test_failures.txt`` as they happened:
    [{"test", "phase", "secs", "error"}], the error being the report's first ``E`` line (the
    exception and its message)."""
    found = []
    for line in text.splitlines():
        header = FAILURE_HEADER.match(line)
        if header:
            found.append({"test": header[1], "phase": header[2], "secs": float(header[3]),
                          "error": ""})
        elif found and not found[-1]["error"] and line.startswith("E ") and line[1:].strip():
            found[-1]["error"] = line[1:].strip()[:200]
    return found


def sanitizer_findings(output: str) -> Optional[str]:
    """compute-sanitizer's summary lines (memcheck: ERROR SUMMARY, racecheck: RACECHECK SUMMARY)."""
    found = re.findall(r"=+ ((?:ERROR|RACECHECK) SUMMARY: .*)", output)
    return "; ".join(dict.fromkeys(found)) if found else None


# ----------------------------------------------------------------------------- verify.json

def _verdict(item) -> Optional[str]:
    """'passed', 'failed' or 'skipped' for one verify row (a row with a note was skipped)."""
    if not isinstance(item, dict):
        return None
    if item.get("note"):
        return "skipped"
    for key in ("passed", "ok", "pass"):
        if isinstance(item.get(key), bool):
            return "passed" if item[key] else "failed"
    status = str(item.get("status", item.get("result", ""))).lower()
    return {"pass": "passed", "passed": "passed", "ok": "passed", "fail": "failed",
            "failed": "failed", "error": "failed", "skip": "skipped"}.get(status)


def verify_counts(data) -> Optional[dict]:
    """{"passed", "failed", "skipped"} from verify's JSON (``{"meta", "rows": [...]}``, each row
    with a boolean ``passed`` and a ``note`` when skipped), or from a dict of counts."""
    if isinstance(data, dict):
        for block in (data, data.get("summary"), data.get("counts")):
            if isinstance(block, dict) and isinstance(block.get("passed"), int):
                return {k: int(block.get(k, 0)) for k in ("passed", "failed", "skipped")}
        items = next((data[k] for k in ("rows", "results", "checks")
                      if isinstance(data.get(k), list)), None)
    else:
        items = data if isinstance(data, list) else None
    if items is None:
        return None
    verdicts = [_verdict(i) for i in items]
    return {k: verdicts.count(k) for k in ("passed", "failed", "skipped")}


# ----------------------------------------------------------------------------- bench.json

def _shape(row: dict) -> dict:
    return {k: int(v) for k, v in (p.split("=") for p in row["shape"].split())}


def _rows(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def _one(rows: list[dict], **match) -> Optional[dict]:
    found = _rows(rows, **match)
    return found[0] if found else None


def copy_gbps(rows: list[dict]) -> Optional[float]:
    row = _one(rows, op="copy")
    return row["gbps"] if row else None


def vs_best_sdpa(rows: list[dict], provider: str, mode: str, variant: str) -> tuple:
    """(min over sequence lengths of best-SDPA ms / provider ms, detail per length)."""
    ratios = {}
    for row in _rows(rows, op="attention", mode=mode, variant=variant, provider=provider):
        sdpa = [r["ms"] for r in _rows(rows, op="attention", mode=mode, variant=variant,
                                       shape=row["shape"]) if r["provider"].startswith(SDPA_PREFIX)]
        if sdpa:
            ratios[int(row["x"])] = min(sdpa) / row["ms"]
    if not ratios:
        return None, "not measured"
    detail = " ".join(f"L{x // 1024}k:{r:.2f}" for x, r in sorted(ratios.items()))
    return min(ratios.values()), detail


def causal_speedup(rows: list[dict], provider: str, seq_len: int) -> tuple:
    pair = [_one(rows, op="attention", mode="fwd", variant=v, provider=provider, x=seq_len)
            for v in ("non-causal", "causal")]
    if None in pair:
        return None, "not measured"
    return pair[0]["ms"] / pair[1]["ms"], f"{pair[0]['ms']:.3f} / {pair[1]['ms']:.3f} ms"


def decode_vs_kv_read(rows: list[dict], provider: str, variant: str = "") -> tuple:
    """Decode time over the time to read the KV cache once at the measured copy bandwidth."""
    row = _one(rows, op="attention", mode="decode", variant=variant, provider=provider)
    bw = copy_gbps(rows)
    if row is None or bw is None:
        return None, "not measured"
    s = _shape(row)
    kv_bytes = 2 * s["B"] * s["Hkv"] * s["Lk"] * s["D"] * ELEMENT_BYTES.get(row["dtype"], 2)
    floor_ms = kv_bytes / (bw * 1e9) * 1e3
    return row["ms"] / floor_ms, f"{row['ms']:.3f} ms vs KV read {floor_ms:.3f} ms"


def norm_vs_copy(rows: list[dict], op: str, provider: str) -> tuple:
    bw = copy_gbps(rows)
    found = _rows(rows, op=op, mode="fwd+bwd", provider=provider)
    if not found or bw is None:
        return None, "not measured"
    fracs = {int(r["x"]): r["gbps"] / bw for r in found}
    return min(fracs.values()), " ".join(f"C{x}:{f:.2f}" for x, f in sorted(fracs.items()))


def speedup_vs(rows: list[dict], op: str, mode: str, provider: str, baseline: str) -> tuple:
    ratios = {}
    for row in _rows(rows, op=op, mode=mode, provider=provider):
        base = _one(rows, op=op, mode=mode, provider=baseline, shape=row["shape"])
        if base is not None:
            ratios[row["shape"]] = base["ms"] / row["ms"]
    if not ratios:
        return None, "not measured"
    return min(ratios.values()), " ".join(f"{v:.2f}" for v in ratios.values())


def peak_ratio(rows: list[dict], op: str, provider: str, baseline: str) -> tuple:
    row, base = (_one(rows, op=op, mode="fwd+bwd", provider=p) for p in (provider, baseline))
    if row is None or base is None or not row.get("peak_mb") or not base.get("peak_mb"):
        return None, "not measured"
    return row["peak_mb"] / base["peak_mb"], f"{row['peak_mb']:.0f} / {base['peak_mb']:.0f} MB"


def targets(bench: dict) -> list[Target]:
    """The issues' performance targets, evaluated on the standard suite's rows."""
    rows = bench.get("rows", [])
    out = []
    for provider, goal, issue in (("lk-triton", 1.0, "#3"), ("lk-cuda", 0.9, "#5")):
        for variant in ("non-causal", "causal"):
            value, detail = vs_best_sdpa(rows, provider, "fwd", variant)
            out.append(Target(issue, f"attn fwd {variant} {provider} / best SDPA", value, goal,
                              detail=detail))
    for provider, goal in (("lk-triton", 0.9), ("lk-cuda", None)):
        for variant in ("non-causal", "causal"):
            value, detail = vs_best_sdpa(rows, provider, "bwd", variant)
            out.append(Target("#3" if goal else "#5", f"attn bwd {variant} {provider} / best SDPA",
                              value, goal, detail=detail))
    value, detail = causal_speedup(rows, "lk-triton", 8192)
    out.append(Target("#3", "attn fwd L8k causal speedup lk-triton", value, 1.7, detail=detail))
    for variant, label in (("", "decode"), ("cuda-graph", "decode in a CUDA graph")):
        value, detail = decode_vs_kv_read(rows, "lk-triton", variant)
        out.append(Target("#3", f"{label} lk-triton time / KV read time", value, 1.5, "<=",
                          detail))
        value, detail = decode_vs_kv_read(rows, "lk-cuda", variant)
        out.append(Target("#5", f"{label} lk-cuda time / KV read time", value, None, "<=",
                          detail))
    for provider, goal, issue in (("lk-triton", 0.8, "#4"), ("lk-cuda", 0.85, "#5")):
        value, detail = norm_vs_copy(rows, "layer_norm", provider)
        out.append(Target(issue, f"layer_norm f+b {provider} / copy GB/s", value, goal,
                          detail=detail))
    value, detail = speedup_vs(rows, "layer_norm", "fwd+bwd", "lk-triton", "torch")
    out.append(Target("#4", "layer_norm f+b lk-triton vs torch", value, 1.3, detail=detail))
    for mode in ("fwd", "fwd+bwd"):
        value, detail = speedup_vs(rows, "feed_forward", mode, "lk-triton", "torch")
        out.append(Target("#4", f"feed_forward {mode} lk-triton vs torch", value, 1.05,
                          detail=detail))
    value, detail = peak_ratio(rows, "cross_entropy", "lk-triton-inplace", "torch")
    out.append(Target("#4", "cross_entropy peak mem lk-triton-inplace / torch", value, 1 / 3, "<=",
                      detail))
    value, detail = peak_ratio(rows, "cross_entropy", "lk-triton", "torch")
    out.append(Target("#4", "cross_entropy peak mem lk-triton / torch", value, None, "<=", detail))
    value, detail = speedup_vs(rows, "cross_entropy", "fwd+bwd", "lk-triton", "torch")
    out.append(Target("#4", "cross_entropy f+b lk-triton vs torch", value, 1.0, detail=detail))
    for provider in ("lk-auto", "lk-triton", "lk-cuda"):
        value, detail = speedup_vs(rows, "gpt_train", "train", provider, "torch-sdpa")
        out.append(Target("#6", f"GPT-2 small train step {provider} vs torch SDPA", value, 1.15,
                          detail=detail))
    for provider in ("lk-auto", "lk-triton", "lk-cuda"):
        value, detail = speedup_vs(rows, "gpt_train", "train", f"{provider}-graph",
                                   "torch-sdpa-graph")
        out.append(Target("#6", f"GPT-2 small step in a CUDA graph {provider} vs torch SDPA",
                          value, 1.15, detail=detail))
    for check in bench.get("checks", []):
        if check.get("check") == "determinism":
            verdict = {"identical": 1.0, "different": 0.0, "fault": 0.0}.get(check.get("result"))
            out.append(Target("#9", f"bwd bit-identical {check['provider']} {check['variant']}",
                              verdict, 1.0, detail=check.get("detail", "")))
    return out


# ----------------------------------------------------------------------------- summary

def _load_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def step_summary(runs: list[dict]) -> dict:
    """One step from its runs: the last run's status, rc and counts, every run's status (a
    fault then a resume reads failed, then ok) and the failures of the runs that failed."""
    last = runs[-1]
    failed_output = "\n".join(r["output"] for r in runs if r.get("status") != "ok")
    return {"status": last.get("status"), "rc": last.get("rc"), "secs": last.get("secs"),
            "runs": [{k: r.get(k) for k in ("status", "rc", "secs")} for r in runs],
            "pytest": pytest_counts(last["output"]),
            "sanitizer": sanitizer_findings(last["output"]),
            "failures": failures(failed_output) if failed_output else []}


def bench_problems(bench: dict) -> list[dict]:
    """Provider runs that faulted the device, raised or ran out of memory, faults first, and
    determinism checks that faulted (as skip-like dicts)."""
    skipped = [s for s in bench.get("skipped", []) if s.get("kind") in PROBLEM_KINDS]
    checks = [{"op": "determinism", "mode": "bwd", "variant": c.get("variant", ""),
               "provider": c.get("provider", ""), "kind": "fault", "reason": c.get("detail", "")}
              for c in bench.get("checks", []) if c.get("result") == "fault"]
    return sorted(skipped + checks, key=lambda s: s["kind"] != "fault")


def summarize(out_dir: str) -> dict:
    log_path = os.path.join(out_dir, "gpu_check.log")
    text = open(log_path, errors="replace").read() if os.path.exists(log_path) else ""
    log = parse_log(text)
    steps = {name: step_summary(runs) for name, runs in log["steps"].items()}
    verify = _load_json(os.path.join(out_dir, "verify.json"))
    failures_path = os.path.join(out_dir, "test_failures.txt")
    failed_tests = (test_failures(open(failures_path, errors="replace").read())
                    if os.path.exists(failures_path) else [])
    bench = _load_json(os.path.join(out_dir, "bench.json")) or {}
    env = bench.get("environment", {})
    return {
        "gpu": log["info"].get("gpu") or env.get("device", "unknown"),
        "date": log["info"].get("date") or env.get("date", "unknown"),
        "commit": log["info"].get("commit") or env.get("commit", "unknown"),
        "mode": log["info"].get("mode", "full"),
        "versions": {k: log["info"].get(k) or env.get(k) for k in ("python", "torch", "triton")},
        "backends": log["info"].get("backends"),
        "precompiled": log["info"].get("precompiled"),
        "steps": steps,
        "test_failures": failed_tests,
        "verify": verify_counts(verify) if verify is not None else None,
        "copy_gbps": copy_gbps(bench.get("rows", [])),
        "bench_rows": len(bench.get("rows", [])),
        "bench_errors": bench_problems(bench),
        "targets": [dict(asdict(t), status=t.status) for t in targets(bench)],
        "profile": profile_lines(steps_output(log["steps"], "profile")),
        "host_overhead": host_overhead_lines(steps_output(log["steps"], "host-overhead")),
        "sweep": sweep_lines(steps_output(log["steps"], "sweep-ws"))
        + sweep_lines(steps_output(log["steps"], "sweep")),
        "native": native_lines(log["steps"]),
        "autotune": bench.get("autotune", {}),
    }


def steps_output(steps: dict[str, list[dict]], name: str) -> str:
    """The output of step ``name``'s last run ('' when it did not run)."""
    return steps[name][-1]["output"] if name in steps else ""


PROFILE_ROW = re.compile(
    r"^(== .*|host waits for the device \d+ times a step|  \d+ x \S+|host time .*|"
    r"(kernel|host op .*\))\s+calls\s+ms/step\s+share|.+\s\d+\s+[\d.]+\s+[\d.]+%|"
    r"kernel ms/step by category .*|  [a-z][a-z /]*?(\s+[\d.]+)+)$")


def profile_lines(output: str) -> list[str]:
    """The tables of ``bench/profile_step.py`` in a step's output (``== provider`` headers,
    column titles and kernel rows), without the profiler's own log lines."""
    return [line.rstrip() for line in output.splitlines() if PROFILE_ROW.match(line.rstrip())]


def host_overhead_lines(output: str) -> list[str]:
    """The table of ``bench/host_overhead.py`` (from its ``op ... mode`` title on)."""
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"^op\s+mode\s", line)), None)
    return [] if start is None else [line.rstrip() for line in lines[start:] if line.strip()]


NATIVE_FOLLOW_UPS = {"native-backtrace": 60, "native-rebuild": 5, "native-probe-system-gxx": 30}


def sweep_lines(output: str) -> list[str]:
    """The tables of ``bench/sweep.py`` (from its first ``== `` title on)."""
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("== ")), None)
    return [] if start is None else [line.rstrip() for line in lines[start:] if line.strip()]


def native_lines(steps: dict[str, list[dict]], tail: int = 60) -> list[str]:
    """What the native probe printed when it failed (the compilers, the libraries and the
    crashing case), then each follow-up that ran (the cuda-gdb backtrace, the rebuild with the
    system's g++ and its probe); [] when the probe passed."""
    probe = steps.get("native-probe")
    if not probe or probe[-1].get("status") == "ok":
        return []
    lines = probe[-1]["output"].splitlines()[-tail:]
    for name, keep in NATIVE_FOLLOW_UPS.items():
        if name in steps:
            run = steps[name][-1]
            lines += [f"--- {name}: {run.get('status')} (rc={run.get('rc')}) ---"]
            lines += run["output"].splitlines()[-keep:]
    return [line.rstrip() for line in lines]


def _counts_text(counts: Optional[dict]) -> str:
    if not counts:
        return "no summary"
    return ", ".join(f"{n} {w}" for w, n in counts.items())


def _run_text(run: dict) -> str:
    """'ok in 50 s', 'failed rc=3 in 60 s'."""
    rc = f" rc={run['rc']}" if run["status"] in FAILED_STATUSES else ""
    return f"{run['status']}{rc} in {run['secs']} s"


def _step_text(summary: dict, name: str) -> str:
    step = summary["steps"].get(name)
    if step is None:
        return "not run"
    runs = step["runs"]
    if len(runs) == 1:
        text = f"{step['status']} ({step['secs']} s)"
    else:
        text = f"{step['status']} after {len(runs)} runs ({', then '.join(map(_run_text, runs))})"
    if step.get("pytest") is not None:
        text += ": " + _counts_text(step["pytest"])
    if step.get("sanitizer"):
        text += ": " + step["sanitizer"]
    return text


def _value(t: dict) -> str:
    if t["value"] is None:
        return "n/a"
    if t["what"].startswith("bwd bit-identical"):
        return "same" if t["value"] == 1.0 else "differs"
    return f"{t['value']:.2f}"


def _goal(t: dict) -> str:
    if t["goal"] is None:
        return "-"
    if t["what"].startswith("bwd bit-identical"):
        return "same"
    return f"{t['cmp']} {t['goal']:.2f}"


def step_lines(summary: dict) -> list[tuple[str, str]]:
    verify = summary["verify"]
    verify_text = _step_text(summary, "verify")
    if verify is not None:
        verify_text += (f": {verify['passed']} passed, {verify['failed']} failed, "
                        f"{verify['skipped']} skipped")
    lines = [("build", _step_text(summary, "build")),
             ("backends", summary["backends"] or "unknown"),
             ("Triton precompile", f"{summary['precompiled']} kernel variants"
              if summary.get("precompiled") is not None else "not run"),
             ("pytest -m cuda", _step_text(summary, "pytest-cuda"))]
    if "pytest-cuda-rest" in summary["steps"]:
        lines.append(("pytest -m cuda, left over", _step_text(summary, "pytest-cuda-rest")))
    lines.append(("verify", verify_text))
    sanitized = [("memcheck", _step_text(summary, "memcheck")),
                 ("racecheck", _step_text(summary, "racecheck"))]
    if summary["mode"] == "sanitize":
        lines += sanitized
    else:
        if "pytest-rest-core" in summary["steps"]:
            lines.append(("pytest rest (built-here tests)",
                          _step_text(summary, "pytest-rest-core")))
        lines += [("pytest rest", _step_text(summary, "pytest-rest")),
                  ("bench", _step_text(summary, "bench") + f": {summary['bench_rows']} rows, "
                   + _problem_counts(summary["bench_errors"]))]
        lines += [line for line in sanitized if line[0] in summary["steps"]]
    copy = summary["copy_gbps"]
    lines.append(("copy bandwidth", f"{copy:.0f} GB/s (read + write)" if copy else "n/a"))
    return lines


def _problem_counts(problems: list[dict]) -> str:
    """'1 fault, 2 error' (the provider problems by kind), or 'no provider problems'."""
    counts = {kind: sum(p["kind"] == kind for p in problems) for kind in PROBLEM_KINDS}
    text = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
    return f"provider problems: {text}" if text else "no provider problems"


def problem_lines(summary: dict) -> list[str]:
    """Failed tests, failed step runs, device faults and provider errors, a few of each."""
    lines = [f"test: {f['test']} ({f['phase']}, {f['secs']:.0f} s): "
             f"{f['error'] or 'see test_failures.txt'}"
             for f in summary.get("test_failures", [])[:12]]
    for name, step in summary["steps"].items():
        lines += [f"{name}: {line}" for line in step.get("failures", [])]
    lines += [f"bench: [{e['kind']}] {e['op']} {e['mode']} {e['variant']} {e['provider']}: "
              f"{e['reason'][:120]}" for e in summary["bench_errors"][:6]]
    return lines


def format_text(summary: dict) -> str:
    versions = " ".join(f"{k} {v}" for k, v in summary["versions"].items() if v)
    out = ["=" * 30 + " GPU CHECK SUMMARY " + "=" * 30,
           f"GPU: {summary['gpu']}   commit {summary['commit']}   {summary['date']}   {versions}"]
    problems = problem_lines(summary)
    if problems:
        out += ["problems:"] + [f"  {line}" for line in problems]
    out += [f"{name:<15} {text}" for name, text in step_lines(summary)]
    if summary["mode"] != "sanitize":
        out.append(f"{'issue':<6}{'headline':<48}{'value':>8}{'target':>9}  {'status':<7} detail")
        for t in summary["targets"]:
            out.append(f"{t['issue']:<6}{t['what']:<48}{_value(t):>8}{_goal(t):>9}  "
                       f"{t['status']:<7} {t['detail'][:44]}")
        met = sum(t["status"] == "MET" for t in summary["targets"])
        missed = sum(t["status"] == "MISSED" for t in summary["targets"])
        out.append(f"targets: {met} MET, {missed} MISSED, "
                   f"{sum(t['status'] == 'n/a' for t in summary['targets'])} n/a")
    return "\n".join(out)


def format_markdown(summary: dict, csv_name: Optional[str], png_name: Optional[str]) -> str:
    md = [f"# GPU check: {summary['gpu'].split(',')[0]}, {summary['date']}", "",
          f"- GPU: {summary['gpu']}",
          f"- commit: `{summary['commit']}`",
          "- versions: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items() if v),
          f"- mode: {summary['mode']}", "", "| step | result |", "| --- | --- |"]
    md += [f"| {name} | {text.replace('|', '/')} |" for name, text in step_lines(summary)]
    if summary["mode"] != "sanitize":
        md += ["", "## Headline ratios (standard suite, bf16)", "",
               "| issue | headline | value | target | status | detail |",
               "| --- | --- | --- | --- | --- | --- |"]
        md += [f"| {t['issue']} | {t['what']} | {_value(t)} | {_goal(t)} | {t['status']} | "
               f"{t['detail']} |" for t in summary["targets"]]
    if summary.get("profile"):
        md += ["", "## Where a GPT-2-small training step's time goes", "", "```"]
        md += summary["profile"] + ["```"]
    if summary.get("host_overhead"):
        md += ["", "## Host time per call of the public ops (microseconds, bench/host_overhead.py)",
               "", "```"] + summary["host_overhead"] + ["```"]
    if summary.get("sweep"):
        md += ["", "## Launch-parameter sweeps (bench/sweep.py)", "", "```"]
        md += summary["sweep"] + ["```"]
    if summary.get("native"):
        md += ["", "## Native probe of the C++ ops' error paths (failed)", "", "```"]
        md += summary["native"] + ["```"]
    if summary.get("autotune"):
        md += ["", "## Configs the Triton autotuners chose (kernel, tuning key: config)", "", "```"]
        md += [f"{kernel} {key}: {config}" for kernel, chosen in sorted(summary["autotune"].items())
               for key, config in chosen.items()] + ["```"]
    if summary.get("test_failures"):
        md += ["", "## Failed tests (from test_failures.txt)", ""]
        md += [f"- `{f['test']}` ({f['phase']}, {f['secs']:.0f} s): `{f['error']}`"
               for f in summary["test_failures"]]
    problems = problem_lines(summary)
    if problems:
        md += ["", "## Problems", ""] + [f"- `{line}`" for line in problems]
    if csv_name:
        md += ["", f"All rows: [{csv_name}]({csv_name})."]
    if png_name:
        md += ["", f"![benchmarks]({png_name})"]
    return "\n".join(md) + "\n"


def results_stem(summary: dict) -> str:
    """``<date>-<gpu>-<commit>``, e.g. ``2026-11-20-nvidia-h100-80gb-hbm3-18b6ffc``: two checks
    on one day (of different commits) keep their own files."""
    gpu = summary["gpu"].split(",")[0].strip().lower()
    stem = f"{summary['date'][:10]}-{re.sub(r'[^a-z0-9]+', '-', gpu).strip('-') or 'unknown'}"
    commit = re.sub(r"[^0-9a-f]", "", str(summary.get("commit", "")).lower())[:7]
    return f"{stem}-{commit}" if commit else stem


def write_results(summary: dict, out_dir: str, results_dir: str) -> str:
    """bench/results/<stem>.md, with the CSV and the plot copied beside it."""
    os.makedirs(results_dir, exist_ok=True)
    stem = results_stem(summary)
    names = {}
    for src, ext in (("bench.csv", "csv"), ("bench.png", "png")):
        if os.path.exists(os.path.join(out_dir, src)):
            names[ext] = f"{stem}.{ext}"
            shutil.copyfile(os.path.join(out_dir, src), os.path.join(results_dir, names[ext]))
    path = os.path.join(results_dir, f"{stem}.md")
    with open(path, "w") as f:
        f.write(format_markdown(summary, names.get("csv"), names.get("png")))
    return path


def exit_code(summary: dict) -> int:
    """1 when a run of the build, a test, verify, the bench or a sanitizer step failed (a bench
    that faulted and resumed included), a verify row failed or the bench faulted the device;
    else 0."""
    steps = summary["steps"]
    failed_run = any(run["status"] in FAILED_STATUSES
                     for name in CHECKED_STEPS for run in steps.get(name, {}).get("runs", []))
    faulted = any(p["kind"] == "fault" for p in summary["bench_errors"])
    verify_failed = bool(summary["verify"] and summary["verify"]["failed"])
    return int(failed_run or faulted or verify_failed or bool(summary.get("test_failures")))


def input_problem(out_dir: str) -> Optional[str]:
    """Why ``out_dir`` is not a GPU check's output folder, else None."""
    if not os.path.isdir(out_dir):
        return f"--out {out_dir}: no such folder"
    if not any(os.path.exists(os.path.join(out_dir, name)) for name in INPUT_FILES):
        return f"--out {out_dir}: holds none of {', '.join(INPUT_FILES)}"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-results", help="the GPU check's output folder")
    parser.add_argument("--print", action="store_true", help="print the summary table")
    parser.add_argument("--results-dir", help="write <date>-<gpu>.md (+ CSV, PNG) there")
    args = parser.parse_args(argv)
    problem = input_problem(args.out)
    if problem:
        print(f"summarize.py: error: {problem}", file=sys.stderr)
        return 2
    summary = summarize(args.out)
    try:
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    except OSError as exc:  # fetched results are read-only: the markdown is what matters then
        print(f"note: summary.json not written ({exc})")
    if args.results_dir:
        print(f"wrote {write_results(summary, args.out, args.results_dir)}")
    if args.print or not args.results_dir:
        print(format_text(summary))
    return exit_code(summary)


if __name__ == "__main__":
    sys.exit(main())
