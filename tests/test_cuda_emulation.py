"""The CUDA attention kernels on the CPU emulator of tests/cuda_emulation, against the float64
reference.

g++ compiles csrc/attention_kernels.cuh against cuda_emulation.h (a fiber per CUDA thread;
cp.async, ldmatrix and mma.sync emulated per the PTX ISA) and the driver runs the launches that
csrc/attention_launch.cuh plans for the CUDA build: the tensor-core kernels (fp16/bf16), the
float32 SIMT kernels and the 16-bit SIMT fallbacks. The driver is built once per session; each
case writes random inputs, runs the forward and the backward in a subprocess, and checks out,
dq, dk, dv by the pass rule (the torch backend in the same dtype setting the budget), lse
against the float64 logsumexp, exact zeros in the rows that see no key, and that the emulator
saw no race or out-of-bounds access; flash-decoding also on random shapes, masks, strides and
SM counts (hypothesis, the profiles of property_profile.py). The self-tests drop a
__syncthreads and expect the emulator to notice.
"""
from __future__ import annotations

import math
import os
import subprocess
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llm_kernels as lk
from attention_check import leaf64, make_qkv
from emulation_check import CXX_FLAGS, gxx, read, run_driver
from llm_kernels.attention import kernel_mask
from llm_kernels.numerics import assert_close
from llm_kernels.reference import attention_ref, causal_keep
from property_profile import profile as properties_profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER_SOURCE = os.path.join(ROOT, "tests", "cuda_emulation", "attention_driver.cpp")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = [F32, F16, BF16]
NAMES = {F32: "f32", F16: "f16", BF16: "bf16"}
LOG2E = torch.tensor(math.log2(math.e), dtype=torch.float32)
MASK_FLOOR2 = -65536.0  # csrc/common.h: an additive mask * log2(e) below it hides its key


@pytest.fixture(scope="session")
def driver(tmp_path_factory):
    """The emulator driver, built by g++ into a session temp dir."""
    exe = tmp_path_factory.mktemp("cuda_emulation") / "attention_driver"
    cmd = [gxx(), *CXX_FLAGS, "-rdynamic", "-I", os.path.join(ROOT, "csrc"), DRIVER_SOURCE,
           "-o", str(exe)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"building the emulator failed: {' '.join(cmd)}\n{result.stderr[-6000:]}")
    return exe


def storage(t: torch.Tensor) -> bytes:
    """t's raw elements from its first to its last at its strides (stride(-1) == 1)."""
    n = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.detach().as_strided((n,), (1,)).contiguous().view(torch.uint8).numpy().tobytes()


def emulate(driver, case_dir, q, k, v, attn_mask, grad_out, *, causal, scale, **options):
    """Runs the driver on q, k, v (B, H, L, D views), attn_mask as lk.attention takes it and
    grad_out; returns ({out, lse, dq, dk, dv}, the emulator's fault messages)."""
    (b, h, lq, d), (hkv, lk_) = q.shape, k.shape[1:3]
    fields = dict(dtype=NAMES[q.dtype], batch=b, heads=h, kv_heads=hkv, q_len=lq, k_len=lk_,
                  head_dim=d, causal=int(causal), causal_offset=lk_ - lq if causal else 0,
                  scale=repr(scale), q_stride=q.stride()[:3], k_stride=k.stride()[:3],
                  v_stride=v.stride()[:3], mask_dtype="none", **options)
    inputs = dict(q=q, k=k, v=v, dout=grad_out.contiguous())
    mask = kernel_mask(attn_mask, (b, h, lq, lk_))
    if mask is not None:
        fields.update(mask_dtype=NAMES[mask.dtype], mask_stride=mask.stride())
        inputs["mask"] = mask
    faults = run_driver(driver, case_dir, fields,
                        {name: storage(t) for name, t in inputs.items()})
    shapes = dict(out=q.shape, lse=q.shape[:3], dq=q.shape, dk=k.shape, dv=v.shape)
    results = {name: read(case_dir / f"{name}.bin", shape, F32 if name == "lse" else q.dtype)
               for name, shape in shapes.items() if (case_dir / f"{name}.bin").exists()}
    return results, faults


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    b: int
    h: int
    hkv: int
    lq: int
    lk: int
    d: int
    causal: bool = False
    seq_major: bool = False  # q, k, v: (B, L, H, D) tensors transposed to (B, H, L, D)
    mask: str = "none"  # "float": (B, 1, Lq, Lk) in q's dtype; "bool": (B, H, Lq, Lk)
    warp_rows: int = 16  # query rows per warp of the tensor-core forward (16 or 32)
    sm_count: int = 4  # the SMs the decode split plan assumes

    def __str__(self):
        flags = [f for f, on in (("causal", self.causal), ("seq_major", self.seq_major),
                                 (f"{self.mask}_mask", self.mask != "none"),
                                 (f"rows{self.warp_rows}", self.warp_rows != 16),
                                 (f"sms{self.sm_count}", self.sm_count != 4)) if on]
        return "-".join([NAMES[self.dtype], f"B{self.b}H{self.h}Hkv{self.hkv}",
                         f"Lq{self.lq}Lk{self.lk}D{self.d}", *flags])


