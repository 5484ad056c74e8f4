"""The row-wise CUDA kernels on the CPU emulator of tests/cuda_emulation, against the float64
reference.

g++ compiles the real csrc/layer_norm.cu, softmax.cu, cross_entropy.cu and feed_forward.cu with
-include cuda_emulation.h (a fiber per CUDA thread, warp shuffles, a device of a settable SM
count), and rows_driver.cpp calls their host entry points of csrc/kernels.h, so the launch
plans (16-byte or scalar vectors, the fused or the wide layer-norm backward, the partial sums)
are those of the CUDA build. The driver is built once per session; each case writes its inputs,
runs the forward and the backward in a subprocess (a crash fails the test) and checks every
output by the pass rule, torch in the same dtype setting the budget, with the emulator seeing
no fault. NaN rows must come out NaN, as in torch.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from emulation_check import CXX_FLAGS, gxx, read, run_driver
from llm_kernels.numerics import assert_close
from llm_kernels.reference import (ACTIVATIONS, activation_ref, cross_entropy_ref,
                                   layer_norm_ref, rms_norm_ref, softmax_ref)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATION = os.path.join(ROOT, "tests", "cuda_emulation")
KERNELS = ("layer_norm", "softmax", "cross_entropy", "feed_forward")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = [F32, F16, BF16]
NAMES = {F32: "f32", F16: "f16", BF16: "bf16"}
IGNORE = -100


@pytest.fixture(scope="session")
def driver(tmp_path_factory):
    """rows_driver linked with the four .cu files, compiled by g++ in parallel."""
    cxx = gxx()
    out = tmp_path_factory.mktemp("cuda_emulation_rows")
    flags = [cxx, *CXX_FLAGS, "-I", os.path.join(ROOT, "csrc"), "-I", EMULATION]
    emulated = ["-x", "c++", "-include", os.path.join(EMULATION, "cuda_emulation.h")]
    compiles = [flags + emulated + ["-c", os.path.join(ROOT, "csrc", f"{k}.cu"), "-o",
                                    str(out / f"{k}.o")] for k in KERNELS]
    compiles.append(flags + ["-c", os.path.join(EMULATION, "rows_driver.cpp"), "-o",
                             str(out / "rows_driver.o")])
    jobs = [(cmd, subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)) for cmd in compiles]
    exe = out / "rows_driver"
    link = [cxx, "-rdynamic", "-pthread", *(cmd[-1] for cmd in compiles), "-o", str(exe)]
    for cmd, job in [*jobs, (link, None)]:
        job = job or subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        _, err = job.communicate()
        if job.returncode != 0:
            pytest.fail(f"building the emulator failed: {' '.join(cmd)}\n{err[-6000:]}")
    return exe


def raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(torch.uint8).numpy().tobytes()


def emulate(driver, case_dir, fields: dict, inputs: dict, outputs: dict):
    """Runs the driver on `inputs` (name -> tensor) with case.txt `fields`; returns (name ->
    tensor of `outputs`' (shape, dtype) for the files it wrote, the emulator's faults)."""
    faults = run_driver(driver, case_dir, fields, {name: raw(t) for name, t in inputs.items()})
    got = {name: read(case_dir / f"{name}.bin", shape, dtype)
           for name, (shape, dtype) in outputs.items() if (case_dir / f"{name}.bin").exists()}
    return got, faults


def run_case(driver, case_dir, fields, inputs, outputs):
    got, faults = emulate(driver, case_dir, fields, inputs, outputs)
    assert not faults, "the emulator reports:\n" + "\n".join(faults)
    assert set(got) == set(outputs), f"outputs missing: {set(outputs) - set(got)}"
    return got


def leaf64(t):
    return t.detach().double().requires_grad_()


def leaf(t):
    return t.detach().clone().requires_grad_()


def check(got: dict, refs: dict, torch_outs: dict, dtype):
    for name, ref in refs.items():
        out_dtype = F32 if got[name].dtype == F32 else dtype
        assert_close(got[name], ref.detach(), torch_outs[name].detach(), out_dtype, name)


# ---- layer_norm / rms_norm ------------------------------------------------------------------


@dataclass(frozen=True)
class NormCase:
    rms: bool
    dtype: torch.dtype
    rows: int
    cols: int
    inputs: tuple = ()  # of weight, bias, residual, grad_h
    sms: int = 132

    def __str__(self):
        return "-".join([("rms" if self.rms else "ln"), NAMES[self.dtype],
                         f"{self.rows}x{self.cols}", *self.inputs, f"sms{self.sms}"])


ALL = ("weight", "bias", "residual", "grad_h")
# rows, cols, inputs, sms. The fused backward caches up to 8192 columns (4096 scalar).
NORM_SHAPES = [
    (1, 1, ALL, 132),
    (37, 17, ("weight",), 1),  # scalar; 32 fused blocks of 37 rows
    (37, 127, (), 132),
    (37, 1000, ALL, 1),  # 16-byte vectors
    (37, 1025, ("weight", "bias"), 132),
    (19, 4104, ("weight", "bias", "residual"), 2),  # vectors, fused, 512 threads; 8 blocks
    (3, 4097, ("weight", "bias"), 132),  # scalar, wide: dx + column-tiled partials
    (17, 8200, ALL, 132),  # vectors, wide (3 row chunks); the forward re-reads past its cache
]
NORM_CASES = [NormCase(rms, dtype, rows, cols,
                       tuple(i for i in inputs if not (rms and i == "bias")), sms)
              for rows, cols, inputs, sms in NORM_SHAPES for rms in (False, True)
              for dtype in DTYPES]


def norm_forward(case, x, weight, bias, residual, eps, upcast):
    if case.rms:
        return rms_norm_ref(x, weight, eps, residual=residual, upcast=upcast)
    return layer_norm_ref(x, weight, bias, eps, residual=residual, upcast=upcast)


def norm_outputs_and_grads(case, tensors, grad_y, grad_h, eps, upcast):
    """(outputs, grads) of the reference (float64) or of torch (the dtype)."""
    make = leaf64 if upcast else leaf
    leaves = {k: make(t) for k, t in tensors.items()}
    out = norm_forward(case, leaves["x"], leaves.get("weight"), leaves.get("bias"),
                       leaves.get("residual"), eps, upcast)
    y, h = out if "residual" in leaves else (out, None)
    wrt = list(leaves.values())
    outs, grads_in = [y], [grad_y.to(y.dtype)]
    if h is not None and grad_h is not None:
        outs.append(h)
        grads_in.append(grad_h.to(h.dtype))
    grads = dict(zip(leaves, torch.autograd.grad(outs, wrt, grads_in, allow_unused=True)))
    results = {"y": y, "dx": grads["x"]}
    if h is not None:
        results["h"] = h
    for name, key in (("weight", "dweight"), ("bias", "dbias")):
        if name in leaves:
            results[key] = grads[name]
    return results


@pytest.mark.parametrize("case", NORM_CASES, ids=str)
def test_emulated_norm(driver, tmp_path, seed, case):
    gen = torch.Generator().manual_seed(seed)
    n, c, dtype = case.rows, case.cols, case.dtype
    eps = 1e-6 if case.rms else 1e-5
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    tensors = {"x": (randn(n, c) * 2 + 0.5).to(dtype)}
    if "residual" in case.inputs:
        tensors["residual"] = randn(n, c).to(dtype)
    if "weight" in case.inputs:
        tensors["weight"] = (1 + 0.5 * randn(c)).to(dtype)
    if "bias" in case.inputs:
        tensors["bias"] = randn(c).to(dtype)
    grad_y = randn(n, c).to(dtype)
    grad_h = randn(n, c).to(dtype) if "grad_h" in case.inputs else None
    inputs = dict(tensors, grad_y=grad_y, **({"grad_h": grad_h} if grad_h is not None else {}))
    optional = [k for k in ("weight", "bias", "residual", "grad_h") if k in inputs]
    fields = dict(op="rms_norm" if case.rms else "layer_norm", dtype=NAMES[dtype], rows=n,
                  cols=c, sms=case.sms, eps=eps, inputs=" ".join(optional))
    outputs = dict(y=((n, c), dtype), dx=((n, c), dtype), rstd=((n,), F32))
    if not case.rms:
        outputs["mean"] = ((n,), F32)
    if "residual" in inputs:
        outputs["h"] = ((n, c), dtype)
    if "weight" in inputs:
        outputs["dweight"] = ((c,), dtype)
    if "bias" in inputs:
        outputs["dbias"] = ((c,), dtype)
    got = run_case(driver, tmp_path, fields, inputs, outputs)

    refs = norm_outputs_and_grads(case, tensors, grad_y, grad_h, eps, upcast=True)
    torch_outs = norm_outputs_and_grads(case, tensors, grad_y, grad_h, eps, upcast=False)
    if "h" in refs:  # h = x + residual rounded to the dtype, as torch rounds it
        assert torch.equal(got["h"], torch_outs["h"]), "h"
        del refs["h"]
    check(got, refs, torch_outs, dtype)
    # The statistics are of h rounded to the dtype.
    h = tensors["x"] + tensors["residual"] if "residual" in tensors else tensors["x"]
    h64, h32 = h.double(), h.float()
    mean64 = torch.zeros(n, dtype=torch.float64) if case.rms else h64.mean(-1)
    var64 = ((h64 - mean64[:, None]) ** 2).mean(-1)
    mean32 = torch.zeros(n) if case.rms else h32.mean(-1)
    var32 = ((h32 - mean32[:, None]) ** 2).mean(-1)
    assert_close(got["rstd"], (var64 + eps).rsqrt(), (var32 + eps).rsqrt(), F32, "rstd")
    if not case.rms:
        assert_close(got["mean"], mean64, mean32, F32, "mean")


# ---- softmax --------------------------------------------------------------------------------

SOFTMAX_WIDTHS = [1, 17, 127, 1000, 1025, 8200]
SOFTMAX_CASES = [(dtype, cols) for cols in SOFTMAX_WIDTHS for dtype in DTYPES]
NAN_ROWS = [3, 4]


def softmax_inputs(rows, cols, dtype, gen):
    """Rows with scattered -inf, of all -inf (row 1), of +-1e4 (row 2), with one NaN (row 3),
    of all NaN (row 4); the others plain."""
    x = 3 * torch.randn(rows, cols, generator=gen)
    x[0, torch.rand(cols, generator=gen) < 0.3] = float("-inf")
    x[0, 0] = 0.5
    x[1] = float("-inf")
    x[2] = 1e4 * torch.randn(cols, generator=gen).sign()
    x[3, cols // 2] = float("nan")
    x[4] = float("nan")
    return x.to(dtype)


@pytest.mark.parametrize("dtype, cols", SOFTMAX_CASES,
                         ids=[f"{NAMES[d]}-37x{c}" for d, c in SOFTMAX_CASES])
def test_emulated_softmax(driver, tmp_path, seed, dtype, cols):
    gen = torch.Generator().manual_seed(seed)
    rows = 37
    x = softmax_inputs(rows, cols, dtype, gen)
    grad_y = torch.randn(rows, cols, generator=gen).to(dtype)
    out = ((rows, cols), dtype)
    got = run_case(driver, tmp_path, dict(op="softmax", dtype=NAMES[dtype], rows=rows, cols=cols),
                   dict(x=x, grad_y=grad_y), dict(y=out, dx=out))
    x64, xt = leaf64(x), leaf(x)
    ref, torch_out = softmax_ref(x64, upcast=True), softmax_ref(xt)
    ref_dx, = torch.autograd.grad(ref, x64, grad_y.double())
    torch_dx, = torch.autograd.grad(torch_out, xt, grad_y)
    nan = torch.zeros(rows, dtype=torch.bool)
    nan[NAN_ROWS] = True
    for name, ref_t in (("y", ref), ("dx", ref_dx)):
        assert bool(ref_t[nan].isnan().all()), f"the reference {name} of the NaN rows"
        assert bool(got[name][nan].isnan().all()), f"{name}: NaN must propagate as in torch"
    assert torch.equal(got["y"][1], torch.zeros(cols, dtype=dtype)), "all -inf row"
    assert torch.equal(got["dx"][1], torch.zeros(cols, dtype=dtype)), "all -inf row, dx"
    check({k: got[k][~nan] for k in ("y", "dx")}, {"y": ref[~nan], "dx": ref_dx[~nan]},
          {"y": torch_out[~nan], "dx": torch_dx[~nan]}, dtype)


# ---- cross_entropy --------------------------------------------------------------------------

CE_CASES = [(dtype, cols, reduction, False) for cols in (1, 17, 127, 1000, 1025, 8200)
            for dtype in DTYPES for reduction in (("mean",) if cols not in (127, 1000)
                                                  else ("mean", "sum", "none"))]
CE_CASES += [(dtype, cols, "mean", True) for dtype in DTYPES for cols in (127, 1000)]


@pytest.mark.parametrize("dtype, cols, reduction, inplace", CE_CASES,
                         ids=[f"{NAMES[d]}-37x{c}-{r}{'-inplace' if i else ''}"
                              for d, c, r, i in CE_CASES])
def test_emulated_cross_entropy(driver, tmp_path, seed, dtype, cols, reduction, inplace):
    """Per-row loss and lse, and the backward of each reduction given its per-row grad_loss;
    ignored rows give 0, a target outside [0, V) NaN."""
    gen = torch.Generator().manual_seed(seed)
    rows = 37
    logits = (4 * torch.randn(rows, cols, generator=gen)).to(dtype)
    target = torch.randint(0, cols, (rows,), generator=gen)
    target[torch.rand(rows, generator=gen) < 0.2] = IGNORE
    target[0] = IGNORE
    target[1] = cols  # out of range
    kept = (target != IGNORE) & (target < cols)
    valid = target != IGNORE  # what F.cross_entropy's mean divides by, the bad row included
    if reduction == "none":
        grad_loss = torch.randn(rows, generator=gen)
    else:
        grad_loss = torch.full((rows,), 1.0 / int(valid.sum()) if reduction == "mean" else 1.0)
    fields = dict(op="cross_entropy", dtype=NAMES[dtype], rows=rows, cols=cols,
                  ignore_index=IGNORE, inplace=int(inplace))
    got = run_case(driver, tmp_path, fields, dict(logits=logits, target=target,
                                                  grad_loss=grad_loss),
                   dict(loss=((rows,), F32), lse=((rows,), F32), grad=((rows, cols), dtype)))
    assert bool(got["loss"][1].isnan()) and bool(got["grad"][1].isnan().all()), "bad target"
    assert torch.equal(got["loss"][~valid], torch.zeros(int((~valid).sum())))
    assert torch.equal(got["grad"][~valid], torch.zeros_like(got["grad"][~valid]))

    safe = torch.where(kept, target, IGNORE)  # torch raises on the bad target: leave it out
    l64, lt = leaf64(logits), leaf(logits)
    ref_loss = cross_entropy_ref(l64, safe, reduction="none", upcast=True)
    torch_loss = cross_entropy_ref(lt, safe, reduction="none")
    ref_grad, = torch.autograd.grad(ref_loss, l64, torch.where(kept, grad_loss, 0).double())
    torch_grad, = torch.autograd.grad(torch_loss, lt, torch.where(kept, grad_loss, 0).to(dtype))
    ref_lse, torch_lse = logits.double().logsumexp(-1), logits.float().logsumexp(-1)
    check({"loss": got["loss"][kept], "lse": got["lse"], "grad": got["grad"][kept]},
          {"loss": ref_loss[kept], "lse": ref_lse, "grad": ref_grad[kept]},
          {"loss": torch_loss[kept].float(), "lse": torch_lse, "grad": torch_grad[kept]}, dtype)


# ---- feed-forward epilogues -----------------------------------------------------------------

FF_CASES = [(op, dtype, cols, sms, inplace)
            for op in (*ACTIVATIONS, "swiglu") for dtype in DTYPES
            for cols, sms, inplace in ((1000, 1, False), (127, 132, True))]


@pytest.mark.parametrize("op, dtype, cols, sms, inplace", FF_CASES,
                         ids=[f"{o}-{NAMES[d]}-37x{c}-sms{s}{'-inplace' if i else ''}"
                              for o, d, c, s, i in FF_CASES])
def test_emulated_feed_forward_epilogue(driver, tmp_path, seed, op, dtype, cols, sms, inplace):
    """act(pre) and its backward for every activation, silu(gate) * up and its backward, over
    37 x cols values (1000: 16-byte vectors, a grid-stride loop on 1 SM; 127: scalar, the
    gradient written over grad_out)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (37, cols)
    randn = lambda: (2 * torch.randn(*shape, generator=gen)).to(dtype)  # noqa: E731
    grad_out = randn()
    fields = dict(dtype=NAMES[dtype], rows=shape[0], cols=cols, sms=sms, inplace=int(inplace))
    out = (shape, dtype)
    if op == "swiglu":
        gate, up = randn(), randn()
        got = run_case(driver, tmp_path, dict(op="swiglu", **fields),
                       dict(gate=gate, up=up, grad_out=grad_out),
                       dict(out=out, out_backward=out, grad_gate=out, grad_up=out))

        def swiglu(g, u, make):
            g, u = make(g), make(u)
            y = F.silu(g) * u
            return [y, *torch.autograd.grad(y, (g, u), grad_out.to(y.dtype))]

        refs, torch_outs = swiglu(gate, up, leaf64), swiglu(gate, up, leaf)
        names = ("out", "grad_gate", "grad_up")
    else:
        pre = randn()
        got = run_case(driver, tmp_path,
                       dict(op="activation", act=ACTIVATIONS.index(op), **fields),
                       dict(pre=pre, grad_out=grad_out),
                       dict(out=out, out_backward=out, grad_pre=out))

        def act(x, make):
            x = make(x)
            y = activation_ref(x, op)
            return [y, *torch.autograd.grad(y, x, grad_out.to(y.dtype))]

        refs, torch_outs = act(pre, leaf64), act(pre, leaf)
        names = ("out", "grad_pre")
    assert torch.equal(got["out_backward"], got["out"]), "the backward's out"
    check(got, dict(zip(names, refs)), dict(zip(names, torch_outs)), dtype)


# ---- the emulator itself ------------------------------------------------------------------


def test_emulator_exposes_a_missing_syncthreads_in_row_reduce(driver, tmp_path):
    """Every thread skips its second __syncthreads, the one in row_reduce between the warps'
    writes of their partial sums and the reads of all of them: in the layer-norm forward of
    512-thread rows, warps read slots other warps have not written yet (a race of plain
    shared-memory accesses, which no detector sees), and the output fails the pass rule."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 4100, generator=gen).to(F16)
    got, faults = emulate(driver, tmp_path, dict(op="layer_norm", dtype="f16", rows=37,
                                                 cols=4100, skip_syncthreads=2, inputs=""),
                          dict(x=x, grad_y=torch.zeros_like(x)),
                          dict(y=((37, 4100), F16)))
    assert not faults
    ref = layer_norm_ref(x.double(), upcast=True)
    with pytest.raises(AssertionError, match="fails the pass rule"):
        assert_close(got["y"], ref, layer_norm_ref(x), F16, "y")
