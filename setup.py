"""Build: pure Python always; ``llm_kernels._C`` from ``csrc/`` whenever torch allows.

- CUDA build of torch + nvcc: CUDA and C++ CPU kernels (``LLM_KERNELS_WITH_CUDA``).
- CPU build of torch (or no nvcc): the C++ CPU kernels only.
- No torch importable in the build environment, or ``LLM_KERNELS_SKIP_EXT=1``: pure Python.

Environment: ``LLM_KERNELS_CUDA_ARCHS`` (default: the visible GPU, else ``8.0;9.0+PTX``),
``MAX_JOBS`` (parallel compile jobs, read by torch's ninja build), ``LLM_KERNELS_SKIP_EXT=1``.
The build status is written to ``llm_kernels/_build_info.json`` for ``llm-kernels info``.
"""
import glob
import json
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(ROOT, "llm_kernels", "_build_info.json")


def _write_build_info(**info):
    with open(BUILD_INFO, "w") as f:
        json.dump(info, f, indent=1)


def _find_cuda_home():
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    for candidate in ("/usr/local/cuda", os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
                      if nvcc else None):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    return None


def _cuda_archs(torch):
    archs = os.environ.get("LLM_KERNELS_CUDA_ARCHS")
    if archs:
        return archs
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if major >= 8:
            return f"{major}.{minor}"
        print(f"llm_kernels: the visible GPU is sm_{major}{minor}; the CUDA kernels need sm_80 or "
              "newer, building for the default archs")
    return "8.0;9.0+PTX"  # the PTX JIT-compiles on newer GPUs


def _openmp_flags(torch):
    """-fopenmp when torch runs at::parallel_for on OpenMP: the loop is inlined from torch's
    headers into our CPU kernels and runs on one thread without the flag."""
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []


def _extensions():
    if os.environ.get("LLM_KERNELS_SKIP_EXT") == "1":
        _write_build_info(built=False, cuda=False, reason="skipped: LLM_KERNELS_SKIP_EXT=1")
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ.setdefault("CUDA_HOME", cuda_home)
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        reason = (f"torch not importable at build time ({exc}): install torch first and build "
                  "with `pip install --no-build-isolation -e .`")
        print("llm_kernels:", reason)
        _write_build_info(built=False, cuda=False, reason=reason)
        return [], {}
    with_cuda = torch.version.cuda is not None and cuda_home is not None
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cu_sources = sorted(glob.glob("csrc/*.cu")) if with_cuda else []
    # No -std flag: torch's BuildExtension adds the C++ standard its headers need (C++20 from
    # torch 2.10 on, C++17 before).
    cxx_flags = ["-O3"] + _openmp_flags(torch)
    link_flags = _openmp_flags(torch)
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr",
                  "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                  "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = _cuda_archs(torch)
        nv_include = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)),
                                  "nvidia", "cu13", "include")
        if os.path.isdir(nv_include):
            include_dirs.append(nv_include)
        ext = cpp_extension.CUDAExtension(
            "llm_kernels._C", cpp_sources + cu_sources, include_dirs=include_dirs,
            define_macros=[("LLM_KERNELS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=link_flags)
    else:
        ext = cpp_extension.CppExtension("llm_kernels._C", cpp_sources, include_dirs=include_dirs,
                                         extra_compile_args={"cxx": cxx_flags},
                                         extra_link_args=link_flags)
    _write_build_info(built=True, cuda=with_cuda, torch=torch.__version__,
                      cuda_archs=os.environ.get("TORCH_CUDA_ARCH_LIST", ""),
                      reason="" if with_cuda else "CPU kernels only: " + (
                          "torch is a CPU build" if torch.version.cuda is None else "nvcc not found"))
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=["llm_kernels", "llm_kernels.models", "llm_kernels.integrations",
              "llm_kernels.kernels", "llm_kernels.bench"],
    package_dir={"llm_kernels.kernels": "kernels", "llm_kernels.bench": "bench"},
    package_data={"llm_kernels": ["_build_info.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
