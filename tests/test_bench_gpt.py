"""The gpt_train benchmark (issue 6) on CPU: the FLOP count, the SDPA model variant, and a
quick CLI run of the tiny config producing timed rows with tokens/s."""
import json
import re

import pytest
import torch

from llm_kernels.bench import cli, gpt_train, suite
from llm_kernels.bench.common import Options
from llm_kernels.bench.harness import Skip

CPU = torch.device("cpu")


def _param_count(v: int, n_layer: int, d: int, d_ff: int) -> int:
    """Parameters of the tied-head GPT without the position embedding, counted by hand."""
    attention = 3 * d * d + 3 * d + d * d + d  # qkv and proj, weights and biases
    mlp = 2 * d * d_ff + d_ff + d
    norms = 2 * 2 * d
    return v * d + n_layer * (attention + mlp + norms) + 2 * d


def test_gpt2_small_flops_per_step():
    case = gpt_train.train_case(gpt_train.GPT2_SMALL, 8, torch.bfloat16, "gpt2-small")
    n = _param_count(50304, 12, 768, 3072)
    assert 123e6 < n < 125e6  # GPT-2 small
    tokens = 8 * 1024
    assert case.flops == pytest.approx((6 * n + 12 * 12 * 768 * 1024) * tokens)
    assert case.extra["tokens"] == tokens and case.x == 1024


def test_sdpa_variant_computes_the_same_loss():
    case = gpt_train.cases(Options(quick=True), CPU)[0]
    x, y = (torch.randint(0, case.params["V"], (2, case.params["T"])) for _ in range(2))
    losses = []
    for sdpa in (False, True):
        torch.manual_seed(0)
        model = gpt_train.build_model(case, "torch", CPU, sdpa=sdpa)
        losses.append(model(x, y)[1])
    assert type(model.blocks[0].attn).__name__ == "SDPASelfAttention"
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


def test_only_named_runs_and_the_gpu_suite_include_it():
    assert "gpt_train" in cli.OPS and "gpt_train" not in cli.DEFAULT_OPS
    item = next(i for i in suite.standard_plan() if i.case.op == "gpt_train")
    assert item.case.params == {"B": 8, "T": 1024, "layers": 12, "d": 768, "V": 50304}
    assert {"lk-triton", "lk-cuda", "lk-auto", "torch", "torch-sdpa"} <= set(item.providers)


def test_quick_cpu_run_times_a_training_step(tmp_path, capsys):
    path = tmp_path / "b.json"
    assert cli.main(["gpt_train", "--quick", "--device", "cpu", "--json", str(path)]) == 0
    capsys.readouterr()
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if r["op"] == "gpt_train"]
    assert {"torch", "torch-sdpa", "lk-auto", "lk-cuda"} <= {r["provider"] for r in rows}
    assert any(s["provider"] == "lk-triton" for s in data["skipped"])
    case = gpt_train.cases(Options(quick=True), CPU)[0]
    for row in rows:
        assert row["mode"] == "train" and row["ms"] > 0
        assert row["tflops"] == pytest.approx(case.flops / (row["ms"] * 1e-3) / 1e12)
        tokens_per_s = float(re.match(r"(\d+) tokens/s, MFU n/a", row["note"]).group(1))
        assert tokens_per_s == pytest.approx(case.extra["tokens"] / (row["ms"] * 1e-3), abs=1)


