"""The benchmark harness (CPU): work counting, percentiles, timing, the CSV/JSON schema, plots,
the quick CLI run, the GPU check's summary and its script's syntax."""
import argparse
import csv
import json
import os
import random
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llm_kernels.bench import cli, cross_entropy, harness, layer_norm, report, rms_norm, softmax
from llm_kernels.bench import summarize, suite
from llm_kernels.bench.common import Options
from llm_kernels.bench.runner import DeviceFault, PlanItem, Runner
from llm_kernels.backends import extension_status
from llm_kernels.reference import causal_keep

CPU = torch.device("cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- work counting

@pytest.mark.parametrize("b,h,lq,lk,d", [(1, 1, 17, 17, 8), (2, 3, 97, 97, 40), (3, 5, 1, 127, 64),
                                         (1, 2, 17, 1025, 16), (2, 1, 97, 300, 128)])
def test_attention_flops_count_two_matmuls_per_visible_pair(b, h, lq, lk, d):
    assert (harness.attention_flops(b, h, lq, lk, d, causal=False, mode="fwd")
            == 4 * b * h * lq * lk * d)
    causal = harness.attention_flops(b, h, lq, lk, d, causal=True, mode="fwd")
    if lq == lk:  # the FlashAttention convention: half of the square
        assert causal == 4 * b * h * d * lq * lk / 2
    else:  # exact count of the bottom-right aligned visible pairs
        visible = causal_keep(lq, lk, lk - lq, CPU).sum().item()
        assert causal == 4 * b * h * d * visible
    for mode, factor in (("bwd", 2.5), ("fwd+bwd", 3.5)):
        assert harness.attention_flops(b, h, lq, lk, d, causal=True, mode=mode) == \
            pytest.approx(factor * causal)


def test_decode_step_sees_every_cached_key():
    lk = random.randint(2, 5000)
    assert harness.causal_pairs(1, lk) == lk


def test_gemm_flops():
    m, n, k = (random.randint(1, 999) for _ in range(3))
    assert harness.gemm_flops(m, n, k, mode="fwd") == 2 * m * n * k
    assert harness.gemm_flops(m, n, k, mode="fwd+bwd", count=3) == 3 * 3 * 2 * m * n * k


def _nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_and_softmax_bytes_count_each_tensor_once(dtype):
    n, c = random.randint(1, 97), random.randint(1, 1025)
    x, dy = torch.randn(n, c).to(dtype), torch.randn(n, c).to(dtype)
    w, b = torch.randn(c).to(dtype), torch.randn(c).to(dtype)
    stats = torch.empty(n, dtype=torch.float32)
    e = x.element_size()
    y = F.layer_norm(x.float(), (c,)).to(dtype)
    ln_fwd = _nbytes(x, w, b, y, stats, stats)
    ln_bwd = _nbytes(dy, x, w, stats, stats, x, w, b)  # dx, dweight, dbias written
    assert layer_norm.bytes_moved("fwd", n, c, e) == ln_fwd
    assert layer_norm.bytes_moved("bwd", n, c, e) == ln_bwd
    assert layer_norm.bytes_moved("fwd+bwd", n, c, e) == ln_fwd + ln_bwd
    assert rms_norm.bytes_moved("fwd", n, c, e) == _nbytes(x, w, y, stats)
    assert rms_norm.bytes_moved("bwd", n, c, e) == _nbytes(dy, x, w, stats, x, w)
    assert softmax.bytes_moved("fwd", n, c, e) == _nbytes(x, y)
    assert softmax.bytes_moved("fwd+bwd", n, c, e) == _nbytes(x, y) + _nbytes(dy, y, x)
    target = torch.randint(0, c, (n,))
    # forward reads logits and targets; backward reads them again and writes the gradient
    assert (cross_entropy.bytes_moved("fwd+bwd", n, c, e)
            == _nbytes(x, target) + _nbytes(x, target, x))


def test_rates():
    ms, work = random.uniform(0.01, 100), random.uniform(1e6, 1e15)
    assert harness.tflops(work, ms) == pytest.approx(work / (ms / 1e3) / 1e12)
    assert harness.gbps(work, ms) == pytest.approx(work / (ms / 1e3) / 1e9)
    assert harness.tflops(None, ms) is None


# ----------------------------------------------------------------------------- timing

@pytest.mark.parametrize("size", [1, 2, 17, 97, 1000])
def test_percentile_matches_numpy(size):
    samples = [random.expovariate(1.0) for _ in range(size)]
    for q in (0.0, 0.2, 0.5, 0.8, 1.0, random.random()):
        assert harness.percentile(samples, q) == pytest.approx(np.percentile(samples, 100 * q))


def test_percentile_rejects_bad_input():
    with pytest.raises(ValueError):
        harness.percentile([], 0.5)
    with pytest.raises(ValueError):
        harness.percentile([1.0], 1.5)


def test_cpu_timer_measures_the_call():
    config = harness.TimerConfig(cpu_warmup=1, cpu_min_reps=4, cpu_max_reps=6, cpu_budget_s=0.01)
    calls = []
    samples = harness.time_cpu(lambda: (calls.append(1), time.sleep(0.003)), config)
    assert 4 <= len(samples) <= 6 and len(calls) == len(samples) + 1
    assert min(samples) >= 3.0
    timing = harness.measure(lambda: time.sleep(0.002), CPU, config)
    assert timing.ms_p20 <= timing.ms <= timing.ms_p80 and timing.ms >= 2.0
    assert timing.peak_mb is None  # no allocator statistics on CPU


def test_environment_tags():
    env = harness.environment(CPU)
    assert set(env) == {"device", "torch", "triton", "commit", "date"}
    assert env["torch"] == torch.__version__ and env["commit"]


# ----------------------------------------------------------------------------- rows and files

def _row(provider, ms, shape="N=1 C=2", **kw):
    row = dict.fromkeys(report.COLUMNS)
    row.update(op="layer_norm", mode="fwd", variant="", provider=provider, dtype="fp32",
               shape=shape, x_name="hidden", x=2, ms=ms, ms_p20=ms, ms_p80=ms, note="")
    row.update(kw)
    return row


def test_ratio_to_best_baseline():
    times = {p: random.uniform(0.1, 10) for p in ("torch", "torch-compile", "lk-triton", "lk-cuda")}
    rows = [_row(p, ms) for p, ms in times.items()] + [_row("torch", 1.0, shape="N=3 C=2")]
    report.add_ratios(rows)
    best = min(("torch", "torch-compile"), key=times.get)
    for row in rows[:4]:
        assert row["best_baseline"] == best
        assert row["vs_best_baseline"] == pytest.approx(times[best] / times[row["provider"]])
    assert rows[4]["vs_best_baseline"] == 1.0 and rows[4]["best_baseline"] == "torch"
    lonely = [_row("lk-triton", 1.0)]
    report.add_ratios(lonely)
    assert lonely[0]["vs_best_baseline"] is None


def _tiny_plan():
    opts = Options(hidden_sizes=(33,), modes=("fwd", "fwd+bwd"), quick=True)
    cases = layer_norm.cases(opts, CPU)
    return opts, [PlanItem(layer_norm, case, ["torch", "lk-triton"]) for case in cases]


def _fast_runner(opts):
    timer = harness.TimerConfig(cpu_warmup=0, cpu_min_reps=2, cpu_max_reps=3, cpu_budget_s=0.0)
    return Runner(CPU, opts, timer, echo=lambda s: None)


def test_csv_and_json_schema(tmp_path):
    opts, plan = _tiny_plan()
    runner = _fast_runner(opts)
    runner.measure_copy()
    results = runner.run(plan)
    assert [r["mode"] for r in results.rows] == ["d2d", "fwd", "fwd+bwd"]
    assert {s["provider"] for s in results.skipped} == {"lk-triton"}
    report.write_csv(results.rows, str(tmp_path / "b.csv"))
    report.write_json(results.as_dict(), str(tmp_path / "b.json"))
    with open(tmp_path / "b.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == report.COLUMNS
        csv_rows = list(reader)
    assert len(csv_rows) == 3
    for row in csv_rows[1:]:
        for column in ("op", "mode", "provider", "dtype", "shape", "x", "ms", "ms_p20", "ms_p80",
                       "gbps", "vs_best_baseline", "device", "torch", "triton", "commit", "date"):
            assert row[column] != "", column
        assert float(row["gbps"]) > 0 and row["peak_mb"] == ""  # n/a on CPU
        case = next(c for c in (i.case for i in plan) if c.mode == row["mode"])
        assert float(row["gbps"]) == pytest.approx(case.nbytes / float(row["ms"]) / 1e6, rel=1e-4)
    back = report.read_csv(str(tmp_path / "b.csv"))
    assert back[1]["ms"] == pytest.approx(results.rows[1]["ms"], rel=1e-5)
    data = json.loads((tmp_path / "b.json").read_text())
    assert set(data) == {"environment", "rows", "skipped", "checks", "excluded", "autotune"}
    assert data["rows"][1]["device"] == data["environment"]["device"]
    assert "Triton" in data["skipped"][0]["reason"]


def test_autotuned_configs_lists_each_kernels_choices(monkeypatch):
    """What the autotuners chose, per kernel and tuning key (here set by hand: under the
    interpreter every kernel has one config, so nothing is tuned)."""
    import triton

    from llm_kernels.kernels import attention, feed_forward
    matmul = triton.autotune(configs=[triton.Config({"BLOCK_M": 64}),
                                      triton.Config({"BLOCK_M": 128})],
                             key=["M"])(feed_forward._matmul_kernel.fn)
    block = random.choice([64, 128])
    matmul.cache[(8192, "torch.bfloat16")] = triton.Config({"BLOCK_M": block}, num_warps=8)
    monkeypatch.setattr(feed_forward, "_tuned_for_test", matmul, raising=False)
    attn = attention._tuned(attention._attn_fwd_kernel, tuple(attention.launches(
        "fwd", 64, torch.bfloat16)), True)
    attn.cache[(1024, 1024)] = triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=2)
    try:
        chosen = harness.autotuned_configs()
    finally:
        del attn.cache[(1024, 1024)]
    assert chosen[matmul.fn.__name__]["(8192, 'torch.bfloat16')"].startswith(
        f"BLOCK_M: {block}, num_warps: 8")
    assert chosen[attn.fn.__name__]["(1024, 1024)"].startswith("BLOCK_N: 32, num_warps: 4")


def test_a_failing_provider_is_recorded_and_the_run_goes_on():
    def broken(case, device, opts):
        raise ZeroDivisionError("kernel exploded")
    module = types.SimpleNamespace(NAME="layer_norm",
                                   PROVIDERS={"lk-triton": broken,
                                              "torch": layer_norm.PROVIDERS["torch"]})
    opts, plan = _tiny_plan()
    results = _fast_runner(opts).run([PlanItem(module, plan[0].case, ["lk-triton", "torch"])])
    assert [r["provider"] for r in results.rows] == ["torch"]
    assert results.skipped[0]["kind"] == "error"
    assert "ZeroDivisionError: kernel exploded" in results.skipped[0]["reason"]


@pytest.mark.parametrize("host_ms,noted", [(0.8, True), (0.2, False), (None, False)])
def test_a_host_bound_row_notes_its_host_time(monkeypatch, host_ms, noted):
    """A GPU row whose call takes at least half its measured time to issue on the CPU says so."""
    timing = harness.Timing(ms=1.0, ms_p20=0.9, ms_p80=1.1, peak_mb=None, host_ms=host_ms)
    monkeypatch.setattr(harness, "measure", lambda fn, device, config, cuda_graph=False: timing)
    module = types.SimpleNamespace(NAME="layer_norm",
                                   PROVIDERS={"torch": layer_norm.PROVIDERS["torch"]})
    opts, plan = _tiny_plan()
    runner = _fast_runner(opts)
    runner.interleave = False  # the GPU's one-provider-at-a-time path
    row, = runner.run([PlanItem(module, plan[0].case, ["torch"])]).rows
    assert ("host 0.800 ms/call" in row["note"]) == noted


@pytest.mark.parametrize("call_ms,rep_ms", [(80.0, 800.0), (0.2, 50)])
def test_gpu_timer_takes_at_least_ten_samples(monkeypatch, call_ms, rep_ms):
    """A call longer than the repetition budget (a training step) gets a budget of ten calls;
    short calls keep the configured one."""
    import triton.testing

    class Event:
        def __init__(self, enable_timing):
            pass

        def record(self):
            pass

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return call_ms
    seen = {}

    def do_bench(fn, warmup, rep, quantiles):
        seen["rep"] = rep
        return [call_ms] * len(quantiles)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    assert harness.time_gpu(lambda: None, harness.QUICK_TIMER) == (call_ms,) * 3
    assert seen["rep"] == pytest.approx(rep_ms)


def test_host_time_is_the_cpu_time_to_issue_one_call(monkeypatch):
    """A call that keeps the CPU busy for 20 ms (and queues nothing) takes 20 ms to issue."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    ms = harness.host_time_ms(lambda: time.sleep(0.02), torch.device("cuda"), calls=3)
    assert 19.0 <= ms < 60.0


def test_cpu_timer_runs_the_callables_in_turns():
    """Each round calls every callable once, starting one further along each round."""
    calls = []
    fns = [lambda i=i: calls.append(i) for i in range(3)]
    config = harness.TimerConfig(cpu_warmup=1, cpu_min_reps=4, cpu_max_reps=4, cpu_budget_s=0.0)
    times = harness.time_cpu_interleaved(fns, config)
    assert [len(t) for t in times] == [4, 4, 4] and all(t >= 0 for ts in times for t in ts)
    assert calls == [0, 1, 2] + [0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 1, 2]
    assert harness.time_cpu_interleaved([], config) == []


def test_cpu_runner_times_a_cases_providers_in_turns():
    """On a CPU the providers of a case alternate while timed (after one warm-up call each),
    and a provider failing mid-run has the others timed alone: both rows still come out."""
    calls = []

    def provider(name, fail_at=None):
        def build(case, device, opts):
            def fn():
                calls.append(name)
                if fail_at is not None and len(calls) >= fail_at:
                    raise ValueError("broke while timed")
            return fn
        return build
    opts, plan = _tiny_plan()
    case = plan[0].case
    module = types.SimpleNamespace(NAME="layer_norm", PROVIDERS={"torch": provider("torch"),
                                                                "lk-cuda": provider("lk-cuda")})
    results = _fast_runner(opts).run([PlanItem(module, case, ["torch", "lk-cuda"])])
    assert [r["provider"] for r in results.rows] == ["torch", "lk-cuda"]
    assert calls[:2] == ["torch", "lk-cuda"]  # the warm-ups
    timed = calls[2:]
    assert timed[:4] == ["torch", "lk-cuda", "lk-cuda", "torch"]
    calls.clear()
    module.PROVIDERS["lk-cuda"] = provider("lk-cuda", fail_at=4)
    results = _fast_runner(opts).run([PlanItem(module, case, ["torch", "lk-cuda"])])
    assert [r["provider"] for r in results.rows] == ["torch"]
    assert results.skipped[0]["provider"] == "lk-cuda" and "broke while timed" in \
        results.skipped[0]["reason"]


def test_device_fault_stops_the_process_and_a_resumed_run_finishes_the_plan():
    def faulting(case, device, opts):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    module = types.SimpleNamespace(NAME="layer_norm",
                                   PROVIDERS={"lk-cuda": faulting,
                                              "torch": layer_norm.PROVIDERS["torch"]})
    opts, plan = _tiny_plan()
    plan = [PlanItem(module, item.case, ["torch", "lk-cuda"]) for item in plan]
    first = _fast_runner(opts)
    with pytest.raises(DeviceFault):
        first.run(plan)
    saved = json.loads(json.dumps(first.results.as_dict()))
    assert ([r["mode"] for r in saved["rows"]] == ["fwd"]
            and saved["excluded"] == [["layer_norm", "lk-cuda"]])
    assert saved["skipped"][0]["kind"] == "fault"
    second = Runner(CPU, opts, first.timer, echo=lambda s: None, resume=saved)
    results = second.run(plan)
    assert ([(r["mode"], r["provider"]) for r in results.rows]
            == [("fwd", "torch"), ("fwd+bwd", "torch")])
    assert ([(s["mode"], s["kind"]) for s in results.skipped]
            == [("fwd", "fault"), ("fwd+bwd", "excluded")])


def test_time_budget_skips_what_is_left():
    opts, plan = _tiny_plan()
    runner = _fast_runner(opts)
    runner.deadline = time.monotonic() - 1
    results = runner.run(plan)
    assert not results.rows and {s["kind"] for s in results.skipped} == {"budget"}


def test_plots_are_written(tmp_path):
    rows = []
    for op, x_name, metric in (("attention", "seq_len", "tflops"), ("softmax", "hidden", "gbps")):
        for provider in ("lk-triton", "torch"):
            for x in (1024, 4096):
                rows.append(_row(provider, random.uniform(0.1, 1), op=op, x=x, x_name=x_name,
                                 device="Fake GPU", **{metric: random.uniform(1, 100)}))
    rows.append(_row("torch", 1.0, op="copy", mode="d2d", gbps=100.0))
    paths = report.plot_ops(rows, str(tmp_path / "plots"))
    assert sorted(os.path.basename(p) for p in paths) == ["attention.png", "softmax.png"]
    grid = report.plot_grid(rows, str(tmp_path / "grid.png"))
    for path in paths + [grid]:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- CLI

def test_register_adds_the_bench_subcommand():
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "softmax", "--quick", "--seq-lens", "64,128"])
    assert args.func is cli.run and args.ops == ["softmax"] and args.seq_lens == (64, 128)


def test_quick_cli_run_on_cpu(tmp_path, capsys):
    code = cli.main(["attention", "layer_norm", "--quick", "--device", "cpu", "--seq-lens", "64",
                     "--head-dim", "16", "--hidden-sizes", "65", "--modes", "fwd",
                     "--providers", "torch,sdpa-math,sdpa-efficient,lk-triton,lk-cuda",
                     "--csv", str(tmp_path / "b.csv"), "--json", str(tmp_path / "b.json"),
                     "--plot", str(tmp_path / "plots")])
    out = capsys.readouterr().out
    assert code == 0
    assert "Triton interpreter is not benchmarked" in out
    data = json.loads((tmp_path / "b.json").read_text())
    measured = {(r["op"], r["provider"]) for r in data["rows"]}
    assert {("attention", "torch"), ("attention", "sdpa-math"), ("layer_norm", "torch")} <= measured
    assert all(r["provider"] != "lk-triton" for r in data["rows"])
    assert any(s["provider"] == "sdpa-efficient" and "CUDA only" in s["reason"]
               for s in data["skipped"])
    attention_rows = [r for r in data["rows"] if r["op"] == "attention"]
    assert {r["variant"] for r in attention_rows} == {"causal", "non-causal"}
    assert all(r["tflops"] > 0 for r in attention_rows)
    assert os.path.exists(tmp_path / "plots" / "attention.png")


def test_quick_cross_entropy_run_with_the_inplace_providers(tmp_path, capsys):
    """lk-cuda-inplace is timed in fwd+bwd (on the C++ CPU kernels) and refuses bwd, whose
    retained graph it would break; lk-triton-inplace is not timed under the interpreter."""
    code = cli.main(["cross_entropy", "--quick", "--device", "cpu", "--hidden-sizes", "33",
                     "--modes", "bwd,fwd+bwd", "--providers", "lk-cuda-inplace,lk-triton-inplace",
                     "--json", str(tmp_path / "b.json")])
    assert code == (0 if extension_status()[0] else 2)  # 2: nothing could run
    data = json.loads((tmp_path / "b.json").read_text())
    skipped = {(s["mode"], s["provider"]): s["reason"] for s in data["skipped"]}
    assert "Triton interpreter is not benchmarked" in skipped[("fwd+bwd", "lk-triton-inplace")]
    assert "cannot replay" in skipped[("bwd", "lk-cuda-inplace")]
    if extension_status()[0]:
        measured = [(r["mode"], r["provider"]) for r in data["rows"] if r["op"] == "cross_entropy"]
        assert measured == [("fwd+bwd", "lk-cuda-inplace")]


@pytest.mark.parametrize("argv", [["no_such_op"], ["softmax", "--modes", "sideways"],
                                  ["--suite", "standard", "--device", "cpu"]])
def test_bad_arguments_exit_2(argv, capsys):
    assert cli.main(argv) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("argv,why", [
    (["attention", "--providers", "liger"], "none is a provider of attention"),
    (["softmax", "--modes", "decode"], "softmax has no such case (its modes: fwd, bwd, fwd+bwd)"),
    (["gpt_train", "--modes", "fwd"], "gpt_train has no such case (its modes: train)"),
    (["--modes", "train"], "nothing to measure"),
    (["attention", "softmax", "--providers", "sdpa-math"], "none is a provider of softmax"),
])
def test_nothing_matching_exits_2_before_measuring(argv, why, capsys):
    assert cli.main([*argv, "--quick", "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert not out and len(err.strip().splitlines()) == 1 and why in err


def test_modes_select_gpt_train_steps():
    args = _parse(["gpt_train", "--modes", "train", "--quick", "--device", "cpu"])
    plan = cli.build_plan(args, cli.options(args), CPU)
    assert plan and {i.case.mode for i in plan} == {"train"}


def test_nothing_that_could_run_exits_2_with_the_reasons(tmp_path, capsys):
    code = cli.main(["attention", "--quick", "--device", "cpu", "--seq-lens", "64", "--head-dim",
                     "16", "--modes", "fwd", "--providers", "lk-triton",
                     "--json", str(tmp_path / "b.json")])
    assert code == 2
    err = capsys.readouterr().err
    assert "nothing could run" in err and "Triton interpreter is not benchmarked" in err
    assert json.loads((tmp_path / "b.json").read_text())["skipped"]  # what was tried is kept


@pytest.mark.parametrize("option,where", [("--csv", "folder"), ("--json", "folder"),
                                          ("--plot-grid", "folder"), ("--plot", "file"),
                                          ("--csv", "under a file")])
def test_unwritable_outputs_exit_2_before_measuring(option, where, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    path = {"folder": tmp_path, "file": tmp_path / "file",
            "under a file": tmp_path / "file" / "b.csv"}[where]
    assert cli.main(["softmax", "--quick", "--device", "cpu", option, str(path)]) == 2
    out, err = capsys.readouterr()
    assert not out and err.startswith(f"llm-kernels bench: error: {option} {path}: ")


def _parse(argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("seconds", ["0", "-5", "nan", "soon"])
def test_time_budget_must_be_positive(seconds, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(["softmax", "--time-budget", seconds])
    assert exc.value.code == 2 and "--time-budget" in capsys.readouterr().err
    assert _parse(["--time-budget", "0.5"]).time_budget == 0.5


@pytest.mark.parametrize("argv,variants", [
    (["--causal", "attention"], "on"), (["--no-causal", "attention"], "off"),
    (["attention"], "both"), (["attention", "--causal"], "on")])
def test_causal_is_a_flag_that_never_swallows_the_op(argv, variants):
    args = _parse(argv)
    assert args.ops == ["attention"] and cli.options(args).causal == variants


def test_bad_backend_environment_variable_exits_2(monkeypatch, capsys):
    """``python -m llm_kernels.bench`` checks $LLM_KERNELS_BACKEND as ``llm-kernels`` does."""
    monkeypatch.setenv("LLM_KERNELS_BACKEND", "bogus")
    assert cli.main(["softmax", "--quick"]) == 2
    assert "LLM_KERNELS_BACKEND" in capsys.readouterr().err


def test_every_provider_has_its_own_plot_color():
    providers = {p for m in cli.OPS.values() for p in m.PROVIDERS}
    providers |= {p for i in suite.standard_plan() for p in i.providers}
    colors = {p: report.provider_color(p) for p in providers}
    assert len(set(colors.values())) == len(providers), colors
    assert report.UNKNOWN_PROVIDER_COLOR not in colors.values()


def test_standard_suite_covers_the_targets():
    plan = suite.standard_plan()
    cases = {(i.case.op, i.case.mode, i.case.variant, i.case.x) for i in plan}
    for mode in ("fwd", "bwd"):
        for seq_len in (4096, 8192, 16384):
            for variant in ("causal", "non-causal"):
                assert ("attention", mode, variant, seq_len) in cases
    decodes = [i.case for i in plan if i.case.mode == "decode"]
    assert [(c.variant, c.extra["cuda_graph"]) for c in decodes] == [("", False),
                                                                     ("cuda-graph", True)]
    for decode in decodes:
        assert decode.params == {"B": 8, "H": 32, "Hkv": 8, "Lq": 1, "Lk": 16384, "D": 128}
    assert {("layer_norm", "fwd+bwd", "", 4096), ("layer_norm", "fwd+bwd", "", 8192),
            ("feed_forward", "fwd", "", 4096), ("cross_entropy", "fwd+bwd", "", 131072)} <= cases
    cross_entropy_item = next(i for i in plan if i.case.op == "cross_entropy")
    assert {"lk-triton", "lk-triton-inplace", "torch"} <= set(cross_entropy_item.providers)
    first_compile = next(n for n, i in enumerate(plan) if "torch-compile" in i.providers)
    assert all(i.providers == ["torch-compile"] for i in plan[first_compile:])


def test_determinism_check_reports_identical_and_skipped_backends(device):
    shape = {"B": 1, "H": 2, "L": random.randint(2, 40), "D": 16}
    checks = suite.determinism_checks(device, [], echo=lambda s: None, shape=shape,
                                      backends=("torch", "triton", "no-such-backend"))
    results = {(c["provider"], c["variant"]): c["result"] for c in checks}
    for variant in ("causal", "non-causal"):  # on CPU, triton runs through the interpreter
        assert results[("lk-torch", variant)] == results[("lk-triton", variant)] == "identical"
        assert results[("lk-no-such-backend", variant)] == "skipped"
    assert "ValueError" in checks[-1]["detail"]


def test_determinism_fault_is_recorded_then_resumed(monkeypatch):
    def fake(backend, causal, device, shape):
        if backend == "cuda":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return {"result": "identical", "detail": ""}
    monkeypatch.setattr(suite, "backward_twice_identical", fake)
    checks = []
    with pytest.raises(DeviceFault):
        suite.determinism_checks(CPU, checks, echo=lambda s: None)
    assert [c["result"] for c in checks] == ["identical", "identical", "fault"]
    suite.determinism_checks(CPU, checks, echo=lambda s: None)
    assert [(c["provider"], c["variant"], c["result"]) for c in checks[3:]] == [
        ("lk-cuda", "causal", "skipped")]


# ----------------------------------------------------------------------------- GPU check

def _bench_rows(copy_gbps):
    rows = [_row("torch", 1.0, op="copy", mode="d2d", gbps=copy_gbps)]
    times = {}
    for variant in ("causal", "non-causal"):
        for x in (4096, 8192):
            shape = f"B=1 H=16 Hkv=16 Lq={x} Lk={x} D=128"
            for provider in ("lk-triton", "sdpa-flash", "sdpa-cudnn", "torch"):
                times[(variant, x, provider)] = random.uniform(0.5, 2.0)
                rows.append(_row(provider, times[(variant, x, provider)], op="attention",
                                 mode="fwd", variant=variant, shape=shape, x=x, dtype="bf16"))
    decode_ms = {variant: random.uniform(0.1, 0.3) for variant in ("", "cuda-graph")}
    for variant, ms in decode_ms.items():
        rows.append(_row("lk-triton", ms, op="attention", mode="decode", variant=variant,
                         dtype="bf16", shape="B=8 H=32 Hkv=8 Lq=1 Lk=16384 D=128", x=16384))
    return rows, times, decode_ms


def test_summary_targets_from_bench_rows():
    copy = random.uniform(1000, 4000)
    rows, times, decode_ms = _bench_rows(copy)
    checks = [{"check": "determinism", "provider": "lk-triton", "variant": "causal",
               "result": "identical", "detail": ""}]
    found = {t.what: t for t in summarize.targets({"rows": rows, "checks": checks})}
    for variant in ("causal", "non-causal"):
        expected = min(min(times[(variant, x, "sdpa-flash")], times[(variant, x, "sdpa-cudnn")])
                       / times[(variant, x, "lk-triton")] for x in (4096, 8192))
        target = found[f"attn fwd {variant} lk-triton / best SDPA"]
        assert target.value == pytest.approx(expected)
        assert target.status == ("MET" if expected >= 1.0 else "MISSED")
    speedup = found["attn fwd L8k causal speedup lk-triton"]
    assert speedup.value == pytest.approx(times[("non-causal", 8192, "lk-triton")]
                                          / times[("causal", 8192, "lk-triton")])
    kv_read_ms = 2 * 8 * 8 * 16384 * 128 * 2 / (copy * 1e9) * 1e3
    assert found["decode lk-triton time / KV read time"].value == pytest.approx(
        decode_ms[""] / kv_read_ms)
    assert found["decode in a CUDA graph lk-triton time / KV read time"].value == pytest.approx(
        decode_ms["cuda-graph"] / kv_read_ms)
    assert found["attn fwd causal lk-cuda / best SDPA"].status == "n/a"
    assert found["bwd bit-identical lk-triton causal"].status == "MET"


def test_summary_training_step_targets_pair_eager_and_graph_rows():
    """Issue 6: each lk step against torch SDPA's, eager against eager and CUDA graph against
    CUDA graph."""
    shape = "B=8 T=1024 layers=12 d=768 V=50304"
    ms = {p: random.uniform(20, 90) for p in ("lk-auto", "torch-sdpa", "lk-auto-graph",
                                              "torch-sdpa-graph", "lk-cuda-graph")}
    rows = [_row(p, t, op="gpt_train", mode="train", variant="gpt2-small", shape=shape)
            for p, t in ms.items()]
    found = {t.what: t for t in summarize.targets({"rows": rows})}
    assert found["GPT-2 small train step lk-auto vs torch SDPA"].value == pytest.approx(
        ms["torch-sdpa"] / ms["lk-auto"])
    for provider in ("lk-auto", "lk-cuda"):
        target = found[f"GPT-2 small step in a CUDA graph {provider} vs torch SDPA"]
        assert target.value == pytest.approx(ms["torch-sdpa-graph"] / ms[provider + "-graph"])
        assert target.status == ("MET" if target.value >= 1.15 else "MISSED")
    assert found["GPT-2 small step in a CUDA graph lk-triton vs torch SDPA"].status == "n/a"


def test_summary_cross_entropy_memory_target_reads_the_inplace_provider():
    """Issue 4's peak-memory target reads lk-triton-inplace; lk-triton's ratio is information."""
    peaks = {"torch": 6144.0, "lk-triton": 2049.0, "lk-triton-inplace": 1.0}
    rows = [_row(p, 1.0, op="cross_entropy", mode="fwd+bwd", shape="N=8192 V=131072",
                 peak_mb=peak, dtype="bf16") for p, peak in peaks.items()]
    found = {t.what: t for t in summarize.targets({"rows": rows})}
    inplace = found["cross_entropy peak mem lk-triton-inplace / torch"]
    assert inplace.value == pytest.approx(1 / 6144) and inplace.status == "MET"
    default = found["cross_entropy peak mem lk-triton / torch"]
    assert default.value == pytest.approx(2049 / 6144) and default.status == "info"


def test_summary_keeps_the_profile_tables_and_autotune_choices(tmp_path):
    """The profile step's tables reach the markdown (the profiler's own log lines do not), and so
    do the autotuners' choices from bench.json."""
    ms = round(random.uniform(1, 9), 3)
    table = [("== lk-triton: 61.20 ms/step under the profiler (133856 tokens/s), "
              "kernels 58.1 ms/step"),
             f"{'kernel':<78} {'calls':>6} {'ms/step':>8} {'share':>6}",
             f"{'_attn_bwd_dkdv_kernel':<78} {24:>6} {ms:>8.3f} {31.5:>5.1f}%",
             f"{'host op (time including children; share of the profiled step)':<78} "
             f"{'calls':>6} {'ms/step':>8} {'share':>6}",
             f"{'autograd::engine::evaluate_function: LayerNormFunctionBackward':<78} "
             f"{24:>6} {ms:>8.3f} {12.5:>5.1f}%"]
    log = "\n".join(["@@info mode=full", "@@begin profile: python -m ...",
                     "[W1126 profiler.cpp] CUPTI warning", *table[:2],
                     "STAGE:2026-11-26 ActivityProfilerController.cpp:314] Completed Stage",
                     *table[2:], "@@step profile status=ok rc=0 secs=30"])
    (tmp_path / "gpu_check.log").write_text(log)
    block = random.choice([64, 128])
    autotune = {"_matmul_kernel": {"(8192, 768, 3072)": f"BLOCK_M: {block}, num_warps: 8"}}
    (tmp_path / "bench.json").write_text(json.dumps({"rows": [], "autotune": autotune}))
    summary = summarize.summarize(str(tmp_path))
    assert summary["profile"] == table
    md = summarize.format_markdown(summary, None, None)
    assert "\n".join(["```", *table, "```"]) in md
    assert f"_matmul_kernel (8192, 768, 3072): BLOCK_M: {block}, num_warps: 8" in md


