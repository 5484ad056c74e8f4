"""kernels/_interpreter.py: triton 3.6's interpreter turns its one-element scalar arrays into
ints with int(array), which numpy >= 2.4 refuses; the fix squeezes first (as triton 3.7 does)."""
import numpy as np
import pytest
from triton.runtime import interpreter

from llm_kernels.kernels import _interpreter


class _Scope:
    """The interpreter's patch scope: records what was set."""

    def __init__(self):
        self.set = {}

    def set_attr(self, obj, name, value):
        self.set[name] = value


class _Tensor:
    def __init__(self, data):
        self.handle = type("Handle", (), {"data": data})()


def _triton_36_patch(tensor, scope):
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))


@pytest.fixture
def fresh_fix(monkeypatch):
    _interpreter.fix_index_conversion.cache_clear()
    yield
    _interpreter.fix_index_conversion.cache_clear()


def test_triton_36_conversion_fails_on_numpy_and_the_fix_squeezes(monkeypatch, fresh_fix):
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", _triton_36_patch)
    scalar = _Tensor(np.array([7], dtype=np.int32))  # how the interpreter holds a scalar
    scope = _Scope()
    _triton_36_patch(_Tensor, scope)
    if tuple(int(p) for p in np.__version__.split(".")[:2]) >= (2, 4):
        with pytest.raises(TypeError):
            scope.set["__index__"](scalar)
    assert _interpreter.fix_index_conversion() is True
    scope = _Scope()
    interpreter._patch_lang_tensor(_Tensor, scope)
    assert scope.set["__index__"](scalar) == 7


def test_a_triton_that_squeezes_is_left_alone(monkeypatch, fresh_fix):
    def squeezing(tensor, scope):
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", squeezing)
    assert _interpreter.fix_index_conversion() is False
    assert interpreter._patch_lang_tensor is squeezing
