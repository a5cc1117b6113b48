"""Rotation checkpoints: the reference schema (§2.7) plus our per-layer clip ratios and metadata.

One file per target, `{k|v}_rotation_{estimator}_{composition}.pt` (data-free:
`{k|v}_rotation_{hadamard|identity}.pt`):

    {"format_version": 1, "objective": "qqt_r_h_pbr", "source_grouping": "layer",
     "layers": {l: {"layer_id": l, "rotation": fp32 [D, D], "eigenvalues": fp32 [D],
                    "clip_ratio": float,                                    # ours
                    "k_mean": fp32 [Hkv, D]}},                # ours, K file only (centering)
     "oscar_kv": {"version": 1, "target", "estimator", "composition", "quant", "window",
                  "model": {...}, "calibration": {...}}}                    # ours

Published RotationZoo files (str or int keys, no additions) load as-is: clips then default to
1.0 (no clip) unless the caller passes ratios, keys are not centered (no `k_mean`), and only L
and D are checked against the model.

`k_mean` is the calibration mean of the post-RoPE keys per KV head. Keys are stored as
(k - k_mean) R_K: softmax is invariant to subtracting the same vector from every key of a head
(each logit of a query moves by the same q . k_mean), so attention is unchanged in exact
arithmetic while the INT2 rows lose their common offset.
Writes are atomic: files go to a temp dir beside the target and are renamed into place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from oscar_kv.atomic_io import write_files_atomic  # noqa: F401  (re-exported)
from oscar_kv.config import ModelGeometry
from oscar_kv.errors import OscarError
from oscar_kv.fit.compose import ORTHO_TOL, orthogonality_error
from oscar_kv.fit.hadamard import hadamard_matrix

FORMAT_VERSION = 1
META_VERSION = 1
DATA_FREE = ("hadamard", "identity")
FIT_HINT = "run `python -m oscar_kv fit ...` to create it"


def rotation_filename(target: str, estimator: str, composition: str = "") -> str:
    """('k', 'qqt', 'r_h_pbr') -> 'k_rotation_qqt_r_h_pbr.pt'.

    Data-free estimators drop the composition: 'k_rotation_hadamard.pt'."""
    return f"{target}_rotation_{objective_name(estimator, composition)}.pt"


def objective_name(estimator: str, composition: str = "") -> str:
    """The checkpoint's `objective`: 'qqt_r_h_pbr', or the bare name for data-free methods."""
    return estimator if estimator in DATA_FREE or not composition else f"{estimator}_{composition}"


def build_checkpoint(rotations: torch.Tensor, eigenvalues: torch.Tensor, objective: str,
                     clip_ratios: Sequence[float] | None = None, oscar_meta: dict | None = None,
                     k_mean: torch.Tensor | None = None) -> dict:
    """rotations [L, D, D], eigenvalues [L, D], k_mean [L, Hkv, D] or None -> the checkpoint
    dict (layer ids 0..L-1)."""
    layers = {}
    for i in range(rotations.shape[0]):
        entry = {"layer_id": i,
                 "rotation": rotations[i].detach().to("cpu", torch.float32).contiguous().clone(),
                 "eigenvalues": eigenvalues[i].detach().to("cpu", torch.float32).clone()}
        if clip_ratios is not None:
            entry["clip_ratio"] = float(clip_ratios[i])
        if k_mean is not None:
            entry["k_mean"] = k_mean[i].detach().to("cpu", torch.float32).contiguous().clone()
        layers[i] = entry
    ckpt = {"format_version": FORMAT_VERSION, "objective": objective,
            "source_grouping": "layer", "layers": layers}
    if oscar_meta is not None:
        ckpt["oscar_kv"] = {"version": META_VERSION, **oscar_meta}
    return ckpt


@dataclass(frozen=True, eq=False)
class RotationFile:
    """One loaded checkpoint: rotations [L, D, D] fp32, eigenvalues [L, D] fp32 (or None),
    k_mean [L, Hkv, D] fp32 (or None: keys not centered)."""

    path: Path
    objective: str
    rotations: torch.Tensor
    eigenvalues: torch.Tensor | None
    clip_ratios: list[float] | None
    meta: dict | None
    k_mean: torch.Tensor | None = None


def _layer_id(key: object, path: Path) -> int:
    try:
        return int(key)
    except (TypeError, ValueError):
        raise OscarError(f"rotation checkpoint {path} has a non-integer layer key {key!r}; "
                         "it is not an oscar/RotationZoo rotation file") from None


