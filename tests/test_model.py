"""The reference GPT (llm_kernels.models): agreement with an independent torch.nn.functional
model, the same logits/loss/gradients on every backend, KV-cache generation, autocast."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import llm_kernels as lk
from llm_kernels.models import GPT, GPTConfig
from llm_kernels.models.gpt import sample_next
from llm_kernels.numerics import assert_close

@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these tiny shapes run faster so on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Small odd-ish shapes; head dim 16 (>= the kernels' minimum of 8).
VARIANTS = {
    "gpt2": dict(mlp="gelu", norm="layernorm", rope=False, causal=True, n_kv_head=2),
    "llama": dict(mlp="swiglu", norm="rmsnorm", rope=True, causal=True, n_kv_head=1),
    "encoder": dict(mlp="gelu", norm="layernorm", rope=False, causal=False, n_kv_head=2),
}


def tiny_config(**overrides) -> GPTConfig:
    base = dict(vocab_size=257, n_layer=2, n_head=2, n_kv_head=2, d_model=32, d_ff=96,
                max_seq_len=24)
    return GPTConfig(**{**base, **overrides})


def randomize(model: GPT, scale: float = 1.0) -> GPT:
    """Weights N(0, scale / sqrt(fan_in)) and norm params near 1 / 0, so that attention and
    every layer shape the logits (GPT-2 init leaves a fresh model nearly position-blind)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or \
                    name == "norm_f.weight":
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0, scale / math.sqrt(p.shape[1]))
    return model


def batch(config: GPTConfig, b: int = 3, t: int = 17):
    idx = torch.randint(0, 256, (b, t))
    targets = torch.randint(0, 256, (b, t))
    if not config.causal:  # masked LM: loss on a subset of positions only
        targets[torch.rand(b, t) > 0.3] = -100
        targets[:, 0] = idx[:, 0]
    return idx, targets


# ----------------------------------------------------------------------------- independent model

def _rope(x, pos0: int):
    """x (B, H, T, D) rotated by angle pos * 10000^(-2i/D) on pairs (i, i + D/2), in fp64."""
    d = x.shape[-1]
    pos = torch.arange(pos0, pos0 + x.shape[2], dtype=torch.float64)
    angles = pos[:, None] * 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def functional_gpt(params: dict, config: GPTConfig, idx, targets=None, dtype=torch.float64):
    """The same model written with torch.nn.functional only, unfused residuals, from a
    state dict; every tensor cast to ``dtype``. Returns (logits, loss)."""
    p = {k: v.to(dtype) for k, v in params.items()}
    b, t = idx.shape
    d, h, hkv = config.d_model, config.n_head, config.n_kv_head
    hd = d // h

    def norm(x, name):
        if config.norm == "layernorm":
            return F.layer_norm(x, (d,), p[name + ".weight"], p[name + ".bias"], eps=1e-5)
        return F.rms_norm(x, (d,), p[name + ".weight"], eps=1e-6)

    x = F.embedding(idx, p["wte.weight"])
    if not config.rope:
        x = x + F.embedding(torch.arange(t), p["wpe.weight"])
    for i in range(config.n_layer):
        pre = f"blocks.{i}."
        qkv = F.linear(norm(x, pre + "norm1"), p[pre + "attn.qkv.weight"], p[pre + "attn.qkv.bias"])
        q, k, v = qkv.split([h * hd, hkv * hd, hkv * hd], dim=-1)
        q = q.reshape(b, t, h, hd).transpose(1, 2)
        k = k.reshape(b, t, hkv, hd).transpose(1, 2)
        v = v.reshape(b, t, hkv, hd).transpose(1, 2)
        if config.rope:
            q, k = _rope(q, 0), _rope(k, 0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=config.causal, enable_gqa=True)
        y = y.transpose(1, 2).reshape(b, t, d)
        x = x + F.linear(y, p[pre + "attn.proj.weight"], p[pre + "attn.proj.bias"])
        z = norm(x, pre + "norm2")
        if config.mlp == "gelu":
            z = F.linear(F.gelu(F.linear(z, p[pre + "mlp.fc_in.weight"],
                                         p[pre + "mlp.fc_in.bias"])),
                         p[pre + "mlp.fc_out.weight"], p[pre + "mlp.fc_out.bias"])
        else:
            z = F.linear(F.silu(F.linear(z, p[pre + "mlp.gate.weight"])) *
                         F.linear(z, p[pre + "mlp.up.weight"]), p[pre + "mlp.down.weight"])
        x = x + z
    logits = F.linear(norm(x, "norm_f"), p["wte.weight"])
    loss = None
    if targets is not None:
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=-100)
    return logits, loss


