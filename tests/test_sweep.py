"""bench/sweep.py: the launch-parameter sweeps run end to end (tiny sizes under the
interpreter here; the GPU check runs them at H100 sizes) and print one table per sweep."""
import os
import subprocess
import sys

import pytest

from llm_kernels.bench import sweep


def _run(*args, interpret="1"):
    env = dict(os.environ, TRITON_INTERPRET=interpret)
    return subprocess.run([sys.executable, "-m", "llm_kernels.bench.sweep", "--device", "cpu",
                           *args], env=env, capture_output=True, text=True, timeout=600)


def test_every_sweep_prints_its_table():
    out = _run("--quick")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    titles = [line for line in out.stdout.splitlines() if line.startswith("== ")]
    assert [t.split()[1] for t in titles] == ["layer_norm", "CUDA", "decode", "attention",
                                              "attention", "feed-forward"]
    cuda_rows = out.stdout.split("== CUDA attention")[1].splitlines()[2:10]
    assert [row.split()[:4] for row in cuda_rows] == [
        ["128", causal, mode, rows] for causal in ("False", "True") for mode in ("fwd", "bwd")
        for rows in ("16*", "32")]
    bwd_rows = out.stdout.split("== attention backward")[1].splitlines()[2:4]
    assert [row.split()[:2] for row in bwd_rows] == [["False", "pointer*"], ["False", "tma"]]
    tma_rows = out.stdout.split("== feed-forward")[1].splitlines()[2:]
    assert [row.split()[:2] for row in tma_rows] == [["fwd", "pointer*"], ["fwd", "tma"]]
    assert "failed" not in out.stdout
    rows = out.stdout.split("== decode")[0].splitlines()[2:]
    assert any(row.split()[1] == "auto" for row in rows) and len(rows) >= 3


@pytest.mark.parametrize("args,why", [(["--sweeps", "nope"], "unknown sweeps: nope")])
def test_bad_arguments_exit_2(args, why):
    out = _run(*args)
    assert out.returncode == 2 and why in out.stderr


def test_without_a_gpu_the_interpreter_is_required():
    out = _run("--quick", interpret="0")
    assert out.returncode == 2 and "TRITON_INTERPRET=1" in out.stderr


def test_a_failing_sweep_is_reported_and_the_others_run(monkeypatch, capsys):
    def broken(device, timer, quick):
        raise RuntimeError("out of resources")
    monkeypatch.setattr(sweep, "decode", broken)
    monkeypatch.setattr(sweep, "layer_norm_bwd", lambda device, timer, quick: ["== layer_norm ok"])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert sweep.main(["--device", "cpu", "--sweeps", "layer_norm_bwd,decode"]) == 1
    printed = capsys.readouterr().out
    assert "== layer_norm ok" in printed
    assert "== decode: failed: RuntimeError: out of resources" in printed
