"""Compose a layer's rotation R from the eigenbasis U, Hadamard H and bit-reversal P (§2.6).

U holds the eigenvectors of the symmetrized fp64 covariance as columns (torch.linalg.eigh,
eigenvalues ascending); H = H_D; P = P_br(lambda). Factors are in matrix-multiplication order
and applied to row vectors, x_rot = x @ R (inverse y @ R.T):

    plain U     pbr P       br U P      br_h128 U P H    r_h U H
    h_pbr H P   h_r_pbr H U P   h_pbr_r H P U   r_h_pbr U H P (default)

Everything is computed in fp64; R is stored fp32 and must pass max|R R^T - I| <= 1e-3.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from oscar_kv.errors import OscarError
from oscar_kv.fit.bitrev import bitrev_permutation
from oscar_kv.fit.estimators import symmetrize
from oscar_kv.fit.hadamard import hadamard_matrix
from oscar_kv.registry import Registry

ORTHO_TOL = 1e-3

# Each composition maps (U, H, P) thunks to R; thunks let `plain` skip H/P on odd head_dims.
Factors = Callable[[], torch.Tensor]
COMPOSITIONS: Registry[Callable[[Factors, Factors, Factors], torch.Tensor]] = Registry(
    "rotation composition")
COMPOSITIONS.add("plain", lambda u, h, p: u())
COMPOSITIONS.add("pbr", lambda u, h, p: p())
COMPOSITIONS.add("br", lambda u, h, p: u() @ p())
COMPOSITIONS.add("br_h128", lambda u, h, p: u() @ p() @ h())
COMPOSITIONS.add("r_h", lambda u, h, p: u() @ h())
COMPOSITIONS.add("h_pbr", lambda u, h, p: h() @ p())
COMPOSITIONS.add("h_r_pbr", lambda u, h, p: h() @ u() @ p())
COMPOSITIONS.add("h_pbr_r", lambda u, h, p: h() @ p() @ u())
COMPOSITIONS.add("r_h_pbr", lambda u, h, p: u() @ h() @ p())

DEFAULT_COMPOSITION = "r_h_pbr"


def orthogonality_error(r: torch.Tensor) -> float:
    """max |R R^T - I| computed in fp64 for R [D, D]."""
    r = r.to(torch.float64)
    return float((r @ r.T - torch.eye(r.shape[0], dtype=torch.float64)).abs().max())


def compose_rotation(u: torch.Tensor, eigenvalues: torch.Tensor, composition: str
                     ) -> torch.Tensor:
    """U [D, D] fp64 (eigenvectors as columns), eigenvalues [D] ascending -> R [D, D] fp64."""
    fn = COMPOSITIONS.get(composition)
    d = u.shape[0]
    u64 = u.to(torch.float64)
    return fn(lambda: u64, lambda: hadamard_matrix(d), lambda: bitrev_permutation(eigenvalues))


def fit_rotation(cov: torch.Tensor, composition: str = DEFAULT_COMPOSITION
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cov [D, D] -> (R fp32 contiguous [D, D], eigenvalues fp32 [D] raw ascending).

    Raises OscarError if the covariance is not finite or R is not orthogonal."""
    c = symmetrize(cov)
    if not torch.isfinite(c).all():
        raise OscarError("the covariance holds NaN or Inf; re-run calibration")
    evals, u = torch.linalg.eigh(c)
    r = compose_rotation(u, evals, composition)
    r32 = r.to(torch.float32).contiguous()
    err = orthogonality_error(r32)
    if err > ORTHO_TOL:
        raise OscarError(f"the {composition} rotation is not orthogonal (max|RR^T-I| = "
                         f"{err:.3g}); the covariance is ill-conditioned, re-run calibration")
    return r32, evals.to(torch.float32)


def fixed_rotation(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-free rotation [D, D] -> (R fp32 contiguous, all-one eigenvalues fp32 [D])."""
    d = matrix.shape[0]
    return matrix.to(torch.float32).contiguous(), torch.ones(d, dtype=torch.float32)