def _param_grads(params: dict, config, idx, targets, dtype):
    leaves = {k: v.detach().to(dtype).requires_grad_(True) for k, v in params.items()}
    logits, loss = functional_gpt(leaves, config, idx, targets, dtype)
    loss.backward()
    return logits, loss, {k: v.grad for k, v in leaves.items()}


def _run(model: GPT, idx, targets):
    model.zero_grad(set_to_none=True)
    logits, loss = model(idx, targets)
    loss.backward()
    return logits, loss, {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_functional_model(variant):
    """lk model (default backend) vs the torch.nn.functional model: logits, loss and every
    parameter gradient by the pass rule against the functional model in fp64."""
    config = tiny_config(**VARIANTS[variant])
    model = randomize(GPT(config))
    idx, targets = batch(config)
    params = {k: v.detach() for k, v in model.state_dict().items()}
    ref_logits, ref_loss, ref_grads = _param_grads(params, config, idx, targets, torch.float64)
    t_logits, t_loss, t_grads = _param_grads(params, config, idx, targets, torch.float32)
    logits, loss, grads = _run(model, idx, targets)
    assert logits.shape == (3, 17, 257) and logits.dtype == torch.float32
    assert_close(logits, ref_logits, t_logits, torch.float32, "logits")
    assert_close(loss, ref_loss, t_loss, torch.float32, "loss")
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], t_grads[name], torch.float32, f"grad {name}")


def _copy_with_backend(model: GPT, backend: str, dtype=torch.float32) -> GPT:
    device = next(model.parameters()).device
    clone = GPT(GPTConfig(**{**model.config.to_dict(), "backend": backend})).to(device, dtype)
    clone.load_state_dict(model.state_dict())
    return clone


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_backends_agree(backend, variant):
    """Same weights on the triton (interpreter on CPU) or cuda (C++ CPU kernels) backend:
    logits, loss and gradients pass the rule against fp64, torch backend fp32 as the baseline."""
    ok, why = lk.available_backends()[backend]
    if not ok:
        pytest.skip(f"backend {backend} unavailable: {why}")
    config = tiny_config(backend="torch", **VARIANTS[variant])
    model = randomize(GPT(config))
    idx, targets = batch(config, b=2, t=16)
    ref = _run(_copy_with_backend(model, "torch", torch.float64), idx, targets)
    base = _run(model, idx, targets)
    try:
        out = _run(_copy_with_backend(model, backend), idx, targets)
    except lk.BackendUnavailableError as exc:
        pytest.skip(f"backend {backend} cannot run the model yet: {exc}")
    assert_close(out[0], ref[0], base[0], torch.float32, f"{backend} logits")
    assert_close(out[1], ref[1], base[1], torch.float32, f"{backend} loss")
    for name, grad in out[2].items():
        assert_close(grad, ref[2][name], base[2][name], torch.float32, f"{backend} grad {name}")


def test_model_uses_lk_ops_with_the_configured_backend():
    config = tiny_config(backend="torch")
    lk.dispatch_log(clear=True)
    GPT(config)(*batch(config))
    ops = {(e["op"], e["backend"], e["reason"]) for e in lk.dispatch_log()}
    expected = {"attention", "layer_norm", "feed_forward", "cross_entropy"}
    assert {op for op, _, _ in ops} == expected
    assert all(backend == "torch" and reason == "requested" for _, backend, reason in ops)


# ----------------------------------------------------------------------------- generation

