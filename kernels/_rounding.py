"""float32 -> output dtype conversion that is also exact under the Triton interpreter.

The interpreter (TRITON_INTERPRET=1, triton 3.6-3.8) converts float32 to bfloat16 by truncating
the mantissa; GPUs round to nearest even. ``to_dtype`` rounds to nearest even by hand first
when ``INTERPRET`` (a constexpr set by the launcher), so CPU tests see the GPU's rounding; on a
GPU it is a plain cast.
"""
import triton
import triton.language as tl


@triton.jit
def to_dtype(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x (float32) in ``dtype``, rounded to nearest even."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
