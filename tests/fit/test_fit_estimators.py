"""Each estimator equals its formula (spec §2.3 / Appendix B) computed on raw tensors."""

from __future__ import annotations

import pytest
import torch
from fit_synth import causal_probs, raw_qkv, stats_from_raw

from oscar_kv.errors import OscarError
from oscar_kv.fit.estimators import ESTIMATORS, layer_covariance, parse_method

S, T, HQ, HKV, D = 2, 10, 4, 2, 8
G = HQ // HKV
N = S * T


@pytest.fixture(scope="module")
def raw():
    q, k, v = raw_qkv(S, T, HQ, HKV, D, seed=3)
    return q, k, v, stats_from_raw(q, k, v)


def _group_q(q, h):
    return q[:, :, h * G:(h + 1) * G].reshape(-1, D)  # [N g, D]


def _close(a, b):
    assert a.dtype == torch.float64
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (a - b).abs().max()
    assert torch.equal(a, a.T)


def test_ktk_vtv(raw):
    q, k, v, st = raw
    kf, vf = k.reshape(-1, D), v.reshape(-1, D)
    _close(layer_covariance(0, st, "ktk"), kf.T @ kf / (N * HKV))
    _close(layer_covariance(0, st, "vtv"), vf.T @ vf / (N * HKV))


def test_qqt(raw):
    q, k, v, st = raw
    want = sum(_group_q(q, h).T @ _group_q(q, h) / (N * G) for h in range(HKV)) / HKV
    _close(layer_covariance(0, st, "qqt"), want)


def _weighted_v(v, h, w):
    w = w * N / w.sum()  # normalized to mean one
    vh = v[:, :, h].reshape(-1, D)
    return (vh * w[:, None]).T @ vh / N


def test_sst_reference_surrogate(raw):
    q, k, v, st = raw
    want = 0
    for h in range(HKV):
        qh = _group_q(q, h)
        c_h = qh.T @ qh / (N * G)
        kh = k[:, :, h].reshape(-1, D)
        w = torch.einsum("nd,de,ne->n", kh, c_h, kh)  # E_q[(q . k_t)^2]
        want = want + _weighted_v(v, h, w) / HKV
    _close(layer_covariance(0, st, "sst"), want)


def test_svv_true_causal_softmax(raw):
    q, k, v, st = raw
    want = 0
    for h in range(HKV):
        w = torch.cat([
            torch.stack([causal_probs(q[s, :, j], k[s, :, h]) for j in range(h * G, (h + 1) * G)])
            .square().sum(dim=1).mean(dim=0) for s in range(S)])  # [N]: mean_j sum_i S_ij^2
        want = want + _weighted_v(v, h, w) / HKV
    _close(layer_covariance(0, st, "svv"), want)


def test_sst_and_svv_differ(raw):
    st = raw[3]
    assert not torch.allclose(layer_covariance(0, st, "sst"), layer_covariance(0, st, "svv"))


@pytest.mark.parametrize("method,want", [
    ("qqt_sst", ("qqt", "sst")), ("qqt_svv", ("qqt", "svv")), ("ktk_vtv", ("ktk", "vtv")),
    ("qqt", ("qqt", "qqt")), ("sst", ("sst", "sst")), ("ktk", ("ktk", "ktk")),
    ("vtv", ("vtv", "vtv")), ("hadamard", ("hadamard", "hadamard")),
    ("identity", ("identity", "identity"))])
def test_parse_method(method, want):
    assert parse_method(method) == want


@pytest.mark.parametrize("method", ["qqt_foo", "bogus", "qqt_sst_ktk", ""])
def test_unknown_method_lists_valid(method):
    with pytest.raises(OscarError, match="qqt_sst"):
        parse_method(method)


def test_data_free_estimators():
    assert ESTIMATORS.get("hadamard").data_free and ESTIMATORS.get("identity").data_free
    assert torch.equal(ESTIMATORS.get("identity").fixed_rotation(4), torch.eye(4).double())
    with pytest.raises(OscarError, match="data-free"):
        layer_covariance(0, {}, "hadamard")


def test_uresidual_not_implemented(raw):
    with pytest.raises(OscarError, match="not implemented"):
        layer_covariance(0, raw[3], "uresidual")


def test_nan_stats_raise(raw):
    st = dict(raw[3])
    st["qq"] = st["qq"].clone()
    st["qq"][0, 1, 2] = float("nan")
    with pytest.raises(OscarError, match="layer 5 contain NaN or Inf; re-run"):
        layer_covariance(5, st, "qqt")


def test_zero_tokens_raise(raw):
    st = dict(raw[3], n=0)
    with pytest.raises(OscarError, match="zero tokens"):
        layer_covariance(0, st, "ktk")


def test_missing_key_raises(raw):
    st = {k: v for k, v in raw[3].items() if k != "wvv"}
    with pytest.raises(OscarError, match="lack wvv"):
        layer_covariance(0, st, "sst")
    layer_covariance(0, st, "qqt")  # other estimators do not need it


def test_zero_and_indefinite_covariance_raise(raw):
    st = raw[3]
    with pytest.raises(OscarError, match="zero or not finite"):
        layer_covariance(0, dict(st, kk=torch.zeros_like(st["kk"])), "ktk")
    with pytest.raises(OscarError, match="not positive semidefinite"):
        layer_covariance(0, dict(st, kk=-st["kk"]), "ktk")
