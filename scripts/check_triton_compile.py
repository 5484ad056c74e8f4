"""Compile every Triton kernel of ``llm_kernels.kernels`` for an NVIDIA GPU on a machine without
one, through the real launchers: catches what the interpreter cannot (lowering and ptxas errors,
an API a triton version lacks, shared memory over the device limit) before GPU time is spent.

    python scripts/check_triton_compile.py                # sm_90, every autotune candidate
    python scripts/check_triton_compile.py --quick        # one config per kernel
    python scripts/check_triton_compile.py --shard 2/8 --no-usage   # 1/8 of the cases
    /path/to/venv-with-triton-3.6/bin/python scripts/check_triton_compile.py   # another triton

A fake CUDA driver reports the target GPU, and every launch becomes a compile-only warmup
(nothing runs, outputs stay garbage); the autotuners' benchmarks just compile each candidate.
The launchers get CPU tensors of the shapes, dtypes and flags a GPU run would see. Prints one
line per compiled kernel variant (name, warps, stages, shared memory, registers and spill bytes
from triton's bundled cuobjdump) and exits 1 when a case fails to compile or a kernel needs more
shared memory than the GPU has (spills are reported, not failures: the autotuner weighs them).
Relies on triton internals (``driver.set_active``, ``JITFunction.run``) present in
triton 3.6 to 3.8.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

# Shared memory per block (bytes) by compute capability: the opt-in maximum.
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


class FakeCudaDriver:
    """Just enough of triton's CUDA driver for compilation: device 0 of the target arch."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")

    def get_benchmarker(self):
        def bench(fn, quantiles=None, **kwargs):
            fn()  # compiles the candidate config
            return [1.0] * len(quantiles) if quantiles else 1.0
        return bench


def install(arch: int, compiled: list) -> None:
    """Make triton compile for ``arch`` and turn every launch into a compile-only warmup that
    appends (kernel name, compiled kernel) to ``compiled``."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction
    driver.set_active(FakeCudaDriver(arch))
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.__name__, kernel))
        return kernel
    JITFunction.run = compile_only


def resource_usage(kernel) -> tuple[int, int]:
    """(registers per thread, spill bytes: stack + local) of a compiled kernel, read from its
    cubin by triton's bundled cuobjdump; (-1, -1) when that is unavailable."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if "cubin" not in kernel.asm or not os.path.exists(tool):
        return -1, -1
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                              text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", text)
    if found is None:
        return -1, -1
    return int(found.group(1)), int(found.group(2)) + int(found.group(3))


def _randn(*shape, dtype):
    import torch
    return torch.randn(*shape).to(dtype)


def attention_cases(dtypes, quick: bool):
    """(name, thunk) pairs: forward and backward for each head dim, causal, mask, GQA, decode."""
    import torch

    from llm_kernels.kernels import attention as k
    dims = (64, 128) if quick else (16, 40, 64, 80, 96, 128, 160, 256)
    mask_dims = (64,) if quick else (32, 64, 128, 256)

    def run(b, h, hkv, lq, lk, d, dtype, causal, masked):
        q = _randn(b, h, lq, d, dtype=dtype)
        kk, v = _randn(b, hkv, lk, d, dtype=dtype), _randn(b, hkv, lk, d, dtype=dtype)
        mask = _randn(b, h, lq, lk, dtype=dtype) if masked else None
        out, lse = k.attention_forward(q, kk, v, mask, causal, lk - lq, d ** -0.5)
        k.attention_backward(torch.randn_like(out), q, kk, v, out, lse, mask, causal, lk - lq,
                             d ** -0.5)

    cases = []
    for dtype in dtypes:
        for d in dims:
            for causal in (False, True):
                cases.append((f"attention d={d} {dtype} causal={causal}",
                              lambda d=d, dtype=dtype, c=causal: run(1, 4, 2, 300, 300, d, dtype,
                                                                     c, False)))
                if not quick:  # lengths divisible by 16: triton specializes on that
                    cases.append((f"attention aligned d={d} {dtype} causal={causal}",
                                  lambda d=d, dtype=dtype, c=causal: run(1, 4, 2, 256, 256, d,
                                                                         dtype, c, False)))
        for d in mask_dims:
            cases.append((f"attention mask d={d} {dtype}",
                          lambda d=d, dtype=dtype: run(1, 2, 2, 97, 130, d, dtype, False, True)))
        cases.append((f"attention decode {dtype}",
                      lambda dtype=dtype: run(2, 8, 2, 1, 4096, 128, dtype, True, False)))
        if dtype != torch.float32:  # the forward reading Q, K, V through TMA
            for d in (64, 128):
                for causal in (False, True):
                    cases.append((f"attention tma d={d} {dtype} causal={causal}",
                                  lambda d=d, dtype=dtype, c=causal: as_hopper(
                                      k, lambda: run(1, 4, 2, 256, 256, d, dtype, c, False))))
                for causal in (False, True):  # the warp-specialized forward and dK/dV
                    cases.append((f"attention ws d={d} {dtype} causal={causal}",
                                  lambda d=d, dtype=dtype, c=causal: as_hopper(
                                      k, lambda: run(1, 4, 2, 256, 300, d, dtype, c, False),
                                      k.WS_ENV)))
    return cases


