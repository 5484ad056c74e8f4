"""Runs a plan of (op module, case, providers): builds, warms up, times and tags each one.

A provider that cannot run (its backend absent, ``BackendUnavailableError``, a kernel error,
out of memory, the time budget spent) is skipped with its reason printed once per op; the
run itself never stops for one provider. The one exception is a device fault (an illegal
memory access, say), which leaves the CUDA context unusable: the runner records it, excludes
that (op, provider) and raises :class:`DeviceFault`; a new process resumes from the results
written so far (``llm-kernels bench --resume``) and skips what is already done.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Optional

import torch

from llm_kernels.bench import harness, report
from llm_kernels.bench.common import DTYPE_NAMES, Case, Options

COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 26}
# A GPU row whose call takes at least this share of its measured time to issue on the CPU
# gets the host time in its note: it is bound by the host, not by its kernels.
HOST_BOUND_SHARE = 0.5
# Error messages of faults after which no CUDA call in the process can succeed.
FAULT_MARKERS = ("illegal memory access", "illegal address", "unspecified launch failure",
                 "device-side assert", "misaligned address", "illegal instruction",
                 "uncorrectable ecc", "launch timed out")


class DeviceFault(RuntimeError):
    """A kernel fault that broke the CUDA context: the run must continue in a new process."""


def is_device_fault(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(marker in text for marker in FAULT_MARKERS)


@dataclass
class PlanItem:
    module: ModuleType
    case: Case
    providers: list[str]


@dataclass
class Results:
    """What a run measured; ``excluded`` lists [op, provider] pairs that faulted the device."""

    environment: dict
    rows: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    excluded: list[list[str]] = field(default_factory=list)
    autotune: dict = field(default_factory=dict)  # kernel -> {tuning key: chosen config}

    def as_dict(self) -> dict:
        return {"environment": self.environment, "rows": self.rows, "skipped": self.skipped,
                "checks": self.checks, "excluded": self.excluded, "autotune": self.autotune}

    @classmethod
    def from_dict(cls, data: dict, environment: dict) -> "Results":
        """Results written by an earlier process of the same run (budget skips dropped: the
        resumed process has time of its own)."""
        return cls(environment=environment, rows=list(data.get("rows", [])),
                   skipped=[s for s in data.get("skipped", []) if s.get("kind") != "budget"],
                   checks=list(data.get("checks", [])), excluded=list(data.get("excluded", [])),
                   autotune=dict(data.get("autotune", {})))


def case_key(op: str, mode: str, variant: str, shape: str, provider: str) -> tuple:
    return (op, mode, variant, shape, provider)


def classify(exc: BaseException) -> tuple[str, str]:
    """(kind, reason) for an exception raised while building or running a provider."""
    from llm_kernels.backends import BackendUnavailableError
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    if isinstance(exc, harness.Skip):
        return "skip", str(exc)
    if isinstance(exc, BackendUnavailableError):
        return "unavailable", first_line
    if isinstance(exc, torch.OutOfMemoryError):
        return "oom", "out of memory"
    if is_device_fault(exc):
        return "fault", f"{type(exc).__name__}: {first_line}"
    return "error", f"{type(exc).__name__}: {first_line}"


class Runner:
    """Measures plan items in order within an optional deadline (``time.monotonic()``)."""

    def __init__(self, device: torch.device, opts: Options, timer: harness.TimerConfig,
                 deadline: Optional[float] = None, echo: Callable[[str], None] = print,
                 resume: Optional[dict] = None, interleave: Optional[bool] = None):
        self.device, self.opts, self.timer, self.deadline = device, opts, timer, deadline
        # CPU: a case's providers timed in turns; GPU: one after another (CUDA events)
        self.interleave = device.type == "cpu" if interleave is None else interleave
        self.echo = echo
        env = harness.environment(device)
        self.results = Results.from_dict(resume, env) if resume else Results(environment=env)
        self._done = {case_key(r["op"], r["mode"], r["variant"], r["shape"], r["provider"])
                      for r in self.results.rows + self.results.skipped}
        self._told: set[tuple] = set()

    def is_excluded(self, op: str, provider: str) -> bool:
        return [op, provider] in self.results.excluded

    def exclude(self, op: str, provider: str) -> None:
        if not self.is_excluded(op, provider):
            self.results.excluded.append([op, provider])

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def run(self, plan: list[PlanItem], after_item: Optional[Callable[[], None]] = None) -> Results:
        for item in plan:
            if self.interleave:
                self.run_interleaved(item.module, item.case, item.providers)
            else:
                for provider in item.providers:
                    self.run_one(item.module, item.case, provider)
            report.add_ratios(self.results.rows)
            if after_item is not None:
                after_item()
        return self.results

    def run_one(self, module: ModuleType, case: Case, provider: str) -> Optional[dict]:
        """Measure one provider on one case; raises DeviceFault when it broke the device."""
        fn = self._prepare(module, case, provider)
        if fn is None:
            return None
        try:
            timing = harness.measure(fn, self.device, self.timer,
                                     cuda_graph=case.extra.get("cuda_graph", False))
        except Exception as exc:  # one provider's failure must not stop the run
            self._fail(case, provider, exc)
            return None
        finally:
            note = getattr(fn, "note", "")
            del fn
            harness.free_memory(self.device)
        return self._record(module, case, provider, timing, note)

    def run_interleaved(self, module: ModuleType, case: Case, providers: list[str]) -> None:
        """CPU: the case's providers timed in turns (harness.time_cpu_interleaved), so that the
        ratios between them do not depend on which one a slow spell of the machine hit. A
        provider that fails while timed has the others timed again one by one; a device fault
        while preparing one still records the providers prepared before it."""
        fns: dict[str, Callable[[], object]] = {}
        fault: Optional[DeviceFault] = None
        for provider in providers:
            try:
                fn = self._prepare(module, case, provider)
            except DeviceFault as exc:
                fault = exc
                break
            if fn is not None:
                fns[provider] = fn
        try:
            samples = harness.time_cpu_interleaved(list(fns.values()), self.timer)
        except Exception:  # one of them failed mid-run: time each alone, which records it
            samples = None
        for i, (provider, fn) in enumerate(fns.items()):
            if samples is not None:
                timing = harness.cpu_timing(samples[i])
            else:
                try:
                    timing = harness.measure(fn, self.device, self.timer)
                except Exception as exc:
                    self._fail(case, provider, exc)
                    continue
            self._record(module, case, provider, timing, getattr(fn, "note", ""))
        del fns
        harness.free_memory(self.device)
        if fault is not None:
            raise fault

    def _prepare(self, module: ModuleType, case: Case, provider: str):
        """The provider's callable for the case, warmed up (compilation, autotuning, allocator
        growth); None when it is not to be measured (measured before, out of time, excluded) or
        failed (recorded; a device fault raises DeviceFault)."""
        if case_key(case.op, case.mode, case.variant, case.shape, provider) in self._done:
            return None
        if self.out_of_time():
            self._skip(case, provider, "budget", "time budget spent")
            return None
        if self.is_excluded(case.op, provider):
            self._skip(case, provider, "excluded", "faulted the device earlier in this run")
            return None
        try:
            fn = module.PROVIDERS[provider](case, self.device, self.opts)
            fn()
            self._sync()
            return fn
        except Exception as exc:  # one provider's failure must not stop the run
            self._fail(case, provider, exc)
            return None

    def _fail(self, case: Case, provider: str, exc: Exception) -> None:
        """Record a provider's failure; a device fault excludes the op's provider for the rest
        of the run and raises DeviceFault."""
        kind, reason = classify(exc)
        self._skip(case, provider, kind, reason)
        if kind == "fault":
            self.exclude(case.op, provider)
            raise DeviceFault(f"{case.op} {provider}: {reason}") from exc

    def _record(self, module: ModuleType, case: Case, provider: str, timing: harness.Timing,
                note: str) -> dict:
        row = self._row(case, provider, timing, note)
        describe = getattr(module, "row_note", None)  # a note from the measured time
        if describe is not None:
            row["note"] = describe(case, row, self.device)
        if timing.host_ms is not None and timing.host_ms >= HOST_BOUND_SHARE * timing.ms:
            row["note"] = "; ".join(filter(None, [row["note"],
                                                  f"host {timing.host_ms:.3f} ms/call"]))
        self.results.rows.append(row)
        self.echo(f"  {case.op:<13} {case.mode:<7} {case.variant or '-':<10} {case.shape:<34} "
                  f"{provider:<15} {row['ms']:9.3f} ms" + self._rate(row)
                  + (f"  {row['note']}" if describe is not None else ""))
        return row

    def measure_copy(self) -> Optional[dict]:
        """Device-to-device copy bandwidth, bytes read plus bytes written (the memory roofline);
        None when an earlier process of this run measured it."""
        if any(r["op"] == "copy" for r in self.results.rows):
            return None
        nbytes = COPY_BYTES.get(self.device.type, COPY_BYTES["cpu"])
        case = Case(op="copy", mode="d2d", dtype=torch.float32, params={"bytes": nbytes},
                    x_name="bytes", x=nbytes, nbytes=2 * nbytes)
        try:
            src = torch.randn(nbytes // 4, device=self.device)
            dst = torch.empty_like(src)
            run = lambda: dst.copy_(src)  # noqa: E731
            run()
            self._sync()
            timing = harness.measure(run, self.device, self.timer)
        except Exception as exc:  # the ratios to the copy bandwidth become n/a, nothing else
            self._skip(case, "torch", *classify(exc))
            return None
        finally:
            src = dst = run = None
            harness.free_memory(self.device)
        row = self._row(case, "torch", timing, "bytes read + written")
        self.results.rows.append(row)
        self.echo(f"  copy bandwidth: {row['gbps']:.0f} GB/s (read + write, {nbytes >> 20} MiB)")
        return row

    def _row(self, case: Case, provider: str, timing: harness.Timing, note: str) -> dict:
        row = {"op": case.op, "mode": case.mode, "variant": case.variant, "provider": provider,
               "dtype": DTYPE_NAMES.get(case.dtype, str(case.dtype)), "shape": case.shape,
               "x_name": case.x_name, "x": case.x, "ms": timing.ms, "ms_p20": timing.ms_p20,
               "ms_p80": timing.ms_p80, "tflops": harness.tflops(case.flops, timing.ms),
               "gbps": harness.gbps(case.nbytes, timing.ms), "peak_mb": timing.peak_mb,
               "vs_best_baseline": None, "best_baseline": None, "note": note}
        row.update(self.results.environment)
        return row

    @staticmethod
    def _rate(row: dict) -> str:
        parts = []
        if row["tflops"] is not None:
            parts.append(f"{report.format_rate(row['tflops']):>7} TFLOP/s")
        if row["gbps"] is not None:
            parts.append(f"{report.format_rate(row['gbps']):>7} GB/s")
        if row["peak_mb"] is not None:
            parts.append(f"peak {row['peak_mb']:.0f} MB")
        return "  " + "  ".join(parts) if parts else ""

    def _skip(self, case: Case, provider: str, kind: str, reason: str) -> None:
        self._done.add(case_key(case.op, case.mode, case.variant, case.shape, provider))
        self.results.skipped.append({"op": case.op, "mode": case.mode, "variant": case.variant,
                                     "shape": case.shape, "provider": provider, "kind": kind,
                                     "reason": reason})
        key = (case.op, provider, kind, reason)
        if key not in self._told:
            self._told.add(key)
            self.echo(f"  skip {case.op} {provider}: [{kind}] {reason}")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
