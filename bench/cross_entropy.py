"""Cross-entropy over (N, V) logits, mean reduction: GB/s and peak memory.

Bytes: forward reads the logits and targets; backward reads the logits again and writes their
gradient. The x axis is the vocabulary size V (``--hidden-sizes`` sets it). The ``-inplace``
providers run ``inplace_backward=True`` (the gradient written over the logits, which the next
timed call then takes as its logits); they skip the ``bwd`` mode, whose retained graph cannot
be replayed once its saved logits are overwritten.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from llm_kernels.bench import rowwise
from llm_kernels.bench.common import Case, Options, check_importable, randn
from llm_kernels.bench.harness import Skip

NAME = "cross_entropy"
METRIC = "gbps"
ROWS = {"cuda": 8192, "cpu": 512}


def bytes_moved(mode: str, n: int, v: int, e: int) -> float:
    return rowwise.sum_modes(n * v * e + n * 8, 2 * n * v * e + n * 8, mode)


def cases(opts: Options, device: torch.device) -> list[Case]:
    vocab = rowwise.sizes(opts, device, gpu=(32768, 65536, 131072, 262144), gpu_quick=(131072,),
                          cpu=(8192, 32768))
    return rowwise.row_cases(NAME, opts, device, bytes_moved, x_name="vocab",
                             n_rows=ROWS.get(device.type, ROWS["cpu"]), widths=vocab)


def make_inputs(case: Case, device: torch.device):
    """logits (N, V) requiring grad in backward modes, target (N,) int64."""
    n, v = case.params["N"], case.params["V"]
    logits = randn((n, v), case.dtype, device, requires_grad=case.mode != "fwd")
    return logits, torch.randint(0, v, (n,), device=device)


def lk_cross_entropy(logits, target, *, backend, inplace_backward=False):
    import llm_kernels as lk
    return lk.cross_entropy(logits, target, backend=backend, inplace_backward=inplace_backward)


def lk_inplace_provider(provider: str, case: Case, device: torch.device, opts: Options):
    """``provider`` (lk-triton or lk-cuda) with ``inplace_backward=True``."""
    if case.mode == "bwd":
        raise Skip("the in-place backward overwrites the saved logits: bwd mode cannot replay "
                   "its retained graph (fwd+bwd measures it)")
    fn = functools.partial(lk_cross_entropy, inplace_backward=True)
    return rowwise.lk_provider(fn, make_inputs, provider, case, device, opts)


def torch_cross_entropy(logits, target):
    return F.cross_entropy(logits, target)


def liger_cross_entropy(logits, target):
    from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
    out = LigerCrossEntropyFunction.apply(logits, target, -100)
    return out[0] if isinstance(out, tuple) else out


def liger_provider(case: Case, device: torch.device, opts: Options):
    check_importable("liger_kernel")
    return rowwise.plain_provider(liger_cross_entropy, make_inputs, case, device, opts)


PROVIDERS = {
    "lk-triton": functools.partial(rowwise.lk_provider, lk_cross_entropy, make_inputs,
                                   "lk-triton"),
    "lk-cuda": functools.partial(rowwise.lk_provider, lk_cross_entropy, make_inputs, "lk-cuda"),
    "lk-triton-inplace": functools.partial(lk_inplace_provider, "lk-triton"),
    "lk-cuda-inplace": functools.partial(lk_inplace_provider, "lk-cuda"),
    "torch": functools.partial(rowwise.lk_provider, lk_cross_entropy, make_inputs, "lk-torch"),
    "torch-compile": functools.partial(rowwise.compile_provider, torch_cross_entropy,
                                       make_inputs),
    "liger": liger_provider,
}