def as_hopper(module, thunk, switch: str = "") -> None:
    """thunk() with an opt-in Hopper path of module switched on (the environment variable
    ``switch``, by default its TMA reads' $<module>.TMA_ENV) and its TMA device check answering
    yes for the CPU tensors here, as on a Hopper GPU."""
    switch = switch or module.TMA_ENV
    os.environ[switch] = "1"
    tma_device, module.tma_device = module.tma_device, lambda t: True
    try:
        thunk()
    finally:
        del os.environ[switch]
        module.tma_device = tma_device


def row_cases(dtypes, quick: bool):
    """Layer norm / RMSNorm (with residual, rows longer than one block), softmax, cross-entropy
    (both backwards)."""
    import torch

    from llm_kernels.kernels import cross_entropy, layer_norm, softmax
    widths = (4096,) if quick else (768, 4096, 10000)

    def norm(c, dtype, rms, residual):
        x = _randn(64, c, dtype=dtype)
        w, b = _randn(c, dtype=dtype), (None if rms else _randn(c, dtype=dtype))
        r = _randn(64, c, dtype=dtype) if residual else None
        y, h, mean, rstd = layer_norm.layer_norm_forward(x, w, b, r, 1e-5, rms)
        layer_norm.layer_norm_backward(torch.randn_like(y), torch.randn_like(y) if residual
                                       else None, h if residual else x, w, b, mean, rstd, rms)

    def soft(c, dtype):
        y = softmax.softmax_forward(_randn(64, c, dtype=dtype))
        softmax.softmax_backward(torch.randn_like(y), y)

    def xent(v, dtype):
        logits, target = _randn(64, v, dtype=dtype), torch.randint(0, v, (64,))
        loss, lse = cross_entropy.cross_entropy_forward(logits, target, -100)
        cross_entropy.cross_entropy_backward(torch.ones_like(loss), logits, target, lse, -100)
        cross_entropy.cross_entropy_backward_inplace(torch.ones_like(loss), logits, target, lse,
                                                     -100)

    cases = []
    for dtype in dtypes:
        for c in widths:
            for rms in (False, True):
                cases.append((f"norm C={c} {dtype} rms={rms}",
                              lambda c=c, dtype=dtype, rms=rms: norm(c, dtype, rms, True)))
            cases.append((f"softmax C={c} {dtype}", lambda c=c, dtype=dtype: soft(c, dtype)))
        cases.append((f"norm no residual {dtype}", lambda dtype=dtype: norm(1000, dtype, False,
                                                                            False)))
        cases.append((f"cross_entropy {dtype}", lambda dtype=dtype: xent(50304, dtype)))
    return cases