def read_rotation_file(path: str | Path) -> RotationFile:
    """Load and validate one checkpoint (torch.load weights_only=True, int or str layer keys)."""
    path = Path(path)
    if not path.is_file():
        raise OscarError(f"rotation checkpoint {path} does not exist; {FIT_HINT}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors: report the file, not the traceback
        raise OscarError(f"rotation checkpoint {path} cannot be read ({type(e).__name__}: "
                         f"{e}); re-create it with `python -m oscar_kv fit ...`") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("layers"), dict) \
            or not ckpt["layers"]:
        raise OscarError(f"rotation checkpoint {path} has no 'layers' dict; it is not an "
                         "oscar/RotationZoo rotation file")
    layers = {_layer_id(k, path): v for k, v in ckpt["layers"].items()}
    ids = sorted(layers)
    if ids != list(range(len(ids))):
        raise OscarError(f"rotation checkpoint {path} has layers {ids[:3]}...{ids[-1]} but "
                         f"needs every layer 0..{len(ids) - 1}; refit the full model")
    rots, evs, clips, means = [], [], [], []
    for i in ids:
        entry = layers[i]
        r = entry.get("rotation") if isinstance(entry, dict) else None
        if not isinstance(r, torch.Tensor) or r.ndim != 2 or r.shape[0] != r.shape[1]:
            raise OscarError(f"layer {i} of {path} has no square 'rotation' matrix; the file "
                             "is damaged, refit it")
        if rots and r.shape != rots[0].shape:
            raise OscarError(f"layer {i} of {path} has shape {tuple(r.shape)} but layer 0 has "
                             f"{tuple(rots[0].shape)}; the file is damaged, refit it")
        r = r.to(torch.float32).contiguous()
        if not torch.isfinite(r).all():
            raise OscarError(f"layer {i} of {path} holds NaN or Inf; refit the rotation")
        err = orthogonality_error(r)
        if err > ORTHO_TOL:
            raise OscarError(f"layer {i} of {path} is not orthogonal (max|RR^T-I| = {err:.3g} "
                             f"> {ORTHO_TOL}); refit the rotation")
        rots.append(r)
        ev = entry.get("eigenvalues")
        evs.append(ev.to(torch.float32) if isinstance(ev, torch.Tensor) else None)
        clips.append(entry.get("clip_ratio"))
        means.append(_k_mean(entry.get("k_mean"), r.shape[0], i, path))
    if any(m is None for m in means) and not all(m is None for m in means):
        raise OscarError(f"{path} has key means for some layers only; refit the rotation")
    if means[0] is not None and any(m.shape != means[0].shape for m in means):
        raise OscarError(f"{path} has key means of different head counts; refit the rotation")
    if any(c is None for c in clips) and not all(c is None for c in clips):
        raise OscarError(f"{path} has clip ratios for some layers only; refit the rotation")
    if clips[0] is not None and not all(math.isfinite(float(c)) for c in clips):
        raise OscarError(f"{path} has a non-finite clip ratio; refit the rotation")
    d = rots[0].shape[0]
    ev_ok = all(e is not None and e.shape == (d,) for e in evs)
    meta = ckpt.get("oscar_kv")
    return RotationFile(path=path, objective=str(ckpt.get("objective", "")),
                        rotations=torch.stack(rots),
                        eigenvalues=torch.stack(evs) if ev_ok else None,
                        clip_ratios=None if clips[0] is None else [float(c) for c in clips],
                        meta=meta if isinstance(meta, dict) else None,
                        k_mean=None if means[0] is None else torch.stack(means))


def _k_mean(m: object, d: int, layer: int, path: Path) -> torch.Tensor | None:
    if m is None:
        return None
    if not isinstance(m, torch.Tensor) or m.ndim != 2 or m.shape[1] != d:
        raise OscarError(f"layer {layer} of {path} has a 'k_mean' that is not [Hkv, {d}]; the "
                         "file is damaged, refit it")
    if not torch.isfinite(m).all():
        raise OscarError(f"layer {layer} of {path} has a non-finite 'k_mean'; refit it")
    return m.to(torch.float32).contiguous()


@dataclass(frozen=True, eq=False)
class RotationSet:
    """Per-layer rotations of a model: k, v [L, D, D] fp32; clip_k, clip_v [L] (>= 1: off);
    k_mean [L, Hkv, D] fp32 key means subtracted before R_K, or None (no centering)."""

    k: torch.Tensor
    v: torch.Tensor
    clip_k: list[float]
    clip_v: list[float]
    meta: dict = field(default_factory=dict)
    k_mean: torch.Tensor | None = None

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def head_dim(self) -> int:
        return self.k.shape[-1]


