"""The C++ CPU row loops compile to vector code in the AVX2 and AVX-512 clones (cpu_vec.cpp).

A NaN-propagating rewrite of ``max_of`` once made GCC scalarize its loop (a 16-lane select on a
mask or'ed with a NaN test): softmax and cross-entropy forwards ran 4-6x slower on CPU and no
test noticed; a lambda in the feed-forward epilogue loops once left them in baseline scalar
code (2x slower blocks). This reads the built extension's machine code (binutils' objdump,
which the build's toolchain brings).
"""
import re
import shutil
import subprocess

from llm_kernels.backends import load_extension

# function -> packed instructions its loop must use in every vector clone
PACKED = {"max_of": ("vmaxps",), "exp_shift_sum": ("vaddps", "vmulps"),
          "normalize_affine": ("vmulps",), "norm_backward_row": ("vmulps",),
          "activation_rows": ("vmulps", "vdivps"), "activation_grad_rows": ("vmulps",),
          "swiglu_rows": ("vmulps", "vdivps"), "swiglu_grad_rows": ("vmulps",)}


def clone_bodies(path: str) -> dict[tuple[str, str], str]:
    """(function, clone) -> disassembly, for the avx2/avx512f clones of lk:: functions."""
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", path], check=True,
                          capture_output=True, text=True).stdout
    bodies = {}
    for block in text.split("\n\n"):
        m = re.match(r"[0-9a-f]+ <lk::(\w+)\(.*\[clone \.(avx2|avx512f)\]>:", block.strip())
        if m:
            bodies[(m.group(1), m.group(2))] = block
    return bodies


def test_row_loops_are_vectorized_in_every_clone():
    module = load_extension()
    assert module is not None, "llm_kernels._C is not built"
    assert shutil.which("objdump"), "objdump (binutils) is needed to read the extension"
    bodies = clone_bodies(module.__file__)
    for function, instructions in PACKED.items():
        for clone in ("avx2", "avx512f"):
            body = bodies.get((function, clone))
            assert body is not None, f"no {clone} clone of lk::{function}"
            for instruction in instructions:
                assert re.search(rf"\t{instruction}\s+%[yz]mm", body), (
                    f"lk::{function} [{clone}] has no {instruction} on ymm/zmm registers: its loop "
                    "was not vectorized")
