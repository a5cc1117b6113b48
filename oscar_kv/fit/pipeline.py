"""Phase 2 driver: statistics -> per-layer R_K, R_V (+ clip ratios) -> checkpoint files.

Reads STATS_DIR/stats.pt (and holdout.pt for the clip search), fits the K and V targets with
the method's estimators and the composition, picks clip ratios (fitted on the holdout, fixed,
or off) and writes `{k|v}_rotation_*.pt` plus `fit_report.json` into OUT_DIR atomically.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from oscar_kv.capture.stats import CALIBRATE_HINT, load_holdout
from oscar_kv.capture.stats import load_stats as read_stats
from oscar_kv.config import ModelGeometry, QuantSpec, WindowSpec
from oscar_kv.errors import OscarError
from oscar_kv.fit.checkpoint import (
    build_checkpoint,
    objective_name,
    rotation_filename,
    write_files_atomic,
)
from oscar_kv.fit.clip_search import check_grid, search_clip_ratios
from oscar_kv.fit.compose import (
    COMPOSITIONS,
    DEFAULT_COMPOSITION,
    fit_rotation,
    fixed_rotation,
    orthogonality_error,
)
from oscar_kv.fit.estimators import ESTIMATORS, layer_covariance, parse_method

REPORT_NAME = "fit_report.json"
# (r_k [L, D, D], r_v [L, D, D], k_mean [L, Hkv, D] | None)
#   -> (source name, clip_k per layer, clip_v per layer, report)
ClipSelector = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None],
                        tuple[str, list, list, dict]]


def load_stats(stats_dir: str | Path) -> tuple[dict, ModelGeometry, dict[int, dict]]:
    """STATS_DIR/stats.pt -> (raw dict, model geometry, {layer id: layer sums}) validated."""
    stats = read_stats(stats_dir)
    if not all(isinstance(stats.get(key), dict) for key in ("layers", "model")):
        raise OscarError(f"{stats_dir}/stats.pt is not an oscar-kv statistics file; "
                         f"{CALIBRATE_HINT}")
    geom = ModelGeometry.from_dict(stats["model"])
    layers = {int(k): v for k, v in stats["layers"].items()}
    if sorted(layers) != list(range(geom.num_layers)):
        raise OscarError(f"{stats_dir}/stats.pt holds layers {sorted(layers)[:4]}... but the "
                         f"model has {geom.num_layers}; {CALIBRATE_HINT}")
    return stats, geom, layers


def fit_target(layers: dict[int, dict], estimator: str, composition: str, head_dim: int
               ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """-> rotations fp32 [L, D, D], eigenvalues fp32 [L, D], per-layer max|RR^T - I|."""
    est = ESTIMATORS.get(estimator)
    rots, evs = [], []
    for lid in sorted(layers):
        if est.fixed_rotation is not None:
            r, ev = fixed_rotation(est.fixed_rotation(head_dim))
        else:
            r, ev = fit_rotation(layer_covariance(lid, layers[lid], estimator), composition)
        if r.shape[-1] != head_dim:
            raise OscarError(f"layer {lid} statistics have head_dim {r.shape[-1]} but the model "
                             f"header says {head_dim}; {CALIBRATE_HINT}")
        rots.append(r)
        evs.append(ev)
    rot = torch.stack(rots)
    return rot, torch.stack(evs), [orthogonality_error(r) for r in rot]


def key_means(layers: dict[int, dict], geom: ModelGeometry) -> torch.Tensor | None:
    """Per-layer calibration key means fp32 [L, Hkv, D] from the statistics' `k_sum` / `n`,
    or None when the statistics have no key sums."""
    if any("k_sum" not in layers[i] for i in range(geom.num_layers)):
        return None
    means = []
    for i in range(geom.num_layers):
        k_sum, n = layers[i]["k_sum"], int(layers[i]["n"])
        if tuple(k_sum.shape) != (geom.num_kv_heads, geom.head_dim) or n <= 0:
            raise OscarError(f"layer {i}: statistics hold k_sum {tuple(k_sum.shape)} over {n} "
                             f"tokens; expected [{geom.num_kv_heads}, {geom.head_dim}] over > 0 "
                             f"tokens; re-run `python -m oscar_kv calibrate`")
        means.append((k_sum / n).to(torch.float32))
    return torch.stack(means)


def centered_key_moments(layers: dict[int, dict]) -> dict[int, dict]:
    """The statistics with kk replaced by the centered second moment
    sum_t (k - mean)^T (k - mean) = kk - k_sum^T k_sum / n (per KV head); everything else,
    including the query moments the default K estimator uses, is unchanged."""
    out = {}
    for i, st in layers.items():
        k_sum, n = st["k_sum"].to(torch.float64), int(st["n"])
        outer = k_sum[:, :, None] * k_sum[:, None, :] / n
        out[i] = {**st, "kk": st["kk"].to(torch.float64) - outer}
    return out


def _centered(k: torch.Tensor, mean: torch.Tensor, layer: int) -> torch.Tensor:
    """Held-out keys [S, T, Hkv, D] minus the layer's key mean [Hkv, D] (same dtype)."""
    if k.ndim != 4 or tuple(k.shape[-2:]) != tuple(mean.shape):
        raise OscarError(f"holdout k of layer {layer} is {tuple(k.shape)} but the key means are "
                         f"{tuple(mean.shape)}; re-run `python -m oscar_kv calibrate`")
    return (k.float() - mean).to(k.dtype)


