"""Phase 1 for models too big for the HF path: calibrate inside a tensor-parallel SGLang server.

    python -m oscar_kv.capture.server_capture --model-path M --tp 4 --data gpqa_diamond.csv \
        --gpqa --max-tokens 30000 --out STATS_DIR

Starts `python -m sglang.launch_server` with the plugin's capture flags
(`SGLANG_OSCAR_CAPTURE_DIR=STATS_DIR`, `SGLANG_OSCAR_CAPTURE_TOKENS` = the exact number of
calibration tokens), prefills every calibration sequence once through the native `/generate`
endpoint (`input_ids`, one new token, each sequence in one chunk so that the capture sees it
from position 0), waits for every rank's pass-1 file, stops the server and merges the ranks into
STATS_DIR/stats.pt (`oscar_kv.sglang_plugin.capture.merge_capture`). The calibration sequences
are exactly those `python -m oscar_kv calibrate` would use for the same data and budget. No
holdout.pt is written: fit with `--clip-k/--clip-v`, `--clip-search off` or `--clip-search model`.

No sglang import here: the server is a subprocess and the protocol is HTTP.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

from oscar_kv.errors import OscarError
from oscar_kv.server_process import launched, wait_until

CAPTURE_DIR_ENV = "SGLANG_OSCAR_CAPTURE_DIR"
CAPTURE_TOKENS_ENV = "SGLANG_OSCAR_CAPTURE_TOKENS"


def server_command(model_path: str, tp: int, port: int, seq_len: int, extra: str = "") -> list:
    """The launch command: radix cache off (a cached prefix would hide tokens from the capture),
    no warmup request (it would be captured), and a prefill chunk that holds a whole
    calibration sequence."""
    return [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path,
            "--tensor-parallel-size", str(tp), "--host", "127.0.0.1", "--port", str(port),
            "--trust-remote-code", "--disable-radix-cache", "--skip-server-warmup",
            "--chunked-prefill-size", str(max(seq_len, 8192)), *shlex.split(extra)]


def _post(url: str, payload: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"{}")
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise OscarError(f"the calibration request to {url} failed ({type(e).__name__}: {e}); "
                         "see server.log in the output directory") from None


def healthy(base: str) -> bool:
    """Ready to take requests. /get_model_info answers without generating: /health runs a
    one-token generation, which the capture would record."""
    try:
        with urllib.request.urlopen(f"{base}/get_model_info", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def prefill_all(base: str, sequences: list[list[int]], timeout: float = 600.0) -> int:
    """POST each sequence to /generate (one new token, greedy); returns tokens sent."""
    sent = 0
    for ids in sequences:
        _post(f"{base}/generate", {"input_ids": ids,
                                   "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}},
              timeout)
        sent += len(ids)
    return sent


def ranks_done(capture_dir: Path, tp: int) -> bool:
    """True once every rank wrote rank<r>/pass1.pt (the plugin does so when the token budget
    is reached)."""
    return len(list(capture_dir.glob("rank*/pass1.pt"))) >= tp


def _check_counts(out_dir: Path, tokens: int, sequences: int) -> None:
    """The merged statistics must hold exactly the calibration sequences: anything else (a
    warmup or health request captured, a sequence split by chunked prefill) is reported."""
    from oscar_kv.capture.stats import load_stats

    stats = load_stats(out_dir)
    got = (int(stats.get("num_tokens", -1)), int(stats.get("num_sequences", -1)))
    if got != (tokens, sequences):
        raise OscarError(f"the capture in {out_dir} holds {got[0]} tokens in {got[1]} sequences "
                         f"but {tokens} tokens in {sequences} sequences were sent; check "
                         f"server.log for other requests or chunked prompts")


def run_server_capture(model_path: str, data: str, out: str, tp: int = 1,
                       max_tokens: int = 30_000, seq_len: int = 2048, gpqa: bool = False,
                       port: int = 31058, server_args: str = "", server_cmd: str = "",
                       health_timeout: float = 1200.0, capture_timeout: float = 600.0,
                       keep_spill: bool = False, tokenizer=None) -> Path:
    """Calibrate `model_path` inside an SGLang server; returns OUT (with stats.pt)."""
    from oscar_kv.capture.data import load_calibration_data, load_hf_tokenizer
    from oscar_kv.sglang_plugin.capture import merge_capture

    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise OscarError(f"{out_dir} is not empty; the capture writes per-rank files there, "
                         f"give a new directory")
    kind = "gpqa" if gpqa else "auto"
    if tokenizer is None and not (data.endswith(".npy") and not gpqa):
        tokenizer = load_hf_tokenizer(model_path)
    calib = load_calibration_data(data, kind=kind, tokenizer=tokenizer, seq_len=seq_len,
                                  max_tokens=max_tokens, holdout_seqs=0)
    seqs = [s.tolist() for s in calib.sequences]
    total = sum(len(s) for s in seqs)
    if total == 0:
        raise OscarError(f"no calibration tokens in {data}; check the file and --max-tokens")
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env[CAPTURE_DIR_ENV] = str(out_dir.resolve())
    env[CAPTURE_TOKENS_ENV] = str(total)
    cmd = (shlex.split(server_cmd) + ["--port", str(port)] if server_cmd
           else server_command(model_path, tp, port, max(len(s) for s in seqs), server_args))
    print(f"capture: {len(seqs)} sequences, {total} tokens -> {out_dir}")
    print("server cmd: " + shlex.join(cmd))
    base, log = f"http://127.0.0.1:{port}", out_dir / "server.log"
    with launched(cmd, env, log) as proc:
        wait_until(lambda: healthy(base), proc, health_timeout, 2.0,
                   "it was healthy (raise --health-timeout if it is only slow)", log)
        prefill_all(base, seqs)
        wait_until(lambda: ranks_done(out_dir, tp), proc, capture_timeout, 2.0,
                   f"all {tp} ranks wrote their capture (rank*/pass1.pt)", log)
    merge_capture(out_dir)
    _check_counts(out_dir, total, len(seqs))
    if not keep_spill:
        for rank_dir in out_dir.glob("rank*"):
            shutil.rmtree(rank_dir / "kv", ignore_errors=True)
    print(f"calibrated on {total} tokens inside SGLang (tp {tp}) -> {out_dir}/stats.pt")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m oscar_kv.capture.server_capture",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--data", required=True, help="token .npy, text file or GPQA csv")
    ap.add_argument("--gpqa", action="store_true", help="--data is the GPQA-diamond csv")
    ap.add_argument("--out", required=True, help="statistics directory to create")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=30_000)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--port", type=int, default=31058)
    ap.add_argument("--server-args", default="", help="extra launch_server arguments")
    ap.add_argument("--server-cmd", default="", help="replace the launch command (+ --port)")
    ap.add_argument("--health-timeout", type=float, default=1200.0)
    ap.add_argument("--capture-timeout", type=float, default=600.0)
    ap.add_argument("--keep-spill", action="store_true",
                    help="keep the spilled K/V (rank*/kv) after the merge")
    args = ap.parse_args(argv)
    try:
        run_server_capture(args.model_path, args.data, args.out, args.tp, args.max_tokens,
                           args.seq_len, args.gpqa, args.port, args.server_args,
                           args.server_cmd, args.health_timeout, args.capture_timeout,
                           args.keep_spill)
    except OscarError as e:
        print(f"oscar-kv server capture: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
