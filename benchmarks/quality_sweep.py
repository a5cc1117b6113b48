"""Quality sweep on the reference model: calibrate -> fit -> evaluate many KV variants.

Prints and saves (JSON) ppl / KL / top-1 / copy accuracy for bf16, naive, hadamard and OSCAR
with several clip settings (none, the reference's fixed 0.96/0.92, global grids and the fitted
per-layer ratios), at each requested sequence length. Meant for a GPU (seconds per variant);
works on CPU with small --num-seqs.

    python benchmarks/quality_sweep.py --model ../shared/models/oscar-tiny-code-lm \
        --work runs/sweep --seq-lens 2048,4096
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from oscar_kv.config import QuantSpec, WindowSpec
from oscar_kv.workflows import run_calibrate


def _variants(rot, fitted: dict, grid_k, grid_v):
    n = rot.num_layers
    yield "oscar_noclip", dataclasses.replace(rot, clip_k=[1.0] * n, clip_v=[1.0] * n)
    yield "oscar_ref_0.96_0.92", dataclasses.replace(rot, clip_k=[0.96] * n, clip_v=[0.92] * n)
    yield from fitted.items()
    for ck in grid_k:
        for cv in grid_v:
            yield f"oscar_k{ck}_v{cv}", dataclasses.replace(rot, clip_k=[ck] * n, clip_v=[cv] * n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default=None, help="token .npy (default: the model's heldout)")
    ap.add_argument("--work", required=True)
    ap.add_argument("--calib-tokens", type=int, default=200_000)
    ap.add_argument("--calib-seq-len", type=int, default=2048)
    ap.add_argument("--seq-lens", default="2048")
    ap.add_argument("--num-seqs", type=int, default=16)
    ap.add_argument("--grid-k", default="1.0,0.98,0.96")
    ap.add_argument("--grid-v", default="1.0,0.96,0.92,0.88")
    ap.add_argument("--skip-calibrate", action="store_true")
    ap.add_argument("--center-k", action=argparse.BooleanOptionalAction, default=True,
                    help="centered keys (the default fit); --no-center-k for the uncentered "
                         "rows of the README table")
    ap.add_argument("--fits", default="qqt_sst:attn_kl:out_mse",
                    help="comma list of method:k_objective:v_objective fitted variants")
    args = ap.parse_args()

    from oscar_kv.capture.calibrate import load_hf_model
    from oscar_kv.evals.lm_eval import evaluate_methods
    from oscar_kv.evals.report import format_results_table
    from oscar_kv.evals.tokens import copy_probes, lm_windows, load_token_file
    from oscar_kv.fit.checkpoint import load_rotation_set
    from oscar_kv.hf import model_geometry

    work = Path(args.work)
    data = args.data or str(Path(args.model) / "heldout_tokens.npy")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    if not args.skip_calibrate:
        run_calibrate(args.model, data, str(work / "stats"), max_tokens=args.calib_tokens,
                      seq_len=args.calib_seq_len, holdout_seqs=2, device=dev, batch_size=8,
                      progress=False)
    quant, window = QuantSpec(), WindowSpec()
    from oscar_kv.fit.pipeline import fit_rotations

    model = load_hf_model(args.model, dtype="float32", device=dev)
    fitted = {}
    for spec in args.fits.split(","):
        method, kobj, vobj = spec.split(":")
        d = work / f"rot_{method}_{kobj}_{vobj}"
        fit_rotations(work / "stats", d, method=method, fit_clip=True, quant=quant,
                      window=window, k_objective=kobj, v_objective=vobj,
                      center_k=args.center_k)
        fitted[f"fit_{method}_{kobj}_{vobj}"] = load_rotation_set(
            d, expect=model_geometry(model))
    print(f"calibrate+fit: {time.time() - t0:.1f} s")
    base = next(iter(fitted.values()))
    tokens = load_token_file(data)
    grid_k = [float(x) for x in args.grid_k.split(",")]
    grid_v = [float(x) for x in args.grid_v.split(",")]
    out = {"config": vars(args), "runs": {},
           "fitted": {k: {"clip_k": r.clip_k, "clip_v": r.clip_v} for k, r in fitted.items()}}
    for seq_len in [int(s) for s in args.seq_lens.split(",")]:
        lm_ids = lm_windows(tokens, seq_len, args.num_seqs)
        copy_ids, copy_mask = copy_probes(tokens, seq_len, args.num_seqs)
        rows = evaluate_methods(model, ["bf16", "naive", "hadamard"], lm_ids, copy_ids,
                                copy_mask, quant=quant, window=window, progress=False)
        for name, rs in _variants(base, fitted, grid_k, grid_v):
            r = evaluate_methods(model, ["oscar"], lm_ids, copy_ids, copy_mask, rotations=rs,
                                 quant=quant, window=window, progress=False)[0]
            r["method"] = name
            rows.append(r)
        print(f"\n## seq_len {seq_len}, {args.num_seqs} sequences\n")
        print(format_results_table(rows))
        out["runs"][str(seq_len)] = rows
        work.mkdir(parents=True, exist_ok=True)
        (work / "sweep.json").write_text(json.dumps(out, indent=2))
    print(f"\ntotal {time.time() - t0:.1f} s")
    for k, r in fitted.items():
        print(f"{k}: clip_k={r.clip_k} clip_v={r.clip_v}")


if __name__ == "__main__":
    main()
