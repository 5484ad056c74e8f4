"""Hugging Face transformers with attn_implementation="llm_kernels" against "eager".

Tiny randomly initialised Llama (GQA), GPT-2 and BERT configs built here (no downloads). The
float64 reference is the model in float64 on torch's SDPA (math kernel): the eager attention
runs its softmax in float32, where float64's minimum turns masked rows into -inf and NaN. The
same-dtype torch computation is the eager model in float32. (Llama's RMSNorm and rotary
tables round through float32 even in a float64 model; GPT-2 and BERT are float64 throughout.)
Padded positions (attention_mask == 0) are left out of the comparisons: their rows see no key,
which lk defines as zeros and eager as a uniform average over masked keys.
"""
import contextlib
import copy
import sys
import warnings

import pytest
import torch

import llm_kernels as lk
from llm_kernels.numerics import assert_close

transformers = pytest.importorskip(
    "transformers",
    reason="Hugging Face transformers is not installed (pip install llm-kernels[hf])")

from llm_kernels.integrations import transformers as lk_hf  # noqa: E402

VOCAB = 97
# Softmax is shift invariant, so the loss does not depend on a key projection's bias: its exact
# gradient is zero and the computed one is rounding noise, where a relative error means nothing.
ZERO_GRADIENT_PARAMETERS = ("attention.self.key.bias",)


@pytest.fixture(scope="module", autouse=True)
def registered():
    lk_hf.register()


def llama_config(**overrides):
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **overrides)


def gpt2_config():
    return transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=48, n_layer=2, n_head=3)


def bert_config():
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2,
                                   num_attention_heads=3, intermediate_size=96,
                                   max_position_embeddings=64)


def build(config, auto_cls, attn_implementation):
    """A fresh eval-mode model on its own copy of ``config`` (from_config writes into it)."""
    model = auto_cls.from_config(copy.deepcopy(config), attn_implementation=attn_implementation)
    return model.eval()


def models(config, auto_cls=transformers.AutoModelForCausalLM, attn_implementation="llm_kernels"):
    """(model under test in fp32, eager fp32, fp64 reference), all with the same weights."""
    model = build(config, auto_cls, attn_implementation)
    eager = build(config, auto_cls, "eager")
    eager.load_state_dict(model.state_dict())
    ref64 = build(config, auto_cls, "sdpa").double()
    ref64.load_state_dict(model.state_dict())
    return model, eager, ref64


def padding_mask(batch, length, side, pads=(3, 0, 5)):
    """(B, L) int64 attention_mask with ``pads[b]`` zeros on the left or right of row b."""
    mask = torch.ones(batch, length, dtype=torch.int64)
    for row, pad in zip(range(batch), pads):
        if side == "left":
            mask[row, :pad] = 0
        else:
            mask[row, length - pad:] = 0
    return mask


