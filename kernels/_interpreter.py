"""Triton 3.6's interpreter with numpy >= 2.4: a loop bound computed at run time fails.

The interpreter holds every scalar (a kernel's int argument, ``tl.program_id``) as a
one-element array, and triton 3.6 turns such a tensor into a Python int with
``int(array)``, which numpy 2.4 made an error ("only 0-dimensional arrays can be converted
to Python scalars"). So ``range(0, C, BLOCK)`` or ``tl.range(start, end)`` over such values
raises inside every kernel. Triton 3.7 squeezes the array first; ``fix_index_conversion``
gives triton 3.6's interpreter that same conversion. Compiled kernels (a GPU) never run
this code.
"""
from __future__ import annotations

import functools


def _squeezed_index(self) -> int:
    return int(self.handle.data.squeeze())


@functools.lru_cache(maxsize=None)
def fix_index_conversion() -> bool:
    """Make the interpreter's tensor-to-int conversion squeeze its one-element array first,
    as triton >= 3.7 does; True when the running triton needed it. Idempotent; changes
    nothing on a triton whose interpreter already does this."""
    import inspect

    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or "squeeze()" in inspect.getsource(patch_tensor):
        return False

    @functools.wraps(patch_tensor)
    def patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", _squeezed_index)

    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
