"""`python -m oscar_kv` / `oscar-kv`: calibrate -> fit -> eval, or all three with `pipeline`.

Flags and JSON keys here are a contract used by external checks; keep them stable. Every
user error exits with status 2 and one sentence on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from oscar_kv.config import QuantSpec, WindowSpec
from oscar_kv.errors import OscarError

DEFAULT_METHODS = "bf16,naive,hadamard,oscar"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model directory (local files only)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype for the model (float32 is fastest on CPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")


def _add_calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True,
                   help="calibration tokens (.npy), text/.jsonl, or a GPQA csv with --gpqa")
    p.add_argument("--gpqa", action="store_true", help="treat --data as the GPQA-diamond csv")
    p.add_argument("--max-tokens", type=int, default=200_000)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--holdout-seqs", type=int, default=2,
                   help="extra sequences kept raw (not in the moments) for the clip search")
    p.add_argument("--softmax-stats", action=argparse.BooleanOptionalAction, default=True,
                   help="also accumulate the causal-softmax V moment for the `svv` estimator "
                        "(the dominant pass-1 cost on CPU)")
    p.add_argument("--batch-size", type=int, default=1, help="calibration sequences per forward")
    p.add_argument("--raw-dump", default=None,
                   help="also write the reference's raw layer_<l>/{q,k,v} dump here")


def _add_fit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="qqt_sst")
    p.add_argument("--composition", default="r_h_pbr")
    p.add_argument("--fit-clip", action=argparse.BooleanOptionalAction, default=True,
                   help="search per-layer clip ratios on held-out calibration sequences")
    p.add_argument("--clip-search", default="auto", choices=["auto", "model", "layer", "off"],
                   help="model: one K/V ratio by the model's next-token KL on held-out "
                        "calibration sequences (needs --model); layer: per-layer attention "
                        "proxies; auto: model if --model is given, else layer")
    p.add_argument("--recall-probes", type=int, default=8,
                   help="copy probes per held-out sequence in the model-level clip selection")
    p.add_argument("--clip-k", type=float, default=None, help="fixed K clip ratio (no search)")
    p.add_argument("--clip-v", type=float, default=None, help="fixed V clip ratio (no search)")
    p.add_argument("--center-k", action=argparse.BooleanOptionalAction, default=True,
                   help="store calibration key means and quantize k - mean (attention is "
                        "invariant to it; lowers the INT2 key error)")


def _add_format_args(p: argparse.ArgumentParser) -> None:
    d_w, d_q = WindowSpec(), QuantSpec()
    p.add_argument("--sink-tokens", type=int, default=d_w.sink_tokens)
    p.add_argument("--recent-tokens", type=int, default=d_w.recent_tokens)
    p.add_argument("--flush-block", type=int, default=d_w.flush_block)
    p.add_argument("--group-size", type=int, default=d_q.group_size)
    p.add_argument("--scale-dtype", default=d_q.scale_dtype)
    p.add_argument("--quantizer", default=d_q.quantizer)


def _add_eval_args(p: argparse.ArgumentParser, need_data: bool = True) -> None:
    if need_data:
        p.add_argument("--data", required=True, help="evaluation tokens (.npy) or text file")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--num-seqs", type=int, default=16)
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--json", default=None, help="write results JSON here")
    p.add_argument("--no-copy", action="store_true", help="skip the long-range copy probes")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="oscar-kv", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("calibrate", help="phase 1: stream Q/K/V statistics from an HF model")
    _add_model_args(p)
    _add_calib_args(p)
    p.add_argument("--out", required=True, help="statistics directory to write")

    p = sub.add_parser("fit", help="phase 2: fit per-layer rotations and clip ratios")
    p.add_argument("--stats", required=True)
    p.add_argument("--model", default=None, help="HF model directory (for --clip-search model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="rotation directory to write")
    _add_fit_args(p)
    _add_format_args(p)

    p = sub.add_parser("eval", help="perplexity / KL / copy accuracy per method")
    _add_model_args(p)
    p.add_argument("--rotations", default=None, help="rotation directory (needed for oscar)")
    _add_eval_args(p)
    _add_format_args(p)

    p = sub.add_parser("pipeline", help="calibrate, fit and eval in one go")
    _add_model_args(p)
    _add_calib_args(p)
    _add_fit_args(p)
    _add_format_args(p)
    p.add_argument("--work", required=True, help="directory for stats/, rotations/, eval.json")
    p.add_argument("--eval-seq-len", type=int, default=2048)
    p.add_argument("--num-seqs", type=int, default=16)
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--no-copy", action="store_true")
    return ap


def _specs(args) -> tuple[QuantSpec, WindowSpec]:
    quant = QuantSpec(group_size=args.group_size, scale_dtype=args.scale_dtype,
                      quantizer=args.quantizer)
    window = WindowSpec(sink_tokens=args.sink_tokens, recent_tokens=args.recent_tokens,
                        flush_block=args.flush_block)
    return quant, window


def cmd_calibrate(args, out: str | None = None) -> dict:
    from oscar_kv.workflows import run_calibrate

    return run_calibrate(model=args.model, data=args.data, gpqa=args.gpqa,
                         max_tokens=args.max_tokens, seq_len=args.seq_len,
                         holdout_seqs=args.holdout_seqs, out=out or args.out,
                         raw_dump=args.raw_dump, dtype=args.dtype, device=args.device,
                         softmax_stats=args.softmax_stats, batch_size=args.batch_size)


def cmd_fit(args, stats: str | None = None, out: str | None = None) -> dict:
    from oscar_kv.workflows import run_fit

    quant, window = _specs(args)
    fixed = None
    if args.clip_k is not None or args.clip_v is not None:
        fixed = (args.clip_k if args.clip_k is not None else 1.0,
                 args.clip_v if args.clip_v is not None else 1.0)
    return run_fit(stats=stats or args.stats, out=out or args.out, method=args.method,
                   composition=args.composition, fit_clip=args.fit_clip, fixed_clip=fixed,
                   quant=quant, window=window, model=args.model, clip_search=args.clip_search,
                   dtype=args.dtype, device=args.device, recall_probes=args.recall_probes,
                   center_k=args.center_k)


def cmd_eval(args, rotations: str | None = None, data: str | None = None,
             seq_len: int | None = None, json_out: str | None = None) -> dict:
    from oscar_kv.workflows import run_eval

    quant, window = _specs(args)
    return run_eval(model=args.model, rotations=rotations or args.rotations,
                    data=data or args.data, seq_len=seq_len or args.seq_len,
                    num_seqs=args.num_seqs, methods=[m for m in args.methods.split(",") if m],
                    quant=quant, window=window, json_out=json_out or args.json,
                    copy=not args.no_copy, dtype=args.dtype, device=args.device)


def cmd_pipeline(args) -> dict:
    work = Path(args.work)
    t0 = time.time()
    cmd_calibrate(args, out=str(work / "stats"))
    cmd_fit(args, stats=str(work / "stats"), out=str(work / "rotations"))
    res = cmd_eval(args, rotations=str(work / "rotations"), data=args.data,
                   seq_len=args.eval_seq_len, json_out=str(work / "eval.json"))
    print(f"pipeline finished in {time.time() - t0:.0f} s; results in {work / 'eval.json'}")
    return res


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"calibrate": cmd_calibrate, "fit": cmd_fit, "eval": cmd_eval,
                "pipeline": cmd_pipeline}
    try:
        handlers[args.cmd](args)
    except OscarError as e:
        print(f"oscar-kv: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"oscar-kv: error: file not found: {e.filename or e}", file=sys.stderr)
        return 2
    return 0


def _dump(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)


if __name__ == "__main__":
    sys.exit(main())
