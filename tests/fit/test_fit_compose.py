"""Compositions of U, H, P_br (spec §2.6): orthogonal and equal to the explicit products."""

from __future__ import annotations

import pytest
import torch

from oscar_kv.errors import OscarError
from oscar_kv.fit.bitrev import bitrev_permutation
from oscar_kv.fit.compose import COMPOSITIONS, fit_rotation, orthogonality_error
from oscar_kv.fit.hadamard import hadamard_matrix

D = 32


def _cov(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(500, D, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 4, D)
    c = x.T @ x / 500
    c[0, 1] += 1e-9  # slightly asymmetric: fit_rotation must symmetrize
    return c


def _explicit(name: str, c: torch.Tensor) -> torch.Tensor:
    lam, u = torch.linalg.eigh((c + c.T) / 2)
    h, p = hadamard_matrix(D), bitrev_permutation(lam)
    return {"plain": u, "pbr": p, "br": u @ p, "br_h128": u @ p @ h, "r_h": u @ h,
            "h_pbr": h @ p, "h_r_pbr": h @ u @ p, "h_pbr_r": h @ p @ u,
            "r_h_pbr": u @ h @ p}[name]


def test_all_reference_compositions_registered():
    assert set(COMPOSITIONS.names()) == {"plain", "pbr", "br", "br_h128", "r_h", "h_pbr",
                                         "h_r_pbr", "h_pbr_r", "r_h_pbr"}


@pytest.mark.parametrize("name", ["plain", "pbr", "br", "br_h128", "r_h", "h_pbr", "h_r_pbr",
                                  "h_pbr_r", "r_h_pbr"])
def test_composition_matches_explicit_product(name):
    c = _cov()
    r, lam = fit_rotation(c, name)
    assert r.dtype == torch.float32 and r.is_contiguous() and r.shape == (D, D)
    want = _explicit(name, c)
    # fp32 storage of an fp64 product: entries are O(1), so 2 ulp of fp32 at 1.
    assert (r.double() - want).abs().max() <= 2.5e-7
    assert orthogonality_error(r) < 1e-5
    assert lam.dtype == torch.float32
    assert torch.equal(lam, torch.linalg.eigvalsh((c + c.T) / 2).float())  # raw ascending


def test_rotation_is_invertible_by_transpose():
    r, _ = fit_rotation(_cov(1), "r_h_pbr")
    x = torch.randn(7, D)
    assert torch.allclose(x @ r @ r.T, x, atol=1e-5)


def test_plain_rotation_diagonalizes_covariance():
    c = _cov(2)
    r, lam = fit_rotation(c, "plain")
    rot = r.double().T @ c @ r.double()
    assert torch.allclose(rot, torch.diag(lam.double()), atol=1e-4 * float(lam.max()))


def test_plain_works_without_power_of_two():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(100, 12, generator=gen, dtype=torch.float64)
    r, _ = fit_rotation(x.T @ x, "plain")
    assert orthogonality_error(r) < 1e-5
    with pytest.raises(OscarError, match="head_dim 12 is not a power of two"):
        fit_rotation(x.T @ x, "r_h_pbr")


def test_unknown_composition_and_nan():
    with pytest.raises(OscarError, match="r_h_pbr"):
        fit_rotation(_cov(), "nope")
    c = _cov()
    c[3, 3] = float("inf")
    with pytest.raises(OscarError, match="NaN or Inf"):
        fit_rotation(c, "r_h_pbr")
