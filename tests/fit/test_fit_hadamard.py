"""Hadamard H_n and the eigenvalue-ordered bit-reversal permutation P_br (spec §2.4-2.5)."""

from __future__ import annotations

import math

import pytest
import torch

from oscar_kv.errors import OscarError
from oscar_kv.fit.bitrev import bit_reversal_indices, bitrev_perm, bitrev_permutation
from oscar_kv.fit.hadamard import hadamard_matrix, is_power_of_two


def test_h2_values():
    s = 1 / math.sqrt(2)
    assert torch.equal(hadamard_matrix(2), torch.tensor([[s, s], [s, -s]], dtype=torch.float64))


def test_h4_natural_sylvester_order():
    sign = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])
    assert torch.allclose(hadamard_matrix(4), sign.double() / 2, atol=0, rtol=1e-15)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 64, 128, 256])
def test_hadamard_orthonormal_symmetric(n):
    h = hadamard_matrix(n)
    assert torch.equal(h, h.T)
    assert (h @ h.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-13
    assert torch.allclose(h.abs(), torch.full((n, n), n**-0.5, dtype=torch.float64), rtol=1e-14)


def test_hadamard_dtype():
    assert hadamard_matrix(8, torch.float32).dtype == torch.float32


@pytest.mark.parametrize("n", [0, 3, 96, 192])
def test_non_power_of_two_raises(n):
    assert not is_power_of_two(n)
    with pytest.raises(OscarError, match=rf"head_dim {n} is not a power of two; the Hadamard "
                                         r"rotation needs a power-of-two head_dim"):
        hadamard_matrix(n)


def test_bit_reversal_d8():
    assert bit_reversal_indices(8).tolist() == [0, 4, 2, 6, 1, 5, 3, 7]


def test_bit_reversal_d128():
    br = bit_reversal_indices(128)
    assert br[:6].tolist() == [0, 64, 32, 96, 16, 80]
    assert sorted(br.tolist()) == list(range(128))
    assert torch.equal(br[br], torch.arange(128))  # an involution
    assert br[127] == 127 and br[1] == 64


def test_bit_reversal_non_power_of_two():
    with pytest.raises(OscarError, match="power of two"):
        bit_reversal_indices(96)


@pytest.mark.parametrize("d", [8, 128])
def test_pbr_places_ith_largest_at_br_i(d):
    gen = torch.Generator().manual_seed(d)
    lam = torch.randn(d, generator=gen, dtype=torch.float64)  # unsorted on purpose
    u = torch.randn(d, d, generator=gen, dtype=torch.float64)
    p = bitrev_permutation(lam)
    br = bit_reversal_indices(d)
    order = torch.argsort(lam, descending=True)
    moved = u @ p
    for i in range(d):
        assert torch.equal(moved[:, br[i]], u[:, order[i]])
    assert torch.equal(p.T @ p, torch.eye(d, dtype=torch.float64))
    assert torch.equal(p, torch.eye(d, dtype=torch.float64)[:, bitrev_perm(lam)])


def test_pbr_with_ascending_eigh_output():
    lam = torch.arange(8, dtype=torch.float64)  # ascending, as eigh returns
    perm = bitrev_perm(lam)
    # rank i (largest first) is eigen-index 7 - i and must land at column br[i].
    br = bit_reversal_indices(8)
    assert all(perm[br[i]] == 7 - i for i in range(8))
