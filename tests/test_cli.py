"""The llm-kernels command: info and verify run and exit 0; bad arguments exit 2."""
import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import llm_kernels as lk
from llm_kernels import cli, verify
from llm_kernels.backends import BACKENDS
from llm_kernels.bench import harness


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "llm_kernels", *args], capture_output=True,
                          text=True, env=env, timeout=600)


def test_info_lists_backends():
    proc = _run("info")
    assert proc.returncode == 0, proc.stderr
    for word in ("torch", "triton", "cuda", "backends:", "default backend"):
        assert word in proc.stdout


@pytest.mark.parametrize("on,off,line", [
    ("LLM_KERNELS_ATTENTION_TMA", "LLM_KERNELS_MATMUL_TMA",
     "triton TMA reads: attention on ($LLM_KERNELS_ATTENTION_TMA), feed-forward off "
     "($LLM_KERNELS_MATMUL_TMA)"),
    ("LLM_KERNELS_MATMUL_WS", "LLM_KERNELS_ATTENTION_WS",
     "triton warp-specialized loops: attention off ($LLM_KERNELS_ATTENTION_WS), feed-forward on "
     "($LLM_KERNELS_MATMUL_WS)")])
def test_info_shows_the_opt_in_switches(on, off, line):
    env = dict(os.environ, **{on: "1"})
    env.pop(off, None)
    proc = _run("info", env=env)
    assert proc.returncode == 0, proc.stderr
    assert line in proc.stdout


@pytest.mark.parametrize("value,shown", [("32", "32 query rows per warp"),
                                          ("24", "'24' query rows per warp is invalid (16 or 32)")])
def test_info_shows_the_cuda_attention_warp_rows(value, shown):
    if not cli.build_info().get("cuda"):
        pytest.skip("the extension was built without its CUDA kernels")
    proc = _run("info", env=dict(os.environ, LLM_KERNELS_CUDA_ATTENTION_WARP_ROWS=value))
    assert proc.returncode == 0, proc.stderr
    assert (f"cuda attention forward and dQ: {shown} ($LLM_KERNELS_CUDA_ATTENTION_WARP_ROWS)"
            in proc.stdout)


def test_verify_torch_and_kernels_pass(tmp_path):
    path = tmp_path / "verify.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the interpreter is covered by the per-op tests
    proc = _run("verify", "--ops", "softmax", "layer_norm", "rms_norm", "cross_entropy", "--json",
                str(path), env=env)
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
    real = verify.run_case

    def broken(case, backend, dtype):
        rows = real(case, backend, dtype)
        rows[0].passed = False
        return rows
    monkeypatch.setattr(verify, "run_case", broken)
    assert cli.main(["verify", "--ops", "softmax", "--backends", "torch"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_verify_interrupted_writes_the_finished_rows_and_exits_130(monkeypatch, tmp_path, capsys):
    """Ctrl-C (or a GPU check's time limit) mid-run: the cases that finished are printed and
    written to --json, marked interrupted, and the exit code is 130."""
    real, calls = verify.run_case, []

    def interrupted_third(case, backend, dtype):
        calls.append(case.shape)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(case, backend, dtype)
    monkeypatch.setattr(verify, "run_case", interrupted_third)
    path = tmp_path / "verify.json"
    assert cli.main(["verify", "--ops", "softmax", "--backends", "torch", "--json",
                     str(path)]) == 130
    data = json.loads(path.read_text())
    assert data["meta"]["interrupted"] is True
    assert {r["shape"] for r in data["rows"]} == set(calls[:2]) and data["rows"]
    assert all(r["passed"] for r in data["rows"])
    assert "interrupted" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["verify", "--ops", "conv2d"], ["verify", "--backends", "tpu"],
                                  ["verify", "--device", "foo"], ["verify", "--device", "meta"],
                                  ["nonsense"], ["train", "--data", "x", "--mlp", "relu"],
                                  ["generate", "--max-new-tokens", "abc"],
                                  ["bench", "--dtype", "fp8"]])
def test_bad_arguments_exit_2(args):
    """A bad argument: exit 2 and one line on stderr naming it (no usage block, no traceback)."""
    proc = _run(*args)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "error" in proc.stderr and "Traceback" not in proc.stderr


def _never_run(*args, **kwargs):
    raise AssertionError("verify ran a case after a bad argument")


def test_verify_named_backend_that_cannot_run_exits_2(monkeypatch, capsys):
    """Triton runs CPU tensors only under the interpreter: named explicitly without it, verify
    stops with the reason instead of reporting every case skipped."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(verify, "run_case", _never_run)
    assert cli.main(["verify", "--device", "cpu", "--backends", "triton"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "triton" in err and "TRITON_INTERPRET" in err


def test_verify_that_checked_nothing_exits_2(monkeypatch, capsys):
    def skipped(case, backend, dtype):
        return [verify.Row(case.op, backend, "float32", case.shape, "-", math.nan, math.nan,
                           math.nan, True, "skipped: no kernel for this call")]
    monkeypatch.setattr(verify, "run_case", skipped)
    assert cli.main(["verify", "--ops", "softmax", "--backends", "torch"]) == 2
    err = capsys.readouterr().err
    assert "nothing was checked" in err and "no kernel for this call" in err


def test_verify_json_goes_into_new_folders_as_strict_json(monkeypatch, tmp_path):
    """Parent folders are created, and a skipped row's errors are null, not NaN."""
    real = verify.run_case

    def with_a_skip(case, backend, dtype):
        return real(case, backend, dtype) + [verify.Row(
            case.op, "cuda", "float32", case.shape, "-", math.nan, math.nan, math.nan, True,
            "skipped: test")]
    monkeypatch.setattr(verify, "run_case", with_a_skip)
    path = tmp_path / "new" / "folder" / "verify.json"
    assert cli.main(["verify", "--ops", "softmax", "--backends", "torch", "--json", str(path)]) == 0

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")
    rows = json.loads(path.read_text(), parse_constant=no_constants)["rows"]
    skipped = [r for r in rows if r["note"]]
    assert skipped and all(r["max_abs"] is r["rel"] is r["torch_rel"] is None for r in skipped)
    assert all(isinstance(r["rel"], float) for r in rows if not r["note"])


