"""Attention: forward, backward, forward+backward and decode.

FLOPs 4*B*H*Lq*Lk*D per forward (halved when causal, backward 2.5x). GPU default: D = 128,
H = 2048 / D, B*L = 16384 tokens, L from 1k to 16k, bf16; decode: one query per sequence,
B = 8, H = 4096 / D (32 at D = 128) query heads, H / 4 key/value heads, against L cached keys,
on a GPU also replayed from a CUDA graph (variant ``cuda-graph``: the kernels' device time).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from llm_kernels.bench.common import (Case, Options, check_importable, check_lk_available,
                                      default_dtype, lk_backend, pick_modes, quiet, randn,
                                      timed_step, with_tma)
from llm_kernels.bench.harness import Skip, attention_flops, element_size

NAME = "attention"
METRIC = "tflops"
TOKENS_GPU = 16384
GRAPH_VARIANT = "cuda-graph"
# Providers that materialize the (B, H, Lq, Lk) scores are skipped above this many elements.
MAX_SCORES = {"cuda": 2**31, "cpu": 2**26}
CPU_SDPA_BACKENDS = ("FLASH_ATTENTION", "MATH")


def _seq_lens(opts: Options, device: torch.device) -> list[int]:
    if opts.seq_lens:
        return list(opts.seq_lens)
    if device.type == "cuda":
        return [2048, 8192] if opts.quick else [1024, 2048, 4096, 8192, 16384]
    return [256, 1024]


def _variants(opts: Options) -> list[bool]:
    return {"on": [True], "off": [False], "both": [False, True]}[opts.causal]


def dense_case(mode: str, b: int, h: int, seq_len: int, d: int, causal: bool,
               dtype: torch.dtype) -> Case:
    """Self-attention over ``seq_len`` tokens: q, k, v (B, H, L, D)."""
    params = {"B": b, "H": h, "Hkv": h, "Lq": seq_len, "Lk": seq_len, "D": d}
    return Case(op=NAME, mode=mode, dtype=dtype, params=params, x_name="seq_len", x=seq_len,
                variant="causal" if causal else "non-causal",
                flops=attention_flops(b, h, seq_len, seq_len, d, causal=causal, mode=mode))


def decode_case(b: int, h: int, hkv: int, lk: int, d: int, dtype: torch.dtype,
                cuda_graph: bool = False) -> Case:
    """One decode step: q (B, H, 1, D) against the cache k, v (B, Hkv, Lk, D). ``cuda_graph``
    (variant ``cuda-graph``): every provider's step replayed from a CUDA graph, as servers run
    decode steps, so the row is the kernels' device time without the host's issue time."""
    params = {"B": b, "H": h, "Hkv": hkv, "Lq": 1, "Lk": lk, "D": d}
    e = element_size(dtype)
    nbytes = (2 * b * hkv * lk * d + 2 * b * h * d) * e  # K and V read once, q read, out written
    return Case(op=NAME, mode="decode", dtype=dtype, params=params, x_name="seq_len", x=lk,
                variant=GRAPH_VARIANT if cuda_graph else "",
                flops=attention_flops(b, h, 1, lk, d, causal=False, mode="decode"),
                nbytes=nbytes, extra={"kv_bytes": 2 * b * hkv * lk * d * e,
                                      "cuda_graph": cuda_graph})


def cases(opts: Options, device: torch.device) -> list[Case]:
    dtype = default_dtype(opts, device)
    gpu = device.type == "cuda"
    d = opts.head_dim or (128 if gpu else 64)
    default_modes = (["fwd", "bwd", "decode"] if gpu else ["fwd", "fwd+bwd", "decode"]) \
        if opts.quick else ["fwd", "bwd", "fwd+bwd", "decode"]
    seq_lens = _seq_lens(opts, device)
    out = []
    for mode in pick_modes(opts, default_modes, ("fwd", "bwd", "fwd+bwd", "decode")):
        # A quick CPU run times the slower modes at the shortest length only.
        lens = seq_lens[:1] if opts.quick and not gpu and mode != "fwd" else seq_lens
        for seq_len in lens:
            if mode == "decode":
                h = max(1, 4096 // d) if gpu else 8
                out.extend(decode_case(8 if gpu else 1, h, max(1, h // 4),
                                       seq_len if gpu else 4 * seq_len, d, dtype, graph)
                           for graph in ((False, True) if gpu else (False,)))
                continue
            h = max(1, 2048 // d) if gpu else 8
            b = max(1, TOKENS_GPU // seq_len) if gpu else 1
            out.extend(dense_case(mode, b, h, seq_len, d, causal, dtype)
                       for causal in _variants(opts))
    return out


def _inputs(case: Case, device: torch.device, layout: str = "bhld"):
    """q, k, v requiring grad when the mode has a backward; (B, H, L, D) or (B, L, H, D)."""
    p = case.params
    grad = case.mode in ("bwd", "fwd+bwd")
    shapes = [(p["B"], p["H"], p["Lq"], p["D"]), (p["B"], p["Hkv"], p["Lk"], p["D"])]
    if layout == "blhd":
        shapes = [(s[0], s[2], s[1], s[3]) for s in shapes]
    q = randn(shapes[0], case.dtype, device, requires_grad=grad)
    k, v = (randn(shapes[1], case.dtype, device, requires_grad=grad) for _ in range(2))
    return q, k, v


def _causal(case: Case) -> bool:
    return case.variant == "causal"


def _check_scores_fit(case: Case, device: torch.device) -> None:
    p = case.params
    elements = p["B"] * p["H"] * p["Lq"] * p["Lk"]
    if elements >= MAX_SCORES.get(device.type, MAX_SCORES["cpu"]):
        raise Skip(f"materializes {elements / 2**30:.1f} Gi scores (too slow / out of memory)")


def lk_provider(provider: str, case: Case, device: torch.device, opts: Options):
    import llm_kernels as lk
    check_lk_available(provider, device)
    backend, causal = lk_backend(provider), _causal(case)
    forward = functools.partial(lk.attention, causal=causal, backend=backend)
    return timed_step(forward, _inputs(case, device), case.mode)


def lk_tma_provider(case: Case, device: torch.device, opts: Options):
    """lk-triton with Q, K, V (and dO) read through TMA descriptors
    ($LLM_KERNELS_ATTENTION_TMA=1, opt-in; Hopper and newer)."""
    from llm_kernels.kernels import attention as kernels
    if case.mode == "decode":
        raise Skip("the decode (split-key) kernel reads by pointer only")
    return with_tma(lk_provider("lk-triton", case, device, opts), kernels, device)


def lk_ws_provider(case: Case, device: torch.device, opts: Options):
    """lk-triton with the warp-specialized forward, dK/dV and dQ kernels
    ($LLM_KERNELS_ATTENTION_WS=1, opt-in; Hopper and newer)."""
    from llm_kernels.kernels import attention as kernels
    if case.mode == "decode":
        raise Skip("the decode (split-key) kernel is not warp-specialized")
    return with_tma(lk_provider("lk-triton", case, device, opts), kernels, device,
                    kernels.WS_ENV)


def torch_provider(case: Case, device: torch.device, opts: Options):
    """The eager reference (``backend="torch"``): materializes the scores."""
    import llm_kernels as lk
    _check_scores_fit(case, device)
    forward = functools.partial(lk.attention, causal=_causal(case), backend="torch")
    return timed_step(forward, _inputs(case, device), case.mode)


def _probe(forward, q, k, v, backend_name: str) -> None:
    """One call, turning SDPA's "No available kernel" into a Skip."""
    try:
        quiet(lambda: forward(q, k, v))()
    except RuntimeError as exc:
        if "No available kernel" in str(exc) or "No viable backend" in str(exc):
            raise Skip(f"SDPA's {backend_name} backend has no kernel for this input/device")
        raise


