"""Host time of the Triton launchers, measured on a machine without a GPU.

    python scripts/launch_overhead.py              # per launcher call, then per GPT step
    python scripts/launch_overhead.py --profile    # cProfile of the Triton GPT step

The fake sm_90 driver of ``check_triton_compile.py`` turns every launch into a compile-only
warmup, so what is timed is the Python around the kernels: the launchers' host code, triton's
argument binding and autotuner lookup, the custom-op dispatch and autograd. The real launch
(``cuLaunchKernelEx``, a few microseconds) is not in it, and the kernels never run: outputs are
garbage. Tiny CPU tensors, one thread. The GPT step (12 layers, autocast bf16, AdamW) runs with
the ``triton`` backend and, for comparison, the ``cuda`` backend's C++ CPU kernels and the
``torch`` backend (whose CPU kernels do compute, on tiny shapes). Needs triton and no
``TRITON_INTERPRET``; the first run compiles every kernel (minutes).
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from check_triton_compile import install  # noqa: E402

DTYPE = torch.bfloat16
ROWS, C, D_FF, VOCAB = 64, 768, 3072, 50304
B, H, L, D = 1, 12, 64, 64


def _randn(*shape):
    return torch.randn(*shape).to(DTYPE)


def launcher_cases() -> dict:
    """name -> thunk calling one launcher of llm_kernels.kernels on GPT-2-small-like rows."""
    from llm_kernels.kernels import attention as at
    from llm_kernels.kernels import cross_entropy as ce
    from llm_kernels.kernels import feed_forward as ff
    from llm_kernels.kernels import layer_norm as ln
    x, w, b, r = _randn(ROWS, C), _randn(C), _randn(C), _randn(ROWS, C)
    q, k, v = _randn(B, H, L, D), _randn(B, H, L, D), _randn(B, H, L, D)
    logits, target = _randn(ROWS, VOCAB), torch.randint(0, VOCAB, (ROWS,))
    w1, b1, w2, b2 = _randn(D_FF, C), _randn(D_FF), _randn(C, D_FF), _randn(C)
    y, h, mean, rstd = ln.layer_norm_forward(x, w, b, r, 1e-5, False)
    out, lse = at.attention_forward(q, k, v, None, True, 0, D ** -0.5)
    ff_out, pre = ff.feed_forward_forward(x, w1, b1, w2, b2, "gelu")
    return {
        "layer_norm_forward": lambda: ln.layer_norm_forward(x, w, b, r, 1e-5, False),
        "layer_norm_backward": lambda: ln.layer_norm_backward(y, y, h, w, b, mean, rstd, False),
        "attention_forward": lambda: at.attention_forward(q, k, v, None, True, 0, D ** -0.5),
        "attention_backward": lambda: at.attention_backward(out, q, k, v, out, lse, None, True,
                                                            0, D ** -0.5),
        "cross_entropy_forward": lambda: ce.cross_entropy_forward(logits, target, -100),
        "feed_forward_forward": lambda: ff.feed_forward_forward(x, w1, b1, w2, b2, "gelu"),
        "feed_forward_backward": lambda: ff.feed_forward_backward(ff_out, x, w1, b1, w2, b2,
                                                                  pre, "gelu"),
    }


def per_call_us(fn, number: int, repeat: int) -> float:
    """Median over ``repeat`` blocks of the microseconds per call of ``fn`` (warmed up)."""
    blocks = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        blocks.append((time.perf_counter() - start) / number * 1e6)
    return statistics.median(blocks)


def accept_cpu_tensors() -> None:
    """Let the triton backend take CPU tensors without the interpreter: the fake driver
    compiles for sm_90 and launches nothing."""
    from llm_kernels import backends
    device_type_reason = backends._device_type_reason
    backends._triton_status = lambda: (True, "")
    backends._device_reason = lambda backend, kernel, device: device_type_reason(
        backend, kernel, device.type, backend == "triton")


def gpt_step(backend: str):
    """A training step of a 12-layer GPT on a (2, 16) batch, autocast bf16, AdamW."""
    from llm_kernels.models.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, n_layer=12, n_head=4, n_kv_head=4, d_model=64,
                          d_ff=256, max_seq_len=32, backend=backend))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx, targets = torch.randint(257, (2, 16)), torch.randint(257, (2, 16))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true",
                        help="cProfile 10 Triton GPT steps instead (top 40 by own time)")
    parser.add_argument("--number", type=int, default=200, help="launcher calls per block")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: this times the compiled launch path")
    torch.set_num_threads(1)
    launched: list = []
    install(90, launched)
    accept_cpu_tensors()
    if args.profile:
        step = gpt_step("triton")
        step()
        profiler = cProfile.Profile()
        profiler.runcall(lambda: [step() for _ in range(10)])
        pstats.Stats(profiler).sort_stats("tottime").print_stats(40)
        return
    print(f"{'launcher (bf16)':28} {'us/call':>8} {'launches':>9}")
    for name, fn in launcher_cases().items():
        fn()
        before = len(launched)
        us = per_call_us(fn, args.number, 5)
        calls = (len(launched) - before) / (args.number * 5)
        print(f"{name:28} {us:8.1f} {calls:9.1f}")
    print(f"\n{'GPT step, backend':28} {'ms/step':>8} {'launches':>9}")
    for backend in ("triton", "cuda", "torch"):
        step = gpt_step(backend)
        step()
        before = len(launched)
        step()
        calls = len(launched) - before
        print(f"{backend:28} {per_call_us(step, 5, 5) / 1e3:8.2f} {calls:9d}")


if __name__ == "__main__":
    main()
