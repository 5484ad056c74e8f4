"""End-to-end training throughput of the reference GPT (issue 6): one full training step
(forward, loss, backward, AdamW step) of the same model with each backend.

GPU: GPT-2 small (124M: 12 layers, 12 heads, d 768, d_ff 3072, vocab 50304), batch 8 x 1024
tokens, bf16 autocast. CPU: a tiny model (2 layers, d 64, T 64, batch 2 with --quick), fp32.
Work per step: ``llm_kernels.train.flops_per_token`` (6 N + 12 n_layer d_model T) times the
tokens, so the TFLOP/s column is the model FLOP rate; each row's note gives tokens/s and the
MFU against the device's bf16 peak (``llm_kernels.train.peak_flops``; n/a on a CPU).

Providers: ``lk-triton``/``lk-cuda``/``lk-auto`` (GPTConfig backend; auto takes each op's
measured fastest backend), ``torch`` (backend "torch": the
pure-torch references, attention materializing the scores) and ``torch-sdpa`` (backend "torch"
with attention through ``torch.nn.functional.scaled_dot_product_attention``).

``<provider>-graph`` (GPU only): the same step captured once in a CUDA graph (forward, loss,
backward and the AdamW step) and replayed, so the host issues one graph launch a step instead
of every op: the device time of the step without the host's Python, autograd and launch
overhead, for the lk backends and the torch SDPA model alike.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import torch.nn.functional as F

from llm_kernels.bench.common import Case, Options, check_lk_available, default_dtype, lk_backend
from llm_kernels.bench.harness import Skip, capture_graph

NAME = "gpt_train"
METRIC = "tflops"
MODE = "train"
IN_DEFAULT_RUN = False  # only when named: `llm-kernels bench gpt_train`
LR, WEIGHT_DECAY = 3e-4, 0.1
GPT2_SMALL = {"vocab_size": 50304, "n_layer": 12, "n_head": 12, "n_kv_head": 12, "d_model": 768,
              "d_ff": 3072, "max_seq_len": 1024}
CPU_QUICK = {"vocab_size": 257, "n_layer": 2, "n_head": 2, "n_kv_head": 2, "d_model": 64,
             "d_ff": 256, "max_seq_len": 64}
CPU_FULL = {"vocab_size": 257, "n_layer": 4, "n_head": 4, "n_kv_head": 4, "d_model": 128,
            "d_ff": 512, "max_seq_len": 128}


def model_flops_per_step(model_args: dict, batch: int, seq_len: int) -> float:
    """Model FLOPs of one training step, counted on a parameter-free (meta) copy of the model."""
    from llm_kernels.models.gpt import GPT, GPTConfig
    from llm_kernels.train import flops_per_token
    with torch.device("meta"):
        model = GPT(GPTConfig(**model_args))
    return flops_per_token(model, seq_len) * batch * seq_len


def train_case(model_args: dict, batch: int, dtype: torch.dtype, variant: str) -> Case:
    """One step over (batch, max_seq_len) tokens of the model ``model_args``."""
    t = model_args["max_seq_len"]
    params = {"B": batch, "T": t, "layers": model_args["n_layer"], "d": model_args["d_model"],
              "V": model_args["vocab_size"]}
    return Case(op=NAME, mode=MODE, dtype=dtype, params=params, x_name="seq_len", x=t,
                variant=variant, flops=model_flops_per_step(model_args, batch, t),
                extra={"model": dict(model_args), "tokens": batch * t})


def cases(opts: Options, device: torch.device) -> list[Case]:
    dtype = default_dtype(opts, device)
    if device.type == "cuda":
        return [train_case(GPT2_SMALL, 8, dtype, "gpt2-small")]
    if opts.quick:
        return [train_case(CPU_QUICK, 2, dtype, "tiny")]
    return [train_case(CPU_FULL, 4, dtype, "small")]


def amp_dtype(case: Case) -> Optional[torch.dtype]:
    """The autocast dtype (None: plain fp32 training)."""
    return None if case.dtype == torch.float32 else case.dtype


def row_note(case: Case, row: dict, device: torch.device) -> str:
    """Tokens/s and MFU of a measured row (called by the runner once the step is timed)."""
    from llm_kernels.train import peak_flops
    tokens_per_s = case.extra["tokens"] / (row["ms"] * 1e-3)
    peak = peak_flops(device, amp_dtype(case))
    mfu = "n/a" if peak is None else f"{100 * row['tflops'] * 1e12 / peak:.1f}%"
    return f"{tokens_per_s:.0f} tokens/s, MFU {mfu}"


def _sdpa_attention_class():
    from llm_kernels.models.gpt import SelfAttention

    class SDPASelfAttention(SelfAttention):
        """SelfAttention with torch's SDPA in place of ``lk.attention`` (training only)."""

        def forward(self, x, rotary=None, cache=None, pos: int = 0):
            """x (B, T, d) -> (B, T, d); no KV cache."""
            b, t, _ = x.shape
            h, hkv, d = self.n_head, self.n_kv_head, self.head_dim
            q, k, v = self.qkv(x).split([h * d, hkv * d, hkv * d], dim=-1)
            q = q.view(b, t, h, d).transpose(1, 2)  # (B, H, T, D)
            k = k.view(b, t, hkv, d).transpose(1, 2)  # (B, Hkv, T, D)
            v = v.view(b, t, hkv, d).transpose(1, 2)  # (B, Hkv, T, D)
            if rotary is not None:
                q, k = rotary(q, pos), rotary(k, pos)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                               enable_gqa=h != hkv)  # (B, H, T, D)
            return self.dropout(self.proj(y.transpose(1, 2).reshape(b, t, h * d)))

    return SDPASelfAttention


