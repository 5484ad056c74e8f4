"""The standard GPU suite run by ``bench/gpu_check.sh`` (``llm-kernels bench --suite standard``),
sized to the issues' performance targets, and the bit-for-bit determinism check.

- attention forward and backward, bf16, D = 128, H = 16, B*L = 16k, L in {4k, 8k, 16k},
  causal and not (``lk-triton-tma``: lk-triton with the opt-in TMA reads; the opt-in
  warp-specialized kernels, never run on a GPU yet, are timed by the sweep instead, where a
  hang would cost only that step); a decode step B = 8, H = 32, Hkv = 8, Lk = 16k, issued
  from Python and replayed from a CUDA graph (the kernels' device time);
- layer norm forward+backward, hidden 4096 and 8192, 16k rows (the copy bandwidth is measured
  in the same run by the runner), and its forward and backward alone at 4096;
- feed-forward forward and forward+backward at tokens 8192, d 4096, d_ff 16384 (with
  ``lk-triton-tma`` too);
- cross-entropy forward+backward at N = 8192, V = 128k (peak memory), with the in-place
  backward too (``lk-triton-inplace``);
- one training step of GPT-2 small (124M, batch 8 x 1024, bf16 autocast) per backend, eager
  torch and torch SDPA (issue 6: tokens/s and MFU in the row's note), and the lk backends and
  torch SDPA with the whole step captured in a CUDA graph (``-graph``: no host overhead);
- rms_norm, softmax and swiglu once each (no target: after the training step);
- torch.compile providers last (their compile time is the first thing the time budget cuts).
"""
from __future__ import annotations

import torch

from llm_kernels.bench import (attention, cross_entropy, feed_forward, gpt_train, layer_norm,
                               rms_norm, softmax, swiglu)
from llm_kernels.bench.common import Case
from llm_kernels.bench.harness import free_memory
from llm_kernels.bench.runner import PlanItem

DTYPE = torch.bfloat16
ATTN_PROVIDERS = ["lk-triton", "lk-cuda", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn",
                  "sdpa-math", "torch", "flash-attn", "lk-triton-tma"]
ROW_PROVIDERS = ["lk-triton", "lk-cuda", "torch", "liger"]
LAST = "torch-compile"
# The target's pair first, eager then replayed from a CUDA graph (the step's device time, never
# measured yet: a time budget cut the end of the list), the eager torch ops last.
GPT_PROVIDERS = ["torch-sdpa", "lk-auto", "lk-cuda", "lk-triton", "torch-sdpa-graph",
                 "lk-auto-graph", "lk-cuda-graph", "lk-triton-graph", "torch"]
DETERMINISM_SHAPE = {"B": 2, "H": 16, "L": 4096, "D": 128}


def _rows(module, mode: str, n: int, c: int) -> Case:
    e = torch.empty((), dtype=DTYPE).element_size()
    short = "V" if module is cross_entropy else "C"
    return Case(op=module.NAME, mode=mode, dtype=DTYPE, params={"N": n, short: c},
                x_name="vocab" if short == "V" else "hidden", x=c,
                nbytes=module.bytes_moved(mode, n, c, e))


