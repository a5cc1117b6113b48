"""Rotation checkpoint I/O: round trip, reference-schema files, validation messages, atomicity."""

from __future__ import annotations

import pytest
import torch

from oscar_kv.config import ModelGeometry
from oscar_kv.errors import OscarError
from oscar_kv.fit.checkpoint import (
    build_checkpoint,
    hadamard_rotation_set,
    identity_rotation_set,
    load_rotation_set,
    read_rotation_file,
    rotation_filename,
    write_files_atomic,
)
from oscar_kv.fit.hadamard import hadamard_matrix

L, D = 3, 16
GEOM = ModelGeometry(num_layers=L, num_q_heads=4, num_kv_heads=2, head_dim=D,
                     model_type="synthetic", name_or_path="x")


def _rotations(seed: int, n: int = L, d: int = D) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    qs = [torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
          for _ in range(n)]
    return torch.stack(qs).float()


def _eig(n: int = L, d: int = D) -> torch.Tensor:
    return torch.rand(n, d).sort(dim=-1).values


def _write_pair(path, k=None, v=None, clips=(None, None), meta=True, geom=GEOM):
    k = _rotations(0) if k is None else k
    v = _rotations(1) if v is None else v
    files = {}
    for t, r, c in (("k", k, clips[0]), ("v", v, clips[1])):
        m = {"target": t, "estimator": "qqt", "model": geom.to_dict()} if meta else None
        files[rotation_filename(t, "qqt" if t == "k" else "sst", "r_h_pbr")] = \
            build_checkpoint(r, _eig(r.shape[0], r.shape[-1]), "x_r_h_pbr", c, m)
    write_files_atomic(path, files)
    return k, v


def test_filenames():
    assert rotation_filename("k", "qqt", "r_h_pbr") == "k_rotation_qqt_r_h_pbr.pt"
    assert rotation_filename("v", "sst", "r_h_pbr") == "v_rotation_sst_r_h_pbr.pt"
    assert rotation_filename("k", "hadamard", "r_h_pbr") == "k_rotation_hadamard.pt"


def test_round_trip_bit_exact(tmp_path):
    clips = ([0.9, 0.95, 1.0], [0.8, 0.81, 0.92])
    k, v = _write_pair(tmp_path / "rot", clips=clips)
    rs = load_rotation_set(tmp_path / "rot", expect=GEOM)
    assert torch.equal(rs.k, k) and torch.equal(rs.v, v)
    assert rs.k.dtype == torch.float32 and rs.k.shape == (L, D, D)
    assert rs.clip_k == clips[0] and rs.clip_v == clips[1]
    assert rs.meta["k_meta"]["model"]["num_kv_heads"] == 2
    assert rs.num_layers == L and rs.head_dim == D
    # the explicit (k_file, v_file) form gives the same set
    pair = (tmp_path / "rot" / "k_rotation_qqt_r_h_pbr.pt",
            tmp_path / "rot" / "v_rotation_sst_r_h_pbr.pt")
    assert torch.equal(load_rotation_set(pair).v, v)


def test_saved_schema(tmp_path):
    _write_pair(tmp_path, clips=([0.9] * L, [0.9] * L))
    raw = torch.load(tmp_path / "k_rotation_qqt_r_h_pbr.pt", weights_only=True)
    assert raw["format_version"] == 1 and raw["source_grouping"] == "layer"
    assert sorted(raw["layers"]) == [0, 1, 2] and all(isinstance(i, int) for i in raw["layers"])
    e = raw["layers"][1]
    assert e["layer_id"] == 1 and e["rotation"].dtype == torch.float32
    assert e["rotation"].is_contiguous() and e["eigenvalues"].shape == (D,)
    assert raw["oscar_kv"]["version"] == 1


def test_reference_schema_file_with_str_keys_loads(tmp_path):
    k, v = _rotations(4), _rotations(5)
    for t, r in (("k", k), ("v", v)):
        ref = {"format_version": 1, "objective": f"{t}_r_h_pbr", "source_grouping": "layer",
               "layers": {str(i): {"layer_id": i, "rotation": r[i].clone(),
                                   "eigenvalues": torch.ones(D)} for i in range(L)}}
        torch.save(ref, tmp_path / f"{t}_rotation_zoo.pt")
    rs = load_rotation_set(tmp_path, expect=GEOM)
    assert torch.equal(rs.k, k) and torch.equal(rs.v, v)
    assert rs.clip_k == [1.0] * L and rs.clip_v == [1.0] * L  # no clip by default
    rs2 = load_rotation_set(tmp_path, clip_k=0.96, clip_v=[0.9, 0.91, 0.92])
    assert rs2.clip_k == [0.96] * L and rs2.clip_v == [0.9, 0.91, 0.92]
    with pytest.raises(OscarError, match="2 clip ratios were given"):
        load_rotation_set(tmp_path, clip_v=[0.9, 0.9])
    # without our metadata only layers and head_dim are checked
    other_heads = ModelGeometry(num_layers=L, num_q_heads=8, num_kv_heads=8, head_dim=D)
    load_rotation_set(tmp_path, expect=other_heads)
    with pytest.raises(OscarError, match=r"has 3 layers of head_dim 16 but the model has 4 "
                                         r"layers of head_dim 16"):
        load_rotation_set(tmp_path, expect=ModelGeometry(4, 4, 2, D))


def test_geometry_mismatch_names_both_sides(tmp_path):
    _write_pair(tmp_path)
    with pytest.raises(OscarError, match=r"num_kv_heads=2 but this model has num_kv_heads=4"):
        load_rotation_set(tmp_path, expect=ModelGeometry(L, 4, 4, D))
    with pytest.raises(OscarError, match=r"head_dim=16 but this model has .*head_dim=32"):
        load_rotation_set(tmp_path, expect=ModelGeometry(L, 4, 2, 32))