@pytest.mark.parametrize("crashed", [False, True])
def test_summary_keeps_the_host_overhead_table_and_a_native_crash(tmp_path, crashed):
    """The host-overhead table reaches the markdown; the native probe's output and the cuda-gdb
    backtrace only when the probe failed."""
    us = round(random.uniform(10, 90), 1)
    table = [f"{'op':<30} {'mode':<10} {'torch':>8} {'lk-triton':>10}", "-" * 60,
             f"{'decode':<30} {'fwd':<10} {us:>8.1f} {2 * us:>10.1f}"]
    probe = ["CXX=/opt/gcc/bin/g++", "Fatal Python error: Segmentation fault"]
    log = ["@@info mode=full", "@@begin native-probe: bash scripts/native_probe.sh", *probe,
           f"@@step native-probe status={'failed' if crashed else 'ok'} "
           f"rc={139 if crashed else 0} secs=5",
           "@@begin host-overhead: python -m ...", "warming up", *table,
           "@@step host-overhead status=ok rc=0 secs=12"]
    if crashed:
        log += ["@@begin native-backtrace: cuda-gdb ...", "#0  0x00007f in __cxa_throw ()",
                "@@step native-backtrace status=ok rc=0 secs=40",
                "@@begin native-probe-system-gxx: bash scripts/native_probe.sh",
                "DONE 229 cases, 0 failed", "@@step native-probe-system-gxx status=ok rc=0 secs=9"]
    (tmp_path / "gpu_check.log").write_text("\n".join(log))
    summary = summarize.summarize(str(tmp_path))
    assert summary["host_overhead"] == table
    md = summarize.format_markdown(summary, None, None)
    assert "\n".join(["```", *table, "```"]) in md
    assert ("#0  0x00007f in __cxa_throw ()" in md) == crashed
    assert ("Segmentation fault" in md) == crashed
    assert ("--- native-probe-system-gxx: ok (rc=0) ---\nDONE 229 cases" in md) == crashed


