"""The bad-input matrix: every public function fed wrong ranks, mismatched shapes, mixed dtypes
and devices, unsupported dtypes, strided last dims, empty tensors, bad masks, NaN and inf, on
one backend.

    python tests/bad_input_matrix.py BACKEND [--device cpu|cuda]   # torch, cuda, triton, auto

Each case expects one of:
- ``Raises``: a TypeError/ValueError/RuntimeError (BackendUnavailableError for a backend named
  explicitly that lacks a dtype or head dim) whose message names the argument, raised before
  any kernel op is looked up (``_ops.ops`` is spied on);
- ``Matches``: a result that passes the pass rule against the float64 reference (float64
  inputs and head dims the kernels lack on ``torch``/``auto``, strided inputs the ops copy);
- ``NonFinite``: NaN/inf inputs give a result whose NaN/+inf/-inf pattern is the torch
  backend's or that of the torch.nn.functional op (NaN propagates as in torch, never vanishes);
  its finite entries pass the pass rule against the float64 reference.

Prints ``PASS <case>: ...`` or ``FAIL <case>: ...`` per case, then ``DONE <n> cases, <m>
failed``; exits 1 when a case failed. tests/test_bad_input.py runs it in a subprocess, so a crash
fails that test instead of killing pytest.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

NAN, INF = float("nan"), float("inf")
KERNEL_BACKENDS = ("cuda", "triton")
OTHER_DEVICE = "meta"


# ---- expectations ------------------------------------------------------------------------------

@dataclass
class Raises:
    exc: type
    pattern: str  # regex searched in the message; names the argument


@dataclass
class Matches:
    reference: Callable  # () -> float64 tensor or tuple, a *_ref(upcast=True) call


@dataclass
class NonFinite:
    reference: Callable  # () -> float64 tensor or tuple (finite entries are compared with it)
    alternative: Optional[Callable] = None  # () -> the torch.nn.functional op's result


@dataclass
class Case:
    name: str
    call: Callable  # () -> result; runs under lk.use_backend(backend)
    expect: object


class Matrix:
    """Runs cases on one backend; records what each did."""

    def __init__(self, lk, ops_module, backend: str):
        self.lk, self.backend = lk, backend
        self.launches: list[str] = []
        real_ops = ops_module.ops

        def spy(name):
            self.launches.append(name)
            return real_ops(name)
        ops_module.ops = spy

    def run_on(self, backend: str, call: Callable):
        with self.lk.use_backend(backend):
            return call()

    def check(self, case: Case) -> str:
        """'' when the case behaved as expected, else what went wrong."""
        expect = case.expect
        if isinstance(expect, Raises):
            return self.check_raises(case, expect)
        out = self.run_on(self.backend, case.call)
        torch_out = self.run_on("torch", case.call)
        if isinstance(expect, Matches):
            return compare_all(out, expect.reference(), torch_out)
        alternative = expect.alternative() if expect.alternative else None
        return check_non_finite(out, torch_out, alternative, expect.reference())

    def check_raises(self, case: Case, expect: Raises) -> str:
        self.launches.clear()
        try:
            self.run_on(self.backend, case.call)
        except Exception as exc:  # noqa: BLE001 - the type is what is checked
            if not isinstance(exc, expect.exc):
                return f"raised {type(exc).__name__}: {exc}; expected {expect.exc.__name__}"
            if not re.search(expect.pattern, str(exc)):
                return f"{type(exc).__name__} message {str(exc)!r} lacks /{expect.pattern}/"
            if self.launches:
                return f"raised only after looking up kernel ops {self.launches}"
            return ""
        return f"returned a result; expected {expect.exc.__name__} /{expect.pattern}/"


def as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def compare_all(out, ref, torch_out) -> str:
    from llm_kernels.numerics import compare
    for i, (o, r, t) in enumerate(zip(as_tuple(out), as_tuple(ref), as_tuple(torch_out),
                                      strict=True)):
        if o.dtype != t.dtype:
            return f"out{i} dtype {o.dtype}, torch backend gives {t.dtype}"
        result = compare(o, r, t, o.dtype)
        if not result.passed:
            return f"out{i} fails the pass rule: {result.describe()}"
    return ""


def pattern(t: torch.Tensor) -> torch.Tensor:
    """0 finite, 1 NaN, 2 +inf, 3 -inf, elementwise."""
    t = t.detach().double().cpu()
    return (torch.isnan(t) * 1 + torch.isposinf(t) * 2 + torch.isneginf(t) * 3).to(torch.int8)


def describe_pattern(p: torch.Tensor) -> str:
    flat = p.flatten()
    return (f"{int((flat == 1).sum())} NaN, {int((flat == 2).sum())} +inf, "
            f"{int((flat == 3).sum())} -inf of {flat.numel()}")


def check_non_finite(out, torch_out, alternative, ref) -> str:
    """The non-finite pattern is the torch backend's or the alternative's; finite entries
    pass the pass rule against the reference."""
    from llm_kernels.numerics import compare
    alternatives = as_tuple(alternative) if alternative is not None else None
    for i, (o, t, r) in enumerate(zip(as_tuple(out), as_tuple(torch_out), as_tuple(ref),
                                      strict=True)):
        allowed = [pattern(t)] + ([pattern(alternatives[i])] if alternatives else [])
        got = pattern(o)
        if not any(torch.equal(got, a) for a in allowed):
            return (f"out{i} non-finite pattern ({describe_pattern(got)}) differs from torch's "
                    f"({' or '.join(describe_pattern(a) for a in allowed)})")
        finite = (got == 0) & (pattern(r) == 0) & (pattern(t) == 0)
        if finite.any():
            o64, r64, t64 = (x.detach().double().cpu()[finite] for x in (o, r, t))
            result = compare(o64, r64, t64, o.dtype)
            if not result.passed:
                return f"out{i} finite entries fail the pass rule: {result.describe()}"
    return ""


# ---- inputs ------------------------------------------------------------------------------------

def math_sdpa(*args, **kwargs) -> torch.Tensor:
    """torch's sdpa by its math backend (its fused CPU kernel drops a NaN in the query)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(*args, **kwargs)


