"""Bit-reversal permutation ordered by eigenvalue, P_br (spec §2.5).

br[i] = i with its log2(D) bits reversed (D = 128: 0, 64, 32, 96, 16, 80, ...). With
sorted_idx = argsort(lambda, descending) and perm[br[i]] = sorted_idx[i], P = I[:, perm]:
right-multiplying by P moves input column perm[c] to output column c, so the i-th largest
eigenvalue direction lands at column br[i]. Consecutive ranks thus go to maximally separated
positions, spreading high-variance directions across quant groups when group_size < D.
"""

from __future__ import annotations

import torch

from oscar_kv.fit.hadamard import check_power_of_two


def bit_reversal_indices(d: int) -> torch.Tensor:
    """-> br int64 [d]: br[i] = i with its log2(d) bits reversed (d a power of two)."""
    check_power_of_two(d, "the bit-reversal permutation")
    bits = d.bit_length() - 1
    out = [int(format(i, f"0{bits}b")[::-1], 2) if bits else 0 for i in range(d)]
    return torch.tensor(out, dtype=torch.long)


def bitrev_perm(eigenvalues: torch.Tensor) -> torch.Tensor:
    """eigenvalues [D] -> perm int64 [D] with perm[br[i]] = argsort(eigenvalues, desc)[i].

    The sort is stable, so tied eigenvalues (e.g. all ones) keep their index order."""
    d = eigenvalues.shape[0]
    br = bit_reversal_indices(d)
    sorted_idx = torch.sort(eigenvalues.detach().cpu().double(), descending=True, stable=True)[1]
    perm = torch.empty(d, dtype=torch.long)
    perm[br] = sorted_idx
    return perm


def bitrev_permutation(eigenvalues: torch.Tensor, dtype: torch.dtype = torch.float64
                       ) -> torch.Tensor:
    """eigenvalues [D] -> P_br [D, D] = I[:, perm] (column c of P is e_{perm[c]})."""
    d = eigenvalues.shape[0]
    return torch.eye(d, dtype=dtype)[:, bitrev_perm(eigenvalues)]