def test_summary_reads_the_log_and_verify(tmp_path):
    passed, failed = random.randint(1, 99), random.randint(0, 9)
    log = "\n".join([
        "@@info mode=full", "@@info gpu=NVIDIA H100 80GB HBM3, 81559 MiB, 580.1",
        "@@info commit=abc123", "@@info date=2026-11-20T10:00Z",
        "@@begin build: pip install", "compiling", "@@step build status=ok rc=0 secs=93",
        "@@begin pytest-cuda: pytest -m cuda", "....F",
        f"{failed} failed, {passed} passed, 2 skipped in 41.20s",
        "@@step pytest-cuda status=failed rc=1 secs=45",
        "@@begin memcheck: compute-sanitizer", "========= ERROR SUMMARY: 0 errors",
        "@@step memcheck status=ok rc=0 secs=80"])
    (tmp_path / "gpu_check.log").write_text(log)
    rows = [{"op": "attention", "passed": True, "note": ""}] * passed + \
        [{"op": "softmax", "passed": False, "note": ""}] * failed + \
        [{"op": "swiglu", "passed": False, "note": "skipped: no kernel"}]
    (tmp_path / "verify.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    bench_rows, _, _ = _bench_rows(3000.0)
    (tmp_path / "bench.json").write_text(json.dumps({"environment": {}, "rows": bench_rows,
                                                     "skipped": [], "checks": []}))
    summary = summarize.summarize(str(tmp_path))
    assert summary["gpu"].startswith("NVIDIA H100") and summary["commit"] == "abc123"
    assert summary["steps"]["pytest-cuda"]["pytest"] == {"failed": failed, "passed": passed,
                                                         "skipped": 2}
    assert summary["steps"]["memcheck"]["sanitizer"] == "ERROR SUMMARY: 0 errors"
    assert summary["verify"] == {"passed": passed, "failed": failed, "skipped": 1}
    assert summary["copy_gbps"] == 3000.0
    assert summarize.exit_code(summary) == 1
    text = summarize.format_text(summary)
    assert "GPU CHECK SUMMARY" in text and f"{passed} passed" in text
    path = summarize.write_results(summary, str(tmp_path), str(tmp_path / "results"))
    assert os.path.basename(path) == "2026-11-20-nvidia-h100-80gb-hbm3-abc123.md"
    assert "| #3 | attn fwd causal lk-triton / best SDPA |" in open(path).read()


FAULTED_LOG = "\n".join([
    "@@info mode=full", "@@info gpu=NVIDIA H100 80GB HBM3", "@@info date=2026-11-27T05:00Z",
    "@@begin build: pip", "@@step build status=ok rc=0 secs=120",
    "@@begin bench: python -m llm_kernels.bench",
    "  skip attention lk-triton: [fault] RuntimeError: CUDA error: an illegal memory access",
    "@@step bench status=failed rc=3 secs=60",
    "@@begin bench: python -m llm_kernels.bench --resume", "12 rows measured",
    "@@step bench status=ok rc=0 secs=50"])
FAULT = {"op": "attention", "mode": "fwd", "variant": "causal", "shape": "B=1", "kind": "fault",
         "provider": "lk-triton", "reason": "RuntimeError: CUDA error: an illegal memory access"}
UNAVAILABLE = dict(FAULT, provider="flash-attn", kind="unavailable",
                   reason="flash_attn is not installed")


def _gpu_results(tmp_path, log, skipped, excluded=()):
    (tmp_path / "gpu_check.log").write_text(log)
    (tmp_path / "bench.json").write_text(json.dumps({
        "environment": {}, "rows": _bench_rows(3000.0)[0], "skipped": skipped, "checks": [],
        "excluded": [list(e) for e in excluded]}))
    return summarize.summarize(str(tmp_path))


def test_summary_reports_a_device_fault_and_fails(tmp_path):
    """A fault is a problem, the bench step reads failed then ok, and the exit code is 1."""
    summary = _gpu_results(tmp_path, FAULTED_LOG, [FAULT, UNAVAILABLE],
                           excluded=[("attention", "lk-triton")])
    assert [r["status"] for r in summary["steps"]["bench"]["runs"]] == ["failed", "ok"]
    bench_line = dict(summarize.step_lines(summary))["bench"]
    assert "failed rc=3 in 60 s, then ok in 50 s" in bench_line and "1 fault" in bench_line
    problems = summarize.problem_lines(summary)
    assert any("[fault] attention fwd causal lk-triton: RuntimeError" in p for p in problems)
    assert not any("flash-attn" in p for p in problems)
    assert summarize.exit_code(summary) == 1


def test_summary_lists_a_determinism_check_that_faulted():
    check = {"check": "determinism", "provider": "lk-cuda", "variant": "causal", "result": "fault",
             "detail": "RuntimeError: CUDA error: misaligned address"}
    problems = summarize.bench_problems({"skipped": [UNAVAILABLE], "checks": [check]})
    assert [(p["op"], p["provider"], p["kind"], p["reason"]) for p in problems] == [
        ("determinism", "lk-cuda", "fault", check["detail"])]


@pytest.mark.parametrize("status", ["ok", "failed", "timeout"])
def test_summary_exit_code_follows_the_bench_step(tmp_path, status):
    """Unavailable providers are normal; a failed or timed-out bench step fails the check."""
    log = "\n".join(["@@info mode=full", "@@begin bench: python -m llm_kernels.bench",
                     f"@@step bench status={status} rc={0 if status == 'ok' else 1} secs=9"])
    summary = _gpu_results(tmp_path, log, [UNAVAILABLE])
    assert summary["bench_errors"] == [] and summarize.problem_lines(summary) == []
    assert summarize.exit_code(summary) == (0 if status == "ok" else 1)


@pytest.mark.parametrize("what", ["missing", "empty"])
def test_summarize_needs_a_gpu_check_folder(what, tmp_path, capsys):
    out = tmp_path / "out"
    if what == "empty":
        out.mkdir()
    results = tmp_path / "results"
    assert summarize.main(["--out", str(out), "--results-dir", str(results)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not results.exists() and not (out / "summary.json").exists()


def test_gpu_check_script_parses():
    script = os.path.join(REPO, "bench", "gpu_check.sh")
    result = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# Stands in for python in a dry run of gpu_check.sh: the heavy steps answer at once with the
# lines and files the real ones produce; everything else (import probes, summarize.py) runs on
# the real interpreter. (Not a raw string: Python drops each backslash-newline, so a wrapped line
# below is one line of the script.)
STUB_PYTHON = """#!/usr/bin/env bash
case "$1 $2" in
  "-m pip") echo "Successfully installed llm-kernels"; exit 0 ;;
  "-m pytest")
    case " $* " in *" --co "*) echo "tests/test_a.py::test_one"; \
echo "tests/test_a.py::test_two[x]"; exit 0 ;; esac
    echo "failure log: $LLM_KERNELS_FAILURE_LOG"; echo "....s"; \
echo "4 passed, 1 skipped in 0.12s"; exit 0 ;;
  "-m llm_kernels")
    while [ $# -gt 0 ]; do [ "$1" = --json ] && printf '%s' \
'{"meta": {}, "rows": [{"op": "attention", "passed": true, "note": ""}]}' > "$2"; shift; done
    echo "verify: 1 passed"; exit 0 ;;
  "-m llm_kernels.bench")
    while [ $# -gt 0 ]; do [ "$1" = --json ] && printf '%s' \
'{"environment": {}, "rows": [], "skipped": [], "checks": [], \
"excluded": [], "autotune": {}}' > "$2"; shift; done
    echo "0 rows measured"; exit 0 ;;
  "-X faulthandler")
    if [ -n "${STUB_NATIVE_CRASH:-}" ]; then echo "PASS attention/ok"; kill -SEGV $$; fi
    echo "DONE 229 cases, 0 failed"; exit 0 ;;
  "scripts/check_triton_compile.py --no-usage")  # the package is not installed yet
    case ":${PYTHONPATH:-}:" in *":@REPO@:"*) echo "ok   _attn_fwd_kernel warps=4"; exit 0 ;; esac
    echo "FAIL: No module named 'llm_kernels'"; exit 1 ;;
  "-c import torch, llm_kernels._C"*) exit 0 ;;
  "-c import torch"*) echo "torch: (stub)"; exit 0 ;;
  "-m llm_kernels.bench.sweep")
    case " $* " in *" --sweeps attention_ws "*)
      echo "== attention, no mask (stub)"; echo "D mode causal kernels ms"; \
echo "128 fwd False ws 1.0"; exit 0 ;; esac
    echo "== decode (stub): programs per SM"; echo "Lk per_sm ms"; echo "16384 4* 0.201"; exit 0 ;;
  "-m llm_kernels.bench.host_overhead")
    echo "op                             mode          torch   lk-triton"
    echo "decode                         fwd            24.1       61.5"
    exit 0 ;;
  "-m llm_kernels.bench.profile_step")
    echo "== lk-triton: 61.20 ms/step under the profiler (133856 tokens/s), kernels 58.10 ms/step"
    echo "kernel\
                                                                          calls  ms/step  share"
    echo "_attn_bwd_dkdv_kernel\
                                                              24   18.300  31.5%"
    exit 0 ;;
esac
[ "$1" = setup.py ] && exit 0
exec "@REAL@" "$@"
"""


def _dry_run(tmp_path, *args, **env_vars):
    """gpu_check.sh with the stub python: (stdout, the log, {step: status})."""
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON.replace("@REAL@", sys.executable).replace("@REPO@", REPO))
    stub.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(stub), OUT=str(out),
               EXT_BUILD_STAMP=str(tmp_path / "stamp"), **env_vars)
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_check.sh"), *args], env=env,
                            capture_output=True, text=True, timeout=600)
    log = (out / "gpu_check.log").read_text()
    steps = dict(line.split()[1:3] for line in log.splitlines() if line.startswith("@@step "))
    return result.stdout, log, steps


