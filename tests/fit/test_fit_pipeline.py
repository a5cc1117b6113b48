"""End to end: synthetic stats.pt/holdout.pt -> fit_rotations -> files that load_rotation_set
accepts, with the rotations the estimators and compositions define."""

from __future__ import annotations

import json

import pytest
import torch
from fit_synth import write_stats_dir

from oscar_kv.config import ModelGeometry, QuantSpec, WindowSpec
from oscar_kv.errors import OscarError
from oscar_kv.fit.checkpoint import load_rotation_set
from oscar_kv.fit.compose import fit_rotation
from oscar_kv.fit.estimators import layer_covariance
from oscar_kv.fit.hadamard import hadamard_matrix
from oscar_kv.fit.pipeline import fit_rotations, load_stats

QUANT = QuantSpec(group_size=16)
WIN = WindowSpec(sink_tokens=4, recent_tokens=8, flush_block=4)


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("stats")
    write_stats_dir(d)
    return d


def test_fit_default_method_with_clip_search(stats_dir, tmp_path):
    logs = []
    out = tmp_path / "rot"
    summary = fit_rotations(stats_dir, out, quant=QUANT, window=WIN, device="cpu",
                            clip_grid=[0.85, 0.9, 0.95, 1.0], log=logs.append)
    assert sorted(p.name for p in out.iterdir()) == [
        "fit_report.json", "k_rotation_qqt_r_h_pbr.pt", "v_rotation_sst_r_h_pbr.pt"]
    _, geom, layers = load_stats(stats_dir)
    rs = load_rotation_set(out, expect=geom)
    for lid in range(2):
        rk, _ = fit_rotation(layer_covariance(lid, layers[lid], "qqt"), "r_h_pbr")
        rv, _ = fit_rotation(layer_covariance(lid, layers[lid], "sst"), "r_h_pbr")
        assert torch.equal(rs.k[lid], rk) and torch.equal(rs.v[lid], rv)
    report = json.loads((out / "fit_report.json").read_text())
    assert report["clip_source"] == "fitted" and report["clip_k"] == rs.clip_k
    assert rs.clip_v == [lc["v_ratio"] for lc in report["clip_search"]["layers"]]
    assert all(r in (0.85, 0.9, 0.95, 1.0) for r in rs.clip_k + rs.clip_v)
    assert max(max(e) for e in report["orthogonality_error"].values()) < 1e-5
    assert summary["files"]["k"].endswith("k_rotation_qqt_r_h_pbr.pt")
    meta = rs.meta["k_meta"]
    assert meta["estimator"] == "qqt" and meta["window"]["sink_tokens"] == 4
    assert meta["quant"]["group_size"] == 16 and meta["calibration"]["num_tokens"] == 32
    assert any("clip search" in line for line in logs)
    # the model check uses the recorded geometry
    with pytest.raises(OscarError, match="num_kv_heads=2 but this model has num_kv_heads=1"):
        load_rotation_set(out, expect=ModelGeometry(2, 4, 1, 16))


def test_fixed_and_off_clips(stats_dir, tmp_path):
    fit_rotations(stats_dir, tmp_path / "a", method="ktk_vtv", composition="plain",
                  fixed_clip=(0.96, 0.92), quant=QUANT)
    rs = load_rotation_set(tmp_path / "a")
    assert rs.clip_k == [0.96, 0.96] and rs.clip_v == [0.92, 0.92]
    assert (tmp_path / "a" / "k_rotation_ktk_plain.pt").exists()
    fit_rotations(stats_dir, tmp_path / "b", method="qqt_svv", fit_clip=False)
    rs = load_rotation_set(tmp_path / "b")
    assert rs.clip_k == [1.0, 1.0] and (tmp_path / "b" / "v_rotation_svv_r_h_pbr.pt").exists()


def test_hadamard_method(stats_dir, tmp_path):
    fit_rotations(stats_dir, tmp_path, method="hadamard", fit_clip=False)
    assert (tmp_path / "k_rotation_hadamard.pt").exists()
    raw = torch.load(tmp_path / "v_rotation_hadamard.pt", weights_only=True)
    assert raw["objective"] == "hadamard"
    assert torch.equal(raw["layers"][1]["eigenvalues"], torch.ones(16))
    assert torch.equal(raw["layers"][0]["rotation"], hadamard_matrix(16, torch.float32))


