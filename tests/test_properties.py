"""Property-based tests (hypothesis): random shapes, dtypes, masks and strides for every public
op on every kernel backend available on CPU (the C++ kernels of ``cuda``, the Triton kernels
under the interpreter), forward and backward, each example against the float64 reference
(``*_ref(upcast=True)``) by the pass rule.

The default profile runs a few derandomized examples per op and backend (reproducible in CI);
``LLM_KERNELS_HYPOTHESIS_PROFILE=long`` runs many more, freshly random each time (a failure
prints the blob that reproduces it with ``@reproduce_failure``). Triton examples stay tiny
(L <= 48, D <= 64): the interpreter runs them through numpy.

Triage of a long-profile failure: the pass rule compares Frobenius norms, so where one element
dominates a tensor (a rank-1 weight gradient from a single row, a gradient funnelled through a
few hidden units) the verdict rests on that element's rounding; a kernel result one ulp from
the reference can then fail when torch happens to be exact. Such a near-bound failure (kernel
error 2-4x torch's, on a degenerate shape) is a limit of the rule; a bug shows as errors far
beyond torch's, or as a pattern (every seed of a shape family). Known families of the kind:
- Attention dq/dk where query rows see one or two keys (Lk of 1 or 2, or causal with Lq much
  larger than Lk, or masks): the kernels take delta = rowsum(dO * O) from its own dot product,
  as FlashAttention does, where torch sums P * dP over the very dP it subtracts it from; with
  a peaked row, dS = P (dP - delta) is a small difference and the two roundings no longer
  cancel (up to ~10x torch's error at D ~ 70, on either kernel backend; a plain fp32 copy of
  that formulation fails the same examples). With a single key the exact gradient is 0, torch
  gives 0, and the kernels' rounding noise (~1e-7 per element) meets the rule's absolute
  float32 floor of 1e-6.
- SwiGLU's fp16 weight gradients on a few rows (1-2 seeds in 300 at 6 rows, both backends,
  at 3-4x torch's error).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import llm_kernels as lk
from llm_kernels.reference import (ACTIVATIONS, attention_ref, causal_keep, cross_entropy_ref,
                                   feed_forward_ref, layer_norm_ref, rms_norm_ref, softmax_ref,
                                   swiglu_ref)
from property_profile import profile
from reference_check import check_against_reference, randn, require_cpu_backend

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("cuda", "triton")
# Examples per test as a fraction of the profile's max_examples: the C++ kernels are fast,
# the interpreter is not.
WEIGHT = {"cuda": 2.0, "triton": 0.8}


def run_property(strategy, check, backend: str, weight: float = 1.0) -> None:
    """Run ``check(case, backend)`` over examples of ``strategy`` under the selected profile."""
    require_cpu_backend(backend)
    base = profile()
    examples = max(1, round(base.max_examples * WEIGHT[backend] * weight))

    @settings(base, max_examples=examples)
    @given(strategy)
    def prop(case):
        check(case, backend)

    prop()


def tiny(backend: str) -> bool:
    return backend == "triton"


SEEDS = st.integers(0, 2**31 - 1)

# The pass rule compares norms: on a tensor of a handful of elements (or one that all flows
# through a handful) it compares single roundings, where torch can be exact by luck and a
# correctly rounded kernel still fail.
MIN_ELEMENTS = 8


def assume_enough_elements(*shapes) -> None:
    """Skip examples where a compared output or gradient has fewer than MIN_ELEMENTS."""
    assume(all(math.prod(s) >= MIN_ELEMENTS for s in shapes))


@st.composite
def input_scales(draw, dtype):
    """Spread of random inputs: large only in 16 bits. In float32 a wide spread saturates
    softmax rows, whose gradients are then all cancellation: torch's own float32 error passes
    the 1e-5 cap only at unit scale (test_extremes covers large values)."""
    return 1.0 if dtype == torch.float32 else draw(st.sampled_from((1.0, 8.0)))


# ---- attention ------------------------------------------------------------------------------

MASKS = ("none", "padding", "additive", "masked_row")


@dataclass(frozen=True)
class AttentionCase:
    b: int
    h: int
    hkv: int
    lq: int
    lk: int
    d: int
    dtype: torch.dtype
    causal: bool
    mask: str
    mask_dims: tuple  # additive mask: which of (B, H, Lq, Lk) are full (the others 1)
    mask_rank: int  # additive mask: leading size-1 dims dropped down to this rank
    mask_dtype: torch.dtype  # additive mask
    seq_major: bool  # q, k, v are (B, L, H, D) tensors transposed to (B, H, L, D)
    scale_factor: Optional[float]  # scale = scale_factor / sqrt(D); None: the default 1/sqrt(D)
    seed: int


@st.composite
def attention_cases(draw, backend):
    small = tiny(backend)
    hkv = draw(st.integers(1, 2))
    dtype = draw(st.sampled_from(DTYPES))
    length = st.integers(1, 48 if small else 100)
    return AttentionCase(
        b=draw(st.integers(1, 2)), h=hkv * draw(st.integers(1, 3)), hkv=hkv,
        lq=draw(length), lk=draw(length),
        d=draw(st.integers(8, 64 if small else 256)), dtype=dtype, causal=draw(st.booleans()),
        mask=draw(st.sampled_from(MASKS)), mask_dims=draw(st.tuples(*[st.booleans()] * 4)),
        mask_rank=draw(st.integers(1, 4)),
        mask_dtype=draw(st.sampled_from((dtype, torch.float32))),
        seq_major=draw(st.booleans()), scale_factor=draw(st.one_of(
            st.none(), st.floats(0.25, 1.0 if dtype == torch.float32 else 3.0))),
        seed=draw(SEEDS))


def attention_inputs(c: AttentionCase, gen):
    """q (B, H, Lq, D), k/v (B, Hkv, Lk, D); with seq_major, strided views of (B, L, H, D)."""
    def make(heads, length):
        if c.seq_major:
            return randn(gen, c.b, length, heads, c.d, dtype=c.dtype).transpose(1, 2)
        return randn(gen, c.b, heads, length, c.d, dtype=c.dtype)
    return make(c.h, c.lq), make(c.hkv, c.lk), make(c.hkv, c.lk)


def attention_mask(c: AttentionCase, gen) -> Optional[torch.Tensor]:
    full = (c.b, c.h, c.lq, c.lk)
    if c.mask == "padding":  # (B, 1, 1, Lk): batch i attends to its first n_i >= 1 keys
        lengths = torch.randint(1, c.lk + 1, (c.b, 1, 1, 1), generator=gen)
        return torch.arange(c.lk) < lengths
    if c.mask == "additive":
        shape = tuple(n if keep else 1 for n, keep in zip(full, c.mask_dims))[4 - c.mask_rank:]
        return randn(gen, *shape, dtype=c.mask_dtype)
    if c.mask == "masked_row":  # (B, H, Lq, Lk) random, one query row sees no key
        keep = torch.rand(full, generator=gen) > 0.3
        keep[tuple(torch.randint(0, n, (), generator=gen) for n in full[:3])] = False
        return keep
    return None


def blind_rows(c: AttentionCase, mask) -> torch.Tensor:
    """Bool (B, H, Lq): query rows that see no key at all (bool mask and causal together)."""
    keep = torch.ones(c.b, c.h, c.lq, c.lk, dtype=torch.bool)
    if mask is not None and mask.dtype == torch.bool:
        keep = keep & mask
    if c.causal:
        keep = keep & causal_keep(c.lq, c.lk, c.lk - c.lq, "cpu")
    return ~keep.any(-1)


def check_attention(c: AttentionCase, backend: str) -> None:
    gen = torch.Generator().manual_seed(c.seed)
    q, k, v = attention_inputs(c, gen)
    mask = attention_mask(c, gen)
    scale = None if c.scale_factor is None else c.scale_factor / math.sqrt(c.d)
    kwargs = dict(causal=c.causal, scale=scale, attn_mask=mask)
    got = check_against_reference(
        lambda backend, q, k, v: lk.attention(q, k, v, backend=backend, **kwargs),
        lambda q, k, v: attention_ref(q, k, v, upcast=True, **kwargs),
        dict(q=q, k=k, v=v), c.dtype, backend, gen, "attention")
    blind = blind_rows(c, mask)
    for name in ("out0", "dq"):
        assert torch.equal(got[name][blind], torch.zeros_like(got[name][blind])), (
            f"{name}: a query row that sees no key must give exact zeros")


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_properties(backend):
    run_property(attention_cases(backend), check_attention, backend, weight=2.0)


# ---- layer_norm / rms_norm ------------------------------------------------------------------

@dataclass(frozen=True)
class NormCase:
    lead: tuple
    c: int
    dtype: torch.dtype
    weight: bool
    bias: bool
    residual: bool
    eps: float
    shift: float  # added to x: a large mean stresses the variance computation
    seed: int


# Below these widths the gradient of x is O(eps) and all cancellation (rms_norm at C = 1,
# layer_norm at C <= 2 normalize every direction away): float32 torch itself misses the
# 1e-5 bound there, so no float32 kernel can pass; test_extremes checks them.
MIN_WIDTH = {True: 2, False: 3}


@st.composite
def norm_cases(draw, backend, rms):
    return NormCase(
        lead=tuple(draw(st.lists(st.integers(1, 9), max_size=2))),
        c=draw(st.integers(MIN_WIDTH[rms], 300 if tiny(backend) else 2100)),
        dtype=draw(st.sampled_from(DTYPES)),
        weight=draw(st.booleans()), bias=not rms and draw(st.booleans()),
        residual=draw(st.booleans()), eps=draw(st.sampled_from((1e-5, 1e-6, 0.1))),
        shift=draw(st.sampled_from((0.0, 4.0))), seed=draw(SEEDS))


def check_norm(c: NormCase, backend: str, rms: bool) -> None:
    assume_enough_elements((*c.lead, c.c), *[(c.c,)] * (c.weight or c.bias))
    gen = torch.Generator().manual_seed(c.seed)
    tensors = {"x": randn(gen, *c.lead, c.c, dtype=torch.float64).add(c.shift).to(c.dtype)}
    if c.weight:
        tensors["weight"] = randn(gen, c.c, dtype=c.dtype, scale=0.5).add(1)
    if c.bias:
        tensors["bias"] = randn(gen, c.c, dtype=c.dtype)
    if c.residual:
        tensors["residual"] = randn(gen, *c.lead, c.c, dtype=c.dtype)
    fn, ref = (lk.rms_norm, rms_norm_ref) if rms else (lk.layer_norm, layer_norm_ref)
    check_against_reference(
        lambda backend, **t: fn(**t, eps=c.eps, backend=backend),
        lambda **t: ref(**t, eps=c.eps, upcast=True),
        tensors, c.dtype, backend, gen, "rms_norm" if rms else "layer_norm")


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_properties(backend, rms):
    run_property(norm_cases(backend, rms), lambda c, b: check_norm(c, b, rms), backend)


# ---- softmax --------------------------------------------------------------------------------

@dataclass(frozen=True)
class SoftmaxCase:
    shape: tuple
    dim: int
    dtype: torch.dtype
    scale: float
    seed: int


@st.composite
def softmax_cases(draw, backend):
    """A wide axis among up to two narrow ones, in any order; the interpreter (one program
    per row) always reduces over the wide axis, so that it runs few rows."""
    shape = tuple(draw(st.lists(st.integers(1, 5 if tiny(backend) else 9), max_size=2)))
    shape += (draw(st.integers(1, 300 if tiny(backend) else 5000)),)
    perm = draw(st.permutations(range(len(shape))))
    wide = perm.index(len(shape) - 1)
    dim = wide if tiny(backend) else draw(st.integers(0, len(shape) - 1))
    dtype = draw(st.sampled_from(DTYPES))
    return SoftmaxCase(shape=tuple(shape[i] for i in perm),
                       dim=dim - len(shape) * draw(st.booleans()),  # negative dims too
                       dtype=dtype, scale=draw(input_scales(dtype)), seed=draw(SEEDS))


def check_softmax(c: SoftmaxCase, backend: str) -> None:
    assume_enough_elements(c.shape)
    gen = torch.Generator().manual_seed(c.seed)
    x = randn(gen, *c.shape, dtype=c.dtype, scale=c.scale)
    check_against_reference(
        lambda backend, x: lk.softmax(x, c.dim, backend=backend),
        lambda x: softmax_ref(x, c.dim, upcast=True), {"x": x}, c.dtype, backend, gen, "softmax")


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_properties(backend):
    run_property(softmax_cases(backend), check_softmax, backend)


# ---- feed_forward / swiglu ------------------------------------------------------------------

@dataclass(frozen=True)
class FeedForwardCase:
    lead: tuple
    d: int
    d_ff: int
    d_out: int
    dtype: torch.dtype
    activation: str
    b1: bool
    b2: bool
    seed: int


@st.composite
def feed_forward_cases(draw, backend):
    dims = st.integers(1, 40 if tiny(backend) else 160)
    return FeedForwardCase(
        lead=tuple(draw(st.lists(st.integers(1, 7 if tiny(backend) else 20), min_size=1,
                                 max_size=2))),
        d=draw(dims), d_ff=draw(dims), d_out=draw(dims), dtype=draw(st.sampled_from(DTYPES)),
        activation=draw(st.sampled_from(ACTIVATIONS)), b1=draw(st.booleans()),
        b2=draw(st.booleans()), seed=draw(SEEDS))


def linear_weight(gen, out_features, in_features, dtype):
    """nn.Linear-like scale: unit-variance inputs give unit-variance outputs."""
    return randn(gen, out_features, in_features, dtype=dtype, scale=1 / math.sqrt(in_features))


def feed_forward_shapes(c: FeedForwardCase, biases: bool) -> list:
    """Shapes of x, the weights, the output (and the biases), all compared, and of the hidden
    activations (N, d_ff) every gradient flows through."""
    n = math.prod(c.lead)
    shapes = [(n, c.d), (c.d_ff, c.d), (c.d_out, c.d_ff), (n, c.d_out), (n, c.d_ff)]
    return shapes + [(c.d_ff,)] * c.b1 + [(c.d_out,)] * c.b2 if biases else shapes


def check_feed_forward(c: FeedForwardCase, backend: str) -> None:
    assume_enough_elements(*feed_forward_shapes(c, biases=True))
    gen = torch.Generator().manual_seed(c.seed)
    tensors = {"x": randn(gen, *c.lead, c.d, dtype=c.dtype),
               "w1": linear_weight(gen, c.d_ff, c.d, c.dtype),
               "w2": linear_weight(gen, c.d_out, c.d_ff, c.dtype)}
    if c.b1:
        tensors["b1"] = randn(gen, c.d_ff, dtype=c.dtype)
    if c.b2:
        tensors["b2"] = randn(gen, c.d_out, dtype=c.dtype)

    def call(backend, x, w1, w2, b1=None, b2=None):
        return lk.feed_forward(x, w1, b1, w2, b2, activation=c.activation, backend=backend)

    def ref(x, w1, w2, b1=None, b2=None):
        return feed_forward_ref(x, w1, b1, w2, b2, activation=c.activation, upcast=True)
    check_against_reference(call, ref, tensors, c.dtype, backend, gen, "feed_forward")


def check_swiglu(c: FeedForwardCase, backend: str) -> None:
    assume_enough_elements(*feed_forward_shapes(c, biases=False))
    gen = torch.Generator().manual_seed(c.seed)
    tensors = {"x": randn(gen, *c.lead, c.d, dtype=c.dtype),
               "w_gate": linear_weight(gen, c.d_ff, c.d, c.dtype),
               "w_up": linear_weight(gen, c.d_ff, c.d, c.dtype),
               "w_down": linear_weight(gen, c.d_out, c.d_ff, c.dtype)}
    check_against_reference(
        lambda backend, **t: lk.swiglu(**t, backend=backend),
        lambda **t: swiglu_ref(**t, upcast=True), tensors, c.dtype, backend, gen, "swiglu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_feed_forward_properties(backend):
    run_property(feed_forward_cases(backend), check_feed_forward, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_properties(backend):
    run_property(feed_forward_cases(backend), check_swiglu, backend)


# ---- cross_entropy --------------------------------------------------------------------------

@dataclass(frozen=True)
class CrossEntropyCase:
    n: int
    v: int
    dtype: torch.dtype
    ignore_index: int
    ignored: float  # fraction of rows whose target is ignore_index
    reduction: str
    scale: float
    seed: int


@st.composite
def cross_entropy_cases(draw, backend):
    v = draw(st.integers(1, 400 if tiny(backend) else 5000))
    dtype = draw(st.sampled_from(DTYPES))
    return CrossEntropyCase(
        n=draw(st.integers(1, 16 if tiny(backend) else 64)), v=v, dtype=dtype,
        ignore_index=draw(st.sampled_from((-100, -1) if v == 1 else (-100, -1, 0))),
        ignored=draw(st.sampled_from((0.0, 0.3))),
        reduction=draw(st.sampled_from(("mean", "sum", "none"))),
        scale=draw(input_scales(dtype)), seed=draw(SEEDS))


def cross_entropy_target(c: CrossEntropyCase, gen) -> torch.Tensor:
    """(N,) int64 classes; a fraction set to ignore_index, never row 0 (mean stays defined)."""
    low = 1 if c.ignore_index == 0 else 0  # a class that is not ignore_index
    target = torch.randint(low, c.v, (c.n,), generator=gen)
    ignored = torch.rand(c.n, generator=gen) < c.ignored
    ignored[0] = False
    return target.masked_fill(ignored, c.ignore_index)


def check_cross_entropy(c: CrossEntropyCase, backend: str) -> None:
    assume_enough_elements((c.n, c.v))
    gen = torch.Generator().manual_seed(c.seed)
    logits = randn(gen, c.n, c.v, dtype=c.dtype, scale=c.scale)
    target = cross_entropy_target(c, gen)
    kwargs = dict(ignore_index=c.ignore_index, reduction=c.reduction)
    check_against_reference(
        lambda backend, logits: lk.cross_entropy(logits, target, backend=backend, **kwargs),
        lambda logits: cross_entropy_ref(logits, target, upcast=True, **kwargs),
        {"logits": logits}, c.dtype, backend, gen, "cross_entropy")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_properties(backend):
    run_property(cross_entropy_cases(backend), check_cross_entropy, backend)
