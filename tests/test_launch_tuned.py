"""``_host.launch_tuned``: the config an autotuner chose is replayed for a repeated key, with its
pre-hook; a new key goes through the autotuner (which benchmarks it)."""
import pytest
import torch
import triton
import triton.language as tl

from llm_kernels.backends import interpreting
from llm_kernels.kernels import _host

pytestmark = pytest.mark.skipif(not (interpreting() or torch.cuda.is_available()),
                                reason="runs a Triton kernel: a GPU or TRITON_INTERPRET=1")


@triton.jit
def _fill_kernel(out_ptr, n, value, BLOCK: tl.constexpr):
    """out[i] = value * 1000 + BLOCK for i < n: the output names the config that ran."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, value * 1000 + BLOCK, mask=offsets < n)


def _tuner(timings: dict, benched: list, hooked: list):
    """_fill_kernel autotuned over BLOCK 4, 8 and 16 (key n); ``timings`` (BLOCK -> ms) is what
    the fake benchmark reports; every benchmark and every pre-hook call is recorded."""
    def bench(kernel_call, quantiles):
        kernel_call()
        block = benched_block[0]
        benched.append(block)
        return [timings[block]] * len(quantiles)

    benched_block = [None]

    def pre_hook(nargs):
        benched_block[0] = nargs["BLOCK"]
        hooked.append((nargs["BLOCK"], nargs["n"], nargs["value"]))

    configs = [triton.Config({"BLOCK": block}, num_warps=1, pre_hook=pre_hook)
               for block in (4, 8, 16)]
    return triton.autotune(configs=configs, key=["n"], do_bench=bench)(_fill_kernel)


def _launch(tuner, n: int, value: int) -> torch.Tensor:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.zeros(n, dtype=torch.int32, device=device)
    args = (out, n, value)
    _host.launch_tuned(tuner, lambda meta: (triton.cdiv(n, meta["BLOCK"]),), args, {},
                       (n,) + _host.dtypes(args))
    return out.cpu()


def test_repeated_key_replays_the_chosen_config_with_its_pre_hook():
    benched, hooked = [], []
    tuner = _tuner({4: 3.0, 8: 1.0, 16: 2.0}, benched, hooked)
    first = _launch(tuner, 37, 5)
    assert sorted(benched) == [4, 8, 16]
    assert tuner.best_config.kwargs == {"BLOCK": 8}
    assert first.tolist() == [5008] * 37
    hooked.clear()
    again = _launch(tuner, 37, 6)
    assert len(benched) == 3  # no new benchmark
    assert again.tolist() == [6008] * 37
    assert hooked == [(8, 37, 6)]  # the chosen config's pre-hook saw this launch's arguments


def test_new_key_goes_through_the_autotuner():
    benched, hooked = [], []
    timings = {4: 3.0, 8: 1.0, 16: 2.0}
    tuner = _tuner(timings, benched, hooked)
    assert _launch(tuner, 37, 1).tolist() == [1008] * 37
    timings.update({8: 5.0, 16: 0.5})
    assert _launch(tuner, 19, 2).tolist() == [2016] * 19
    assert len(benched) == 6
    assert _launch(tuner, 37, 3).tolist() == [3008] * 37  # the first key keeps its choice
    assert _launch(tuner, 19, 4).tolist() == [4016] * 19
    assert len(benched) == 6


def test_key_holds_every_tensor_dtype_in_order():
    a, b = torch.zeros(2, dtype=torch.float16), torch.zeros(2, dtype=torch.int64)
    assert _host.dtypes((a, 3, None, b, 2.0, a)) == (torch.float16, torch.int64, torch.float16)


def test_replaced_configs_or_cache_are_obeyed(monkeypatch):
    """A test that makes an autotuner run one config alone (new ``configs``, empty ``cache``)
    gets that config, not the one chosen before; restoring them restores the earlier choice."""
    benched, hooked = [], []
    tuner = _tuner({4: 3.0, 8: 1.0, 16: 2.0}, benched, hooked)
    assert _launch(tuner, 37, 1).tolist() == [1008] * 37
    with monkeypatch.context() as patch:
        patch.setattr(tuner, "configs", [tuner.configs[2]])
        patch.setattr(tuner, "cache", {})
        assert _launch(tuner, 37, 2).tolist() == [2016] * 37
        assert _launch(tuner, 37, 3).tolist() == [3016] * 37
    assert _launch(tuner, 37, 4).tolist() == [4008] * 37
    with monkeypatch.context() as patch:
        patch.setattr(tuner, "cache", {})
        assert _launch(tuner, 37, 5).tolist() == [5008] * 37
        assert len(benched) == 6  # benchmarked again


def test_attention_launch_keys_kernels_without_a_mask_switch(monkeypatch):
    """On a GPU (autotuning on) an attention launch builds its replay key from the tuner's key
    names that the kernel has: the warp-specialized kernels have no HAS_MASK (the key once
    indexed it and raised KeyError at their first launch)."""
    from llm_kernels.kernels import attention as attn
    launched = []
    monkeypatch.setattr(attn, "_autotune_enabled", lambda: True)
    monkeypatch.setattr(attn, "launch_tuned", lambda tuner, grid, args, constexprs, key:
                        launched.append((tuner, key)))
    candidates = [attn.Launch(128, 64, 4, 2), attn.Launch(128, 128, 4, 2)]
    out = torch.empty(4)
    attn._launch(_fill_kernel, lambda meta: (1,), candidates, (out, 4, 1.0),
                 {"D": 64, "CAUSAL": False})
    attn._launch(_fill_kernel, lambda meta: (1,), candidates, (out, 4, 1.0),
                 {"D": 64, "CAUSAL": True, "HAS_MASK": False})
    (tuner, key), (_, masked_key) = launched
    assert key == (64, False, None, torch.float32)
    assert masked_key == (64, True, False, torch.float32)
    assert tuner.keys == attn._TUNE_KEYS
