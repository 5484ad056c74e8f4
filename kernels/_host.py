"""Integer arithmetic for the launchers' host code (grids, block sizes, split plans).

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions: each call goes through
their wrapper (about 2 us), and a launch takes several of them. These are the same values by
plain integer arithmetic.
"""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for b > 0 (``triton.cdiv``)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n for n >= 1; n itself for n <= 1
    (``triton.next_power_of_2``)."""
    return n if n <= 1 else 1 << (n - 1).bit_length()