SHAPES = [  # (b, h, hkv, lq, lk, d, options)
    (2, 2, 2, 1, 1, 64, dict(causal=True)),
    (2, 4, 2, 17, 17, 40, dict(causal=True)),
    (1, 4, 1, 97, 97, 80, dict()),
    (1, 2, 2, 97, 97, 128, dict(causal=True)),
    (1, 2, 1, 130, 129, 128, dict(causal=True)),  # two query tiles of 128; query 0 sees no key
    (1, 4, 2, 37, 150, 16, dict(causal=True)),
    (2, 2, 1, 70, 33, 64, dict(causal=True)),  # the first 37 queries see no key
    (2, 4, 1, 1, 203, 128, dict(causal=True)),  # decode over a cache
    (2, 4, 2, 33, 47, 80, dict(seq_major=True)),
    (2, 4, 2, 29, 53, 64, dict(mask="float")),
    (1, 2, 1, 41, 41, 40, dict(causal=True, mask="bool")),
    (1, 2, 1, 45, 67, 256, dict(causal=True)),  # 16 bits: tensor-core forward, SIMT backward
    # Several key tiles through both K/V stages of the tensor-core forward, per head-dim tile:
    (1, 2, 1, 70, 300, 48, dict(mask="float")),  # D <= 64: 5 tiles of 64, every one masked
    (1, 2, 2, 200, 333, 128, dict(causal=True)),  # D <= 128: 6 tiles of 64, unmasked ones between
    (1, 1, 1, 33, 170, 200, dict()),  # D <= 256 (Q re-read from shared memory): 6 tiles of 32
    # Several query tiles through both Q/dO stages of the tensor-core dK/dV (one sequence over the
    # group's heads) and several key tiles through both K/V stages of dQ, per head-dim tile:
    (1, 4, 2, 150, 140, 64, dict(causal=True)),  # D <= 64: 3 tiles of 64 per head, group 2
    (1, 3, 1, 75, 200, 128, dict(mask="float")),  # D <= 128: 3 tiles of 32 per head, group 3
    (2, 4, 2, 70, 90, 96, dict(causal=True, mask="bool")),  # masked and causal, tails everywhere
]
CASES = [Case(dtype, *shape, **options) for *shape, options in SHAPES for dtype in DTYPES]
CASES += [Case(F16, 1, 2, 2, 19, 29, 20, causal=True)]  # D % 8 != 0: the 16-bit SIMT fallback
# The tensor-core forward (and at D <= 64 the dQ kernel) with two m-tiles per warp
# ($LLM_KERNELS_CUDA_ATTENTION_WARP_ROWS=32): query tiles of 128 rows, at every head dim the
# forward serves that way (D <= 128).
CASES += [Case(dtype, *shape, **options, warp_rows=32) for *shape, options in SHAPES
          for dtype in (F16, BF16) if shape[5] <= 128]