@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_greedy_generation_with_cache_matches_recompute(variant):
    """Greedy tokens with the KV cache == recomputing the whole sequence each step (fp64)."""
    config = tiny_config(**VARIANTS[variant])
    model = randomize(GPT(config), scale=3.0).double()
    prompt = torch.randint(0, 256, (3, 5))
    out = model.generate(prompt, max_new_tokens=config.max_seq_len - 5, temperature=0)
    expected = prompt
    with torch.no_grad():
        for _ in range(config.max_seq_len - 5):
            logits, _ = model(expected)
            expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.shape == (3, config.max_seq_len)
    assert torch.equal(out, expected)
    assert len(set(out[:, 5:].flatten().tolist())) > 3  # the test sees varied tokens


def test_cached_decode_logits_match_full_forward():
    """Prompt in one call, then Lq = 1 steps: the logits of every position pass the rule
    against the full forward in fp64 (fp32 full forward as the baseline)."""
    config = tiny_config(**VARIANTS["gpt2"])
    model = randomize(GPT(config)).eval()
    seq = torch.randint(0, 256, (2, 19))
    with torch.no_grad():
        caches = model.new_kv_caches(2, "cpu")
        steps = [model.cached_logits(seq[:, :7], caches, 0)]
        steps += [model.cached_logits(seq[:, i:i + 1], caches, i) for i in range(7, 19)]
        cached = torch.cat(steps, dim=1)
        full, _ = model(seq)
        ref, _ = _copy_with_backend(model, "torch", torch.float64)(seq)
    assert caches[0].k.shape == (2, config.n_kv_head, config.max_seq_len, config.head_dim)
    assert_close(cached, ref, full, torch.float32, "cached logits")


def test_generate_refuses_what_it_cannot_do():
    config = tiny_config()
    model = GPT(config)
    prompt = torch.randint(0, 256, (1, 20))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(prompt, max_new_tokens=5)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 1, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 1, top_k=0)
    with pytest.raises(ValueError, match="causal"):
        GPT(tiny_config(causal=False)).generate(prompt, 1)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randint(0, 256, (1, 25)))
    with pytest.raises(TypeError, match="int64"):
        model(torch.rand(1, 4))


@pytest.mark.parametrize("call, error, match", [
    (lambda m, p: m.generate([[1, 2]], 2), TypeError, "idx must be an int64 tensor .* a list"),
    (lambda m, p: m.generate(p, 2, temperature=float("nan")), ValueError, "temperature"),
    (lambda m, p: m.generate(p, 2, temperature=float("inf")), ValueError, "temperature"),
    (lambda m, p: m.generate(p, 2, temperature="1"), TypeError, "temperature"),
    (lambda m, p: m.generate(p, 2.0), TypeError, "max_new_tokens"),
    (lambda m, p: m.generate(p, True), TypeError, "max_new_tokens"),
    (lambda m, p: m.generate(p, 2, top_k=2.5), TypeError, "top_k"),
    (lambda m, p: m.generate(torch.tensor([[257, 1]]), 2), ValueError,
     r"token ids from 1 to 257: they must be in \[0, vocab_size=257\)"),
    (lambda m, p: m(torch.tensor([[-1, 1]])), ValueError, "vocab_size=257"),
    (lambda m, p: m.cached_logits(torch.tensor([[300]]), m.new_kv_caches(1, "cpu"), 0),
     ValueError, "vocab_size=257"),
])
def test_bad_generate_and_forward_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call(GPT(tiny_config()), torch.randint(0, 256, (1, 3)))


def test_generate_takes_integral_counts():
    model = GPT(tiny_config())
    prompt = torch.randint(0, 256, (2, 3))
    for count in (np.int64(5), torch.tensor(5)):
        assert model.generate(prompt, count, top_k=np.int64(4)).shape == (2, 8)


def test_generate_restores_every_modules_mode():
    model = GPT(tiny_config(dropout=0.1)).train()
    model.blocks[0].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    model.generate(torch.randint(0, 256, (1, 3)), 2)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert not model.blocks[0].training and model.blocks[1].training