def feed_forward_cases(dtypes, quick: bool):
    """feed_forward (with and without biases) and swiglu, forward and backward, at a size large
    enough for the autotuned matmul to try every config."""
    import torch

    from llm_kernels.kernels import feed_forward, swiglu
    n, d, d_ff = (512, 256, 1024) if quick else (1024, 1024, 4096)

    def ffn(dtype, bias):
        x, w1, w2 = (_randn(n, d, dtype=dtype), _randn(d_ff, d, dtype=dtype),
                     _randn(d, d_ff, dtype=dtype))
        b1, b2 = ((_randn(d_ff, dtype=dtype), _randn(d, dtype=dtype)) if bias else (None, None))
        out, pre = feed_forward.feed_forward_forward(x, w1, b1, w2, b2, "gelu")
        feed_forward.feed_forward_backward(torch.randn_like(out), x, w1, b1, w2, b2, pre, "gelu")

    def glu(dtype):
        x, wg, wu = (_randn(n, d, dtype=dtype), _randn(d_ff, d, dtype=dtype),
                     _randn(d_ff, d, dtype=dtype))
        wd = _randn(d, d_ff, dtype=dtype)
        out, gate, up = swiglu.swiglu_forward(x, wg, wu, wd)
        swiglu.swiglu_backward(torch.randn_like(out), x, wg, wu, wd, gate, up)

    def ffn_tma(dtype):  # the matmuls reading A and B through TMA
        as_hopper(feed_forward, lambda: ffn(dtype, True))

    def ws(thunk):  # the warp-specialized TMA matmul
        as_hopper(feed_forward, thunk, feed_forward.WS_ENV)

    cases = []
    for dtype in dtypes:
        for bias in (True, False):
            cases.append((f"feed_forward {dtype} bias={bias}",
                          lambda dtype=dtype, bias=bias: ffn(dtype, bias)))
        if dtype != torch.float32:
            cases.append((f"feed_forward tma {dtype}", lambda dtype=dtype: ffn_tma(dtype)))
            cases.append((f"feed_forward ws {dtype}",
                          lambda dtype=dtype: ws(lambda: ffn(dtype, True))))
            cases.append((f"swiglu ws {dtype}", lambda dtype=dtype: ws(lambda: glu(dtype))))
        cases.append((f"swiglu {dtype}", lambda dtype=dtype: glu(dtype)))
    return cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(MAX_SHARED),
                        help="compute capability x 10 (default 90: H100/H200)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer shapes and one config per kernel (no autotune candidates)")
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument("--shard", default="0/1", metavar="K/N",
                        help="run every N-th case from the K-th (K in 0..N-1): N processes in "
                             "parallel fill triton's cache (TRITON_CACHE_DIR) N times faster")
    parser.add_argument("--no-usage", action="store_true",
                        help="skip reading registers and spills from each cubin")
    args = parser.parse_args(argv)
    try:
        shard, shards = (int(part) for part in args.shard.split("/"))
        if not 0 <= shard < shards:
            raise ValueError
    except ValueError:
        parser.error(f"--shard takes K/N with 0 <= K < N, got {args.shard!r}")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    if args.quick:
        os.environ["LLM_KERNELS_AUTOTUNE"] = "0"
    import torch
    import triton
    compiled: list = []
    install(args.arch, compiled)
    if args.quick:
        from llm_kernels.kernels import feed_forward, swiglu
        for module in (feed_forward, swiglu):  # the autotuned matmuls: their last config only
            for tuner in vars(module).values():
                if isinstance(tuner, triton.runtime.autotuner.Autotuner):
                    tuner.configs = tuner.configs[-1:]
    dtypes = (torch.bfloat16,) if args.quick else (torch.bfloat16, torch.float16, torch.float32)
    cases = [c for group in (attention_cases, row_cases, feed_forward_cases)
             for c in group(dtypes, args.quick) if args.only in c[0]][shard::shards]
    print(f"triton {triton.__version__}, torch {torch.__version__}, sm_{args.arch}, "
          f"{len(cases)} cases", flush=True)
    failures, seen, spilling, start = [], set(), 0, time.monotonic()
    for name, thunk in cases:
        before = len(compiled)
        try:
            thunk()
        except Exception:  # reported, and the next case runs
            failures.append(name)
            print(f"FAIL {name}:\n{traceback.format_exc(limit=-3)}", flush=True)
            continue
        for kernel_name, kernel in compiled[before:]:
            meta = kernel.metadata
            key = (kernel_name, meta.num_warps, meta.num_stages, meta.shared, str(meta.hash))
            if key in seen:
                continue
            seen.add(key)
            over = meta.shared > MAX_SHARED[args.arch]
            if over:
                failures.append(f"{name}: {kernel_name} needs {meta.shared} B of shared memory")
            regs, spill = (-1, -1) if args.no_usage else resource_usage(kernel)
            spilling += spill > 0
            print(f"{'OVER ' if over else 'ok   '}{kernel_name:<32} warps={meta.num_warps} "
                  f"stages={meta.num_stages} shared={meta.shared:>6} regs={regs:>3} "
                  f"spill={spill:>4}  ({name})", flush=True)
    print(f"{len(seen)} kernel variants compiled for sm_{args.arch} in "
          f"{time.monotonic() - start:.0f} s ({spilling} of them spill registers); "
          f"{len(failures)} failures", flush=True)
    for failure in failures:
        print(f"  FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