# Stands in for compute-sanitizer: drops its options and runs the command after them. (Not a raw
# string: Python drops the backslash-newline, so the wrapped line is one line of the script.)
STUB_SANITIZER = """#!/usr/bin/env bash
while [ "${1#-}" != "$1" ]; do case "$1" in \
--tool|--error-exitcode|--print-limit|--target-processes) shift 2 ;; *) shift ;; esac; done
"$@"; rc=$?; echo "========= ERROR SUMMARY: 0 errors"; exit $rc
"""


def test_gpu_check_bench_call_resumes_the_first_calls_benchmark(tmp_path):
    """--bench with BENCH_RESUME: the earlier call's bench.json is copied into the output folder
    and the bench resumes from it; no cuda tests or profile run; memcheck and racecheck over the
    CUDA C++ kernels' small tests (before the bench: the sweeps are cut first), the tests of
    what the machine built, verify and the rest of the tests do."""
    earlier = tmp_path / "earlier.json"
    earlier.write_text('{"environment": {}, "rows": [], "skipped": [], "checks": []}')
    finished = tmp_path / "cuda_finished.txt"
    finished.write_text("tests/test_a.py::test_one\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "compute-sanitizer").write_text(STUB_SANITIZER)
    (bin_dir / "compute-sanitizer").chmod(0o755)
    stdout, log, steps = _dry_run(tmp_path, "--bench", BENCH_RESUME=str(earlier),
                                  CUDA_RESUME=str(finished), PATH=f"{bin_dir}:{os.environ['PATH']}")
    begins = {line.split(":")[0].split()[1]: line for line in log.splitlines()
              if line.startswith("@@begin ")}
    assert "--resume" in begins["bench"].split() and steps["bench"] == "status=ok"
    leftover = begins["pytest-cuda-rest"].split()  # the cuda test call 1 did not finish
    assert "tests/test_a.py::test_two[x]" in leftover
    assert "tests/test_a.py::test_one" not in leftover and steps["pytest-cuda-rest"] == "status=ok"
    assert "tests/test_bad_input.py" in begins["pytest-rest-core"].split()
    assert "--ignore tests/test_bad_input.py" in begins["pytest-rest"]
    for tool in ("memcheck", "racecheck"):
        assert f"--tool {tool}" in begins[tool]
        assert "-k test_cuda_attention and (tiny_shapes or " in begins[tool]
        assert steps[tool] == "status=ok"
    for step in ("pytest-rest-core", "pytest-rest", "verify", "sweep-ws", "sweep"):
        assert steps[step] == "status=ok", step
    assert "pytest-cuda" not in steps and "profile" not in steps
    order = [line.split(":")[0].split()[1] for line in log.splitlines()
             if line.startswith("@@begin ")]
    assert order.index("racecheck") < order.index("bench") < order.index("sweep")  # sanitizer first
    assert order.index("sweep-ws") < order.index("sweep")
    assert "--sweeps attention_ws" in begins["sweep-ws"]
    assert "attention_ws" not in begins["sweep"] and "--sweeps cuda_attention," in begins["sweep"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"]["memcheck"]["status"] == "ok"
    assert summary["sweep"] == ["== attention, no mask (stub)", "D mode causal kernels ms",
                                "128 fwd False ws 1.0", "== decode (stub): programs per SM",
                                "Lk per_sm ms", "16384 4* 0.201"]
    assert stdout.splitlines()[-1].startswith("targets: ")


def test_gpu_check_keeps_a_build_of_the_same_sources(tmp_path):
    """A second call on the still-warm machine keeps the extension the first one built (the
    stamp matches setup.py and csrc/); a stamp of other sources builds again."""
    _, first, steps = _dry_run(tmp_path, "--bench")
    assert "@@begin build:" in first and steps["build"] == "status=ok"
    _, second, steps = _dry_run(tmp_path, "--bench")
    assert "@@begin build:" not in second and "already built here: kept" in second
    assert steps["build"] == "status=ok"
    (tmp_path / "stamp").write_text("0123456789abcdef-9.0\n")
    _, third, _ = _dry_run(tmp_path, "--bench")
    assert "@@begin build:" in third


def test_gpu_check_native_crash_rebuilds_with_the_system_compiler(tmp_path):
    """A probe that dies of a signal marks the crash; the extension is rebuilt with /usr/bin/g++
    (the configured compiler being another one) and probed again; the summary shows both."""
    if not os.path.exists("/usr/bin/g++"):
        pytest.skip("no /usr/bin/g++ on this machine")
    other = tmp_path / "other-g++"
    other.write_text("#!/bin/sh\nexec /usr/bin/g++ \"$@\"\n")
    other.chmod(0o755)
    _, log, steps = _dry_run(tmp_path, GPU_CHECK_BUDGET="415", STUB_NATIVE_CRASH="1",
                             CXX=str(other))
    assert steps["native-probe"] == "status=failed" and "rc=139" in log
    assert steps["native-rebuild"] == "status=ok"
    assert steps["native-probe-system-gxx"] == "status=failed"
    rebuild = next(line for line in log.splitlines() if line.startswith("@@begin native-rebuild"))
    assert "setup.py build_ext --inplace" in rebuild
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert any(line.startswith("--- native-probe-system-gxx: failed") for line in summary["native"])


def test_gpu_check_names_failing_tests_from_the_failure_log(tmp_path):
    """The pytest steps get LLM_KERNELS_FAILURE_LOG inside the output folder (tests/conftest.py
    appends each failure there), and the summary lists what it holds."""
    stdout, log, _ = _dry_run(tmp_path, GPU_CHECK_BUDGET="415")
    failure_log = tmp_path / "out" / "test_failures.txt"
    assert f"failure log: {failure_log}" in log and failure_log.read_text() == ""
    failure_log.write_text("=== FAILED tests/test_x.py::test_y[cuda] (call, 3.2 s)\n"
                           "    assert err < tol\nE   AssertionError: rel 3e-2 > 1e-2\n"
                           "E   assert 0.03 < 0.01\n")
    summary = summarize.summarize(str(tmp_path / "out"))
    assert summary["test_failures"] == [{"test": "tests/test_x.py::test_y[cuda]", "phase": "call",
                                         "secs": 3.2, "error": "AssertionError: rel 3e-2 > 1e-2"}]
    assert summarize.exit_code(summary) == 1
    assert any("tests/test_x.py::test_y[cuda]" in line for line in summarize.problem_lines(summary))
    assert "## Failed tests" in summarize.format_markdown(summary, None, None)


@pytest.mark.parametrize("budget", [415, 30], ids=["full_budget", "budget_spent"])
def test_gpu_check_dry_run_runs_every_step_and_prints_the_summary(tmp_path, budget):
    """gpu_check.sh end to end with the heavy commands stubbed: every step is run (or skipped for
    lack of time, with a note), the output folder stays small and the summary comes last."""
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON.replace("@REAL@", sys.executable).replace("@REPO@", REPO))
    stub.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(stub), OUT=str(out), GPU_CHECK_BUDGET=str(budget),
               EXT_BUILD_STAMP=str(tmp_path / "stamp"))
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_check.sh")], env=env,
                            capture_output=True, text=True, timeout=600)
    log = (out / "gpu_check.log").read_text()
    steps = dict(line.split()[1:3] for line in log.splitlines() if line.startswith("@@step "))
    lines = result.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if "GPU CHECK SUMMARY" in line)
    assert not any(" END " in line or " BEGIN " in line for line in lines[first:]), lines[first:]
    assert lines[-1].startswith("targets: ")
    # Without time, the steps that keep a reserve for later ones are skipped; the last ones
    # run on what is left.
    expected = "status=ok" if budget == 415 else "status=skipped"
    for name in ("build", "pytest-cuda", "verify"):
        assert steps.get(name) == expected, (name, steps)
    later = ("native-probe", "profile", "host-overhead", "bench")
    for name in later:
        assert steps.get(name) in ("status=ok", "status=skipped"), (name, steps)
    if budget == 415:
        assert all(steps[name] == "status=ok" for name in later)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["profile"][2].startswith("_attn_bwd_dkdv_kernel")
        assert summary["host_overhead"][1].startswith("decode")
        assert "@@info precompiled=8" in log and summary["precompiled"] == "8"
    assert len(list(out.iterdir())) <= 8