def poisoned(t: torch.Tensor, index, value: float) -> torch.Tensor:
    out = t.clone()
    out[index] = value
    return out


def unsupported(backend: str, pattern_: str, reference: Callable):
    """float64 or a head dim the kernels lack: a kernel backend named explicitly raises with
    the reason; torch and auto compute it."""
    from llm_kernels import BackendUnavailableError
    if backend in KERNEL_BACKENDS:
        return Raises(BackendUnavailableError, pattern_)
    return Matches(reference)


@dataclass
class Satisfies:
    predicate: Callable  # predicate(result) -> bool
    description: str


class Inputs:
    """Seeded random tensors on one device."""

    def __init__(self, device: str, seed: int = 1):
        self.device = torch.device(device)
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, *shape, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(device=self.device, dtype=dtype)

    def bools(self, *shape, value=True) -> torch.Tensor:
        return torch.full(shape, value, dtype=torch.bool, device=self.device)

    def target(self, n: int, classes: int) -> torch.Tensor:
        return torch.randint(0, classes, (n,), generator=self.gen).to(self.device)


def named(prefix: str, cases: list) -> list[Case]:
    return [Case(f"{prefix}/{name}", call, expect) for name, call, expect in cases]


# ---- attention ---------------------------------------------------------------------------------

def attention_cases(lk, backend: str, inp: Inputs) -> list[Case]:
    from llm_kernels.reference import attention_ref
    q, k, v = inp.randn(2, 4, 5, 16), inp.randn(2, 2, 7, 16), inp.randn(2, 2, 7, 16)

    def call(q_=q, k_=k, v_=v, **kw):
        return lambda: lk.attention(q_, k_, v_, **kw)

    def ref(q_=q, k_=k, v_=v, **kw):
        return lambda: attention_ref(q_, k_, v_, upcast=True, **kw)
    as64 = (q.double(), k.double(), v.double())
    d4 = (q[..., :4], k[..., :4], v[..., :4])
    d300 = tuple(inp.randn(1, 1, 3, 300) for _ in range(3))
    mask64 = inp.randn(5, 7, dtype=torch.float64)
    mask_grad = inp.randn(5, 7).requires_grad_()
    row_blocked = torch.zeros(5, 7, device=inp.device)
    row_blocked[3] = -INF
    return named("attention", [
        ("not_a_tensor", call(q_=q.tolist()), Raises(TypeError, r"q must be a torch\.Tensor")),
        ("rank_q", call(q_=q[0]), Raises(ValueError, r"q must have 4 dims")),
        ("rank_k", call(k_=k[None]), Raises(ValueError, r"k must have 4 dims")),
        ("batch_mismatch", call(q_=q[:1]), Raises(ValueError, r"must agree in B and D")),
        ("head_dim_mismatch", call(q_=q[..., :8]), Raises(ValueError, r"must agree in B and D")),
        ("kv_shape_mismatch", call(v_=v[:, :1]), Raises(ValueError, r"k and v must have")),
        ("heads_not_multiple", call(q_=q[:, :3]), Raises(ValueError, r"H=3 .* Hkv=2")),
        ("kv_heads_zero", call(k_=k[:, :0], v_=v[:, :0]), Raises(ValueError, r"Hkv=0")),
        ("mixed_dtype_k", call(k_=k.half()), Raises(TypeError, r"k has dtype torch\.float16")),
        ("mixed_dtype_v", call(v_=v.bfloat16()), Raises(TypeError, r"v has dtype")),
        ("mixed_device_k", call(k_=k.to(OTHER_DEVICE)), Raises(ValueError, r"k is on meta")),
        ("mixed_device_v", call(v_=v.to(OTHER_DEVICE)), Raises(ValueError, r"v is on meta")),
        ("int_dtype", call(q.int(), k.int(), v.int()), Raises(TypeError, r"q must be float16")),
        ("bool_dtype", call(q.bool(), k.bool(), v.bool()), Raises(TypeError, r"q must be")),
        ("float64", call(*as64), unsupported(backend, r"float64", ref(*as64))),
        ("head_dim_4", call(*d4), unsupported(backend, r"head dims 8\.\.256, got D=4", ref(*d4))),
        ("head_dim_300", call(*d300), unsupported(backend, r"got D=300", ref(*d300))),
        ("strided_last_dim_q", call(q_=inp.randn(2, 4, 16, 5).transpose(-1, -2)),
         Raises(ValueError, r"q must have a contiguous last dim")),
        ("strided_last_dim_v", call(v_=inp.randn(2, 2, 16, 7).transpose(-1, -2)),
         Raises(ValueError, r"v must have a contiguous last dim")),
        ("empty_lq", call(q_=q[:, :, :0]), Matches(ref(q_=q[:, :, :0]))),
        ("empty_lk", call(k_=k[:, :, :0], v_=v[:, :, :0]), Matches(ref(k_=k[:, :, :0],
                                                                       v_=v[:, :, :0]))),
        ("empty_lk_causal", call(k_=k[:, :, :0], v_=v[:, :, :0], causal=True),
         Matches(ref(k_=k[:, :, :0], v_=v[:, :, :0], causal=True))),
        ("empty_batch", call(q[:0], k[:0], v[:0]), Matches(ref(q[:0], k[:0], v[:0]))),
        ("mask_wrong_shape", call(attn_mask=inp.bools(5, 6)),
         Raises(ValueError, r"attn_mask of shape \(5, 6\) is not broadcastable")),
        ("mask_5d", call(attn_mask=inp.bools(1, 2, 4, 5, 7)), Raises(ValueError, r"attn_mask of")),
        ("mask_int", call(attn_mask=inp.bools(5, 7).int()),
         Raises(TypeError, r"attn_mask must be bool")),
        ("mask_not_a_tensor", call(attn_mask=[[True] * 7] * 5),
         Raises(TypeError, r"attn_mask must be a torch\.Tensor")),
        ("mask_device", call(attn_mask=inp.bools(5, 7).to(OTHER_DEVICE)),
         Raises(ValueError, r"attn_mask is on meta")),
        ("mask_float64", call(attn_mask=mask64), Matches(ref(attn_mask=mask64))),
        ("mask_requires_grad", call(attn_mask=mask_grad),
         unsupported(backend, r"attn_mask", ref(attn_mask=mask_grad))),
        ("mask_row_all_neg_inf", call(attn_mask=row_blocked), Matches(ref(attn_mask=row_blocked))),
        ("scale_nan", call(scale=NAN), Raises(ValueError, r"scale must be a finite")),
        ("scale_inf", call(scale=INF), Raises(ValueError, r"scale must be a finite")),
        ("scale_not_a_number", call(scale="big"), Raises(ValueError, r"could not convert")),
    ]) + attention_non_finite_cases(lk, inp)


