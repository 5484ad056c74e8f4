"""Fail when ptxas reports register spills in the sm_90 fast-path CUDA kernels.

Compiles each checked ``csrc/*.cu`` file for sm_90 with ``nvcc --cubin -Xptxas -v`` (device code
only, into a temporary directory, with torch's include flags and the build's defines), parses the
per-kernel registers / spill stores / spill loads / shared memory that ptxas prints, and fails on
any non-zero spill in a kernel whose name matches the file's fast-path patterns.

    python scripts/check_spills.py                 # the default files, exit 1 on a spill
    python scripts/check_spills.py csrc/softmax.cu --all-kernels
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = "sm_90"
# File -> regexes over kernel names (mangled names contain the identifiers verbatim); a kernel
# matching one of them is a fast path and must not spill.
FAST_PATHS = {
    "csrc/layer_norm.cu": [r"layer_norm_forward_kernel", r"layer_norm_backward_fused_kernel"],
    **{f"csrc/attention_{unit}.cu": [r"."]
       for unit in ("fwd_f16", "fwd_bf16", "fwd_f32", "bwd_f16", "bwd_bf16", "bwd_f32")},
}
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-DLLM_KERNELS_WITH_CUDA=1",
              "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


@dataclass
class KernelInfo:
    name: str
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    smem: int = 0

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME, /usr/local/cuda or PATH."""
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def std_flag() -> str:
    """The C++ standard torch's headers need (torch's BuildExtension picks the same)."""
    import torch
    aten = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "ATen.h")
    with open(aten) as f:
        return "-std=c++20" if "C++20 or later" in f.read() else "-std=c++17"


def include_flags() -> list[str]:
    """-I flags for csrc/, torch, the nvidia wheel headers and Python (as setup.py uses)."""
    import torch
    from torch.utils import cpp_extension
    try:
        paths = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # torch < 2.6
        paths = cpp_extension.include_paths(cuda=True)
    nv = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "cu13", "include")
    paths = [os.path.join(ROOT, "csrc")] + list(paths) + [sysconfig.get_paths()["include"]]
    if os.path.isdir(nv):
        paths.append(nv)
    return ["-I" + p for p in paths]


def parse_ptxas(text: str, arch: str = ARCH) -> list[KernelInfo]:
    """Per-kernel resource usage from ``ptxas -v`` output."""
    kernels: list[KernelInfo] = []
    current = None
    for line in text.splitlines():
        entry = _ENTRY.search(line)
        if entry:
            current = KernelInfo(entry.group(1)) if entry.group(2) == arch else None
            if current is not None:
                kernels.append(current)
            continue
        if current is None:
            continue
        spill = _SPILL.search(line)
        if spill:
            current.stack, current.spill_stores, current.spill_loads = map(int, spill.groups())
        used = _USED.search(line)
        if used:
            current.registers = int(used.group(1))
            current.smem = int(used.group(2) or 0)
    return kernels


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    lines = out.stdout.splitlines()
    return lines if out.returncode == 0 and len(lines) == len(names) else names


def compile_file(nvcc: str, path: str, flags: list[str], tmp: str) -> list[KernelInfo]:
    """ptxas resource usage of every sm_90 kernel in one .cu file."""
    out = os.path.join(tmp, os.path.basename(path) + ".cubin")
    cmd = [nvcc, "--cubin", f"-arch={ARCH}", "-Xptxas", "-v", *NVCC_FLAGS, *flags, path, "-o", out]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"nvcc failed on {path}:\n{result.stderr[-4000:]}")
    kernels = parse_ptxas(result.stdout + result.stderr)
    for kernel, pretty in zip(kernels, demangle([k.name for k in kernels])):
        kernel.name = pretty
    return kernels


def check(files: dict[str, list[str]]) -> tuple[list[str], str]:
    """(failures, report) for the given files -> fast-path patterns."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME)")
    flags = [std_flag()] + include_flags()
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda f: compile_file(nvcc, f, flags, tmp), files))
    failures, lines = [], []
    for (path, patterns), kernels in zip(files.items(), results):
        lines.append(f"{path}: {len(kernels)} kernels for {ARCH}")
        for k in sorted(kernels, key=lambda k: k.name):
            fast = any(re.search(p, k.name) for p in patterns)
            lines.append(f"  {'FAST' if fast else '    '} regs={k.registers:3d} "
                         f"spill_st={k.spill_stores:4d} spill_ld={k.spill_loads:4d} "
                         f"stack={k.stack:4d} smem={k.smem:6d}  {k.name[:150]}")
            if fast and k.spills:
                failures.append(f"{path}: {k.name}: {k.spill_stores} bytes spill stores, "
                                f"{k.spill_loads} bytes spill loads")
    return failures, "\n".join(lines)


def default_files() -> dict[str, list[str]]:
    """The FAST_PATHS files that exist in this checkout."""
    return {f: p for f, p in FAST_PATHS.items() if os.path.exists(os.path.join(ROOT, f))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="csrc .cu files (default: the fast-path files)")
    parser.add_argument("--all-kernels", action="store_true",
                        help="treat every kernel of the files as a fast path")
    args = parser.parse_args(argv)
    files = {f: FAST_PATHS.get(f, [r"."]) for f in args.files} if args.files else default_files()
    if args.all_kernels:
        files = {f: [r"."] for f in files}
    failures, report = check(files)
    print(report)
    if failures:
        print("register spills in fast-path kernels:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("no spills in the fast-path kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