def test_missing_and_ambiguous_files(tmp_path):
    with pytest.raises(OscarError, match="does not exist; run `python -m oscar_kv fit"):
        load_rotation_set(tmp_path / "nope")
    _write_pair(tmp_path)
    (tmp_path / "v_rotation_sst_r_h_pbr.pt").unlink()
    with pytest.raises(OscarError, match=r"exactly one v_rotation_\*.pt \(found none\)"):
        load_rotation_set(tmp_path)
    _write_pair(tmp_path)
    torch.save({}, tmp_path / "k_rotation_hadamard.pt")
    with pytest.raises(OscarError, match="found k_rotation_hadamard.pt, k_rotation_qqt"):
        load_rotation_set(tmp_path)
    with pytest.raises(OscarError, match="does not exist"):
        read_rotation_file(tmp_path / "absent.pt")


def test_k_v_shape_mismatch(tmp_path):
    _write_pair(tmp_path, v=_rotations(1, n=2))
    with pytest.raises(OscarError, match=r"has rotations \(3, 16, 16\) but .* has \(2, 16, 16\)"):
        load_rotation_set(tmp_path)


def test_bad_contents_raise(tmp_path):
    def one(layers, name="bad.pt"):
        torch.save({"format_version": 1, "layers": layers}, tmp_path / name)
        return tmp_path / name

    eye = torch.eye(D)
    with pytest.raises(OscarError, match="not orthogonal"):
        read_rotation_file(one({0: {"rotation": eye * 1.01}}))
    nan = eye.clone()
    nan[2, 3] = float("nan")
    with pytest.raises(OscarError, match="NaN or Inf"):
        read_rotation_file(one({0: {"rotation": nan}}))
    with pytest.raises(OscarError, match="no square 'rotation'"):
        read_rotation_file(one({0: {"rotation": torch.ones(D, D + 1)}}))
    with pytest.raises(OscarError, match="needs every layer 0..1"):
        read_rotation_file(one({0: {"rotation": eye}, 2: {"rotation": eye}}))
    with pytest.raises(OscarError, match="has shape"):
        read_rotation_file(one({0: {"rotation": eye}, 1: {"rotation": torch.eye(8)}}))
    with pytest.raises(OscarError, match="no 'layers' dict"):
        read_rotation_file(one({}))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(OscarError, match="cannot be read"):
        read_rotation_file(tmp_path / "junk.pt")


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "out"
    good = build_checkpoint(_rotations(0), _eig(), "x", None, None)
    with pytest.raises(Exception):  # noqa: B017 - any serialization error
        write_files_atomic(out, {"a.pt": good, "b.pt": {"f": lambda: 0}})
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(Exception):  # noqa: B017
        write_files_atomic(out, {"a.pt": good, "b.pt": {"f": lambda: 0}})
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    write_files_atomic(out, {"a.pt": good, "r.json": "{}"})
    assert sorted(p.name for p in out.iterdir()) == ["a.pt", "keep.txt", "r.json"]


def test_identity_and_hadamard_sets():
    ident, had = identity_rotation_set(GEOM), hadamard_rotation_set(GEOM)
    assert torch.equal(ident.k, torch.eye(D).expand(L, D, D))
    assert torch.equal(had.v[2], hadamard_matrix(D, torch.float32))
    assert had.clip_k == [1.0] * L and ident.clip_v == [1.0] * L
    with pytest.raises(OscarError, match="power of two"):
        hadamard_rotation_set(ModelGeometry(2, 2, 2, 96))


def test_key_means_round_trip_and_validation(tmp_path):
    k, v = _rotations(0), _rotations(1)
    mean = torch.randn(L, 2, D)
    files = {"k_rotation_qqt_r_h_pbr.pt": build_checkpoint(k, _eig(), "qqt_r_h_pbr",
                                                           k_mean=mean),
             "v_rotation_sst_r_h_pbr.pt": build_checkpoint(v, _eig(), "sst_r_h_pbr")}
    write_files_atomic(tmp_path / "ok", files)
    rs = load_rotation_set(tmp_path / "ok", expect=GEOM)
    assert torch.equal(rs.k_mean, mean) and rs.k_mean.dtype == torch.float32
    # files without means (RotationZoo, older fits) load uncentered
    _write_pair(tmp_path / "plain")
    assert load_rotation_set(tmp_path / "plain").k_mean is None
    # means on some layers only, the wrong width, NaN, or on the V file: refused
    partial = build_checkpoint(k, _eig(), "qqt_r_h_pbr", k_mean=mean)
    del partial["layers"][2]["k_mean"]
    wide = build_checkpoint(k, _eig(), "qqt_r_h_pbr", k_mean=torch.randn(L, 2, D + 1))
    nan = build_checkpoint(k, _eig(), "qqt_r_h_pbr", k_mean=mean.clone().fill_(float("nan")))
    for name, ck, msg in (("partial", partial, "some layers only"), ("wide", wide, "not \\[Hkv"),
                          ("nan", nan, "non-finite 'k_mean'")):
        write_files_atomic(tmp_path / name, {"k_rotation_qqt_r_h_pbr.pt": ck,
                                             "v_rotation_sst_r_h_pbr.pt": files[
                                                 "v_rotation_sst_r_h_pbr.pt"]})
        with pytest.raises(OscarError, match=msg):
            load_rotation_set(tmp_path / name)
    swapped = (tmp_path / "ok" / "v_rotation_sst_r_h_pbr.pt",
               tmp_path / "ok" / "k_rotation_qqt_r_h_pbr.pt")
    with pytest.raises(OscarError, match="is a V rotation file"):
        load_rotation_set(swapped)