def test_conftest_writes_each_failure_to_the_failure_log(tmp_path):
    """tests/conftest.py appends a failing test's id, phase and error to LLM_KERNELS_FAILURE_LOG
    as it happens (passing tests write nothing there), and the id of every test that ran to its
    end, whatever its outcome, to LLM_KERNELS_FINISHED_LOG."""
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n\n"
        "def test_fails():\n    assert 2 + 2 == 5, 'arithmetic'\n\n"
        "def test_passes():\n    assert True\n\n"
        "@pytest.mark.skip(reason='not here')\ndef test_skipped():\n    pass\n")
    failure_log, finished_log = tmp_path / "failures.txt", tmp_path / "finished.txt"
    env = dict(os.environ, LLM_KERNELS_FAILURE_LOG=str(failure_log),
               LLM_KERNELS_FINISHED_LOG=str(finished_log),
               PYTHONPATH=os.path.join(REPO, "tests"))
    env.pop("PYTEST_XDIST_WORKER", None)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p",
                             "no:cacheprovider", "-c", os.devnull, "--rootdir", str(tmp_path),
                             str(tmp_path / "test_sample.py")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert "1 failed, 1 passed, 1 skipped" in result.stdout, result.stdout + result.stderr
    failed = summarize.test_failures(failure_log.read_text())
    assert [(f["test"].split("::")[-1], f["phase"]) for f in failed] == [("test_fails", "call")]
    assert "AssertionError: arithmetic" in failed[0]["error"]
    finished = [line.split("::")[-1] for line in finished_log.read_text().splitlines()]
    assert finished == ["test_fails", "test_passes", "test_skipped"]


