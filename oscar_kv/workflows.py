"""The three phases as plain functions the CLI (and users' scripts) call.

Each takes paths and specs, does one job, writes its outputs atomically and returns a JSON-able
summary. Heavy imports (transformers) happen inside the functions.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from oscar_kv.atomic_io import write_files_atomic
from oscar_kv.config import QuantSpec, WindowSpec
from oscar_kv.errors import OscarError


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OscarError("--device cuda was asked for but no CUDA GPU is visible; use cpu")
    return name


def run_calibrate(model: str, data: str, out: str, max_tokens: int = 200_000,
                  seq_len: int = 2048, holdout_seqs: int = 2, gpqa: bool = False,
                  raw_dump: str | None = None, dtype: str = "float32",
                  device: str = "auto", progress: bool = True, softmax_stats: bool = True,
                  batch_size: int = 1) -> dict:
    """Phase 1: stream statistics of `model` over `data` into `out` (stats.pt, holdout.pt)."""
    from oscar_kv.capture.calibrate import calibrate, load_hf_model
    from oscar_kv.capture.data import load_calibration_data, load_hf_tokenizer

    kind = "gpqa" if gpqa else "auto"
    tok = None if (data.endswith(".npy") and not gpqa) else load_hf_tokenizer(model)
    calib = load_calibration_data(data, kind=kind, tokenizer=tok, seq_len=seq_len,
                                  max_tokens=max_tokens, holdout_seqs=holdout_seqs)
    m = load_hf_model(model, dtype=dtype, device=_device(device))
    summary = calibrate(m, calib.batches(batch_size), out, holdout_seqs=calib.holdout,
                        progress=progress, raw_dump_dir=raw_dump, token_source=calib.source,
                        softmax_stats=softmax_stats)
    print(f"calibrated on {calib.num_tokens} tokens -> {out}")
    return summary


CLIP_SEARCHES = ("auto", "model", "layer", "off")


def run_fit(stats: str, out: str, method: str = "qqt_sst", composition: str = "r_h_pbr",
            fit_clip: bool = True, fixed_clip: tuple[float, float] | None = None,
            quant: QuantSpec = QuantSpec(), window: WindowSpec = WindowSpec(),
            model: str | None = None, clip_search: str = "auto", dtype: str = "float32",
            device: str = "auto", recall_probes: int = 8, center_k: bool = True) -> dict:
    """Phase 2: fit rotations (+ clip ratios) from `stats` into `out`.

    Clip ratios: `fixed_clip` wins; else with `fit_clip`, `clip_search` picks how:
    "model" (one K and one V ratio chosen by the model's next-token KL on the held-out
    calibration sequences; needs `model`), "layer" (per-layer attention-error proxies, no model
    needed), "auto" = "model" when a model is given, else "layer"; "off" = no clipping.
    center_k: store calibration key means so the cache quantizes k - mean (fit_rotations).
    """
    from oscar_kv.fit.pipeline import fit_rotations

    if clip_search not in CLIP_SEARCHES:
        raise OscarError(f"unknown clip search {clip_search!r}; choose one of: "
                         f"{', '.join(CLIP_SEARCHES)}")
    if clip_search == "auto":
        clip_search = "model" if model else "layer"
    if not fit_clip:
        clip_search = "off"
    if clip_search == "model" and fixed_clip is None:
        if not model:
            raise OscarError("--clip-search model needs --model (the model the statistics "
                             "came from)")
        return _fit_with_model_clips(stats, out, method, composition, quant, window, model,
                                     dtype, device, recall_probes, center_k)
    summary = fit_rotations(stats, out, method=method, composition=composition,
                            fit_clip=clip_search == "layer", fixed_clip=fixed_clip,
                            quant=quant, window=window, log=print, center_k=center_k)
    print(f"rotations written to {out}")
    return summary


def _fit_with_model_clips(stats, out, method, composition, quant, window, model, dtype,
                          device, recall_probes: int = 8, center_k: bool = True) -> dict:
    from oscar_kv.capture.calibrate import load_hf_model
    from oscar_kv.evals.clip_select import select_global_clips
    from oscar_kv.fit.checkpoint import RotationSet
    from oscar_kv.fit.pipeline import fit_rotations, load_holdout
    from oscar_kv.hf import check_rotation_geometry, model_geometry

    hold = load_holdout(stats)
    if "ids" not in hold:
        raise OscarError(f"{stats}/holdout.pt has no held-out token ids (made by an older "
                         "calibrate); re-run `python -m oscar_kv calibrate` or use "
                         "--clip-search layer")
    mdl = load_hf_model(model, dtype=dtype, device=_device(device))
    geom = model_geometry(mdl)

    def select(r_k: torch.Tensor, r_v: torch.Tensor, k_mean: torch.Tensor | None
               ) -> tuple[str, list, list, dict]:
        rot = RotationSet(k=r_k, v=r_v, clip_k=[1.0] * len(r_k), clip_v=[1.0] * len(r_v),
                          meta={}, k_mean=k_mean)
        check_rotation_geometry(rot, geom)
        sel = select_global_clips(mdl, rot, hold["ids"], quant=quant, window=window,
                                  probes_per_seq=recall_probes)
        print(f"model-level clip selection: k={sel['clip_k']} v={sel['clip_v']} "
              f"(mean KL {sel['k_curve'][str(sel['clip_k'])]:.5f} -> "
              f"{sel['v_curve'][str(sel['clip_v'])]:.5f})")
        return "model_kl", [sel["clip_k"]] * len(r_k), [sel["clip_v"]] * len(r_v), sel

    summary = fit_rotations(stats, out, method=method, composition=composition, quant=quant,
                            window=window, log=print, clip_selector=select, center_k=center_k)
    print(f"rotations written to {out}")
    return summary


def _write_json_atomic(path: str, obj: dict) -> None:
    p = Path(path)
    write_files_atomic(p.parent, {p.name: json.dumps(obj, indent=2)})


def run_eval(model: str, data: str, methods: list[str], rotations: str | None = None,
             seq_len: int = 2048, num_seqs: int = 16, quant: QuantSpec = QuantSpec(),
             window: WindowSpec = WindowSpec(), json_out: str | None = None,
             copy: bool = True, dtype: str = "float32", device: str = "auto",
             progress: bool = True) -> dict:
    """Evaluate `methods` on held-out windows of `data`; prints a table, optionally JSON."""
    from oscar_kv.capture.calibrate import load_hf_model
    from oscar_kv.capture.data import load_hf_tokenizer
    from oscar_kv.evals.lm_eval import evaluate_methods
    from oscar_kv.evals.report import format_results_table
    from oscar_kv.evals.tokens import copy_probes, lm_windows, load_token_file
    from oscar_kv.fit.checkpoint import load_rotation_set
    from oscar_kv.hf import METHODS, model_geometry

    for m in methods:
        METHODS.get(m)
    tok = None if data.endswith(".npy") else load_hf_tokenizer(model)
    tokens = load_token_file(data, tok)
    lm_ids = lm_windows(tokens, seq_len, num_seqs)
    copy_ids = copy_mask = None
    if copy:
        copy_ids, copy_mask = copy_probes(tokens, seq_len, num_seqs)
    mdl = load_hf_model(model, dtype=dtype, device=_device(device))
    rot = None
    if "oscar" in methods:
        if rotations is None:
            raise OscarError("method oscar needs --rotations (a directory written by `fit`)")
        rot = load_rotation_set(rotations, expect=model_geometry(mdl))
    results = evaluate_methods(mdl, methods, lm_ids, copy_ids, copy_mask, rotations=rot,
                               quant=quant, window=window, progress=progress)
    config = {"model": model, "data": data, "rotations": rotations, "seq_len": seq_len,
              "num_seqs": num_seqs, "copy_probes": copy, "dtype": dtype,
              "quant": quant.to_dict(), "window": window.to_dict(),
              "clip_k": None if rot is None else list(rot.clip_k),
              "clip_v": None if rot is None else list(rot.clip_v)}
    out = {"results": results, "config": config}
    print(format_results_table(results))
    if json_out:
        _write_json_atomic(json_out, out)
    return out