# Flash-decoding (16-bit, group * Lq <= 32 query rows per kv head, <= 16 at D 256): the group's
# rows as one or two m-tiles, the keys split over blocks (a wave of 2-4 blocks per SM of sm_count)
# and over each block's warps, the splits merged by a second kernel.
DECODE_SHAPES = [  # (b, h, hkv, lq, lk, d, options)
    (1, 4, 1, 1, 700, 64, dict()),  # 11 tiles of 64 in 4 splits (the last one shorter)
    (2, 8, 2, 2, 333, 128, dict(causal=True)),  # 8 rows; 3 splits, the last tile partly hidden
    (1, 8, 2, 4, 400, 80, dict(mask="float")),  # 16 rows (a full m-tile), D padded to 128
    (2, 4, 4, 4, 260, 256, dict(causal=True, sm_count=16)),  # D 256: 3 splits of 3 tiles of 32
    (1, 2, 1, 8, 8, 40, dict(causal=True, mask="bool")),  # one tile, one split: no merge kernel
    (1, 2, 1, 6, 3, 64, dict(causal=True)),  # Lq > Lk: queries 0-2 see no key
    (2, 6, 2, 3, 500, 64, dict(seq_major=True)),  # 9 rows from strided heads
    (1, 2, 1, 1, 2100, 64, dict(sm_count=64)),  # 33 tiles in 11 splits of 3
    # 17-32 rows: two m-tiles sharing each K/V fragment
    (1, 8, 1, 3, 500, 64, dict()),  # 24 rows, Q in registers; 4 splits
    (2, 8, 2, 8, 300, 128, dict(causal=True)),  # 32 rows, Q re-read from shared memory
    (1, 4, 1, 5, 200, 80, dict(mask="float", sm_count=8)),  # 20 rows, masked; 2 splits
    (1, 8, 2, 5, 150, 256, dict()),  # 20 rows at D 256: the forward kernel, not decode
]
CASES += [Case(dtype, *shape, **options) for *shape, options in DECODE_SHAPES
          for dtype in (F16, BF16)]


def make_mask(case: Case, gen: torch.Generator):
    """The case's attn_mask: additive with scattered -inf entries, a row of -inf and a row of
    -1e9 (torch.finfo(float16).min in float16), or bool with a row of False."""
    if case.mask == "float":
        bias = (2 * torch.randn(case.b, 1, case.lq, case.lk, generator=gen)).to(case.dtype)
        bias[torch.rand(bias.shape, generator=gen) < 0.2] = float("-inf")
        bias[0, :, 3] = float("-inf")
        bias[-1, :, case.lq - 2] = max(-1e9, torch.finfo(case.dtype).min)
        return bias
    if case.mask == "bool":
        keep = torch.rand(case.b, case.h, case.lq, case.lk, generator=gen) > 0.3
        keep[0, -1, 5] = False
        return keep
    return None


def visible_keys(case: Case, attn_mask) -> torch.Tensor:
    """(B, H, Lq, Lk) bool: query i sees key j (causal, mask -inf or below the floor)."""
    visible = torch.ones(case.b, case.h, case.lq, case.lk, dtype=torch.bool)
    if case.causal:
        visible &= causal_keep(case.lq, case.lk, case.lk - case.lq, "cpu")
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible &= attn_mask
    elif attn_mask is not None:
        visible &= attn_mask.float() * LOG2E >= MASK_FLOOR2
    return visible


def reference_lse(q64, k64, attn_mask, visible, scale) -> torch.Tensor:
    """The float64 logsumexp of the visible scores, -inf for a row that sees no key."""
    group = q64.shape[1] // k64.shape[1]
    scores = q64 @ k64.repeat_interleave(group, dim=1).transpose(-1, -2) * scale
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        scores = scores + attn_mask.double()
    return scores.masked_fill(~visible, float("-inf")).logsumexp(-1)