def attention_non_finite_cases(lk, inp: Inputs) -> list[Case]:
    """q (1, 2, 4, 8), k/v (1, 1, 6, 8): one NaN or inf in q, k, v or the mask."""
    from llm_kernels.reference import attention_ref
    q, k, v = inp.randn(1, 2, 4, 8), inp.randn(1, 1, 6, 8), inp.randn(1, 1, 6, 8)
    padding = inp.bools(1, 1, 1, 6)
    padding[..., 2] = False
    bias = inp.randn(4, 6)

    def case(name, q_=q, k_=k, v_=v, causal=False, mask=None):
        # torch's sdpa is top-left causal: an alternative only without causal
        sdpa = None if causal else (lambda: math_sdpa(q_, k_, v_, attn_mask=mask,
                                                      enable_gqa=True))
        return (name, lambda: lk.attention(q_, k_, v_, causal=causal, attn_mask=mask),
                NonFinite(lambda: attention_ref(q_, k_, v_, causal=causal, attn_mask=mask,
                                                upcast=True), sdpa))
    return named("attention", [
        case("nan_q", q_=poisoned(q, (0, 1, 2, 3), NAN)),
        case("nan_k", k_=poisoned(k, (0, 0, 2, 3), NAN)),
        case("nan_v", v_=poisoned(v, (0, 0, 2, 3), NAN)),
        case("inf_q", q_=poisoned(q, (0, 0, 1, 5), INF)),
        case("inf_k", k_=poisoned(k, (0, 0, 4, 0), INF)),
        case("neg_inf_v", v_=poisoned(v, (0, 0, 1, 7), -INF)),
        case("nan_k_causal_last_key", k_=poisoned(k, (0, 0, 5, 3), NAN), causal=True),
        case("nan_k_padded_out", k_=poisoned(k, (0, 0, 2, 3), NAN), mask=padding),
        case("nan_mask", mask=poisoned(bias, (1, 2), NAN)),
        case("nan_q_bf16", q_=poisoned(q, (0, 0, 3, 0), NAN).bfloat16(), k_=k.bfloat16(),
             v_=v.bfloat16()),
    ])


def sdpa_cases(lk, backend: str, inp: Inputs) -> list[Case]:
    from llm_kernels.reference import sdpa_ref
    q, k, v = inp.randn(2, 4, 5, 16), inp.randn(2, 2, 7, 16), inp.randn(2, 2, 7, 16)

    def call(q_=q, k_=k, v_=v, **kw):
        return lambda: lk.scaled_dot_product_attention(q_, k_, v_, enable_gqa=True, **kw)
    as64 = (q.double(), k.double(), v.double())
    q_nan = poisoned(q, (1, 2, 0, 0), NAN)
    return named("sdpa", [
        ("int_dtype", call(q_=q.int()), Raises(TypeError, r"query must be float16")),
        ("batch_broadcast", call(q_=q[:1]),
         Matches(lambda: sdpa_ref(q[:1], k, v, enable_gqa=True, upcast=True))),
        ("heads_not_multiple", call(q_=q[:, :3]), Raises(ValueError, r"H=3 .* Hkv=2")),
        ("mixed_device", call(k_=k.to(OTHER_DEVICE)), Raises(ValueError, r"k is on meta")),
        ("mixed_dtype", call(v_=v.half()), Raises(TypeError, r"v has dtype")),
        ("empty", call(q_=q[:, :, :0]),
         Matches(lambda: sdpa_ref(q[:, :, :0], k, v, enable_gqa=True, upcast=True))),
        ("mask_wrong_shape", call(attn_mask=inp.bools(4, 7)), Raises(ValueError, r"attn_mask of")),
        ("float64_falls_back", call(*as64),
         Matches(lambda: sdpa_ref(*as64, enable_gqa=True, upcast=True))),
        ("nan_query", call(q_=q_nan),
         NonFinite(lambda: sdpa_ref(q_nan, k, v, enable_gqa=True, upcast=True),
                   lambda: math_sdpa(q_nan, k, v, enable_gqa=True))),
    ])


