"""Device check: calibration captured inside SGLang == the HF hooks' statistics (issue #4), and
the rotations fitted from either give the same quality.

On the H200 with sglang 0.5.17 staged in /tmp/site and the transformers overlay in /tmp/ov
(docs/sglang_integration.md), the reference model carried to .carry/tiny:

    PYTHONPATH=/tmp/ov:/tmp/site:$PWD python scripts/sglang_capture_check.py \
        --model .carry/tiny --out $OUT/capture [--tp 1]

Steps (each a subprocess, logs under OUT): (1) `python -m oscar_kv calibrate` (HF hooks, bf16
model, no holdout) on the first --max-tokens tokens of heldout_tokens.npy, run without the
overlay (the HF path needs the machine's transformers); (2) `python -m
oscar_kv.capture.server_capture` on the same sequences inside `launch_server` (bf16 KV, the
plugin's capture hooks); (3) `oscar_kv.capture.compare` of the two stats.pt (bf16 forwards of
two implementations: ~1e-3 expected, --tol 2e-2); (4) `fit` both with fixed clips and `eval`
both (oscar method, --eval-seqs windows): the perplexities must agree within --ppl-tol.
Writes OUT/capture_check.json; exit 1 when a check fails. With --tp N > 1 (several GPUs), step
(2) runs at that TP size (issue #6: also compare against a TP=1 capture).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from sglang_device_check import ensure_plugin_entry_point, hf_env  # noqa: E402

CLIPS = ("0.96", "0.92")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF model dir with heldout_tokens.npy")
    ap.add_argument("--out", required=True, help="new output directory")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--eval-seqs", type=int, default=4)
    ap.add_argument("--tol", type=float, default=2e-2, help="largest relative moment difference")
    ap.add_argument("--ppl-tol", type=float, default=5e-3, help="relative perplexity difference")
    ap.add_argument("--overlay", action="append", default=None,
                    help="PYTHONPATH entries the HF steps drop (default /tmp/ov)")
    ap.add_argument("--server-args", default="--attention-backend triton --sampling-backend "
                    "pytorch --mem-fraction-static 0.3 --dtype bfloat16")
    return ap.parse_args(argv)


def commands(args, out: Path) -> dict[str, list[str]]:
    """The subprocess command of every step (name -> argv)."""
    py, m = sys.executable, str(args.model)
    data = str(Path(args.model) / "heldout_tokens.npy")
    common = ["--data", data, "--max-tokens", str(args.max_tokens), "--seq-len",
              str(args.seq_len)]
    cmds = {
        "hf_calibrate": [py, "-m", "oscar_kv", "calibrate", "--model", m, "--dtype", "bfloat16",
                         "--device", "cuda", "--holdout-seqs", "0", *common,
                         "--out", str(out / "hf")],
        "sglang_capture": [py, "-m", "oscar_kv.capture.server_capture", "--model-path", m,
                           "--tp", str(args.tp), *common, "--server-args", args.server_args,
                           "--out", str(out / "sglang")],
        "compare": [py, "-m", "oscar_kv.capture.compare", str(out / "hf"), str(out / "sglang"),
                    "--tol", str(args.tol), "--json", str(out / "compare.json")],
    }
    for side in ("hf", "sglang"):
        cmds[f"fit_{side}"] = [py, "-m", "oscar_kv", "fit", "--stats", str(out / side),
                               "--out", str(out / side / "rot"), "--clip-k", CLIPS[0],
                               "--clip-v", CLIPS[1]]
        cmds[f"eval_{side}"] = [py, "-m", "oscar_kv", "eval", "--model", m, "--rotations",
                                str(out / side / "rot"), "--data", data, "--seq-len",
                                str(args.seq_len), "--num-seqs", str(args.eval_seqs),
                                "--methods", "oscar", "--no-copy",
                                "--json", str(out / f"eval_{side}.json")]
    return cmds


def run(name: str, cmd: list[str], env: dict, out: Path) -> int:
    print(f"== {name}: {shlex.join(cmd)}", flush=True)
    with open(out / f"{name}.log", "w") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    print((out / f"{name}.log").read_text()[-1500:], flush=True)
    return rc


def oscar_ppl(path: Path) -> float:
    """The oscar method's perplexity from an `oscar_kv eval --json` file."""
    rows = json.loads(path.read_text())["results"]
    return float(next(r for r in rows if r["method"] == "oscar")["ppl"])


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"error: {out} is not empty; give a new directory")
    out.mkdir(parents=True, exist_ok=True)
    plugin = ensure_plugin_entry_point(Path(tempfile.mkdtemp(prefix="oscar-capture-check-")))
    cmds, report = commands(args, out), {"args": vars(args), "plugin": plugin, "steps": {}}
    plain, full = hf_env(args.overlay), dict(os.environ)
    for name in ("hf_calibrate", "sglang_capture", "compare", "fit_hf", "fit_sglang",
                 "eval_hf", "eval_sglang"):
        rc = run(name, cmds[name], full if name == "sglang_capture" else plain, out)
        report["steps"][name] = rc
        if rc not in (0, 1) or (rc == 1 and name != "compare"):
            break
    if (out / "compare.json").is_file():
        cmp = json.loads((out / "compare.json").read_text())
        report["compare"] = {"max": cmp["max"], "worst": cmp["worst"], "ok": cmp["ok"],
                             "num_tokens": cmp["num_tokens"]}
    if all((out / f"eval_{s}.json").is_file() for s in ("hf", "sglang")):
        ppl = {s: oscar_ppl(out / f"eval_{s}.json") for s in ("hf", "sglang")}
        rel = abs(ppl["sglang"] - ppl["hf"]) / ppl["hf"]
        report["ppl"] = ppl | {"rel_diff": rel, "ok": rel <= args.ppl_tol}
    report["ok"] = bool(report.get("compare", {}).get("ok") and report.get("ppl", {}).get("ok"))
    (out / "capture_check.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in report if k != "args"}, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