def test_missing_inputs_say_what_to_run(stats_dir, tmp_path):
    with pytest.raises(OscarError, match="does not exist; run `python -m oscar_kv calibrate"):
        fit_rotations(tmp_path / "nothing", tmp_path / "out")
    no_hold = tmp_path / "nohold"
    write_stats_dir(no_hold, holdout_t=None)
    with pytest.raises(OscarError, match="holdout file .* does not exist"):
        fit_rotations(no_hold, tmp_path / "out", quant=QUANT)
    assert not (tmp_path / "out").exists()  # nothing half-written
    fit_rotations(no_hold, tmp_path / "out", fit_clip=False)  # fine without the search
    with pytest.raises(OscarError, match="unknown rotation method"):
        fit_rotations(stats_dir, tmp_path / "x", method="qqt_bogus")
    with pytest.raises(OscarError, match="unknown rotation composition"):
        fit_rotations(stats_dir, tmp_path / "x", composition="r_h_x")


def test_bad_stats_file(tmp_path):
    torch.save({"format": "something-else"}, tmp_path / "stats.pt")
    with pytest.raises(OscarError, match="not an oscar-kv statistics file"):
        fit_rotations(tmp_path, tmp_path / "out")
    info = write_stats_dir(tmp_path / "s")
    st = torch.load(tmp_path / "s" / "stats.pt", weights_only=True)
    st["layers"][1]["kk"][0, 0, 0] = float("nan")
    torch.save(st, tmp_path / "s" / "stats.pt")
    with pytest.raises(OscarError, match="'kk' of layer 1 contain NaN"):
        fit_rotations(tmp_path / "s", tmp_path / "out", method="ktk_vtv", fit_clip=False)
    assert info["model"]["num_layers"] == 2


def test_key_means_from_statistics(stats_dir, tmp_path):
    """The K file carries sum_t k / N per layer and KV head (raw-data formula); --no-center-k
    and statistics without key sums (older calibrations) give an uncentered fit."""
    info = write_stats_dir(tmp_path / "s")
    fit_rotations(tmp_path / "s", tmp_path / "c", fit_clip=False)
    rs = load_rotation_set(tmp_path / "c")
    for layer, (_, k, _) in info["raw"].items():
        want = k.reshape(-1, k.shape[2], k.shape[3]).mean(dim=0)
        assert torch.allclose(rs.k_mean[layer].double(), want, rtol=1e-6, atol=1e-7)
    report = json.loads((tmp_path / "c" / "fit_report.json").read_text())
    assert report["k_centered"] is True
    fit_rotations(tmp_path / "s", tmp_path / "u", fit_clip=False, center_k=False)
    assert load_rotation_set(tmp_path / "u").k_mean is None
    for baseline in ("identity", "hadamard"):  # naive / hadamard are never centered
        fit_rotations(tmp_path / "s", tmp_path / baseline, method=baseline, fit_clip=False)
        raw = torch.load(tmp_path / baseline / f"k_rotation_{baseline}.pt", weights_only=True)
        assert "k_mean" not in raw["layers"][0]
    st = torch.load(tmp_path / "s" / "stats.pt", weights_only=True)
    for entry in st["layers"].values():
        del entry["k_sum"]
    torch.save(st, tmp_path / "s" / "stats.pt")
    logs = []
    fit_rotations(tmp_path / "s", tmp_path / "old", fit_clip=False, log=logs.append)
    assert load_rotation_set(tmp_path / "old").k_mean is None
    assert any("without K centering" in line for line in logs)


def test_ktk_fits_the_centered_key_covariance(tmp_path):
    """With centering the stored keys are k - mean, so `ktk` must diagonalise their
    covariance, not the raw second moment (qqt, the default, is unaffected)."""
    info = write_stats_dir(tmp_path / "s")
    fit_rotations(tmp_path / "s", tmp_path / "c", method="ktk_vtv", composition="plain",
                  fit_clip=False)
    fit_rotations(tmp_path / "s", tmp_path / "u", method="ktk_vtv", composition="plain",
                  fit_clip=False, center_k=False)
    rc, ru = load_rotation_set(tmp_path / "c"), load_rotation_set(tmp_path / "u")
    for layer, (_, k, _) in info["raw"].items():
        kf = k.reshape(-1, k.shape[2], k.shape[3])
        kc = kf - kf.mean(dim=0)
        cov = torch.einsum("thd,the->de", kc, kc) / kc.shape[0] / kc.shape[1]
        # the centered fit's rotation diagonalises the centered covariance
        off = rc.k[layer].double().T @ cov @ rc.k[layer].double()
        assert (off - torch.diag(off.diagonal())).abs().max() < 1e-6 * off.abs().max()
        off_u = ru.k[layer].double().T @ cov @ ru.k[layer].double()
        assert (off_u - torch.diag(off_u.diagonal())).abs().max() > 1e-3 * off_u.abs().max()
    assert torch.equal(rc.v, ru.v)