# ---- layer_norm / rms_norm ---------------------------------------------------------------------

def norm_cases(lk, backend: str, inp: Inputs, rms: bool) -> list[Case]:
    from llm_kernels.reference import layer_norm_ref, rms_norm_ref
    x, w, b, r = inp.randn(3, 5, 17), inp.randn(17), inp.randn(17), inp.randn(3, 5, 17)
    op, ref_op = (lk.rms_norm, rms_norm_ref) if rms else (lk.layer_norm, layer_norm_ref)
    extra = {} if rms else {"bias": b}

    def call(x_=x, **kw):
        kw = {"weight": w, **extra, **kw}
        return lambda: op(x_, **kw)

    def ref(x_=x, **kw):
        kw = {"weight": w, **extra, **kw}
        return lambda: ref_op(x_, upcast=True, **kw)

    def functional(x_=x, weight=w, bias=b, residual=None):
        h = x_ if residual is None else x_ + residual
        out = (F.rms_norm(h, (17,), weight, 1e-6) if rms
               else F.layer_norm(h, (17,), weight, bias, 1e-5))
        return out if residual is None else (out, h)

    def non_finite(name, **kw):
        return (name, call(**kw), NonFinite(ref(**kw), lambda: functional(**kw)))
    as64 = {"x_": x.double(), "weight": w.double(), **({} if rms else {"bias": b.double()})}
    rows_strided = inp.randn(3, 10, 17)[:, ::2]
    cases = [
        ("not_a_tensor", call(x_=x.tolist()), Raises(TypeError, r"x must be a torch\.Tensor")),
        ("rank_0", call(x_=x[0, 0, 0], weight=None, **({} if rms else {"bias": None})),
         Raises(ValueError, r"x must have at least 1 dims")),
        ("weight_shape", call(weight=w[:16]),
         Raises(ValueError, r"weight must have shape \(17,\)")),
        ("weight_rank", call(weight=w[None]), Raises(ValueError, r"weight must have 1 dims")),
        ("residual_shape", call(residual=r[:2]), Raises(ValueError, r"residual must have shape")),
        ("mixed_dtype_weight", call(weight=w.half()), Raises(TypeError, r"weight has dtype")),
        ("mixed_dtype_residual", call(residual=r.bfloat16()),
         Raises(TypeError, r"residual has dtype")),
        ("mixed_device_weight", call(weight=w.to(OTHER_DEVICE)),
         Raises(ValueError, r"weight is on meta")),
        ("mixed_device_residual", call(residual=r.to(OTHER_DEVICE)),
         Raises(ValueError, r"residual is on meta")),
        ("int_dtype", call(x_=x.int()), Raises(TypeError, r"x must be float16")),
        ("int_weight", call(weight=w.long()), Raises(TypeError, r"weight must be float16")),
        ("float64", call(**as64), unsupported(backend, r"float64", ref(**as64))),
        ("strided_last_dim", call(x_=inp.randn(3, 17, 5).transpose(-1, -2)),
         Raises(ValueError, r"x must have a contiguous last dim")),
        ("strided_residual", call(residual=inp.randn(3, 17, 5).transpose(-1, -2)),
         Raises(ValueError, r"residual must have a contiguous last dim")),
        ("strided_rows", call(x_=rows_strided), Matches(ref(x_=rows_strided))),
        ("empty_rows", call(x_=x[:0]), Matches(ref(x_=x[:0]))),
        ("empty_rows_residual", call(x_=x[:0], residual=r[:0]),
         Matches(ref(x_=x[:0], residual=r[:0]))),
        ("empty_cols", call(x_=x[..., :0], weight=None, **({} if rms else {"bias": None})),
         Matches(ref(x_=x[..., :0], weight=None, **({} if rms else {"bias": None})))),
        ("eps_negative", call(eps=-1e-5), Raises(ValueError, r"eps must be a non-negative")),
        ("eps_nan", call(eps=NAN), Raises(ValueError, r"eps must be a non-negative")),
        non_finite("nan_x", x_=poisoned(x, (1, 2, 3), NAN)),
        non_finite("inf_x", x_=poisoned(x, (0, 4, 16), INF)),
        non_finite("neg_inf_x", x_=poisoned(x, (2, 0, 0), -INF)),
        non_finite("nan_weight", weight=poisoned(w, 5, NAN)),
        non_finite("nan_residual", residual=poisoned(r, (1, 1, 1), NAN)),
        non_finite("nan_x_fp16", x_=poisoned(x, (1, 2, 3), NAN).half(), weight=w.half(),
                   **({} if rms else {"bias": b.half()})),
    ]
    if not rms:
        cases += [
            ("bias_shape", call(bias=b[:3]), Raises(ValueError, r"bias must have shape \(17,\)")),
            ("mixed_device_bias", call(bias=b.to(OTHER_DEVICE)),
             Raises(ValueError, r"bias is on meta")),
            non_finite("inf_bias", bias=poisoned(b, 7, INF)),
        ]
    return named("rms_norm" if rms else "layer_norm", cases)


# ---- softmax -----------------------------------------------------------------------------------

