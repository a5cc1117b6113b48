"""Sylvester Hadamard matrix H_n, normalized at every recursion step (spec §2.4).

H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]] / sqrt(2): orthonormal, symmetric, entries
±1/sqrt(n), natural (Sylvester) order, not sequency order. n must be a power of two.
"""

from __future__ import annotations

import math

import torch

from oscar_kv.errors import OscarError


def is_power_of_two(n: int) -> bool:
    """True for 1, 2, 4, 8, ..."""
    return n >= 1 and (n & (n - 1)) == 0


def check_power_of_two(head_dim: int, what: str = "the Hadamard rotation") -> None:
    """Raise OscarError unless head_dim is a power of two."""
    if not is_power_of_two(head_dim):
        raise OscarError(f"head_dim {head_dim} is not a power of two; {what} needs a "
                         "power-of-two head_dim")


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """-> H_n [n, n] in `dtype` (built in fp64, then cast)."""
    check_power_of_two(n)
    h = torch.ones(1, 1, dtype=torch.float64)
    inv_sqrt2 = 1.0 / math.sqrt(2.0)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0) * inv_sqrt2
    return h.to(dtype)