def loss_and_grads(model, ids, mask, targets):
    """Cross-entropy of the logits at the real positions, and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=mask).logits  # (B, L, V)
    keep = mask.bool()
    loss = torch.nn.functional.cross_entropy(logits[keep].double(), targets[keep])
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()
             if p.grad is not None}
    return logits.detach()[keep], grads


def check_against_eager(config, auto_cls, ids, mask, context=contextlib.nullcontext):
    """Logits and parameter gradients of the llm_kernels model pass the rule against eager."""
    model, eager, ref64 = models(config, auto_cls)
    targets = torch.randint(0, VOCAB, ids.shape)
    lk.dispatch_log(clear=True)
    with context():
        out, grads = loss_and_grads(model, ids, mask, targets)
    assert any(e["op"] == "attention" and "fallback" not in e["reason"] for e in lk.dispatch_log())
    ref, grads64 = loss_and_grads(ref64, ids, mask, targets)
    torch_out, grads32 = loss_and_grads(eager, ids, mask, targets)
    assert_close(out, ref, torch_out, torch.float32, "logits")
    assert grads.keys() == grads64.keys() and len(grads) > 0
    for name in grads:
        if name.endswith(ZERO_GRADIENT_PARAMETERS):
            continue
        assert_close(grads[name], grads64[name], grads32[name], torch.float32, f"grad of {name}")


@pytest.mark.parametrize("side", ["left", "right"])
def test_llama_gqa_with_padding_matches_eager(side):
    ids = torch.randint(0, VOCAB, (3, 13))
    check_against_eager(llama_config(), transformers.AutoModelForCausalLM, ids,
                        padding_mask(3, 13, side))


def test_llama_without_mask_uses_causal_kernel_path():
    ids = torch.randint(0, VOCAB, (2, 17))
    check_against_eager(llama_config(), transformers.AutoModelForCausalLM, ids,
                        torch.ones_like(ids))


def test_gpt2_with_left_padding_matches_eager():
    ids = torch.randint(0, VOCAB, (3, 11))
    check_against_eager(gpt2_config(), transformers.AutoModelForCausalLM, ids,
                        padding_mask(3, 11, "left"))


def test_bert_with_right_padding_matches_eager():
    ids = torch.randint(0, VOCAB, (3, 11))
    check_against_eager(bert_config(), transformers.AutoModelForMaskedLM, ids,
                        padding_mask(3, 11, "right"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_llama_on_named_backend(backend):
    ids = torch.randint(0, VOCAB, (2, 9))
    try:
        check_against_eager(llama_config(), transformers.AutoModelForCausalLM, ids,
                            padding_mask(2, 9, "left"), context=lambda: lk.use_backend(backend))
    except lk.BackendUnavailableError as exc:
        pytest.skip(f"backend {backend!r} cannot run attention here yet: {exc}")
    assert {e["backend"] for e in lk.dispatch_log() if e["op"] == "attention"} == {backend}


@pytest.fixture
def attention_calls(monkeypatch):
    """Records (Lq, Lk) of every lk.attention call the integration makes."""
    calls = []

    def spy(q, k, v, **kwargs):
        calls.append((q.shape[2], k.shape[2]))
        return lk.attention(q, k, v, **kwargs)

    monkeypatch.setattr(lk_hf, "attention", spy)
    return calls


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_generate_with_cache_matches_eager(attention_calls, cache_implementation):
    """Greedy tokens equal eager's; each decoding step's logits pass the rule against the eager
    float64 model run on the whole generated sequence without a cache."""
    model, eager, ref64 = models(llama_config())
    prompt = torch.randint(0, VOCAB, (3, 7))
    mask = padding_mask(3, 7, "left", pads=(2, 0, 4))
    new = 5
    kwargs = dict(attention_mask=mask, max_new_tokens=new, do_sample=False,
                  cache_implementation=cache_implementation)
    with torch.no_grad():
        out = model.generate(prompt, output_logits=True, return_dict_in_generate=True, **kwargs)
        assert torch.equal(out.sequences, eager.generate(prompt, **kwargs))
        full_mask = torch.cat([mask, torch.ones(3, new, dtype=mask.dtype)], dim=1)
        step = slice(prompt.shape[1] - 1, prompt.shape[1] - 1 + new)
        ref = ref64(input_ids=out.sequences, attention_mask=full_mask).logits[:, step]
        torch_out = eager(input_ids=out.sequences, attention_mask=full_mask).logits[:, step]
    assert any(lq == 1 and lk_ > 1 for lq, lk_ in attention_calls), "no cached decoding step"
    assert_close(torch.stack(out.logits, dim=1), ref, torch_out, torch.float32, "step logits")


def test_dropout_in_training_falls_back_to_torch_with_reason():
    model = build(llama_config(attention_dropout=0.25), transformers.AutoModelForCausalLM,
                  "llm_kernels").train()
    ids = torch.randint(0, VOCAB, (2, 9))
    lk.dispatch_log(clear=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 9, VOCAB) and bool(torch.isfinite(logits).all())
    reasons = [e["reason"] for e in lk.dispatch_log() if e["op"] == "attention"]
    assert reasons and all(r == "fallback (transformers): dropout=0.25 (the kernels compute no "
                           "dropout)" for r in reasons)


def test_sdpa_model_under_patch_torch_runs_through_lk():
    """attn_implementation="sdpa" inside lk.patch_torch(): transformers' SDPA call reaches lk."""
    ids = torch.randint(0, VOCAB, (3, 13))
    mask = padding_mask(3, 13, "right")
    model, eager, ref64 = models(llama_config(), attn_implementation="sdpa")
    lk.dispatch_log(clear=True)
    with torch.no_grad(), lk.patch_torch():
        out = model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    assert any(e["op"] == "scaled_dot_product_attention" for e in lk.dispatch_log())
    with torch.no_grad():
        ref = ref64(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        torch_out = eager(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    assert_close(out, ref, torch_out, torch.float32, "logits")


def test_register_without_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install llm-kernels\[hf\]"):
        lk_hf.register()