@pytest.mark.parametrize("where", ["a folder", "under a file"])
def test_verify_unwritable_json_path_exits_2_before_running(where, monkeypatch, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    path = tmp_path if where == "a folder" else tmp_path / "file" / "verify.json"
    monkeypatch.setattr(verify, "run_case", _never_run)
    assert cli.main(["verify", "--ops", "softmax", "--json", str(path)]) == 2
    assert "--json" in capsys.readouterr().err


def test_verify_accepts_every_op_it_reports(tmp_path):
    path = tmp_path / "verify.json"
    assert cli.main(["verify", "--ops", "rms_norm", "swiglu", "--backends", "torch", "--json",
                     str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert {r["op"] for r in rows} == {"rms_norm", "swiglu"}
    assert set(verify.OPS) == {"attention", "layer_norm", "rms_norm", "softmax", "feed_forward",
                               "swiglu", "cross_entropy"}


def test_verify_subset_reruns_the_same_numbers():
    """An op verified alone sees the inputs and output gradients of the whole run."""
    def errors(ops):
        rows = verify.verify("cpu", ops=ops, backends=["torch"], seed=7, progress=None)
        return {(r.op, r.dtype, r.shape, r.output): r.rel for r in rows}
    together = errors(["layer_norm", "rms_norm", "feed_forward", "swiglu"])
    alone = {**errors(["rms_norm"]), **errors(["swiglu"])}
    assert alone and {k[0] for k in alone} == {"rms_norm", "swiglu"}
    assert alone == {k: v for k, v in together.items() if k in alone}


def test_verify_json_tags_match_the_bench(tmp_path):
    """verify's device name and commit are the bench's (one helper for both)."""
    path = tmp_path / "verify.json"
    assert cli.main(["verify", "--ops", "softmax", "--backends", "torch", "--json", str(path)]) == 0
    meta = json.loads(path.read_text())["meta"]
    env = harness.environment(torch.device("cpu"))
    assert (meta["device"], meta["commit"]) == (env["device"], env["commit"])


def test_info_shows_what_dispatch_picks_for_each_op():
    proc = _run("info")
    assert proc.returncode == 0, proc.stderr
    assert harness.device_name(torch.device("cpu")) in proc.stdout
    assert f"commit {harness.git_commit()}" in proc.stdout
    lines = proc.stdout.split("dispatch on cpu", 1)[1].splitlines()[1:]
    choices = dict(line.split(None, 1) for line in lines if line.startswith("  "))
    assert set(cli.representative_calls(torch.device("cpu"))) <= set(choices)
    for op, backend in ((op, choices[op].split()[0]) for op in cli.representative_calls(
            torch.device("cpu"))):
        assert backend in BACKENDS, (op, choices[op])


def test_info_dispatch_follows_the_default_backend(monkeypatch):
    monkeypatch.setenv("LLM_KERNELS_BACKEND", "torch")
    lines = cli.dispatch_lines(torch.device("cpu"))
    assert "default backend torch" in lines[0]
    assert len(lines) == 1 + len(cli.representative_calls(torch.device("cpu")))
    assert all(line.split()[1:] == ["torch", "(requested)"] for line in lines[1:])
    assert lk.dispatch_log() == []  # info leaves no decision of its own behind


@pytest.mark.parametrize("args", [["info"], ["verify", "--ops", "softmax"],
                                  ["bench", "softmax", "--quick"]])
def test_bad_backend_environment_variable_exits_2(args):
    proc = _run(*args, env={**os.environ, "LLM_KERNELS_BACKEND": "bogus"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "llm-kernels: error: $LLM_KERNELS_BACKEND must be one of "
        "('torch', 'triton', 'cuda', 'auto'), got 'bogus'"]


def _subcommand_help(name):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name].format_help()


def test_help_texts():
    assert "``" not in cli.build_parser().format_help()
    text = " ".join(_subcommand_help("verify").split())
    for words in ("--device DEVICE cpu, cuda or cuda:N", "--seed SEED seed of the random inputs",
                  "--big, --no-big"):
        assert words in text


@pytest.mark.parametrize("flag,big", [([], None), (["--big"], True), (["--no-big"], False)])
def test_verify_big_can_be_turned_on_and_off(flag, big, monkeypatch):
    """--no-big turns the large shapes off even on CUDA; no flag leaves the device default."""
    seen = {}
    monkeypatch.setattr(verify, "verify", lambda *a, **kw: seen.update(kw) or [])
    cli.main(["verify", "--device", "cpu", "--ops", "softmax", *flag])
    assert seen["big"] is big
