"""A GPT (decoder) / bidirectional encoder whose every attention, norm, feed-forward and loss
runs through the ``llm_kernels`` ops.

Pre-norm blocks, with each residual add fused into the norm that follows it:

    x, h = norm1(delta, residual=h)      # h = h + delta (previous block's MLP output); x = norm(h)
    x, h = norm2(attn(x), residual=h)    # h = h + attn(x); x = norm(h)
    delta = mlp(x)

and a final ``norm(delta, residual=h)`` before the LM head, tied to the token embedding.

Positions: learned embeddings, or RoPE on q/k (``rope=True``, "rotate half" convention, no
position embedding). Dropout (torch) is applied to the attention output projection and to the
MLP output only: the kernels compute no dropout, so attention-probability dropout is not
supported. Under ``torch.autocast`` the lk ops (not autocast-aware) receive activations and
weights cast explicitly to the autocast dtype.
"""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import llm_kernels as lk
from llm_kernels import _checks
from llm_kernels.backends import AUTO, BACKENDS

MLPS = ("gelu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
IGNORE_INDEX = -100
INIT_STD = 0.02
ROPE_BASE = 10000.0


@dataclass
class GPTConfig:
    """Model hyper-parameters; ``backend`` is an lk backend name or "auto"."""

    vocab_size: int = 257
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4
    d_model: int = 128
    d_ff: int = 512
    max_seq_len: int = 256
    dropout: float = 0.0
    causal: bool = True
    mlp: str = "gelu"
    norm: str = "layernorm"
    rope: bool = False
    backend: str = AUTO

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff",
                     "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        for name in ("causal", "rope"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"GPTConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real):
            raise TypeError(f"GPTConfig.dropout must be a float, got {self.dropout!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be a multiple of n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of "
                             f"n_kv_head={self.n_kv_head}")
        if self.rope and self.head_dim % 2:
            raise ValueError(f"rope needs an even head dim, got d_model/n_head={self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.mlp not in MLPS:
            raise ValueError(f"mlp must be one of {MLPS}, got {self.mlp!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.backend not in BACKENDS + (AUTO,):
            raise ValueError(f"backend must be one of {BACKENDS + (AUTO,)}, got {self.backend!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


def _lk_backend(config: GPTConfig) -> Optional[str]:
    return None if config.backend == AUTO else config.backend


def compute_dtype(device_type: str, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype the lk ops run in: the autocast dtype when autocast is on, else the params'."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return param_dtype


class Norm(nn.Module):
    """LayerNorm (weight, bias) or RMSNorm (weight) with the residual add fused in."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.rms = config.norm == "rmsnorm"
        self.backend = _lk_backend(config)
        self.weight = nn.Parameter(torch.ones(config.d_model))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(config.d_model))

    def forward(self, x, residual=None):
        """Returns (norm(h), h) with h = x + residual (h = x without residual). x (B, T, d)."""
        w = self.weight.to(x.dtype)
        if self.rms:
            out = lk.rms_norm(x, w, residual=residual, backend=self.backend)
        else:
            out = lk.layer_norm(x, w, self.bias.to(x.dtype), residual=residual,
                                backend=self.backend)
        return out if residual is not None else (out, x)


class Rotary(nn.Module):
    """RoPE: rotates pairs (x_i, x_{i + D/2}) by angle pos * base^(-2i/D)."""

    def __init__(self, head_dim: int, max_seq_len: int):
        super().__init__()
        inv_freq = ROPE_BASE ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (S, D/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x, pos: int):
        """x (B, H, T, D) at positions pos .. pos + T - 1 -> rotated (B, H, T, D)."""
        t, half = x.shape[2], x.shape[3] // 2
        cos = self.cos[pos:pos + t].to(x.dtype)  # (T, D/2)
        sin = self.sin[pos:pos + t].to(x.dtype)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Preallocated keys and values of one layer, each (B, n_kv_head, max_seq_len, head_dim)."""

    def __init__(self, batch: int, config: GPTConfig, dtype: torch.dtype, device):
        shape = (batch, config.n_kv_head, config.max_seq_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, k, v, pos: int):
        """Store k, v (B, Hkv, T, D) at pos .. pos + T - 1; return the cache up to there
        as views (B, Hkv, pos + T, D)."""
        end = pos + k.shape[2]
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class SelfAttention(nn.Module):
    """Multi-head attention with n_kv_head key/value heads (GQA); causal or bidirectional."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.head_dim
        self.causal = config.causal
        self.backend = _lk_backend(config)
        qkv_dim = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.qkv = nn.Linear(config.d_model, qkv_dim)
        self.proj = nn.Linear(config.n_head * config.head_dim, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, rotary: Optional[Rotary], cache: Optional[KVCache] = None, pos: int = 0):
        """x (B, T, d) at positions pos .. pos + T - 1 -> (B, T, d)."""
        b, t, _ = x.shape
        h, hkv, d = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split([h * d, hkv * d, hkv * d], dim=-1)
        q = q.view(b, t, h, d).transpose(1, 2)  # (B, H, T, D)
        k = k.view(b, t, hkv, d).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(b, t, hkv, d).transpose(1, 2)  # (B, Hkv, T, D)
        if rotary is not None:
            q, k = rotary(q, pos), rotary(k, pos)
        if cache is not None:
            k, v = cache.update(k, v, pos)  # (B, Hkv, pos + T, D)
        y = lk.attention(q, k, v, causal=self.causal, backend=self.backend)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(b, t, h * d)
        return self.dropout(self.proj(y))


class MLP(nn.Module):
    """gelu: fc_out(gelu(fc_in(x))); swiglu: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        self.backend = _lk_backend(config)
        if self.swiglu:
            self.gate = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.up = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.down = nn.Linear(config.d_ff, config.d_model, bias=False)
        else:
            self.fc_in = nn.Linear(config.d_model, config.d_ff)
            self.fc_out = nn.Linear(config.d_ff, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        """x (B, T, d) -> (B, T, d)."""
        dt = x.dtype
        if self.swiglu:
            y = lk.swiglu(x, self.gate.weight.to(dt), self.up.weight.to(dt),
                          self.down.weight.to(dt), backend=self.backend)
        else:
            y = lk.feed_forward(x, self.fc_in.weight.to(dt), self.fc_in.bias.to(dt),
                                self.fc_out.weight.to(dt), self.fc_out.bias.to(dt),
                                activation="gelu", backend=self.backend)
        return self.dropout(y)

    def output_projection(self) -> nn.Linear:
        return self.down if self.swiglu else self.fc_out


class Block(nn.Module):
    """One pre-norm transformer block; the residual adds happen inside the norms."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.norm1 = Norm(config)
        self.attn = SelfAttention(config)
        self.norm2 = Norm(config)
        self.mlp = MLP(config)

    def forward(self, h, delta, rotary, cache=None, pos: int = 0):
        """h (B, T, d): the residual stream without ``delta`` (the previous block's MLP output,
        None for the first block). Returns (h, delta) in the same convention."""
        x, h = self.norm1(delta, residual=h) if delta is not None else self.norm1(h)
        x, h = self.norm2(self.attn(x, rotary, cache, pos), residual=h)
        return h, self.mlp(x)


class GPT(nn.Module):
    """Token (+ learned position) embeddings, ``n_layer`` blocks, final norm, tied LM head."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = None if config.rope else nn.Embedding(config.max_seq_len, config.d_model)
        self.rotary = Rotary(config.head_dim, config.max_seq_len) if config.rope else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = Norm(config)
        self.apply(_init_gpt2)
        residual_std = INIT_STD / math.sqrt(2 * config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=residual_std)
            nn.init.normal_(block.mlp.output_projection().weight, std=residual_std)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; ``non_embedding`` leaves out the position embedding (the token
        embedding counts: it is the LM head too)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    def _hidden(self, idx, caches=None, pos: int = 0):
        """idx (B, T) int64 (checked by the caller) at positions pos .. pos + T - 1 -> final
        normed hidden (B, T, d)."""
        dtype = compute_dtype(idx.device.type, self.wte.weight.dtype)
        h = self.wte(idx)  # (B, T, d)
        if self.wpe is not None:
            h = h + self.wpe(torch.arange(pos, pos + idx.shape[1], device=idx.device))
        h = h.to(dtype)
        delta = None
        for i, block in enumerate(self.blocks):
            h, delta = block(h, delta, self.rotary, caches[i] if caches else None, pos)
        x, _ = self.norm_f(delta, residual=h)
        return x

    def _head(self, x):
        """Tied LM head: x (B, T, d) -> logits (B, T, V)."""
        return F.linear(x, self.wte.weight.to(x.dtype))

    def forward(self, idx, targets=None):
        """idx (B, T) int64 -> (logits (B, T, V), loss or None): the loss is the mean
        cross-entropy over the targets != -100, in float32 (summed from the per-token losses,
        so that a bf16 run reports it without bf16 rounding)."""
        _check_idx(idx, self.config, 0)
        logits = self._head(self._hidden(idx))
        if targets is None:
            return logits, None
        targets = targets.reshape(-1)  # (B T,)
        per_token = lk.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets,
                                     ignore_index=IGNORE_INDEX, reduction="none",
                                     backend=_lk_backend(self.config))  # (B T,), 0 where ignored
        return logits, per_token.float().sum() / (targets != IGNORE_INDEX).sum()

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None):
        """Append ``max_new_tokens`` sampled tokens to idx (B, T) -> (B, T + max_new_tokens).

        The prompt runs in one call that fills a preallocated KV cache, then one token per
        step (Lq = 1 against the cache; bottom-right causal alignment lets it see every cached
        key). temperature 0 is greedy; top_k keeps the k largest logits. Raises ValueError when
        T + max_new_tokens exceeds max_seq_len (no sliding window), and for a non-causal model.
        Every module's train/eval mode is as before afterwards.
        """
        max_new_tokens, top_k = _check_sampling(self.config, idx, max_new_tokens, temperature,
                                                top_k)
        modes = [(module, module.training) for module in self.modules()]
        self.eval()
        try:
            caches = self.new_kv_caches(idx.shape[0], idx.device)
            tokens = [idx]
            logits = self._cached_logits(idx, caches, 0)[:, -1]  # (B, V)
            for step in range(max_new_tokens):
                tokens.append(sample_next(logits, temperature, top_k, generator))  # (B, 1)
                if step + 1 < max_new_tokens:
                    logits = self._cached_logits(tokens[-1], caches, idx.shape[1] + step)[:, -1]
        finally:
            for module, training in modes:
                module.training = training
        return torch.cat(tokens, dim=1)

    def new_kv_caches(self, batch: int, device) -> list[KVCache]:
        """One empty KVCache per layer, in the dtype the lk ops run in (autocast-aware)."""
        dtype = compute_dtype(torch.device(device).type, self.wte.weight.dtype)
        return [KVCache(batch, self.config, dtype, device) for _ in self.blocks]

    def cached_logits(self, idx, caches: list[KVCache], pos: int):
        """Logits (B, T, V) of idx (B, T) at positions pos .. pos + T - 1, attending to the
        keys/values already in ``caches`` (positions < pos) and appending idx's own."""
        if not self.config.causal:
            raise ValueError("a KV cache needs a causal model")
        _check_idx(idx, self.config, pos)
        return self._cached_logits(idx, caches, pos)

    def _cached_logits(self, idx, caches: list[KVCache], pos: int):
        return self._head(self._hidden(idx, caches, pos))


def _init_gpt2(module: nn.Module) -> None:
    """GPT-2 init: N(0, 0.02) for linear and embedding weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def _check_idx(idx, config: GPTConfig, pos: int) -> None:
    """idx is an int64 (B, T) tensor of token ids in [0, vocab_size) that fits in max_seq_len
    after pos. The ids' range is checked on CPU tensors only: on a GPU that read would make
    every step wait for the device, and the token embedding's own device-side assert catches
    an id out of range instead (as in any torch model)."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"idx must be an int64 tensor (B, T), got a {type(idx).__name__}")
    if idx.dtype != torch.int64 or idx.dim() != 2:
        raise TypeError(f"idx must be an int64 tensor (B, T), got {idx.dtype} of shape "
                        f"{tuple(idx.shape)}")
    if idx.shape[0] == 0 or idx.shape[1] == 0:
        raise ValueError(f"idx is empty (shape {tuple(idx.shape)})")
    if pos + idx.shape[1] > config.max_seq_len:
        raise ValueError(f"sequence length {pos + idx.shape[1]} exceeds max_seq_len="
                         f"{config.max_seq_len}")
    if not _checks.can_read_values(idx):  # on a GPU: the embedding's device-side assert
        return
    low, high = torch.stack(torch.aminmax(idx)).tolist()
    if low < 0 or high >= config.vocab_size:
        raise ValueError(f"idx holds token ids from {low} to {high}: they must be in "
                         f"[0, vocab_size={config.vocab_size})")


def _as_count(value, name: str) -> int:
    """value as a positive int: Python and numpy integers and integer 0-dim tensors
    (operator.index), not bools."""
    message = f"{name} must be a positive int, got {value!r}"
    if isinstance(value, bool):
        raise TypeError(message)
    try:
        count = operator.index(value)
    except TypeError:
        raise TypeError(message) from None
    if count < 1:
        raise ValueError(message)
    return count


def _check_temperature(temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a float, got {temperature!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")


def _check_sampling(config, idx, max_new_tokens, temperature, top_k) -> tuple[int, Optional[int]]:
    """Check generate()'s arguments; returns (max_new_tokens, top_k) as ints."""
    if not config.causal:
        raise ValueError("generate needs a causal model; this one is a bidirectional "
                         "(masked-LM) encoder")
    _check_idx(idx, config, 0)
    max_new_tokens = _as_count(max_new_tokens, "max_new_tokens")
    if idx.shape[1] + max_new_tokens > config.max_seq_len:
        raise ValueError(f"prompt length {idx.shape[1]} + max_new_tokens {max_new_tokens} "
                         f"exceeds max_seq_len={config.max_seq_len}")
    _check_temperature(temperature)
    return max_new_tokens, None if top_k is None else _as_count(top_k, "top_k")


def sample_next(logits, temperature: float, top_k: Optional[int] = None,
                generator: Optional[torch.Generator] = None):
    """logits (B, V) -> next tokens (B, 1): argmax when temperature is 0, else a sample from
    softmax(logits / temperature) restricted to the top_k largest logits. The row maximum is
    subtracted before dividing, so a tiny temperature tends to argmax instead of overflowing."""
    _check_temperature(temperature)
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float()
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # <= 0, max 0
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
