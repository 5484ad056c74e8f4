"""The llm-kernels command: info and verify run and exit 0; bad arguments exit 2."""
import json
import os
import subprocess
import sys

import pytest


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "llm_kernels", *args], capture_output=True,
                          text=True, env=env, timeout=600)


def test_info_lists_backends():
    proc = _run("info")
    assert proc.returncode == 0, proc.stderr
    for word in ("torch", "triton", "cuda", "backends:", "default backend"):
        assert word in proc.stdout


def test_verify_torch_and_kernels_pass(tmp_path):
    path = tmp_path / "verify.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the interpreter is covered by the per-op tests
    proc = _run("verify", "--ops", "softmax", "layer_norm", "cross_entropy", "--json", str(path),
                env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAIL" not in proc.stdout and " 0 failed" in proc.stdout
    rows = json.loads(path.read_text())["rows"]
    assert {r["op"] for r in rows} == {"softmax", "layer_norm", "rms_norm", "cross_entropy"}
    assert all(r["passed"] for r in rows)
    assert {"torch"} <= {r["backend"] for r in rows}


def test_verify_whole_matrix_under_the_interpreter(tmp_path):
    """The whole verification matrix (what `llm-kernels verify --device cuda` runs on a GPU,
    minus the big shapes) passes on every CPU backend, Triton included."""
    from llm_kernels.backends import extension_status
    from llm_kernels.verify import CASE_BUILDERS
    path = tmp_path / "verify.json"
    proc = _run("verify", "--json", str(path), env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(path.read_text())["rows"]
    failed = [f"{r['op']} {r['backend']} {r['dtype']} {r['shape']} {r['output']}"
              for r in rows if not r["passed"]]
    assert not failed, failed
    assert {r["op"] for r in rows} >= set(CASE_BUILDERS)
    expected = {"torch", "triton"} | ({"cuda"} if extension_status()[0] else set())
    assert {r["backend"] for r in rows} == expected


def test_verify_reports_failure_with_exit_1(monkeypatch, capsys):
    from llm_kernels import cli, verify
    real = verify.run_case

    def broken(case, backend, dtype):
        rows = real(case, backend, dtype)
        rows[0].passed = False
        return rows
    monkeypatch.setattr(verify, "run_case", broken)
    assert cli.main(["verify", "--ops", "softmax", "--backends", "torch"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["verify", "--ops", "conv2d"], ["verify", "--backends", "tpu"],
                                  ["nonsense"]])
def test_bad_arguments_exit_2(args):
    proc = _run(*args)
    assert proc.returncode == 2
    assert proc.stderr.strip()
