"""Every Triton kernel compiles for sm_90 (H100/H200) through its real launchers, here without a
GPU (``scripts/check_triton_compile.py --quick``: a fake CUDA driver, launches turned into
compile-only warmups). The interpreter runs the kernels' math but compiles nothing; this
catches lowering and ptxas errors and shared memory over the device limit."""
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                      "check_triton_compile.py")
KERNELS = ("_attn_fwd_kernel", "_attn_fwd_ws_kernel", "_attn_fwd_split_kernel",
           "_attn_fwd_combine_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel",
           "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_ws_kernel", "_attn_bwd_dq_ws_kernel",
           "_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel", "_softmax_fwd_kernel",
           "_softmax_bwd_kernel", "_cross_entropy_fwd_kernel", "_cross_entropy_bwd_kernel",
           "_matmul_kernel", "_matmul_tma_kernel", "_matmul_ws_kernel", "_column_sum_kernel",
           "_gate_up_kernel")


@pytest.mark.slow
def test_every_triton_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, SCRIPT, "--quick"], env=env, capture_output=True,
                         text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    compiled = {line.split()[1] for line in out.stdout.splitlines() if line.startswith("ok ")}
    assert compiled == set(KERNELS)
    assert out.stdout.rstrip().endswith("0 failures")


def test_the_check_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, SCRIPT, "--quick"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and "unset TRITON_INTERPRET" in out.stderr


def _run(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    return subprocess.run([sys.executable, SCRIPT, "--quick", "--no-usage", *args], env=env,
                          capture_output=True, text=True, timeout=600)


def test_shards_split_the_cases_and_fill_the_triton_cache(tmp_path):
    """--shard K/N runs every N-th case: the shards together compile what one run does, and
    the compiled kernels land in TRITON_CACHE_DIR (what bench/gpu_check.sh precompiles into)."""
    def variants(out):
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        return {line.split("(")[0] for line in out.stdout.splitlines() if line.startswith("ok ")}
    whole = variants(_run(tmp_path, "--only", "norm C=4096"))
    halves = [variants(_run(tmp_path, "--only", "norm C=4096", "--shard", f"{k}/2"))
              for k in range(2)]
    assert whole and halves[0] and halves[1] and halves[0] | halves[1] == whole
    assert any(name.endswith(".cubin") for _, _, files in os.walk(tmp_path / "cache")
               for name in files)


@pytest.mark.parametrize("shard", ["2/2", "1", "a/b", "-1/3"])
def test_a_bad_shard_exits_2(tmp_path, shard):
    out = _run(tmp_path, f"--shard={shard}")
    assert out.returncode == 2 and "--shard takes K/N" in out.stderr