def softmax_cases(lk, backend: str, inp: Inputs) -> list[Case]:
    from llm_kernels.reference import softmax_ref
    x = inp.randn(3, 4, 9)

    def call(x_=x, dim=-1):
        return lambda: lk.softmax(x_, dim)

    def ref(x_=x, dim=-1):
        return lambda: softmax_ref(x_, dim, upcast=True)

    def non_finite(name, x_, dim=-1):
        return (name, call(x_, dim), NonFinite(ref(x_, dim), lambda: F.softmax(x_, dim)))
    transposed = x.transpose(0, 2)
    all_neg_inf = x.clone()
    all_neg_inf[1, 2] = -INF
    nan_and_neg_inf = poisoned(x, (1, 2), NAN)
    nan_and_neg_inf[1, 2, ::2] = -INF
    return named("softmax", [
        ("not_a_tensor", call(x_=x.tolist()), Raises(TypeError, r"x must be a torch\.Tensor")),
        ("rank_0", call(x_=x[0, 0, 0]), Raises(ValueError, r"x must have at least 1 dims")),
        ("dim_out_of_range", call(dim=3), Raises(ValueError, r"dim must be an int in \[-3, 3\)")),
        ("dim_not_int", call(dim="1"), Raises(ValueError, r"dim must be an int")),
        ("dim_bool", call(dim=True), Raises(ValueError, r"dim must be an int")),
        ("int_dtype", call(x_=x.int()), Raises(TypeError, r"x must be float16")),
        ("bool_dtype", call(x_=x > 0), Raises(TypeError, r"x must be float16")),
        ("float64", call(x_=x.double()), unsupported(backend, r"float64", ref(x_=x.double()))),
        ("empty", call(x_=x[:, :0]), Matches(ref(x_=x[:, :0]))),
        ("empty_dim", call(x_=x[..., :0]), Matches(ref(x_=x[..., :0]))),
        ("strided", call(x_=transposed), Matches(ref(x_=transposed))),
        ("strided_dim_0", call(x_=transposed, dim=0), Matches(ref(x_=transposed, dim=0))),
        ("row_all_neg_inf", call(x_=all_neg_inf), Matches(ref(x_=all_neg_inf))),
        non_finite("nan", poisoned(x, (1, 2, 3), NAN)),
        non_finite("inf", poisoned(x, (0, 1, 8), INF)),
        non_finite("neg_inf", poisoned(x, (2, 3, 0), -INF)),
        non_finite("nan_whole_row", poisoned(x, (1, 2), NAN)),
        non_finite("nan_and_neg_inf_row", nan_and_neg_inf),
        non_finite("nan_dim_1", poisoned(x, (1, 2, 3), NAN), dim=1),
        non_finite("nan_fp16", poisoned(x, (1, 2, 3), NAN).half()),
        non_finite("nan_bf16", poisoned(x, (0, 0, 0), NAN).bfloat16()),
    ])


# ---- feed_forward / swiglu ---------------------------------------------------------------------

def feed_forward_cases(lk, backend: str, inp: Inputs) -> list[Case]:
    from llm_kernels.reference import feed_forward_ref
    x, w1, b1 = inp.randn(3, 4, 8), inp.randn(12, 8) / 3, inp.randn(12)
    w2, b2 = inp.randn(6, 12) / 3, inp.randn(6)
    args = {"x": x, "w1": w1, "b1": b1, "w2": w2, "b2": b2}

    def call(activation="gelu", **kw):
        a = {**args, **kw}
        return lambda: lk.feed_forward(a["x"], a["w1"], a["b1"], a["w2"], a["b2"],
                                       activation=activation)

    def ref(activation="gelu", **kw):
        a = {**args, **kw}
        return lambda: feed_forward_ref(a["x"], a["w1"], a["b1"], a["w2"], a["b2"],
                                        activation=activation, upcast=True)

    def non_finite(name, activation="gelu", **kw):
        return (name, call(activation, **kw), NonFinite(ref(activation, **kw)))
    as64 = {name: t.double() for name, t in args.items()}
    x_strided = inp.randn(3, 8, 4).transpose(-1, -2)
    w1_strided = inp.randn(8, 12).t() / 3
    cases = [
        ("not_a_tensor", call(x=x.tolist()), Raises(TypeError, r"x must be a torch\.Tensor")),
        ("rank_0", call(x=x[0, 0, 0]), Raises(ValueError, r"x must have at least 1 dims")),
        ("w1_rank", call(w1=w1[0]), Raises(ValueError, r"w1 must have 2 dims")),
        ("w1_in_features", call(w1=w1[:, :7]),
         Raises(ValueError, r"w1 must have shape \(out_features, 8\)")),
        ("b1_shape", call(b1=b1[:11]), Raises(ValueError, r"b1 must have shape \(12,\)")),
        ("w2_in_features", call(w2=w2[:, :11]),
         Raises(ValueError, r"w2 must have shape \(out_features, 12\)")),
        ("b2_shape", call(b2=b2[None]), Raises(ValueError, r"b2 must have 1 dims")),
        ("mixed_dtype_w1", call(w1=w1.half()), Raises(TypeError, r"w1 has dtype")),
        ("mixed_dtype_b2", call(b2=b2.bfloat16()), Raises(TypeError, r"b2 has dtype")),
        ("mixed_device_w2", call(w2=w2.to(OTHER_DEVICE)), Raises(ValueError, r"w2 is on meta")),
        ("mixed_device_b1", call(b1=b1.to(OTHER_DEVICE)), Raises(ValueError, r"b1 is on meta")),
        ("int_dtype", call(x=x.int()), Raises(TypeError, r"x must be float16")),
        ("int_w1", call(w1=w1.int()), Raises(TypeError, r"w1 must be float16")),
        ("float64", call(**as64), unsupported(backend, r"float64", ref(**as64))),
        ("bad_activation", call("tanh"), Raises(ValueError, r"activation must be one of")),
        ("strided_x", call(x=x_strided), Matches(ref(x=x_strided))),
        ("strided_w1", call(w1=w1_strided), Matches(ref(w1=w1_strided))),
        ("empty_rows", call(x=x[:0]), Matches(ref(x=x[:0]))),
        ("empty_d_ff", call(w1=w1[:0], b1=b1[:0], w2=w2[:, :0]),
         Matches(ref(w1=w1[:0], b1=b1[:0], w2=w2[:, :0]))),
        ("empty_out", call(w2=w2[:0], b2=b2[:0]), Matches(ref(w2=w2[:0], b2=b2[:0]))),
        non_finite("nan_w1_relu", "relu", w1=poisoned(w1, (4, 2), NAN)),
        non_finite("nan_b2", b2=poisoned(b2, 1, NAN)),
    ]
    for act in ("gelu", "gelu_tanh", "relu", "silu"):
        cases += [non_finite(f"nan_x_{act}", act, x=poisoned(x, (1, 2, 3), NAN)),
                  non_finite(f"inf_x_{act}", act, x=poisoned(x, (0, 3, 7), INF)),
                  non_finite(f"neg_inf_x_{act}", act, x=poisoned(x, (2, 1, 0), -INF))]
    return named("feed_forward", cases)