def build_model(case: Case, backend: str, device: torch.device, sdpa: bool = False):
    from llm_kernels.models.gpt import GPT, GPTConfig
    config = GPTConfig(**case.extra["model"], backend=backend)
    with device:  # initialized in place (124M parameters initialize slowly on a CPU)
        model = GPT(config)
        if sdpa:
            attention_class = _sdpa_attention_class()
            for block in model.blocks:
                attn = attention_class(config)
                attn.load_state_dict(block.attn.state_dict())
                block.attn = attn
    return model.train()


def training_step(case: Case, backend: str, device: torch.device, sdpa: bool = False,
                  cuda_graph: bool = False):
    """The callable to time: zero_grad, forward + loss under autocast, backward, AdamW step,
    on fixed random tokens; returns the detached loss. ``cuda_graph``: that step captured in a
    CUDA graph after three warm-up steps (which also create the optimizer state) and replayed;
    the gradients, set to None before the recording, live in the graph's memory pool and are
    rewritten in place by each replay."""
    from llm_kernels.train import make_optimizer
    model = build_model(case, backend, device, sdpa)
    optimizer = make_optimizer(model, {"lr": LR, "weight_decay": WEIGHT_DECAY}, device,
                               capturable=cuda_graph)
    b, t, vocab = case.params["B"], case.params["T"], case.params["V"]
    x, y = (torch.randint(0, vocab, (b, t), device=device) for _ in range(2))
    amp = amp_dtype(case)

    def step():
        optimizer.zero_grad(set_to_none=True)
        # A captured step must cast the weights on every replay: no autocast cast cache.
        with (torch.autocast(device.type, dtype=amp, cache_enabled=not cuda_graph) if amp
              else contextlib.nullcontext()):
            _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        return loss.detach()
    return capture_graph(step, warmup=3) if cuda_graph else step


def _check_graph(cuda_graph: bool, device: torch.device) -> None:
    if cuda_graph and device.type != "cuda":
        raise Skip("CUDA graphs need a GPU")


def lk_provider(provider: str, case: Case, device: torch.device, opts: Options,
                cuda_graph: bool = False):
    _check_graph(cuda_graph, device)
    check_lk_available(provider, device)
    return training_step(case, lk_backend(provider), device, cuda_graph=cuda_graph)


def auto_provider(case: Case, device: torch.device, opts: Options, cuda_graph: bool = False):
    """GPTConfig(backend="auto"), the default: each op on its measured fastest backend."""
    _check_graph(cuda_graph, device)
    return training_step(case, "auto", device, cuda_graph=cuda_graph)


def torch_provider(case: Case, device: torch.device, opts: Options, cuda_graph: bool = False):
    """Every op by the pure-torch references (attention materializes the scores)."""
    _check_graph(cuda_graph, device)
    return training_step(case, "torch", device, cuda_graph=cuda_graph)


def torch_sdpa_provider(case: Case, device: torch.device, opts: Options,
                        cuda_graph: bool = False):
    """The torch references with attention through torch's SDPA (flash on an H100)."""
    _check_graph(cuda_graph, device)
    return training_step(case, "torch", device, sdpa=True, cuda_graph=cuda_graph)


EAGER_PROVIDERS = {
    "lk-triton": functools.partial(lk_provider, "lk-triton"),
    "lk-cuda": functools.partial(lk_provider, "lk-cuda"),
    "lk-auto": auto_provider,
    "torch": torch_provider,
    "torch-sdpa": torch_sdpa_provider,
}
GRAPH_SUFFIX = "-graph"
PROVIDERS = {**EAGER_PROVIDERS,
             **{name + GRAPH_SUFFIX: functools.partial(fn, cuda_graph=True)
                for name, fn in EAGER_PROVIDERS.items()}}
