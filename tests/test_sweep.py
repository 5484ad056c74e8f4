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


def _table_rows(stdout: str, title: str) -> list[list[str]]:
    """The data rows (split into cells) of the table whose title starts with ``== title``."""
    lines = stdout.split("== " + title, 1)[1].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.strip() or line.startswith("== "):
            break
        rows.append(line.split())
    return rows


def test_every_sweep_prints_its_table():
    out = _run("--quick")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    titles = [line for line in out.stdout.splitlines() if line.startswith("== ")]
    assert [t.split()[1] for t in titles] == ["attention,", "CUDA", "attention", "attention",
                                              "feed-forward", "decode", "layer_norm"]
    assert [row[:4] for row in _table_rows(out.stdout, "attention, no mask")] == [
        ["128", mode, "False", kernels] for mode in ("fwd", "bwd")
        for kernels in ("default*", "ws")]
    assert [row[:4] for row in _table_rows(out.stdout, "CUDA attention")] == [
        ["128", causal, mode, rows] for causal in ("False", "True") for mode in ("fwd", "bwd")
        for rows in ("16*", "32")]
    assert [row[:2] for row in _table_rows(out.stdout, "attention backward")] == [
        ["False", "pointer*"], ["False", "tma"]]
    assert [row[:2] for row in _table_rows(out.stdout, "feed-forward")] == [
        ["fwd", "pointer*"], ["fwd", "tma"], ["fwd", "tma+ws"]]
    assert "failed" not in out.stdout
    rows = _table_rows(out.stdout, "layer_norm")
    assert any(row[1] == "auto" for row in rows) and len(rows) >= 3


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