def swiglu_cases(lk, backend: str, inp: Inputs) -> list[Case]:
    from llm_kernels.reference import swiglu_ref
    args = {"x": inp.randn(3, 4, 8), "w_gate": inp.randn(12, 8) / 3,
            "w_up": inp.randn(12, 8) / 3, "w_down": inp.randn(6, 12) / 3}
    x, w_gate, w_up, w_down = args.values()

    def call(**kw):
        a = {**args, **kw}
        return lambda: lk.swiglu(**a)

    def ref(**kw):
        a = {**args, **kw}
        return lambda: swiglu_ref(**a, upcast=True)
    as64 = {name: t.double() for name, t in args.items()}
    return named("swiglu", [
        ("not_a_tensor", call(x=x.tolist()), Raises(TypeError, r"x must be a torch\.Tensor")),
        ("w_gate_rank", call(w_gate=w_gate[None]), Raises(ValueError, r"w_gate must have 2 dims")),
        ("w_gate_in_features", call(w_gate=w_gate[:, :5]),
         Raises(ValueError, r"w_gate must have shape \(out_features, 8\)")),
        ("w_up_shape", call(w_up=w_up[:11]), Raises(ValueError, r"w_up must have w_gate's shape")),
        ("w_down_in_features", call(w_down=w_down[:, :11]),
         Raises(ValueError, r"w_down must have shape \(out_features, 12\)")),
        ("mixed_dtype_w_up", call(w_up=w_up.half()), Raises(TypeError, r"w_up has dtype")),
        ("mixed_device_w_down", call(w_down=w_down.to(OTHER_DEVICE)),
         Raises(ValueError, r"w_down is on meta")),
        ("int_dtype", call(x=x.long()), Raises(TypeError, r"x must be float16")),
        ("float64", call(**as64), unsupported(backend, r"float64", ref(**as64))),
        ("empty_rows", call(x=x[:, :0]), Matches(ref(x=x[:, :0]))),
        ("empty_d_ff", call(w_gate=w_gate[:0], w_up=w_up[:0], w_down=w_down[:, :0]),
         Matches(ref(w_gate=w_gate[:0], w_up=w_up[:0], w_down=w_down[:, :0]))),
        ("nan_x", call(x=poisoned(x, (0, 1, 2), NAN)),
         NonFinite(ref(x=poisoned(x, (0, 1, 2), NAN)))),
        ("inf_w_up", call(w_up=poisoned(w_up, (3, 4), INF)),
         NonFinite(ref(w_up=poisoned(w_up, (3, 4), INF)))),
    ])


# ---- cross_entropy -----------------------------------------------------------------------------

def target_range_cases(call, backend: str, inp: Inputs, target: torch.Tensor) -> list[tuple]:
    """Targets outside [0, 11): a ValueError for CPU tensors. GPU targets are not read on the
    host: the kernels give a NaN loss; torch's device-side assert would end the process (the
    torch backend's cases are left out there)."""
    cases = [("target_too_large", target + 11, r"target values must be in \[0, 11\)"),
             ("target_negative", target - 20, r"target values")]
    if inp.device.type == "cpu":
        return [(name, call(target_=t), Raises(ValueError, pattern)) for name, t, pattern in cases]
    if backend == "torch":
        return []
    return [(name, call(target_=t), Satisfies(lambda loss: bool(loss.isnan()),
                                              "a NaN loss (GPU targets are not read on the host)"))
            for name, t, _ in cases]


