"""The feed-forward block act(x @ w1.T + b1) @ w2.T + b2 (GELU): TFLOP/s.

x (tokens, d), w1 (d_ff, d), w2 (d, d_ff) with d_ff = 4 d. FLOPs 2 matmuls of 2*tokens*d*d_ff
each per forward; backward 2x. The x axis is the hidden size d.
"""
from __future__ import annotations

import functools

import torch

from llm_kernels.bench import rowwise
from llm_kernels.bench.common import (Case, Options, default_dtype, pick_modes, randn,
                                      with_tma)
from llm_kernels.bench.harness import gemm_flops
from llm_kernels.reference import feed_forward_ref

NAME = "feed_forward"
METRIC = "tflops"
ACTIVATION = "gelu"
TOKENS = {"cuda": 8192, "cpu": 256}


def ff_case(mode: str, tokens: int, d: int, d_ff: int, dtype: torch.dtype) -> Case:
    return Case(op=NAME, mode=mode, dtype=dtype, params={"N": tokens, "d": d, "d_ff": d_ff},
                x_name="hidden", x=d, flops=gemm_flops(tokens, d_ff, d, mode=mode, count=2))


def cases(opts: Options, device: torch.device) -> list[Case]:
    dtype = default_dtype(opts, device)
    widths = rowwise.sizes(opts, device, gpu=(1024, 2048, 4096), gpu_quick=(4096,),
                           cpu=(256, 512))
    tokens = TOKENS.get(device.type, TOKENS["cpu"])
    default = ["fwd", "fwd+bwd"] if opts.quick else ["fwd", "bwd", "fwd+bwd"]
    return [ff_case(mode, tokens, d, 4 * d, dtype)
            for mode in pick_modes(opts, default, ("fwd", "bwd", "fwd+bwd")) for d in widths]


def make_inputs(case: Case, device: torch.device):
    """x (N, d), w1 (d_ff, d), b1 (d_ff,), w2 (d, d_ff), b2 (d,), scaled like nn.Linear."""
    n, d, d_ff = case.params["N"], case.params["d"], case.params["d_ff"]
    grad = case.mode != "fwd"
    return (randn((n, d), case.dtype, device, requires_grad=grad),
            randn((d_ff, d), case.dtype, device, scale=d ** -0.5, requires_grad=grad),
            randn((d_ff,), case.dtype, device, scale=0.1, requires_grad=grad),
            randn((d, d_ff), case.dtype, device, scale=d_ff ** -0.5, requires_grad=grad),
            randn((d,), case.dtype, device, scale=0.1, requires_grad=grad))


def lk_feed_forward(x, w1, b1, w2, b2, *, backend):
    import llm_kernels as lk
    return lk.feed_forward(x, w1, b1, w2, b2, activation=ACTIVATION, backend=backend)


def torch_feed_forward(x, w1, b1, w2, b2):
    return feed_forward_ref(x, w1, b1, w2, b2, activation=ACTIVATION)


def lk_tma_provider(case: Case, device: torch.device, opts: Options):
    """lk-triton with the matmuls reading A and B through TMA descriptors
    ($LLM_KERNELS_MATMUL_TMA=1, opt-in; Hopper and newer)."""
    from llm_kernels.kernels import feed_forward as kernels
    step = rowwise.lk_provider(lk_feed_forward, make_inputs, "lk-triton", case, device, opts)
    return with_tma(step, kernels, device)


PROVIDERS = {
    "lk-triton": functools.partial(rowwise.lk_provider, lk_feed_forward, make_inputs,
                                   "lk-triton"),
    "lk-triton-tma": lk_tma_provider,
    "lk-cuda": functools.partial(rowwise.lk_provider, lk_feed_forward, make_inputs, "lk-cuda"),
    "torch": functools.partial(rowwise.lk_provider, lk_feed_forward, make_inputs, "lk-torch"),
    "torch-compile": functools.partial(rowwise.compile_provider, torch_feed_forward,
                                       make_inputs),
}
