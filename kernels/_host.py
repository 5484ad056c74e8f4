"""Host code shared by the launchers: integer arithmetic (grids, block sizes, split plans), the
replay of autotuned configs and the scratch memory of device-side TMA descriptors.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions: each call goes through
their wrapper (about 2 us), and a launch takes several of them. These are the same values by
plain integer arithmetic.
"""
import contextlib

import torch
from triton.runtime import _allocation


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for b > 0 (``triton.cdiv``)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n for n >= 1; n itself for n <= 1
    (``triton.next_power_of_2``)."""
    return n if n <= 1 else 1 << (n - 1).bit_length()


# (autotuner, key) -> (its cache and configs then, the chosen config's launch kwargs, its pre-hook)
_CHOSEN: dict = {}


def launch_tuned(tuner, grid, args: tuple, constexprs: dict, key: tuple) -> None:
    """``tuner[grid](*args, **constexprs)`` for a ``triton.autotune``'d kernel, replaying the
    config the tuner chose for ``key`` without its ``run`` (which rebuilds its tuning key from
    every argument: ~25 us a launch). ``key`` must determine the tuner's own key (its key
    arguments and the dtype of every tensor argument). A new key, or a tuner whose cache or
    configs have been replaced since it chose, goes through the tuner: pruning, benchmarking
    and its cache as before."""
    chosen = _CHOSEN.get((tuner, key))
    if chosen is None or chosen[0] is not tuner.cache or chosen[1] is not tuner.configs:
        tuner[grid](*args, **constexprs)
        config = tuner.best_config
        _CHOSEN[(tuner, key)] = (tuner.cache, tuner.configs, config.all_kwargs(), config.pre_hook)
        return
    meta, pre_hook = chosen[2:]
    if pre_hook is not None:
        pre_hook({**dict(zip(tuner.arg_names, args)), **constexprs, **meta})
    tuner.fn[grid](*args, **constexprs, **meta)


def dtypes(args: tuple) -> tuple:
    """The dtypes of the tensors among ``args``, in order: the part of a triton autotuner's key
    that comes from the arguments' dtypes."""
    return tuple(a.dtype for a in args if isinstance(a, torch.Tensor))


@contextlib.contextmanager
def descriptor_scratch(device: torch.device):
    """Device-side TMA descriptors live in global scratch memory that triton asks its allocator
    for at launch: torch's (stream-ordered) for the launches in this block, unless the caller
    has set one (triton.set_allocator). Nothing to allocate under the interpreter."""
    current = _allocation._allocator.get()
    if device.type != "cuda" or not isinstance(current, _allocation.NullAllocator):
        yield
        return
    token = _allocation._allocator.set(
        lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device))
    try:
        yield
    finally:
        _allocation._allocator.reset(token)
