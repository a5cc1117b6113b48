"""Rotation estimators: the covariance C [D, D] (fp64, symmetric) each target is fitted to.

Inputs are one layer's streamed sums from `stats.pt` (design.md "Statistics"), per KV head h:
qq_h = sum over tokens and the g group query heads of q^T q, kk_h, vv_h (sums of k^T k,
v^T v), wvv_h = sum_t w_t v_t^T v_t with w_t = k_t C_h k_t^T, svv_h = sum_t s_t v_t^T v_t with
s_t the true causal softmax weight, w_sum/s_sum their [Hkv] totals, n = N tokens and
n_q = N * g query rows per group. With these (spec §2.3, Appendix B):

    ktk: C = sum_h kk_h / (N Hkv)             vtv: the same on vv
    qqt: C = mean_h qq_h / n_q                 (C_Q; the K-side target)
    sst: C = mean_h wvv_h / max(w_sum_h, 1e-12)   (= mean_h (1/N) sum_t w~_t v^T v with the
         weights normalized to mean one, w~ = w N / sum w: the reference's surrogate)
    svv: C = mean_h svv_h / max(s_sum_h, 1e-12)   (the paper's V^T S^T S V weighting)

`hadamard` and `identity` are data-free: they fix the rotation (H_D or I) and report all-one
eigenvalues. A method string names the K and V estimators: `qqt_sst` = K from qqt, V from sst;
a single estimator name (`qqt`, `sst`, ...) is used for both targets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from oscar_kv.errors import OscarError
from oscar_kv.fit.hadamard import hadamard_matrix
from oscar_kv.registry import Registry

NORM_FLOOR = 1e-12


@dataclass(frozen=True)
class Estimator:
    """A covariance estimator (`covariance`) or a data-free fixed rotation (`fixed_rotation`)."""

    name: str
    needs: tuple[str, ...] = ()
    covariance: Callable[[dict], torch.Tensor] | None = None
    fixed_rotation: Callable[[int], torch.Tensor] | None = None

    @property
    def data_free(self) -> bool:
        return self.fixed_rotation is not None


ESTIMATORS: Registry[Estimator] = Registry("rotation estimator")


def _f64(layer: dict, key: str) -> torch.Tensor:
    return torch.as_tensor(layer[key]).to(torch.float64)


def _count(layer: dict, key: str) -> int:
    return int(torch.as_tensor(layer[key]).item())


def symmetrize(c: torch.Tensor) -> torch.Tensor:
    """C [D, D] -> (C + C^T) / 2 in fp64."""
    c = c.to(torch.float64)
    return (c + c.T) / 2


def _pooled(layer: dict, key: str) -> torch.Tensor:
    s = _f64(layer, key)  # [Hkv, D, D]
    return s.sum(dim=0) / (_count(layer, "n") * s.shape[0])


def _weighted(layer: dict, key: str, total: str) -> torch.Tensor:
    s = _f64(layer, key)  # [Hkv, D, D]
    w = _f64(layer, total).clamp(min=NORM_FLOOR)  # [Hkv]
    return (s / w[:, None, None]).mean(dim=0)


ESTIMATORS.add("ktk", Estimator("ktk", ("kk", "n"), lambda s: _pooled(s, "kk")))
ESTIMATORS.add("vtv", Estimator("vtv", ("vv", "n"), lambda s: _pooled(s, "vv")))
ESTIMATORS.add("qqt", Estimator(
    "qqt", ("qq", "n_q"), lambda s: (_f64(s, "qq") / _count(s, "n_q")).mean(dim=0)))
ESTIMATORS.add("sst", Estimator(
    "sst", ("wvv", "w_sum", "n"), lambda s: _weighted(s, "wvv", "w_sum")))
ESTIMATORS.add("svv", Estimator(
    "svv", ("svv", "s_sum", "n"), lambda s: _weighted(s, "svv", "s_sum")))
ESTIMATORS.add("hadamard", Estimator("hadamard", fixed_rotation=hadamard_matrix))
ESTIMATORS.add("identity", Estimator(
    "identity", fixed_rotation=lambda d: torch.eye(d, dtype=torch.float64)))


def _uresidual(layer: dict) -> torch.Tensor:
    raise OscarError("the uresidual estimator is not implemented in oscar-kv (it needs raw "
                     "calibration tensors and reference rotations); use qqt_sst or qqt_svv")


ESTIMATORS.add("uresidual", Estimator("uresidual", covariance=_uresidual))


def parse_method(method: str) -> tuple[str, str]:
    """'qqt_sst' -> ('qqt', 'sst'); a single estimator name -> (name, name). Validates names."""
    if method in ESTIMATORS:
        parts = (method, method)
    else:
        parts = tuple(method.split("_"))
        if len(parts) != 2 or not all(p in ESTIMATORS for p in parts):
            raise OscarError(f"unknown rotation method {method!r}; use one estimator name or "
                             f"K_V (e.g. qqt_sst) built from: {', '.join(ESTIMATORS.names())}")
    for p in parts:
        ESTIMATORS.get(p)
    return parts[0], parts[1]


def check_layer_stats(layer_id: int, layer: dict, needs: tuple[str, ...]) -> None:
    """Raise OscarError if `layer` lacks a needed key, has no tokens, or holds NaN/Inf."""
    fix = "re-run `python -m oscar_kv calibrate ...` to rebuild the statistics"
    missing = [k for k in needs if k not in layer]
    if missing:
        raise OscarError(f"statistics for layer {layer_id} lack {', '.join(missing)}; {fix}")
    for key in ("n", "n_q"):
        if key in needs and _count(layer, key) <= 0:
            raise OscarError(f"statistics for layer {layer_id} hold zero tokens ({key}=0); "
                             f"calibrate on a non-empty token set ({fix})")
    for key in needs:
        if not torch.isfinite(torch.as_tensor(layer[key]).double()).all():
            raise OscarError(f"statistics {key!r} of layer {layer_id} contain NaN or Inf; "
                             f"{fix} (check the model runs in a stable dtype)")


def layer_covariance(layer_id: int, layer: dict, estimator: str) -> torch.Tensor:
    """One layer's stats -> symmetrized fp64 C [D, D], checked finite and PSD-ish."""
    est = ESTIMATORS.get(estimator)
    if est.covariance is None:
        raise OscarError(f"estimator {estimator!r} is data-free and has no covariance")
    check_layer_stats(layer_id, layer, est.needs)
    c = symmetrize(est.covariance(layer))
    evals = torch.linalg.eigvalsh(c)
    top = float(evals.abs().max())
    if not torch.isfinite(evals).all() or top <= 0.0:
        raise OscarError(f"the {estimator} covariance of layer {layer_id} is zero or not "
                         "finite; re-run calibration with real (non-degenerate) prompts")
    if float(evals.min()) < -1e-6 * top:
        raise OscarError(f"the {estimator} covariance of layer {layer_id} is not positive "
                         f"semidefinite (min eigenvalue {float(evals.min()):.3g}, max "
                         f"{top:.3g}); the statistics are corrupt, re-run calibration")
    return c
