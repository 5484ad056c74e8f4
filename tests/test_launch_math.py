"""The launchers' host-side integer helpers give exactly triton's values."""
import random

import triton

from llm_kernels.kernels import _host


def test_cdiv_matches_triton():
    cases = [(a, b) for a in range(-70, 300) for b in (1, 2, 3, 16, 17, 64, 128)]
    cases += [(random.randint(0, 2**40), random.randint(1, 2**20)) for _ in range(1000)]
    for a, b in cases:
        assert _host.cdiv(a, b) == triton.cdiv(a, b), (a, b)


def test_next_power_of_2_matches_triton():
    values = list(range(0, 5000)) + [2**k + d for k in range(13, 40) for d in (-1, 0, 1)]
    values += [random.randint(1, 2**40) for _ in range(1000)]
    for n in values:
        assert _host.next_power_of_2(n) == triton.next_power_of_2(n), n