def cross_entropy_cases(lk, backend: str, inp: Inputs) -> list[Case]:
    from llm_kernels.reference import cross_entropy_ref
    logits, target = inp.randn(6, 11), inp.target(6, 11)

    def call(logits_=logits, target_=target, **kw):
        return lambda: lk.cross_entropy(logits_, target_, **kw)

    def ref(logits_=logits, target_=target, **kw):
        return lambda: cross_entropy_ref(logits_, target_, upcast=True, **kw)

    def non_finite(name, logits_=logits, target_=target, **kw):
        return (name, call(logits_, target_, **kw), NonFinite(ref(logits_, target_, **kw)))
    rows_strided = inp.randn(12, 11)[::2]
    long_rows, long_target = inp.randn(2, 9000), inp.target(2, 9000)
    long_rows[0, :4096] = NAN  # NaN in whole leading chunks, the target among the finite values
    long_target[0] = 8999
    t0 = int(target[0])
    ignored_row = target.clone()
    ignored_row[2] = -100
    return named("cross_entropy", [
        ("not_a_tensor", call(logits_=logits.tolist()),
         Raises(TypeError, r"logits must be a torch\.Tensor")),
        ("rank_1", call(logits_=logits[0]), Raises(ValueError, r"logits must have 2 dims")),
        ("rank_3", call(logits_=logits[None]), Raises(ValueError, r"logits must have 2 dims")),
        ("target_int32", call(target_=target.int()), Raises(TypeError, r"target must be an int64")),
        ("target_float", call(target_=target.float()), Raises(TypeError, r"target must be")),
        ("target_list", call(target_=target.tolist()), Raises(TypeError, r"target must be")),
        ("target_shape", call(target_=target[:4]),
         Raises(ValueError, r"target must have shape \(N,\) = \(6,\)")),
        ("target_rank", call(target_=target[:, None]), Raises(ValueError, r"target must have")),
        *target_range_cases(call, backend, inp, target),
        ("target_device", call(target_=target.to(OTHER_DEVICE)),
         Raises(ValueError, r"target is on meta")),
        ("int_dtype", call(logits_=logits.int()), Raises(TypeError, r"logits must be float16")),
        ("float64", call(logits_=logits.double()),
         unsupported(backend, r"float64", ref(logits_=logits.double()))),
        ("strided_last_dim", call(logits_=inp.randn(11, 6).t()),
         Raises(ValueError, r"logits must have a contiguous last dim")),
        ("strided_rows", call(logits_=rows_strided), Matches(ref(logits_=rows_strided))),
        ("empty_rows_sum", call(logits_=logits[:0], target_=target[:0], reduction="sum"),
         Matches(ref(logits_=logits[:0], target_=target[:0], reduction="sum"))),
        ("empty_rows_none", call(logits_=logits[:0], target_=target[:0], reduction="none"),
         Matches(ref(logits_=logits[:0], target_=target[:0], reduction="none"))),
        non_finite("empty_rows_mean", logits[:0], target[:0]),
        ("empty_classes", call(logits_=logits[:, :0]), Raises(ValueError, r"target values")),
        ("bad_reduction", call(reduction="avg"), Raises(ValueError, r"reduction must be one of")),
        ("ignore_index_not_int", call(ignore_index="x"), Raises(TypeError, r"ignore_index must")),
        non_finite("nan_row", poisoned(logits, (3, 4), NAN)),
        non_finite("nan_row_none", poisoned(logits, (3, 4), NAN), reduction="none"),
        non_finite("nan_whole_row", poisoned(logits, 3, NAN), reduction="none"),
        non_finite("nan_leading_chunks", long_rows, long_target, reduction="none"),
        non_finite("nan_in_ignored_row", poisoned(logits, (2, 4), NAN), ignored_row,
                   reduction="none"),
        non_finite("nan_in_ignored_row_mean", poisoned(logits, (2, 4), NAN), ignored_row),
        non_finite("inf_other_class", poisoned(logits, (0, (t0 + 1) % 11), INF),
                   reduction="none"),
        non_finite("inf_target_class", poisoned(logits, (0, t0), INF), reduction="none"),
        non_finite("neg_inf_target_class", poisoned(logits, (0, t0), -INF), reduction="none"),
        non_finite("neg_inf_other_class", poisoned(logits, (0, (t0 + 1) % 11), -INF),
                   reduction="sum"),
        non_finite("all_ignored_mean", target_=torch.full_like(target, -100)),
        non_finite("nan_row_bf16", poisoned(logits, (5, 0), NAN).bfloat16(), reduction="none"),
    ])


# ---- the compiled ops called directly (their TORCH_CHECKs) --------------------------------------