def check_emulated(driver, case_dir, case: Case, attn_mask, gen: torch.Generator) -> None:
    """The case on the emulator (forward and backward) against the float64 reference: out, dq
    of the rows that see a key and dk, dv by the pass rule, exact zeros and lse +inf in the rows
    that see none, lse against the float64 logsumexp, no emulator fault."""
    q, k, v = make_qkv(case.b, case.h, case.hkv, case.lq, case.lk, case.d, case.dtype, "cpu",
                       seq_major=case.seq_major)
    scale = 1.0 / math.sqrt(case.d)
    visible = visible_keys(case, attn_mask)
    blind = ~visible.any(-1)  # (B, H, Lq): rows that see no key give zeros
    grad_out = torch.randn(q.shape, generator=gen).to(case.dtype)
    grad_out[blind] = 0  # torch averages V in the -1e9 rows: leave them out of dk, dv
    got, faults = emulate(driver, case_dir, q, k, v, attn_mask, grad_out, causal=case.causal,
                          scale=scale, warp_rows=case.warp_rows, sm_count=case.sm_count)
    assert not faults, "the emulator reports:\n" + "\n".join(faults)

    kwargs = dict(causal=case.causal, scale=scale, attn_mask=attn_mask)
    q64, k64, v64 = leaf64(q), leaf64(k), leaf64(v)
    ref = attention_ref(q64, k64, v64, upcast=True, **kwargs)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    torch_out = lk.attention(q, k, v, backend="torch", **kwargs)
    torch_grads = torch.autograd.grad(torch_out, (q, k, v), grad_out)
    seen = ~blind
    for name, t, r, tt in (("out", got["out"], ref, torch_out),
                           ("dq", got["dq"], ref_grads[0], torch_grads[0])):
        assert torch.equal(t[blind], torch.zeros_like(t[blind])), f"{name} of the blind rows"
        assert_close(t[seen], r[seen].detach(), tt[seen].detach(), case.dtype, name)
    for name, t, r, tt in zip(("dk", "dv"), (got["dk"], got["dv"]), ref_grads[1:],
                              torch_grads[1:]):
        assert_close(t, r, tt, case.dtype, name)
    lse = got["lse"]
    assert torch.equal(lse[blind], torch.full_like(lse[blind], math.inf)), "lse of blind rows"
    ref_lse = reference_lse(q64.detach(), k64.detach(), attn_mask, visible, scale)
    torch.testing.assert_close(lse[seen].double(), ref_lse[seen], rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_emulated_cuda_attention(driver, tmp_path, seed, case):
    gen = torch.Generator().manual_seed(seed)
    check_emulated(driver, tmp_path, case, make_mask(case, gen), gen)


@st.composite
def decode_cases(draw):
    """16-bit shapes flash-decoding takes (group * Lq <= 32 query rows per kv head, <= 16 at
    D > 128), with a seed for the inputs and a mask kind."""
    d = 8 * draw(st.integers(1, 32))
    hkv, group = draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 3, 4, 8]))
    lq = draw(st.integers(1, (32 if d <= 128 else 16) // group))
    case = Case(draw(st.sampled_from([F16, BF16])), draw(st.integers(1, 2)), hkv * group, hkv,
                lq, draw(st.integers(1, 600)), d, causal=draw(st.booleans()),
                seq_major=draw(st.booleans()), mask=draw(st.sampled_from(["none", "float",
                                                                          "bool"])),
                sm_count=draw(st.integers(1, 16)))
    return case, draw(st.integers(0, 2**31 - 1))


def random_mask(case: Case, gen: torch.Generator):
    """An additive (B, 1, Lq, Lk) mask in q's dtype with 20% -inf, or a bool (B, H, Lq, Lk) one
    keeping 70% of the keys; None for mask "none"."""
    if case.mask == "float":
        bias = (2 * torch.randn(case.b, 1, case.lq, case.lk, generator=gen)).to(case.dtype)
        bias[torch.rand(bias.shape, generator=gen) < 0.2] = float("-inf")
        return bias
    if case.mask == "bool":
        return torch.rand(case.b, case.h, case.lq, case.lk, generator=gen) > 0.3
    return None


def test_emulated_decode_properties(driver, tmp_path_factory):
    """Flash-decoding on random shapes, masks, strides and SM counts (so random split plans),
    forward and backward by check_emulated; the examples per run follow test_properties.py's
    profile ($LLM_KERNELS_HYPOTHESIS_PROFILE: a few derandomized ones, or many with long)."""
    base = properties_profile()

    @settings(base, max_examples=max(1, base.max_examples // 2))
    @given(decode_cases())
    def prop(drawn):
        case, seed = drawn
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        check_emulated(driver, tmp_path_factory.mktemp("decode"), case, random_mask(case, gen),
                       gen)

    prop()


@pytest.mark.parametrize("b,hkv,sm_count", [(1, 1, 4), (2, 4, 1)], ids=["4_splits", "1_split"])
def test_emulated_decode_propagates_nan(driver, tmp_path, b, hkv, sm_count):
    """Flash-decoding keeps NaN as the forward kernel does, through the warps' and the splits'
    merges: a NaN query makes its row NaN (the other rows pass the rule), a NaN key every row."""
    q, k, v = (t.detach() for t in make_qkv(b, 4 * hkv, hkv, 1, 700, 64, F16, "cpu"))
    scale = 0.125
    (tmp_path / "q").mkdir()
    (tmp_path / "k").mkdir()
    q_nan = q.clone()
    q_nan[0, 2, 0, 5] = float("nan")
    got, faults = emulate(driver, tmp_path / "q", q_nan, k, v, None, torch.zeros_like(q),
                          causal=False, scale=scale, backward=0, sm_count=sm_count)
    assert not faults, faults
    poisoned = torch.zeros(q.shape[:3], dtype=torch.bool)
    poisoned[0, 2, 0] = True
    assert torch.isnan(got["out"][poisoned]).all() and torch.isnan(got["lse"][poisoned]).all()
    ref = attention_ref(q.double(), k.double(), v.double(), scale=scale, upcast=True)
    torch_out = lk.attention(q, k, v, scale=scale, backend="torch")
    assert_close(got["out"][~poisoned], ref[~poisoned], torch_out[~poisoned], F16, "out")
    k_nan = k.clone()
    k_nan[0, 0, 600, 7] = float("nan")
    got, faults = emulate(driver, tmp_path / "k", q, k_nan, v, None, torch.zeros_like(q),
                          causal=False, scale=scale, backward=0, sm_count=sm_count)
    assert not faults, faults
    assert torch.isnan(got["out"][0, :4]).all() and torch.isnan(got["lse"][0, :4]).all()
    assert not torch.isnan(got["out"][1:]).any()


def test_emulator_catches_a_missing_syncthreads(driver, tmp_path):
    """Every thread skips its first __syncthreads, the one between the cp.async of the Q tile
    and its ldmatrix in the tensor-core forward: the race detector reports it."""
    q, k, v = make_qkv(1, 1, 1, 20, 40, 64, F16, "cpu")
    _, faults = emulate(driver, tmp_path, q, k, v, None, torch.zeros_like(q), causal=False,
                        scale=0.125, skip_syncthreads=1, backward=0)
    assert faults and "ldmatrix reads a chunk thread" in faults[0], faults


def test_emulator_exposes_a_plain_shared_memory_race(driver, tmp_path):
    """The float32 SIMT forward without its second __syncthreads (K, V tiles loaded, then read)
    races on plain loads and stores, which no detector sees: the NaN-filled shared memory and
    the shuffled thread order still make the output wrong."""
    q, k, v = make_qkv(1, 2, 1, 20, 30, 40, F32, "cpu")
    got, faults = emulate(driver, tmp_path, q, k, v, None, torch.zeros_like(q), causal=False,
                          scale=0.15, skip_syncthreads=2, backward=0)
    assert not faults
    ref = attention_ref(q.double(), k.double(), v.double(), scale=0.15, upcast=True)
    torch_out = lk.attention(q.detach(), k.detach(), v.detach(), scale=0.15, backend="torch")
    with pytest.raises(AssertionError, match="fails the pass rule"):
        assert_close(got["out"], ref, torch_out, F32, "out")
