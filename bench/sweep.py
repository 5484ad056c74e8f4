"""Launch-parameter sweeps on a GPU: the numbers that choose the kernels' launch settings.

    python -m llm_kernels.bench.sweep                          # every sweep, H100/H200 sizes
    python -m llm_kernels.bench.sweep --sweeps layer_norm_bwd --quick

Each sweep times one kernel launcher (``kernels/``) over a grid of settings that the library
otherwise picks itself, with the same timer as the benchmarks (CUDA events, L2 flushed), and
prints one table per sweep; the row marked ``*`` is what the library picks today.

- ``layer_norm_bwd``: the Triton backward at hidden 4096 and 8192 (bf16, N 16384) over warps per
  program and programs per SM: GB/s of dy + x read and dx written.
- ``cuda_attention``: the CUDA C++ tensor-core forward and backward (bf16, B 4, H 16, L 4096, D
  64 and 128) with 16 query rows per warp (the default) and 32 in the forward and, at D <= 64,
  the dQ kernel (two m-tiles share each K/V fragment, ``$LLM_KERNELS_CUDA_ATTENTION_WARP_ROWS``):
  TFLOP/s.
- ``decode``: flash-decoding (B 8, H 32, Hkv 8, D 128, bf16) over the programs per SM its split
  plan aims for and the KV length: ms, the ratio to reading the KV cache once at the copy
  bandwidth, and the host time one call takes (the launcher alone, then ``lk.attention``).
- ``attention_ws``: the Triton attention without mask (B 4, H 16, L 4096, bf16, D 64 and 128),
  forward and backward, causal and not, autotuned, against the
  warp-specialized forward, dK/dV and dQ kernels (``$LLM_KERNELS_ATTENTION_WS=1``) autotuned
  and with each dK/dV or forward launch setting forced: TFLOP/s.
- ``attention_fwd``: the Triton forward (D 128, bf16, L 4096) with each launch setting of its
  table forced, reading Q, K, V by pointer (the default) and through TMA descriptors
  (``$LLM_KERNELS_ATTENTION_TMA=1``): TFLOP/s.
- ``attention_bwd``: the Triton backward (D 128, bf16, L 4096, autotuned), reading Q, K, V and
  dO by pointer (the default) and through TMA descriptors: TFLOP/s.
- ``matmul_tma``: the Triton feed-forward block (tokens 8192, d 4096, d_ff 16384, bf16, gelu),
  forward and forward+backward, its matmuls reading A and B by pointer (the default) and
  through TMA descriptors (``$LLM_KERNELS_MATMUL_TMA=1``) and those in a warp-specialized
  K loop (``$LLM_KERNELS_MATMUL_WS=1``): TFLOP/s.

On a CPU (the interpreter) the sweeps run tiny sizes: a smoke run, not a measurement.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Callable, Iterator, Optional

import torch

from llm_kernels.bench import harness
from llm_kernels.bench.common import env_var

# In the order the GPU check runs them (it may be cut off): the opt-in switches awaiting a
# decision first (the warp-specialized Triton forward, CUDA rows per warp, the Triton TMA
# reads), then the launch plans.
SWEEPS = ("attention_ws", "cuda_attention", "attention_fwd", "attention_bwd", "matmul_tma",
          "decode", "layer_norm_bwd")
MAX_WARPS_PER_SM = 64


def _timed(fn: Callable[[], object], device: torch.device, timer) -> harness.Timing:
    fn()  # compile
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return harness.measure(fn, device, timer)


@contextlib.contextmanager
def _patched(module, name: str, value) -> Iterator[None]:
    """``module.name = value`` for the duration (the sweep's forced setting)."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def _table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return [f"== {title}", line(header), *(line(r) for r in rows)]


def layer_norm_bwd(device: torch.device, timer, quick: bool) -> list[str]:
    from llm_kernels.kernels import layer_norm as ln
    gpu = device.type == "cuda"
    n = 16384 if gpu else 8
    widths = ((4096,) if quick else (4096, 8192)) if gpu else (256,)
    rows = []
    for c in widths:
        x = torch.randn(n, c, device=device, dtype=torch.bfloat16)
        w, b = (torch.randn(c, device=device, dtype=torch.bfloat16) for _ in range(2))
        _, _, mean, rstd = ln.layer_norm_forward(x, w, b, None, 1e-5, False)
        dy = torch.randn_like(x)
        run = lambda: ln.layer_norm_backward(dy, None, x, w, b, mean, rstd, False)  # noqa: E731
        nbytes = 3 * x.numel() * x.element_size()
        auto = _timed(run, device, timer)
        block = ln._config(c)[0]
        chosen = [plan for key, plan in ln._backward_plans.items() if key[1] == block]
        rows.append([str(c), "auto", "auto", f"{auto.ms:.3f}", f"{nbytes / auto.ms / 1e6:.0f}",
                     "* (warps, per SM) = " + ", ".join(map(str, chosen)) if chosen else "*"])
        for warps in sorted({ln._backward_warps(block), 2 * ln._backward_warps(block), 8, 16, 32}):
            if warps > 32 or block // (32 * warps) < 1:
                continue
            for per_sm in ((1, 2) if quick else (1, 2, 3, 4)):
                if warps * per_sm > MAX_WARPS_PER_SM:
                    continue
                def forced(n_rows, args, constexprs, blk, dev, warps=warps, per_sm=per_sm):
                    sms = (torch.cuda.get_device_properties(dev).multi_processor_count
                           if dev.type == "cuda" else 1)
                    return warps, min(n_rows, sms * per_sm)
                with _patched(ln, "_backward_launch", forced):
                    try:
                        t = _timed(run, device, timer)
                    except Exception as exc:  # a setting that does not fit: say so, go on
                        rows.append([str(c), str(warps), str(per_sm), "-", "-",
                                     type(exc).__name__])
                        continue
                rows.append([str(c), str(warps), str(per_sm), f"{t.ms:.3f}",
                             f"{nbytes / t.ms / 1e6:.0f}", ""])
    return _table("layer_norm backward (bf16, N %d): warps x programs per SM" % n,
                  ["C", "warps", "per_sm", "ms", "GB/s", "note"], rows)


def decode(device: torch.device, timer, quick: bool) -> list[str]:
    import llm_kernels as lk
    from llm_kernels.kernels import attention as attn
    gpu = device.type == "cuda"
    b, h, hkv, d = (8, 32, 8, 128) if gpu else (1, 4, 1, 16)
    lengths = ((16384,) if quick else (4096, 16384, 32768)) if gpu else (600,)
    copy_gbps = _copy_gbps(device, timer) if gpu else None
    rows, default = [], attn.DECODE_PROGRAMS_PER_SM
    for lk_len in lengths:
        q = torch.randn(b, h, 1, d, device=device, dtype=torch.bfloat16)
        k, v = (torch.randn(b, hkv, lk_len, d, device=device, dtype=torch.bfloat16)
                for _ in range(2))
        kv_ms = 2 * k.numel() * k.element_size() / copy_gbps / 1e6 if copy_gbps else None
        scale = d ** -0.5
        launcher = lambda: attn.attention_forward(q, k, v, None, False, 0, scale)  # noqa: E731
        public = lambda: lk.attention(q, k, v, backend="triton")  # noqa: E731
        for per_sm in (1, 2, 4, 8):
            with _patched(attn, "DECODE_PROGRAMS_PER_SM", per_sm), torch.no_grad():
                plan = attn.split_plan(b, hkv, h // hkv, 1, lk_len, attn._device_sm_count(device))
                t = _timed(launcher, device, timer)
                host = (harness.host_time_ms(launcher, device),
                        harness.host_time_ms(public, device)) if gpu else (None, None)
            rows.append([str(lk_len), str(per_sm) + ("*" if per_sm == default else ""),
                         str(plan.num_splits if plan else 1), f"{t.ms:.3f}",
                         f"{t.ms / kv_ms:.2f}" if kv_ms else "-",
                         *(f"{x:.3f}" if x is not None else "-" for x in host)])
    return _table(f"decode (B {b}, H {h}/{hkv}, D {d}, bf16): programs per SM of the split plan",
                  ["Lk", "per_sm", "splits", "ms", "x KV read", "host ms (launcher)",
                   "host ms (lk.attention)"], rows)


def attention_fwd(device: torch.device, timer, quick: bool) -> list[str]:
    from llm_kernels.bench.harness import attention_flops
    from llm_kernels.kernels import attention as attn
    gpu = device.type == "cuda"
    b, h, seq_len, d = (4, 16, 4096, 128) if gpu else (1, 2, 64, 16)
    q, k, v = (torch.randn(b, h, seq_len, d, device=device, dtype=torch.bfloat16) for _ in range(3))
    candidates = attn._TABLE["fwd"][(attn.block_d(d), 2)]
    rows = []
    for causal in ((False,) if quick else (False, True)):
        flops = attention_flops(b, h, seq_len, seq_len, d, causal=causal, mode="fwd")

        def run(causal=causal):
            return attn.attention_forward(q, k, v, None, causal, 0, d ** -0.5)
        for i, launch in enumerate(candidates if gpu else candidates[:1]):
            for reads, switch in (("pointer", "0"), ("tma", "1")):
                with _patched(attn, "launches", lambda *a, launch=launch, **kw: [launch]), \
                        env_var(attn.TMA_ENV, switch):
                    try:
                        t = _timed(run, device, timer)
                    except Exception as exc:  # e.g. out of shared memory
                        rows.append([str(causal), str(launch), reads, "-", type(exc).__name__])
                        continue
                rows.append([str(causal), str(launch) + ("*" if i == 0 else ""), reads,
                             f"{t.ms:.3f}", f"{harness.tflops(flops, t.ms):.0f}"])
    return _table(f"attention forward (B {b}, H {h}, L {seq_len}, D {d}, bf16): each launch "
                  "setting (* = the first, used without autotuning), Q/K/V read by pointer (the "
                  "default) and by TMA", ["causal", "launch", "reads", "ms", "TFLOP/s"], rows)


def attention_ws(device: torch.device, timer, quick: bool) -> list[str]:
    from llm_kernels.bench.harness import attention_flops
    from llm_kernels.kernels import attention as attn
    gpu = device.type == "cuda"
    b, h, seq_len = (4, 16, 4096) if gpu else (1, 2, 64)
    table_launches = attn.launches
    rows = []
    for d in ((128,) if quick else (64, 128)):
        q, k, v, grad = (torch.randn(b, h, seq_len, d, device=device, dtype=torch.bfloat16)
                         for _ in range(4))
        calls = []
        for causal in ((False,) if quick else (False, True)):
            o, m = attn.attention_forward(q, k, v, None, causal, 0, d ** -0.5)
            calls.append(("fwd", causal, lambda q=q, k=k, v=v, d=d, c=causal:
                          attn.attention_forward(q, k, v, None, c, 0, d ** -0.5)))
            calls.append(("bwd", causal, lambda q=q, k=k, v=v, d=d, o=o, m=m, c=causal:
                          attn.attention_backward(grad, q, k, v, o, m, None, c, 0, d ** -0.5)))
        for mode, causal, run in calls:
            flops = attention_flops(b, h, seq_len, seq_len, d, causal=causal, mode=mode)
            table = "fwd_ws" if mode == "fwd" else "dkdv_ws"
            settings = [("default*", "0", None), ("ws autotuned", "1", None)]
            settings += [("ws " + str(launch), "1", launch)
                         for launch in (attn._TABLE[table][(d, 2)] if gpu else [])]
            for name, switch, launch in settings:
                forced = (_patched(attn, "launches",
                                   lambda kernel, *a, launch=launch, table=table, **kw:
                                   [launch] if kernel == table
                                   else table_launches(kernel, *a, **kw))
                          if launch is not None else contextlib.nullcontext())
                with forced, env_var(attn.WS_ENV, switch):
                    try:
                        t = _timed(run, device, timer)
                    except Exception as exc:  # e.g. a compiler without warp specialization
                        rows.append([str(d), mode, str(causal), name, "-", type(exc).__name__])
                        continue
                rows.append([str(d), mode, str(causal), name, f"{t.ms:.3f}",
                             f"{harness.tflops(flops, t.ms):.0f}"])
    return _table(f"attention, no mask (B {b}, H {h}, L {seq_len}, bf16): the Triton forward and "
                  "backward (* = the default) and the warp-specialized kernels",
                  ["D", "mode", "causal", "kernels", "ms", "TFLOP/s"], rows)


def cuda_attention(device: torch.device, timer, quick: bool) -> list[str]:
    from llm_kernels._ops import CUDA_ATTENTION_WARP_ROWS_ENV, ops as backend_ops
    from llm_kernels.backends import extension_status
    from llm_kernels.bench.harness import attention_flops
    built, why = extension_status()
    if not built:
        return [f"== CUDA attention: skipped ({why})"]
    gpu = device.type == "cuda"
    b, h, seq_len = (4, 16, 4096) if gpu else (1, 2, 64)
    ops = backend_ops("cuda")
    rows = []
    for d in ((128,) if quick else (64, 128)):
        q, k, v, grad = (torch.randn(b, h, seq_len, d, device=device, dtype=torch.bfloat16)
                         for _ in range(4))
        for causal in (False, True):
            out, lse = ops.attention_forward(q, k, v, None, causal, 0, d ** -0.5)
            calls = {
                "fwd": lambda causal=causal, d=d, q=q, k=k, v=v:
                    ops.attention_forward(q, k, v, None, causal, 0, d ** -0.5),
                "bwd": lambda causal=causal, d=d, q=q, k=k, v=v, grad=grad, out=out, lse=lse:
                    ops.attention_backward(grad, q, k, v, out, lse, None, causal, 0, d ** -0.5),
            }
            for mode, run in calls.items():
                flops = attention_flops(b, h, seq_len, seq_len, d, causal=causal, mode=mode)
                for warp_rows in ("16*", "32"):
                    with env_var(CUDA_ATTENTION_WARP_ROWS_ENV, warp_rows.rstrip("*")):
                        t = _timed(run, device, timer)
                    rows.append([str(d), str(causal), mode, warp_rows, f"{t.ms:.3f}",
                                 f"{harness.tflops(flops, t.ms):.0f}"])
    return _table(f"CUDA attention (B {b}, H {h}, L {seq_len}, bf16): query rows per warp of the "
                  "forward and dQ (* = the default)",
                  ["D", "causal", "mode", "rows/warp", "ms", "TFLOP/s"], rows)


def matmul_tma(device: torch.device, timer, quick: bool) -> list[str]:
    import llm_kernels as lk
    from llm_kernels.bench.common import timed_step
    from llm_kernels.kernels import feed_forward as ff
    gpu = device.type == "cuda"
    n, d, d_ff = (8192, 4096, 16384) if gpu else (64, 32, 64)
    dtype = torch.bfloat16
    x = torch.randn(n, d, device=device).to(dtype).requires_grad_()
    w1 = (torch.randn(d_ff, d, device=device) / d ** 0.5).to(dtype).requires_grad_()
    w2 = (torch.randn(d, d_ff, device=device) / d_ff ** 0.5).to(dtype).requires_grad_()
    b1, b2 = (torch.zeros(m, device=device, dtype=dtype, requires_grad=True) for m in (d_ff, d))
    inputs = (x, w1, b1, w2, b2)
    block = lambda *t: lk.feed_forward(*t, activation="gelu", backend="triton")  # noqa: E731
    rows = []
    for mode in (("fwd",) if quick else ("fwd", "fwd+bwd")):
        flops = 4 * n * d * d_ff * (3 if mode == "fwd+bwd" else 1)
        for reads, tma, ws in (("pointer*", "0", "0"), ("tma", "1", "0"), ("tma+ws", "0", "1")):
            with env_var(ff.TMA_ENV, tma), env_var(ff.WS_ENV, ws):
                t = _timed(timed_step(block, inputs, mode), device, timer)
            rows.append([mode, reads, f"{t.ms:.3f}", f"{harness.tflops(flops, t.ms):.0f}"])
    return _table(f"feed-forward (tokens {n}, d {d}, d_ff {d_ff}, bf16, gelu), lk-triton: the "
                  "matmuls' operand reads (* = the default; ws: the warp-specialized K loop)",
                  ["mode", "reads", "ms", "TFLOP/s"], rows)


def attention_bwd(device: torch.device, timer, quick: bool) -> list[str]:
    from llm_kernels.bench.harness import attention_flops
    from llm_kernels.kernels import attention as attn
    gpu = device.type == "cuda"
    b, h, seq_len, d = (4, 16, 4096, 128) if gpu else (1, 2, 64, 16)
    q, k, v, grad = (torch.randn(b, h, seq_len, d, device=device, dtype=torch.bfloat16)
                     for _ in range(4))
    rows = []
    for causal in ((False,) if quick else (False, True)):
        out, lse = attn.attention_forward(q, k, v, None, causal, 0, d ** -0.5)
        flops = attention_flops(b, h, seq_len, seq_len, d, causal=causal, mode="bwd")

        def run(causal=causal, out=out, lse=lse):
            return attn.attention_backward(grad, q, k, v, out, lse, None, causal, 0, d ** -0.5)
        for reads, switch in (("pointer*", "0"), ("tma", "1")):
            with env_var(attn.TMA_ENV, switch):
                t = _timed(run, device, timer)
            rows.append([str(causal), reads, f"{t.ms:.3f}", f"{harness.tflops(flops, t.ms):.0f}"])
    return _table(f"attention backward (B {b}, H {h}, L {seq_len}, D {d}, bf16), autotuned: "
                  "Q, K, V, dO read by pointer (* = the default) and by TMA",
                  ["causal", "reads", "ms", "TFLOP/s"], rows)


def _copy_gbps(device: torch.device, timer) -> float:
    src = torch.empty(1 << 28, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = _timed(lambda: dst.copy_(src), device, timer)
    return 2 * src.numel() * 4 / t.ms / 1e6


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_kernels.bench.sweep",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", default=",".join(SWEEPS), help="comma-separated, of: "
                        + ", ".join(SWEEPS))
    parser.add_argument("--quick", action="store_true", help="fewer sizes and settings")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    names = args.sweeps.split(",")
    unknown = [n for n in names if n not in SWEEPS]
    if unknown:
        parser.error(f"unknown sweeps: {', '.join(unknown)}")
    device = torch.device(args.device)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("without a GPU the sweeps need TRITON_INTERPRET=1 (a smoke run)")
    timer = harness.QUICK_TIMER
    status = 0
    for name in names:
        try:
            lines = globals()[name](device, timer, args.quick)
        except Exception as exc:  # one sweep's failure must not hide the others
            lines, status = [f"== {name}: failed: {type(exc).__name__}: {exc}"], 1
        print("\n".join(lines), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
