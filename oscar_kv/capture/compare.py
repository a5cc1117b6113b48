"""Compare two calibration statistics files (e.g. HF hooks vs capture inside SGLang, or TP=1 vs
TP=4 captures of the same prompts).

    python -m oscar_kv.capture.compare STATS_A STATS_B [--tol 1e-2] [--json OUT]

Per layer and moment (qq, kk, vv, wvv, svv as matrices [Hkv, D, D]; k_sum [Hkv, D]; w_sum,
s_sum [Hkv]) the relative Frobenius difference ||a - b|| / max(||a||, ||b||); token and sequence
counts and the model geometry must be equal (different prompts are not comparable, so they are
an error, not a large difference). Exit status 1 when the largest difference exceeds --tol.

Two different forward implementations of the same bf16 model agree to ~1e-3 (their q/k/v
differ by bf16 rounding); two captures through the same kernels at different tensor-parallel
sizes agree to fp64 accumulation noise plus the TP reductions' rounding.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from oscar_kv.capture.stats import load_stats
from oscar_kv.config import ModelGeometry
from oscar_kv.errors import OscarError

MOMENTS = ("qq", "kk", "vv", "wvv", "svv", "k_sum", "w_sum", "s_sum")
COUNTS = ("n", "n_q")


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / max(||a||, ||b||) in fp64; 0 for two zero tensors."""
    a, b = a.double(), b.double()
    if a.shape != b.shape:
        raise OscarError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return float("nan")  # (max(0.0, nan) is 0.0: an all-zero side would hide it)
    den = max(a.norm().item(), b.norm().item())
    return 0.0 if den == 0.0 else (a - b).norm().item() / den


def compare_stats(a: dict, b: dict) -> dict:
    """a, b: statistics dicts (`load_stats`). Returns {"layers": {l: {moment: rel}},
    "max": {moment: largest rel over layers}, "worst": (layer, moment, rel), "num_tokens"}.
    Raises OscarError when the geometry, the layer set or the token counts differ, or a
    moment is present in one file only."""
    # the attention shape and (where both name it) the model type; name_or_path is where the
    # model was loaded from (HF calibration: the path; SGLang capture: empty), not a property
    ga, gb = ModelGeometry.from_dict(a["model"]), ModelGeometry.from_dict(b["model"])
    shape = ("num_layers", "num_q_heads", "num_kv_heads", "head_dim")
    if (any(getattr(ga, k) != getattr(gb, k) for k in shape)
            or (ga.model_type and gb.model_type and ga.model_type != gb.model_type)):
        raise OscarError(f"the statistics are of different models: {a.get('model')} vs "
                         f"{b.get('model')}")
    la, lb = a["layers"], b["layers"]
    if sorted(la) != sorted(lb):
        raise OscarError(f"layer sets differ: {sorted(la)} vs {sorted(lb)}")
    layers, worst = {}, (None, None, -1.0)
    for i in sorted(la):
        x, y = la[i], lb[i]
        for c in COUNTS:
            if x.get(c) != y.get(c):
                raise OscarError(f"layer {i}: {c} = {x.get(c)} vs {y.get(c)}: the two files saw "
                                 "different tokens; calibrate both on the same sequences")
        row = {}
        for m in MOMENTS:
            if (m in x) != (m in y):
                raise OscarError(f"layer {i}: moment {m!r} is in one file only (softmax "
                                 "statistics on in one run and off in the other?)")
            if m not in x:
                continue
            r = rel_diff(x[m], y[m])
            if not r == r:  # NaN
                raise OscarError(f"layer {i}: moment {m!r} is not finite in one of the files")
            row[m] = r
            if r > worst[2]:
                worst = (i, m, r)
        layers[i] = row
    top = {m: max(layers[i][m] for i in layers) for m in MOMENTS if m in layers[min(layers)]}
    return {"layers": layers, "max": top, "worst": worst,
            "num_tokens": int(la[min(la)]["n"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stats_a", help="statistics directory (holds stats.pt)")
    ap.add_argument("stats_b")
    ap.add_argument("--tol", type=float, default=1e-2,
                    help="largest relative difference accepted (exit 1 above it)")
    ap.add_argument("--json", default=None, help="write the comparison here")
    args = ap.parse_args(argv)
    try:
        res = compare_stats(load_stats(args.stats_a), load_stats(args.stats_b))
    except OscarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    layer, moment, rel = res["worst"]
    print(f"{res['num_tokens']} tokens per layer; largest relative difference {rel:.3g} "
          f"(layer {layer}, {moment}); per moment: "
          + ", ".join(f"{m} {v:.2g}" for m, v in res["max"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res | {"tol": args.tol, "ok": rel <= args.tol}, f, indent=1)
    return 0 if rel <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