def standard_plan() -> list[PlanItem]:
    plan: list[PlanItem] = []
    for mode in ("fwd", "bwd"):
        for seq_len in (4096, 8192, 16384):
            for causal in (False, True):
                case = attention.dense_case(mode, 16384 // seq_len, 16, seq_len, 128, causal, DTYPE)
                plan.append(PlanItem(attention, case, list(ATTN_PROVIDERS)))
    for graph in (False, True):
        plan.append(PlanItem(attention, attention.decode_case(8, 32, 8, 16384, 128, DTYPE, graph),
                             list(ATTN_PROVIDERS)))
    for hidden in (4096, 8192):
        plan.append(PlanItem(layer_norm, _rows(layer_norm, "fwd+bwd", 16384, hidden),
                             ROW_PROVIDERS + [LAST]))
    for mode in ("fwd", "bwd"):  # where the forward+backward's time goes, at the harder width
        plan.append(PlanItem(layer_norm, _rows(layer_norm, mode, 16384, 4096),
                             ["lk-triton", "lk-cuda", "torch"]))
    for mode in ("fwd", "fwd+bwd"):
        plan.append(PlanItem(feed_forward, feed_forward.ff_case(mode, 8192, 4096, 16384, DTYPE),
                             ["lk-triton", "lk-cuda", "torch", "lk-triton-tma"]))
    plan.append(PlanItem(cross_entropy, _rows(cross_entropy, "fwd+bwd", 8192, 131072),
                         ROW_PROVIDERS + ["lk-triton-inplace", LAST]))
    plan.append(PlanItem(gpt_train, gpt_train.train_case(gpt_train.GPT2_SMALL, 8, DTYPE,
                                                         "gpt2-small"), list(GPT_PROVIDERS)))
    plan.append(PlanItem(rms_norm, _rows(rms_norm, "fwd+bwd", 16384, 8192), list(ROW_PROVIDERS)))
    plan.append(PlanItem(softmax, _rows(softmax, "fwd+bwd", 16384, 8192),
                         ["lk-triton", "lk-cuda", "torch", "torch-native"]))
    plan.append(PlanItem(swiglu, swiglu.swiglu_case("fwd+bwd", 8192, 4096, 11008, DTYPE),
                         ["lk-triton", "lk-cuda", "torch"]))
    return deferred_last(plan, LAST)


def deferred_last(plan: list[PlanItem], provider: str) -> list[PlanItem]:
    """The plan with ``provider`` moved out of every item into items appended at the end."""
    first = [PlanItem(i.module, i.case, [p for p in i.providers if p != provider]) for i in plan]
    last = [PlanItem(i.module, i.case, [provider]) for i in plan if provider in i.providers]
    return first + last


def backward_twice_identical(backend: str, causal: bool, device: torch.device,
                             shape: dict = DETERMINISM_SHAPE) -> dict:
    """Run the attention backward twice on the same inputs and compare dq, dk, dv bit for bit."""
    import llm_kernels as lk
    q, k, v = (torch.randn(shape["B"], shape["H"], shape["L"], shape["D"], device=device,
                           dtype=DTYPE).requires_grad_() for _ in range(3))
    out = lk.attention(q, k, v, causal=causal, backend=backend)
    grad_out = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), grad_out)
    same = [torch.equal(a, b) for a, b in zip(first, second)]
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(first, second))
    return {"result": "identical" if all(same) else "different",
            "detail": f"dq/dk/dv equal: {same}, max abs diff {diff:.3g}"}


def determinism_checks(device: torch.device, checks: list[dict], echo=print,
                       shape: dict = DETERMINISM_SHAPE, backends=("triton", "cuda")) -> list[dict]:
    """The bit-for-bit check for each llm_kernels backend, causal and not, appended to
    ``checks`` (entries already there, from an earlier process of the run, are not redone);
    skips say why. Raises DeviceFault after recording a check that broke the device."""
    from llm_kernels.bench.runner import DeviceFault, classify
    shape_text = " ".join(f"{k}={v}" for k, v in shape.items())
    done = {(c["provider"], c["variant"]) for c in checks}
    for backend in backends:
        for causal in (False, True):
            entry = {"check": "determinism", "provider": f"lk-{backend}",
                     "variant": "causal" if causal else "non-causal", "shape": shape_text}
            if (entry["provider"], entry["variant"]) in done:
                continue
            kind = None
            if any(c["provider"] == entry["provider"] and c["result"] == "fault" for c in checks):
                entry.update(result="skipped", detail="[excluded] faulted the device earlier")
            else:
                try:
                    entry.update(backward_twice_identical(backend, causal, device, shape))
                except Exception as exc:  # reported, never fatal
                    kind, reason = classify(exc)
                    entry.update(result="fault" if kind == "fault" else "skipped",
                                 detail=f"[{kind}] {reason}")
            echo(f"  determinism lk-{backend} {entry['variant']}: {entry['result']} "
                 f"({entry['detail']})")
            checks.append(entry)
            if kind == "fault":
                raise DeviceFault(f"determinism lk-{backend}: {entry['detail']}")
            free_memory(device)
    return checks