def test_env_var_restores_what_was_there(monkeypatch):
    """bench.common.env_var (the TMA providers' and the sweeps' switch) puts back the previous
    value, or removes a variable that was not set."""
    from llm_kernels.bench.common import env_var
    monkeypatch.setenv("LK_TEST_SWITCH", "user")
    monkeypatch.delenv("LK_TEST_UNSET", raising=False)
    with env_var("LK_TEST_SWITCH", "1"), env_var("LK_TEST_UNSET", "1"):
        assert os.environ["LK_TEST_SWITCH"] == os.environ["LK_TEST_UNSET"] == "1"
    assert os.environ["LK_TEST_SWITCH"] == "user" and "LK_TEST_UNSET" not in os.environ


def test_standard_suite_items_picked_by_op_mode_and_provider():
    """--suite standard with OPs, --modes and --providers runs those items of the suite only;
    a selection with nothing in it is a usage error."""
    def plan(*argv):
        parser = argparse.ArgumentParser()
        cli.add_arguments(parser)
        args = parser.parse_args(["--suite", "standard", *argv])
        return cli.build_plan(args, cli.options(args), torch.device("cuda"))

    decode = plan("attention", "--modes", "decode", "--providers", "lk-cuda,sdpa-cudnn")
    assert len(decode) == 2 and all(i.case.mode == "decode" for i in decode)
    assert all(i.providers == ["lk-cuda", "sdpa-cudnn"] for i in decode)
    both = plan("feed_forward", "gpt_train")
    assert {i.module.NAME for i in both} == {"feed_forward", "gpt_train"}
    assert len(plan()) == len(suite.standard_plan())
    with pytest.raises(cli.UsageError, match="no item for softmax --modes decode"):
        plan("softmax", "--modes", "decode")