def direct_op_cases(inp: Inputs) -> list[Case]:
    """torch.ops.llm_kernels.* called with what the public functions never pass them."""
    from llm_kernels.backends import load_extension
    load_extension()
    ops = torch.ops.llm_kernels
    q, k, v = inp.randn(1, 2, 4, 16), inp.randn(1, 1, 6, 16), inp.randn(1, 1, 6, 16)
    out, lse = ops.attention_forward(q, k, v, None, False, 0, 0.25)
    x, w = inp.randn(4, 9), inp.randn(9)
    logits, target = inp.randn(3, 7), inp.target(3, 7)

    def expect(pattern):
        return Raises(RuntimeError, pattern)
    return named("direct_op", [
        ("attention_head_dim_mismatch",
         lambda: ops.attention_forward(q, k[..., :8], v[..., :8], None, False, 0, 0.25),
         expect(r"must agree in B and D")),
        ("attention_int",
         lambda: ops.attention_forward(q.int(), k.int(), v.int(), None, False, 0, 0.25),
         expect(r"q must be float32")),
        ("attention_mask_shape",
         lambda: ops.attention_forward(q, k, v, inp.randn(1, 2, 4, 5), False, 0, 0.25),
         expect(r"mask must have shape")),
        ("attention_mask_bool",
         lambda: ops.attention_forward(q, k, v, inp.bools(1, 2, 4, 6), False, 0, 0.25),
         expect(r"mask must be an additive float")),
        ("attention_strided_last_dim",
         lambda: ops.attention_forward(inp.randn(1, 2, 16, 4).transpose(-1, -2), k, v, None,
                                       False, 0, 0.25),
         expect(r"q must have a contiguous last dim")),
        ("attention_heads_not_multiple",
         lambda: ops.attention_forward(inp.randn(1, 3, 4, 16), inp.randn(1, 2, 6, 16),
                                       inp.randn(1, 2, 6, 16), None, False, 0, 0.25),
         expect(r"multiple of the key/value heads")),
        ("attention_backward_lse_dtype",
         lambda: ops.attention_backward(out, q, k, v, out, lse.half(), None, False, 0, 0.25),
         expect(r"lse must be float32")),
        ("attention_backward_lse_shape",
         lambda: ops.attention_backward(out, q, k, v, out, lse[..., :3], None, False, 0, 0.25),
         expect(r"lse must be float32 of shape")),
        ("layer_norm_rank", lambda: ops.layer_norm_forward(x[None], w, None, None, 1e-5, False),
         expect(r"x must be 2D")),
        ("layer_norm_weight_shape",
         lambda: ops.layer_norm_forward(x, w[:8], None, None, 1e-5, False),
         expect(r"weight must have shape")),
        ("layer_norm_strided", lambda: ops.layer_norm_forward(x.t(), None, None, None, 1e-5, False),
         expect(r"x must be contiguous")),
        ("softmax_int", lambda: ops.softmax_forward(x.int()), expect(r"x must be float16")),
        ("softmax_backward_shape", lambda: ops.softmax_backward(x[:2], x),
         expect(r"grad_y must have shape|must have shape")),
        ("feed_forward_w1_shape",
         lambda: ops.feed_forward_forward(x, inp.randn(5, 8), None, inp.randn(9, 5), None, "gelu"),
         expect(r"w1")),
        ("feed_forward_activation",
         lambda: ops.feed_forward_forward(x, inp.randn(5, 9), None, inp.randn(9, 5), None, "tanh"),
         expect(r"activation must be")),
        ("swiglu_w_up_shape",
         lambda: ops.swiglu_forward(x, inp.randn(5, 9), inp.randn(4, 9), inp.randn(9, 5)),
         expect(r"w_up")),
        ("cross_entropy_target_int32",
         lambda: ops.cross_entropy_forward(logits, target.int(), -100),
         expect(r"target must be int64")),
        ("cross_entropy_target_shape", lambda: ops.cross_entropy_forward(logits, target[:2], -100),
         expect(r"target must have shape")),
        ("cross_entropy_target_out_of_range",
         lambda: ops.cross_entropy_forward(logits, torch.tensor([0, 7, 1000000], device=inp.device),
                                           -100)[0],
         Satisfies(lambda loss: bool(torch.isfinite(loss[0])) and bool(loss[1:].isnan().all()),
                   "NaN loss for targets outside [0, V), no out-of-bounds read")),
    ])


# ---- running ---------------------------------------------------------------------------------

def spy_case(lk, matrix: Matrix, backend: str, inp: Inputs) -> Case:
    """The spy behind "before any kernel" sees the kernel ops a valid call looks up."""
    x = inp.randn(2, 5)

    def call():
        matrix.launches.clear()
        with lk.use_backend(backend):
            lk.softmax(x)
        return list(matrix.launches)
    return Case("spy/sees_kernel_lookups", call,
                Satisfies(lambda launches: launches == [backend], f"ops lookups == [{backend!r}]"))


def all_cases(lk, backend: str, inp: Inputs) -> list[Case]:
    cases = (attention_cases(lk, backend, inp) + sdpa_cases(lk, backend, inp)
             + norm_cases(lk, backend, inp, rms=False) + norm_cases(lk, backend, inp, rms=True)
             + softmax_cases(lk, backend, inp) + feed_forward_cases(lk, backend, inp)
             + swiglu_cases(lk, backend, inp) + cross_entropy_cases(lk, backend, inp))
    if backend == "cuda":
        cases += direct_op_cases(inp)
    return cases


def run_case(matrix: Matrix, case: Case) -> str:
    """'' on the expected outcome, else what happened instead."""
    try:
        if isinstance(case.expect, Satisfies):
            ok = case.expect.predicate(case.call())
            return "" if ok else f"expected {case.expect.description}"
        return matrix.check(case)
    except Exception as exc:  # noqa: BLE001 - reported as the case's failure
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return f"unexpected {type(exc).__name__}: {exc} ({where.filename}:{where.lineno})"


def outcome(case: Case) -> str:
    expect = case.expect
    if isinstance(expect, Raises):
        return f"raises {expect.exc.__name__} /{expect.pattern}/"
    if isinstance(expect, Satisfies):
        return expect.description
    return "matches the float64 reference" if isinstance(expect, Matches) else \
        "NaN/inf pattern as torch"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backend", choices=("torch", "cuda", "triton", "auto"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    warnings.simplefilter("ignore")
    import llm_kernels as lk
    from llm_kernels import _ops
    matrix = Matrix(lk, _ops, args.backend)
    inp = Inputs(args.device)
    cases = all_cases(lk, args.backend, inp)
    if args.backend in KERNEL_BACKENDS:
        cases.append(spy_case(lk, matrix, args.backend, inp))
    failed = 0
    for case in cases:
        problem = run_case(matrix, case)
        failed += bool(problem)
        print(f"{'FAIL' if problem else 'PASS'} {case.name}: {problem or outcome(case)}",
              flush=True)
    print(f"DONE {len(cases)} cases, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