def test_sample_next_top_k_and_temperature():
    logits = torch.randn(4, 97)
    assert torch.equal(sample_next(logits, 0.0), logits.argmax(-1, keepdim=True))
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_next(logits, 1.5, top_k=5, generator=gen) for _ in range(200)], 1)
    top5 = logits.topk(5, dim=-1).indices  # (4, 5)
    assert all(set(draws[r].tolist()) <= set(top5[r].tolist()) for r in range(4))
    assert all(len(set(draws[r].tolist())) > 1 for r in range(4))
    assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=gen),
                       logits.argmax(-1, keepdim=True))


@pytest.mark.parametrize("temperature", [1e-30, 1e-38, 1e-45])
def test_sample_next_tiny_temperature_is_greedy(temperature):
    """logits / temperature would overflow to inf (NaN probabilities): the row maximum is
    subtracted first, so the sample is the argmax."""
    logits = torch.tensor([[10.0, 9.0, -3.0], [-5.0, 2.0, 1.5]])
    gen = torch.Generator().manual_seed(0)
    for top_k in (None, 2):
        assert torch.equal(sample_next(logits, temperature, top_k, gen), torch.tensor([[0], [1]]))
    assert torch.equal(sample_next(logits.bfloat16(), temperature), torch.tensor([[0], [1]]))


def test_sample_next_rejects_a_temperature_that_is_not_finite():
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            sample_next(torch.randn(1, 5), bad)


