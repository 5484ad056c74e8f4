"""The shared benchmark harness: timing, peak memory, FLOP and byte counting, row tags.

Timing: on a GPU, ``triton.testing.do_bench`` (CUDA events, the L2 cache flushed before every
run, median with 20th/80th percentiles); on a CPU, ``time.perf_counter`` loops after a warm-up,
the providers of a case in turns (time_cpu_interleaved). Work: attention FLOPs
``4*B*H*Lq*Lk*D`` (halved when causal; backward 2.5x the forward, forward+backward 3.5x), bytes
for memory-bound ops (each input read once, each output written once).
"""
from __future__ import annotations

import datetime
import gc
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

QUANTILES = (0.5, 0.2, 0.8)
MIN_GPU_SAMPLES = 10
ATTENTION_MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5, "decode": 1.0}
GEMM_MODE_FACTOR = {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Skip(Exception):
    """A provider that cannot run a case; the message says why."""


@dataclass(frozen=True)
class Timing:
    """Median and 20th/80th percentile of the run time in ms, peak memory in MB (None on CPU),
    and on a GPU the CPU time one call takes to issue its work (``host_ms``)."""

    ms: float
    ms_p20: float
    ms_p80: float
    peak_mb: Optional[float]
    host_ms: Optional[float] = None


@dataclass(frozen=True)
class TimerConfig:
    """GPU: do_bench warm-up and repetition times (ms). CPU: warm-up calls and a time budget."""

    gpu_warmup_ms: int = 25
    gpu_rep_ms: int = 100
    cpu_warmup: int = 1
    cpu_min_reps: int = 5
    cpu_max_reps: int = 200
    cpu_budget_s: float = 0.5


QUICK_TIMER = TimerConfig(gpu_warmup_ms=10, gpu_rep_ms=50, cpu_warmup=0, cpu_min_reps=3,
                          cpu_max_reps=50, cpu_budget_s=0.15)


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) of ``samples`` by linear interpolation (numpy's default)."""
    if not samples:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    ordered = sorted(samples)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def time_cpu(fn: Callable[[], object], config: TimerConfig = TimerConfig()) -> list[float]:
    """Run times of ``fn`` in ms: warm-up calls, then at least ``cpu_min_reps`` timed calls and
    more until ``cpu_budget_s`` has passed (at most ``cpu_max_reps``)."""
    for _ in range(config.cpu_warmup):
        fn()
    times: list[float] = []
    stop = time.perf_counter() + config.cpu_budget_s
    while len(times) < config.cpu_max_reps and (len(times) < config.cpu_min_reps
                                                 or time.perf_counter() < stop):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def time_cpu_interleaved(fns: Sequence[Callable[[], object]],
                         config: TimerConfig = TimerConfig()) -> list[list[float]]:
    """time_cpu for several callables in turns, each round calling every one once (starting one
    further along each round), so that a slow or a fast spell of a shared machine falls on all
    of them alike rather than on whichever ran then: warm-up calls, then at least
    ``cpu_min_reps`` rounds and more while ``cpu_budget_s`` per callable lasts (at most
    ``cpu_max_reps``). Returns each callable's run times in ms."""
    for fn in fns:
        for _ in range(config.cpu_warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    stop = time.perf_counter() + config.cpu_budget_s * len(fns)
    rounds = 0
    while fns and rounds < config.cpu_max_reps and (rounds < config.cpu_min_reps
                                                    or time.perf_counter() < stop):
        for k in range(len(fns)):
            i = (rounds + k) % len(fns)
            start = time.perf_counter()
            fns[i]()
            times[i].append((time.perf_counter() - start) * 1e3)
        rounds += 1
    return times


def cpu_timing(samples: Sequence[float]) -> "Timing":
    """The Timing of CPU run times in ms (no peak memory on a CPU)."""
    ms, p20, p80 = (percentile(samples, q) for q in QUANTILES)
    return Timing(ms=ms, ms_p20=p20, ms_p80=p80, peak_mb=None)


def time_gpu(fn: Callable[[], object], config: TimerConfig = TimerConfig()) -> tuple[float, ...]:
    """(median, p20, p80) in ms through ``triton.testing.do_bench`` (L2 flushed before each run),
    over at least MIN_GPU_SAMPLES runs: a call longer than the repetition time (a training
    step) gets a longer one, not a single sample."""
    from triton.testing import do_bench
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    rep_ms = max(config.gpu_rep_ms, MIN_GPU_SAMPLES * start.elapsed_time(end))
    return tuple(do_bench(fn, warmup=config.gpu_warmup_ms, rep=rep_ms,
                          quantiles=list(QUANTILES)))


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Extra device memory (MB) that one call of ``fn`` allocates at its peak, its outputs
    included; None on a CPU (no allocator statistics there)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return peak / 2**20


def host_time_ms(fn: Callable[[], object], device: torch.device, calls: int = 5) -> float:
    """Median wall time (ms) of one call of ``fn`` on the CPU, the device idle before each: the
    time to issue its work. When it is close to the measured device time the row is bound by
    the host (Python, dispatch, launches), not by its kernels; a call that synchronizes inside
    counts its kernels too."""
    samples = []
    for _ in range(calls):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        samples.append((time.perf_counter() - start) * 1e3)
        del result
    torch.cuda.synchronize(device)
    return percentile(samples, 0.5)


def capture_graph(fn: Callable[[], object], warmup: int = 1) -> Callable[[], object]:
    """``fn`` recorded once into a CUDA graph; returns its replay, which returns what the
    recorded call returned (overwritten by each replay). ``warmup`` calls run first on a side
    stream, as capture requires (compilation, autotuning, lazily created state), so the
    recorded call neither compiles nor synchronizes. A replay issues all of ``fn``'s kernels
    with one launch: timing it gives their device time without the host's cost to issue them."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out
    return replay


def measure(fn: Callable[[], object], device: torch.device,
            config: TimerConfig = TimerConfig(), cuda_graph: bool = False) -> Timing:
    """Time an already warmed-up ``fn`` on ``device`` and measure its peak memory (and, on a
    GPU, its host time). ``cuda_graph``: the time (and host time) of ``fn`` replayed from a
    CUDA graph; the peak memory is still that of a plain call."""
    peak = peak_memory_mb(fn, device)
    if cuda_graph:
        fn = capture_graph(fn)
    if device.type == "cuda":
        ms, p20, p80 = time_gpu(fn, config)
        return Timing(ms=ms, ms_p20=p20, ms_p80=p80, peak_mb=peak,
                      host_ms=host_time_ms(fn, device))
    return cpu_timing(time_cpu(fn, config))


def autotuned_configs() -> dict[str, dict[str, str]]:
    """``{kernel: {tuning key: chosen config}}`` of every llm_kernels Triton autotuner that has
    tuned something in this process (kernel modules not imported yet have tuned nothing)."""
    autotuner = sys.modules.get("triton.runtime.autotuner")
    if autotuner is None:
        return {}
    modules = [sys.modules.get(f"llm_kernels.kernels.{name}")
               for name in ("attention", "feed_forward", "swiglu")]
    tuners = [obj for module in modules if module is not None for obj in vars(module).values()
              if isinstance(obj, autotuner.Autotuner)]
    if modules[0] is not None:
        tuners += modules[0].tuned_kernels()
    chosen: dict[str, dict[str, str]] = {}
    for tuner in tuners:
        for key, config in tuner.cache.items():
            chosen.setdefault(tuner.fn.__name__, {})[str(key)] = str(config)
    return chosen


def free_memory(device: torch.device) -> None:
    """Collect garbage and return cached blocks, so one provider's buffers don't crowd the next."""
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except RuntimeError:  # a kernel fault left the context broken: the next call reports it
            pass


# ----------------------------------------------------------------------------- work counting

def causal_pairs(lq: int, lk: int) -> float:
    """Query/key pairs a causal (bottom-right aligned) attention computes.

    Lq == Lk: half of Lq*Lk (the FlashAttention convention). Otherwise the exact count of pairs
    with j <= i + Lk - Lq (a decode step, Lq = 1, sees every key)."""
    if lq == lk:
        return lq * lk / 2
    offset = lk - lq
    return float(sum(min(lk, max(0, i + offset + 1)) for i in range(lq)))


def attention_flops(b: int, h: int, lq: int, lk: int, d: int, *, causal: bool, mode: str) -> float:
    """4*B*H*Lq*Lk*D for the forward (two matmuls), halved when causal; backward 2.5x,
    forward+backward 3.5x."""
    pairs = causal_pairs(lq, lk) if causal else lq * lk
    return 4.0 * b * h * pairs * d * ATTENTION_MODE_FACTOR[mode]


def gemm_flops(m: int, n: int, k: int, *, mode: str, count: int = 1) -> float:
    """2*M*N*K per matmul, ``count`` matmuls; backward 2x, forward+backward 3x."""
    return 2.0 * m * n * k * count * GEMM_MODE_FACTOR[mode]


def tflops(flops: Optional[float], ms: float) -> Optional[float]:
    return None if flops is None else flops / (ms * 1e-3) / 1e12


def gbps(nbytes: Optional[float], ms: float) -> Optional[float]:
    return None if nbytes is None else nbytes / (ms * 1e-3) / 1e9


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------- row tags

def git_commit() -> str:
    """HEAD of the repository, else ``$LLM_KERNELS_COMMIT``, else a ``COMMIT`` file at the
    repository root, else 'unknown' (the GPU machine receives a copy of the tree)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    if os.environ.get("LLM_KERNELS_COMMIT"):
        return os.environ["LLM_KERNELS_COMMIT"].strip()
    path = os.path.join(REPO_ROOT, "COMMIT")
    if os.path.isfile(path):
        with open(path) as f:
            return f.read().strip() or "unknown"
    return "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores)"


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


def environment(device: torch.device) -> dict:
    """Tags put on every row: device name, torch and triton versions, commit and date."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version(),
            "commit": git_commit(), "date": now.strftime("%Y-%m-%dT%H:%MZ")}