def _plain(x: object) -> object:
    """A stats header value as a JSON/weights_only-safe scalar."""
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    return x if x is None or isinstance(x, (int, float, str, bool)) else str(x)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def fit_rotations(stats_dir: str | Path, out_dir: str | Path, method: str = "qqt_sst",
                  composition: str = DEFAULT_COMPOSITION, fit_clip: bool = True,
                  clip_grid: Sequence[float] | None = None, quant: QuantSpec = QuantSpec(),
                  window: WindowSpec = WindowSpec(),
                  fixed_clip: tuple[float, float] | None = None,
                  k_objective: str = "attn_kl", v_objective: str = "out_mse",
                  device: str | torch.device | None = None,
                  log: Callable[[str], None] | None = None,
                  clip_selector: ClipSelector | None = None, center_k: bool = True) -> dict:
    """Fit R_K, R_V (+ clips) from STATS_DIR and write them to OUT_DIR; returns the summary.

    center_k: store the calibration key means in the K file, so keys are quantized as
    (k - mean) R_K (attention is invariant to it; see checkpoint.py). Statistics captured
    before key sums were recorded fit without centering (said in the log and the report).
    Clip ratios: `fixed_clip=(k, v)` applies those to every layer (and skips the search);
    else `clip_selector(r_k [L,D,D], r_v [L,D,D], k_mean) -> (name, clip_k, clip_v, report)`
    chooses
    them (e.g. the model-level selection, which needs the model and so lives outside `fit`);
    else `fit_clip` searches them per layer on holdout.pt; else 1.0 (off)."""
    k_est, v_est = parse_method(method)
    COMPOSITIONS.get(composition)
    stats, geom, layers = load_stats(stats_dir)
    d = geom.head_dim
    say = log or (lambda msg: None)
    # the data-free baselines (naive = identity, hadamard) are defined without centering
    center_k = center_k and not ESTIMATORS.get(k_est).data_free
    k_mean = key_means(layers, geom) if center_k else None
    fitted = {}
    for target, est in (("k", k_est), ("v", v_est)):
        # a key covariance must describe the keys as stored: centered when they are
        src = centered_key_moments(layers) if target == "k" and k_mean is not None else layers
        fitted[target] = fit_target(src, est, composition, d)
        say(f"{target}: {objective_name(est, composition)} fitted for {len(layers)} layers, "
            f"max|RR^T-I| = {max(fitted[target][2]):.2e}")
    if center_k and k_mean is None:
        say("statistics have no key sums (captured by an older calibrate): fitting without K "
            "centering; re-run `python -m oscar_kv calibrate` to get it")
    report = selection = None
    if fixed_clip is not None:
        clip_k, clip_v = ([float(c)] * geom.num_layers for c in fixed_clip)
        clip_source = "fixed"
    elif clip_selector is not None:
        clip_source, clip_k, clip_v, selection = clip_selector(fitted["k"][0], fitted["v"][0],
                                                               k_mean)
    elif fit_clip:
        quant.groups(d)
        holdout = load_holdout(stats_dir)
        if k_mean is not None:  # the proxies must see the keys as the cache stores them
            holdout = {**holdout, "k": {i: _centered(k, k_mean[int(i)], int(i))
                                        for i, k in holdout["k"].items()}}
        report = search_clip_ratios(holdout, fitted["k"][0], fitted["v"][0], quant, window,
                                    check_grid(clip_grid), k_objective, v_objective,
                                    device=device or _default_device(), progress=say)
        clip_k, clip_v, clip_source = report.clip_k, report.clip_v, "fitted"
        say(report.format())
    else:
        clip_k, clip_v = [1.0] * geom.num_layers, [1.0] * geom.num_layers
        clip_source = "off"
    calibration = {k: _plain(stats.get(k)) for k in ("num_tokens", "num_sequences", "seq_len",
                                                     "token_source")}
    calibration["stats_dir"] = str(stats_dir)
    clip_meta = {"source": clip_source, "k_objective": k_objective if report else None,
                 "v_objective": v_objective if report else None}
    files: dict[str, dict | str] = {}
    names = {}
    for target, est, clips in (("k", k_est, clip_k), ("v", v_est, clip_v)):
        rot, ev, _ = fitted[target]
        data_free = ESTIMATORS.get(est).data_free
        meta = {"target": target, "estimator": est,
                "composition": None if data_free else composition,
                "method": method, "quant": quant.to_dict(), "window": window.to_dict(),
                "model": geom.to_dict(), "calibration": calibration, "clip": clip_meta}
        names[target] = rotation_filename(target, est, composition)
        files[names[target]] = build_checkpoint(rot, ev, objective_name(est, composition),
                                                clips, meta,
                                                k_mean=k_mean if target == "k" else None)
    out = Path(out_dir)
    summary = {"out_dir": str(out), "method": method, "composition": composition,
               "k_estimator": k_est, "v_estimator": v_est,
               "files": {"k": str(out / names["k"]), "v": str(out / names["v"]),
                         "report": str(out / REPORT_NAME)},
               "model": geom.to_dict(), "quant": quant.to_dict(), "window": window.to_dict(),
               "orthogonality_error": {t: fitted[t][2] for t in ("k", "v")},
               "clip_source": clip_source, "clip_k": clip_k, "clip_v": clip_v,
               "k_centered": k_mean is not None,
               "clip_search": report.to_dict() if report else None,
               "calibration": calibration}
    if selection is not None:
        summary["clip_selection"] = selection
    files[REPORT_NAME] = json.dumps(summary, indent=1)
    write_files_atomic(out, files)
    say(f"wrote {names['k']}, {names['v']} and {REPORT_NAME} to {out}")
    return summary