def test_profile_step_lists_the_kernels_of_a_step(capsys):
    from llm_kernels.bench import profile_step
    assert profile_step.main(["--providers", "torch-sdpa,lk-triton", "--top", "4", "--warmup",
                              "1", "--steps", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    sdpa = out.split("== torch-sdpa: ")[1].split("== lk-triton")[0].strip().splitlines()
    assert re.match(r"[\d.]+ ms/step \(\d+ tokens/s\), [\d.]+ under the profiler, kernels "
                    r"[\d.]+ ms/step \(device busy \d+% of the profiled step\)", sdpa[0])
    host_header = next(i for i, row in enumerate(sdpa) if row.startswith("host op"))
    kernels, host_ops = sdpa[2:host_header], sdpa[host_header + 1:]
    assert len(kernels) == 4 and len(host_ops) == 4
    assert any(row.startswith("aten::") for row in kernels)
    shares = [float(row.split()[-1].rstrip("%")) for row in kernels]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.01
    host_ms = [float(row.split()[-2]) for row in host_ops]
    assert host_ms == sorted(host_ms, reverse=True) and host_ms[-1] > 0
    assert "== lk-triton: skipped (the Triton interpreter is not benchmarked" in out
    table = out.split("kernel ms/step by category")[1].strip().splitlines()
    assert table[0].split() == ["torch-sdpa"]  # the skipped provider has no column
    cells = {row.rsplit(None, 1)[0].strip(): float(row.split()[-1]) for row in table[1:]}
    assert list(cells)[-2:] == ["other", "total"] and cells["matmul"] > 0
    assert cells["total"] == pytest.approx(sum(list(cells.values())[:-1]), abs=0.01)
    total = float(re.search(r"kernels ([\d.]+) ms/step", sdpa[0]).group(1))
    assert cells["total"] == pytest.approx(total, abs=0.01)
    from llm_kernels.bench import summarize
    kept = summarize.profile_lines(out)
    assert kept[-len(table) - 1:] == [line.rstrip() for line in out.strip().splitlines()[
        -len(table) - 1:]]


# Kernel names from the H100 profiles of bench/results/ (GPT-2 small step, three providers).
H100_KERNELS = {
    "void lk::attn::attention_backward_dkdv_tc<__nv_bfloat16, 64, 64, 4, true>(l...": "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x6...": "attention",
    "_attn_fwd_kernel": "attention",
    "nvjet_sm90_tst_192x128_64x5_1x2_h_bz_coopB_NNT": "matmul",
    "_matmul_kernel": "matmul",
    "void lk::(anonymous namespace)::layer_norm_backward_fused_kernel<__nv_bfloa...": "layer norm",
    "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::B...": "layer norm",
    "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, f": "softmax / loss",
    "void lk::(anonymous namespace)::cross_entropy_forward_kernel<__nv_bf": "softmax / loss",
    "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKe": "activation",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::nativ...": "optimizer",
    "void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy...": "cast / copy",
    "void at::native::reduce_kernel<128, 4, at::native::ReduceOp<c10::BFloat16, ...": "other",
}


def test_profile_categories_of_real_kernel_names():
    from llm_kernels.bench import profile_step
    assert {name: profile_step.category(name) for name in H100_KERNELS} == H100_KERNELS


class _Event:
    def __init__(self, key, device_us, annotation=False, device=torch.autograd.DeviceType.CUDA):
        self.key, self.count, self.self_device_time_total = key, 2, device_us
        self.self_cpu_time_total, self.device_type = 0, device
        self.is_user_annotation = annotation


def test_profile_kernel_rows_leave_out_user_annotations():
    """The span torch's profiler records on the GPU for ``Optimizer.step`` covers the
    optimizer's kernels: counting it too would count them twice."""
    from llm_kernels.bench import profile_step

    class Prof:
        def key_averages(self):
            return [_Event("Optimizer.step#AdamW.step", 3000, annotation=True),
                    _Event("multi_tensor_apply_kernel", 2800), _Event("_matmul_kernel", 8000),
                    _Event("aten::mm", 500, device=torch.autograd.DeviceType.CPU)]
    rows = profile_step.kernel_rows(Prof(), steps=2, on_gpu=True)
    assert rows == [("_matmul_kernel", 1.0, 4.0), ("multi_tensor_apply_kernel", 1.0, 1.4)]
    totals = profile_step.category_ms(rows)
    assert totals["matmul"] == 4.0 and totals["optimizer"] == 1.4 and sum(totals.values()) == 5.4
    lines = profile_step.category_table({"a": totals, "b": totals})
    assert lines[-1].split() == ["total", "5.400", "5.400"]


def test_sync_points_count_each_waiting_call_by_source_line(monkeypatch):
    """Each 'synchronizing CUDA operation' warning of one step is counted at its source line,
    and the summary keeps those lines."""
    import warnings

    from llm_kernels.bench import profile_step, summarize
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)

    def step():
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("an unrelated warning")
    counts = profile_step.sync_points(step)
    assert list(counts.values()) == [3] and next(iter(counts)).endswith(".py:" + str(
        step.__code__.co_firstlineno + 2))
    lines = profile_step._sync_lines(counts)
    assert lines[0] == "host waits for the device 3 times a step"
    assert summarize.profile_lines("\n".join(["noise", *lines])) == lines


def test_profile_step_rejects_unknown_providers():
    from llm_kernels.bench import profile_step
    with pytest.raises(SystemExit):
        profile_step.parse_args(["--providers", "lk-nope"])


def test_cuda_graph_providers_need_a_gpu():
    case = gpt_train.cases(Options(quick=True), CPU)[0]
    graph_providers = [p for p in gpt_train.PROVIDERS if p.endswith(gpt_train.GRAPH_SUFFIX)]
    assert sorted(graph_providers) == sorted(p + "-graph" for p in gpt_train.EAGER_PROVIDERS)
    for provider in graph_providers:
        with pytest.raises(Skip, match="CUDA graphs need a GPU"):
            gpt_train.PROVIDERS[provider](case, CPU, Options())


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["torch-sdpa", "lk-cuda", "lk-triton", "lk-auto"])
def test_cuda_graph_step_replays_the_eager_training(provider):
    """The step captured after three eager warm-up steps replays steps 4 to 6 of the same
    training run (same seed, weights and tokens): the eager run's losses, each replay
    training the model further."""
    case = gpt_train.train_case(gpt_train.CPU_QUICK, 2, torch.bfloat16, "tiny")
    device = torch.device("cuda")
    torch.manual_seed(0)
    eager = gpt_train.PROVIDERS[provider](case, device, Options())
    expected = [eager().item() for _ in range(6)][3:]
    torch.manual_seed(0)
    replay = gpt_train.PROVIDERS[provider + gpt_train.GRAPH_SUFFIX](case, device, Options())
    got = [replay().item() for _ in range(3)]
    assert got == pytest.approx(expected, rel=1e-3, abs=0)
    assert got[0] > got[1] > got[2], got