def test_generate_samples_reproducibly_with_a_generator():
    model = randomize(GPT(tiny_config()))
    prompt = torch.randint(0, 256, (2, 3))
    a = model.generate(prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.equal(a[:, :3], prompt)


# -------------------------------------------------------------------------- autocast, dropout, init

def test_cpu_bf16_autocast_matches_bf16_functional_model():
    """Under autocast the lk ops get bf16 activations and weights (they are not autocast-
    aware); logits and loss pass the bf16 rule, gradients land in the fp32 parameters."""
    config = tiny_config(**VARIANTS["llama"])
    model = randomize(GPT(config))
    idx, targets = batch(config)
    params = {k: v.detach() for k, v in model.state_dict().items()}
    ref_logits, ref_loss = functional_gpt(params, config, idx, targets, torch.float64)
    t_logits, t_loss = functional_gpt(params, config, idx, targets, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, targets)
    assert logits.dtype == torch.bfloat16
    assert_close(logits, ref_logits, t_logits, torch.bfloat16, "autocast logits")
    assert_close(loss, ref_loss, t_loss, torch.bfloat16, "autocast loss")
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name


def test_dropout_on_in_training_off_in_eval():
    model = randomize(GPT(tiny_config(dropout=0.3)))
    idx = torch.randint(0, 256, (2, 9))
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


def test_gpt2_init_and_tied_head():
    config = GPTConfig(vocab_size=257, n_layer=6, n_head=4, n_kv_head=4, d_model=256,
                       d_ff=1024, max_seq_len=64)
    model = GPT(config)
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    for name, p in model.named_parameters():
        if name.endswith("proj.weight") or name.endswith("fc_out.weight"):
            assert abs(p.std().item() / residual_std - 1) < 0.05, name
        elif p.dim() == 2:
            assert abs(p.std().item() / 0.02 - 1) < 0.05, name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:
            assert torch.all(p == 1), name
    idx = torch.randint(0, 256, (1, 5))
    logits, _ = model(idx)
    logits.sum().backward()
    assert model.wte.weight.grad is not None and "lm_head" not in dict(model.named_parameters())
    assert model.num_params() == sum(p.numel() for p in model.parameters()) - 64 * 256


@pytest.mark.parametrize("bad, match", [
    (dict(d_model=33), "multiple of n_head"),
    (dict(n_kv_head=3, n_head=4, d_model=32), "multiple of n_kv_head"),
    (dict(mlp="relu"), "mlp"),
    (dict(norm="batchnorm"), "norm"),
    (dict(backend="tpu"), "backend"),
    (dict(dropout=1.0), "dropout"),
    (dict(n_layer=0), "n_layer"),
    (dict(rope=True, n_head=4, d_model=36), "even head dim"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**bad)


@pytest.mark.parametrize("bad, match", [
    (dict(causal="no"), "GPTConfig.causal must be a bool, got 'no'"),
    (dict(rope="false"), "GPTConfig.rope must be a bool, got 'false'"),
    (dict(causal=1), "GPTConfig.causal must be a bool"),
    (dict(dropout="0.1"), "GPTConfig.dropout must be a float"),
])
def test_config_rejects_bad_types(bad, match):
    with pytest.raises(TypeError, match=match):
        tiny_config(**bad)


# ----------------------------------------------------------------------------- GPU

GPU_CONFIG = dict(vocab_size=257, n_layer=4, n_head=8, n_kv_head=2, d_model=512, d_ff=1376,
                  max_seq_len=512)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", ["gpt2", "llama"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_backends_agree(backend, variant):
    """At a realistic size on the GPU: fp32 logits, loss and gradients by the pass rule
    against fp64; bf16 (model cast) logits and loss against fp64 with torch bf16 as baseline."""
    ok, why = lk.available_backends()[backend]
    if not ok:
        pytest.skip(f"backend {backend} unavailable: {why}")
    config = GPTConfig(**{**GPU_CONFIG, **VARIANTS[variant], "backend": "torch"})
    model = randomize(GPT(config)).cuda()
    idx, targets = (t.cuda() for t in batch(config, b=4, t=509))
    ref = _run(_copy_with_backend(model, "torch", torch.float64), idx, targets)
    base = _run(model, idx, targets)
    out = _run(_copy_with_backend(model, backend), idx, targets)
    assert_close(out[0], ref[0], base[0], torch.float32, f"{backend} logits")
    assert_close(out[1], ref[1], base[1], torch.float32, f"{backend} loss")
    for name, grad in out[2].items():
        assert_close(grad, ref[2][name], base[2][name], torch.float32, f"{backend} grad {name}")
    base16 = _run(_copy_with_backend(model, "torch", torch.bfloat16), idx, targets)
    out16 = _run(_copy_with_backend(model, backend, torch.bfloat16), idx, targets)
    assert_close(out16[0], ref[0], base16[0], torch.bfloat16, f"{backend} bf16 logits")
    assert_close(out16[1], ref[1], base16[1], torch.bfloat16, f"{backend} bf16 loss")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "cuda"])
def test_gpu_autocast_and_cached_generation(backend):
    """bf16 autocast forward/backward on the GPU, and greedy cached generation == recompute."""
    if backend != "auto" and not lk.available_backends()[backend][0]:
        pytest.skip(f"backend {backend} unavailable: {lk.available_backends()[backend][1]}")
    config = GPTConfig(**{**GPU_CONFIG, **VARIANTS["gpt2"], "backend": backend})
    model = randomize(GPT(config), scale=3.0).cuda()
    idx, targets = (t.cuda() for t in batch(config, b=4, t=256))
    ref_logits, _ = _copy_with_backend(model, "torch", torch.float64)(idx)
    base_model = _copy_with_backend(model, "torch")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        base_logits, _ = base_model(idx)
        logits, loss = model(idx, targets)
    assert logits.dtype == torch.bfloat16
    assert_close(logits, ref_logits, base_logits, torch.bfloat16, "autocast logits")
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    prompt = idx[:, :9]
    out = model.generate(prompt, max_new_tokens=40, temperature=0)
    expected = prompt
    with torch.no_grad():
        for _ in range(40):
            expected = torch.cat([expected, model(expected)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, expected)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "cuda"])
def test_gpu_training_step_never_waits_for_the_device(backend):
    """Forward, loss and backward under bf16 autocast issue their work without one host-device
    sync (torch's sync debug mode turns any into an error): the token ids and targets are not
    read on the host, so the host can queue the next step while the device runs this one."""
    if backend != "auto" and not lk.available_backends()[backend][0]:
        pytest.skip(f"backend {backend} unavailable: {lk.available_backends()[backend][1]}")
    config = GPTConfig(**{**GPU_CONFIG, **VARIANTS["gpt2"], "backend": backend})
    model = randomize(GPT(config)).cuda()
    idx, targets = (t.cuda() for t in batch(config, b=4, t=256))  # the shapes compiled above

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(idx, targets)
        loss.backward()
        return loss.detach()
    for _ in range(2):  # compilation, autotuning and one-time launch plans synchronize
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
