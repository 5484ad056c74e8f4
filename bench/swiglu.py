"""SwiGLU (silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T: TFLOP/s.

x (tokens, d), w_gate/w_up (d_ff, d), w_down (d, d_ff) with d_ff = 8/3 d rounded up to a
multiple of 256 (11008 at d = 4096). FLOPs 3 matmuls of 2*tokens*d*d_ff per forward;
backward 2x. The x axis is the hidden size d.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from llm_kernels.bench import rowwise
from llm_kernels.bench.common import (Case, Options, check_importable, default_dtype, pick_modes,
                                      randn)
from llm_kernels.bench.harness import gemm_flops
from llm_kernels.reference import swiglu_ref

NAME = "swiglu"
METRIC = "tflops"
TOKENS = {"cuda": 8192, "cpu": 256}


def hidden_ff(d: int) -> int:
    """ceil(8 d / 3), rounded up to a multiple of 256 from d = 256 on (LLaMA's sizing)."""
    d_ff = math.ceil(8 * d / 3)
    return d_ff if d < 256 else math.ceil(d_ff / 256) * 256


def swiglu_case(mode: str, tokens: int, d: int, d_ff: int, dtype: torch.dtype) -> Case:
    return Case(op=NAME, mode=mode, dtype=dtype, params={"N": tokens, "d": d, "d_ff": d_ff},
                x_name="hidden", x=d, flops=gemm_flops(tokens, d_ff, d, mode=mode, count=3))


def cases(opts: Options, device: torch.device) -> list[Case]:
    dtype = default_dtype(opts, device)
    widths = rowwise.sizes(opts, device, gpu=(1024, 2048, 4096), gpu_quick=(4096,),
                           cpu=(256, 512))
    tokens = TOKENS.get(device.type, TOKENS["cpu"])
    default = ["fwd", "fwd+bwd"] if opts.quick else ["fwd", "bwd", "fwd+bwd"]
    return [swiglu_case(mode, tokens, d, hidden_ff(d), dtype)
            for mode in pick_modes(opts, default, ("fwd", "bwd", "fwd+bwd")) for d in widths]


def make_inputs(case: Case, device: torch.device):
    """x (N, d), w_gate (d_ff, d), w_up (d_ff, d), w_down (d, d_ff), scaled like nn.Linear."""
    n, d, d_ff = case.params["N"], case.params["d"], case.params["d_ff"]
    grad = case.mode != "fwd"
    return (randn((n, d), case.dtype, device, requires_grad=grad),
            randn((d_ff, d), case.dtype, device, scale=d ** -0.5, requires_grad=grad),
            randn((d_ff, d), case.dtype, device, scale=d ** -0.5, requires_grad=grad),
            randn((d, d_ff), case.dtype, device, scale=d_ff ** -0.5, requires_grad=grad))


def lk_swiglu(x, w_gate, w_up, w_down, *, backend):
    import llm_kernels as lk
    return lk.swiglu(x, w_gate, w_up, w_down, backend=backend)


def liger_swiglu(x, w_gate, w_up, w_down):
    """Liger's fused silu(gate) * up between torch's matmuls (how Liger's SwiGLU MLP runs)."""
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    return F.linear(LigerSiLUMulFunction.apply(F.linear(x, w_gate), F.linear(x, w_up)), w_down)


def liger_provider(case: Case, device: torch.device, opts: Options):
    check_importable("liger_kernel")
    return rowwise.plain_provider(liger_swiglu, make_inputs, case, device, opts)


PROVIDERS = {
    "lk-triton": functools.partial(rowwise.lk_provider, lk_swiglu, make_inputs, "lk-triton"),
    "lk-cuda": functools.partial(rowwise.lk_provider, lk_swiglu, make_inputs, "lk-cuda"),
    "torch": functools.partial(rowwise.lk_provider, lk_swiglu, make_inputs, "lk-torch"),
    "torch-compile": functools.partial(rowwise.compile_provider, swiglu_ref, make_inputs),
    "liger": liger_provider,
}