def _resolve_pair(src: str | Path | Sequence[str | Path]) -> tuple[Path, Path]:
    if isinstance(src, (str, Path)):
        d = Path(src)
        if not d.is_dir():
            raise OscarError(f"rotation directory {d} does not exist; {FIT_HINT}")
        found = []
        for t in ("k", "v"):
            cands = sorted(d.glob(f"{t}_rotation_*.pt"))
            if len(cands) != 1:
                names = ", ".join(c.name for c in cands) or "none"
                raise OscarError(f"{d} must hold exactly one {t}_rotation_*.pt (found {names}); "
                                 "pass the (k_file, v_file) pair explicitly or " + FIT_HINT)
            found.append(cands[0])
        return found[0], found[1]
    if len(src) != 2:
        raise OscarError("pass a rotation directory or a (k_file, v_file) pair")
    return Path(src[0]), Path(src[1])


def _clips(given: float | Sequence[float] | None, file: RotationFile, n: int) -> list[float]:
    if given is None:
        return file.clip_ratios if file.clip_ratios is not None else [1.0] * n
    vals = [float(given)] * n if isinstance(given, (int, float)) else [float(c) for c in given]
    if len(vals) != n:
        raise OscarError(f"{len(vals)} clip ratios were given for {file.path.name} but it has "
                         f"{n} layers; pass one ratio or one per layer")
    return vals


def _check_expect(f: RotationFile, expect: ModelGeometry) -> None:
    geom = (f.meta or {}).get("model")
    if isinstance(geom, dict) and "num_layers" in geom:
        expect.check_matches(ModelGeometry.from_dict(geom), f"rotation checkpoint {f.path}")
    lay, d = f.rotations.shape[0], f.rotations.shape[-1]
    if (lay, d) != (expect.num_layers, expect.head_dim):
        raise OscarError(f"rotation checkpoint {f.path} has {lay} layers of head_dim {d} but "
                         f"the model has {expect.num_layers} layers of head_dim "
                         f"{expect.head_dim}; use rotations fitted for this model")


def load_rotation_set(src: str | Path | Sequence[str | Path], expect: ModelGeometry | None = None,
                      clip_k: float | Sequence[float] | None = None,
                      clip_v: float | Sequence[float] | None = None) -> RotationSet:
    """Load a rotation directory (one k_ and one v_rotation_*.pt) or a (k_file, v_file) pair.

    Caller clip ratios override the files'; files without ratios default to 1.0 (no clip).
    With `expect`, the layer count, head_dim (and, if recorded, the head counts) must match."""
    kp, vp = _resolve_pair(src)
    fk, fv = read_rotation_file(kp), read_rotation_file(vp)
    if fk.rotations.shape != fv.rotations.shape:
        raise OscarError(f"{kp.name} has rotations {tuple(fk.rotations.shape)} but {vp.name} "
                         f"has {tuple(fv.rotations.shape)}; use K and V files of the same fit")
    if expect is not None:
        _check_expect(fk, expect)
        _check_expect(fv, expect)
    n = fk.rotations.shape[0]
    meta = {"k_path": str(kp), "v_path": str(vp), "k_objective": fk.objective,
            "v_objective": fv.objective, "k_meta": fk.meta, "v_meta": fv.meta}
    if fv.k_mean is not None:
        raise OscarError(f"{vp.name} carries key means but is a V rotation file; pass the K "
                         f"and V files in that order")
    return RotationSet(k=fk.rotations, v=fv.rotations, clip_k=_clips(clip_k, fk, n),
                       clip_v=_clips(clip_v, fv, n), meta=meta, k_mean=fk.k_mean)


def _fixed_set(geom: ModelGeometry, r: torch.Tensor, method: str) -> RotationSet:
    stack = r.to(torch.float32).expand(geom.num_layers, -1, -1).contiguous()
    ones = [1.0] * geom.num_layers
    return RotationSet(k=stack, v=stack.clone(), clip_k=list(ones), clip_v=list(ones),
                       meta={"k_objective": method, "v_objective": method,
                             "model": geom.to_dict()})


def identity_rotation_set(geom: ModelGeometry) -> RotationSet:
    """The `naive` method: R = I for every layer, no clipping."""
    return _fixed_set(geom, torch.eye(geom.head_dim), "identity")


def hadamard_rotation_set(geom: ModelGeometry) -> RotationSet:
    """The `hadamard` method: R = H_D for every layer, no clipping (power-of-two head_dim)."""
    return _fixed_set(geom, hadamard_matrix(geom.head_dim), "hadamard")