def sdpa_provider(backend_name: str, case: Case, device: torch.device, opts: Options):
    """torch SDPA restricted to one backend; GQA through ``enable_gqa``, else (when the
    backend refuses it) K/V expanded to H heads before the timing."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, backend_name)
    if device.type != "cuda" and backend_name not in CPU_SDPA_BACKENDS:
        raise Skip(f"SDPA's {backend_name} backend runs on CUDA only")
    if backend == SDPBackend.MATH:
        _check_scores_fit(case, device)
    q, k, v = _inputs(case, device)
    gqa = case.params["H"] != case.params["Hkv"]

    def forward(q, k, v, enable_gqa=gqa):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=_causal(case),
                                                  enable_gqa=enable_gqa)
    note = ""
    try:
        _probe(forward, q, k, v, backend_name)
    except Skip:
        if not gqa:
            raise
        rep = case.params["H"] // case.params["Hkv"]
        k, v = (t.detach().repeat_interleave(rep, dim=1).requires_grad_(t.requires_grad)
                for t in (k, v))
        forward = functools.partial(forward, enable_gqa=False)
        _probe(forward, q, k, v, backend_name)
        note = "K/V expanded to H heads (no enable_gqa kernel)"
    run = quiet(timed_step(forward, (q, k, v), case.mode))
    run.note = note
    return run


def flash_attn_provider(case: Case, device: torch.device, opts: Options):
    check_importable("flash_attn")
    if device.type != "cuda":
        raise Skip("flash-attn runs on CUDA only")
    from flash_attn import flash_attn_func
    forward = functools.partial(flash_attn_func, causal=_causal(case))
    return timed_step(forward, _inputs(case, device, layout="blhd"), case.mode)


PROVIDERS = {
    "lk-triton": functools.partial(lk_provider, "lk-triton"),
    "lk-cuda": functools.partial(lk_provider, "lk-cuda"),
    "lk-triton-tma": lk_tma_provider,
    "lk-triton-ws": lk_ws_provider,
    "torch": torch_provider,
    "sdpa-flash": functools.partial(sdpa_provider, "FLASH_ATTENTION"),
    "sdpa-efficient": functools.partial(sdpa_provider, "EFFICIENT_ATTENTION"),
    "sdpa-cudnn": functools.partial(sdpa_provider, "CUDNN_ATTENTION"),
    "sdpa-math": functools.partial(sdpa_provider, "MATH"),
    "flash-attn": flash_attn_provider,
}
