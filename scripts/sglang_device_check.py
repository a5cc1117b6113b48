"""On-device check of `--kv-cache-dtype int2` in SGLang 0.5.17 (H200): correctness against the HF
`oscar` path and a BF16 engine, CUDA-graph padding, chunked prefill, and throughput.

Run from the repo root on the device, sglang 0.5.17 + deps in /tmp/site and the transformers
5.12.1 overlay in /tmp/ov (docs/sglang_integration.md §1.4), the reference model and a rotation
directory from `python -m oscar_kv fit` (one k_rotation_*.pt, one v_rotation_*.pt) carried:

    PYTHONPATH=/tmp/ov:/tmp/site:$PWD python scripts/sglang_device_check.py \
        --model shared/oscar-tiny-code-lm --rotations shared/rotations-tiny --out $OUT

Phases (one int2 engine, one BF16 engine; the HF reference runs in a subprocess whose
PYTHONPATH drops the --overlay entries, so it uses the machine's transformers):
  A  sequential prompts: a long one chunked by --chunk (> sink + recent: the INT2 body and the
     flushed prefix are read by later chunks), one long single-chunk prompt, a shared-prefix pair
     (the second must hit the radix cache on both engines; on int2 exactly the window-aware cap
     `expected_int2_hit`: the cached sink + INT2 body, never the recent window), a short one;
  B  six short prompts at once (one prefill batch, no chunking) with long, different
     continuations: decode crosses sink + recent (flushes every 8 steps) while the batch shrinks
     6 -> 1 through padded CUDA-graph sizes (5, 6, 7 are padded to 8 by default);
  C  throughput: --bench-batch prompts of --bench-len tokens, --bench-new new tokens, both
     engines at the same --mem-fraction-static; KV capacity (max_total_num_tokens) of each.
For A and B every SGLang continuation is teacher-forced through HF (same chunking; a radix hit
of m tokens is a chunk boundary at m, and the first request of the pair is one chunk, so HF's
[0, m) chunk computes what it cached): top-1 agreement and mean |logprob difference| of
SGLang's tokens, int2 vs HF `oscar` and, as the noise floor, BF16 engine vs HF `bf16`, overall
and for the hit prompt. The bench flushes the radix cache before each timed run, so both
engines prefill every prompt. Writes $OUT/sglang_check.json; exits 1 on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

WINDOW = (64, 256)  # sink, recent: the plugin's defaults, set explicitly for both paths


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF model dir (config, weights, tokens)")
    ap.add_argument("--rotations", required=True, help="dir with k_rotation_*.pt, v_rotation_*.pt")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="output dir")
    ap.add_argument("--overlay", action="append", default=None,
                    help="PYTHONPATH entries the HF reference drops (default /tmp/ov)")
    ap.add_argument("--chunk", type=int, default=512, help="--chunked-prefill-size")
    ap.add_argument("--mem-fraction-static", type=float, default=0.05)
    ap.add_argument("--max-running-requests", type=int, default=32)
    ap.add_argument("--absorb", type=int, default=1, help="SGLANG_OSCAR_ABSORB_V_ROTATION")
    ap.add_argument("--new-tokens", type=int, default=64, help="phase A continuation length")
    ap.add_argument("--bench-batch", type=int, default=32)
    ap.add_argument("--bench-len", type=int, default=2048)
    ap.add_argument("--bench-new", type=int, default=256)
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--min-top1", type=float, default=0.90)
    ap.add_argument("--top1-slack", type=float, default=0.03,
                    help="int2 top-1 may trail the BF16 floor by this much")
    ap.add_argument("--dlp-factor", type=float, default=2.0)
    ap.add_argument("--dlp-slack", type=float, default=0.02)
    return ap.parse_args(argv)


# ---- setup ---------------------------------------------------------------------------------
def ensure_plugin_entry_point(tmp: Path) -> str:
    """With a PYTHONPATH-only checkout there is no installed entry point: write a dist-info
    that declares `sglang.srt.plugins: oscar_kv_int2` and put it on sys.path and PYTHONPATH
    (SGLang's worker processes inherit the environment)."""
    from importlib.metadata import entry_points

    if any(e.name == "oscar_kv_int2" for e in entry_points(group="sglang.srt.plugins")):
        return "installed"
    info = tmp / "oscar_kv_device_check-0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: oscar-kv-device-check\n"
                                   "Version: 0.0\n")
    (info / "entry_points.txt").write_text(
        "[sglang.srt.plugins]\noscar_kv_int2 = oscar_kv.sglang_plugin:register\n")
    sys.path.insert(0, str(tmp))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(tmp)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return f"dist-info written to {tmp}"


def hf_env(overlay: list[str] | None) -> dict:
    """os.environ for a subprocess on the machine's transformers: PYTHONPATH without the
    SGLang-only overlay entries (default /tmp/ov)."""
    drop = {os.path.abspath(p) for p in (overlay or ["/tmp/ov"])}
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if p and os.path.abspath(p) not in drop]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path))


def rotation_files(rot_dir: Path) -> tuple[Path, Path]:
    ks, vs = sorted(rot_dir.glob("k_rotation_*.pt")), sorted(rot_dir.glob("v_rotation_*.pt"))
    if len(ks) != 1 or len(vs) != 1:
        sys.exit(f"error: {rot_dir} must hold exactly one k_rotation_*.pt and one "
                 "v_rotation_*.pt; run `python -m oscar_kv fit --stats ... --out DIR` first")
    return ks[0], vs[0]


def load_tokens(model_dir: Path):
    import numpy as np

    path = model_dir / "heldout_tokens.npy"
    if not path.is_file():
        sys.exit(f"error: {path} is missing; carry the whole reference model directory")
    toks = np.load(path).astype("int64")
    return [int(t) for t in toks[toks != 0][:200_000]]


def build_prompts(toks: list[int], args) -> dict:
    """Phase A (sequential) and B (batched) prompts: name -> (ids, max_new_tokens)."""
    p, r = WINDOW
    long_len = 3 * args.chunk - 36  # three chunks, the last partial
    shared = toks[5000:5000 + p + r + 80]
    a = {"long_chunked": (toks[:long_len], args.new_tokens),
         "long_one_chunk": (toks[2000:2000 + min(args.chunk, p + r + 150)], args.new_tokens),
         "shared_a": (shared + toks[7000:7060], args.new_tokens),
         "shared_b": (shared + toks[8000:8050], args.new_tokens),
         "short": (toks[9000:9040], args.new_tokens)}
    lens, news = [7, 33, 64, 90, 120, 150], [700, 600, 500, 400, 300, 200]
    b = {f"batch_{i}": (toks[10000 + 1000 * i:10000 + 1000 * i + n], m)
         for i, (n, m) in enumerate(zip(lens, news, strict=True))}
    if sum(lens) > args.chunk:
        sys.exit(f"error: phase B prompts ({sum(lens)} tokens) must fit one --chunk")
    if len(a["shared_a"][0]) > args.chunk:
        sys.exit(f"error: shared_a ({len(a['shared_a'][0])} tokens) must fit one --chunk")
    return {"A": a, "B": b}


def expected_int2_hit(prompts: dict, args) -> int:
    """Cached tokens shared_b must get on the int2 engine: what shared_a's release inserted
    (its committed tokens up to the body end), capped for shared_b's window and chunk."""
    from oscar_kv.config import WindowSpec
    from oscar_kv.sglang_plugin.pool_index import cacheable_prefix, shareable_prefix

    w = WindowSpec(*WINDOW, 8)
    (ids_a, new_a), (ids_b, _) = prompts["A"]["shared_a"], prompts["A"]["shared_b"]
    common = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=False))
                   if x != y),
                  min(len(ids_a), len(ids_b)))
    cached = min(cacheable_prefix(len(ids_a) + new_a - 1, w), common, len(ids_b) - 1)
    return shareable_prefix(cached, len(ids_b), w, args.chunk)


def engine_kwargs(args, kind: str) -> dict:
    kw = dict(model_path=str(args.model), sampling_backend="pytorch", random_seed=0,
              mem_fraction_static=args.mem_fraction_static, chunked_prefill_size=args.chunk,
              max_running_requests=args.max_running_requests, skip_tokenizer_init=True,
              log_level="warning")
    if kind == "int2":
        kw.update(kv_cache_dtype="int2", attention_backend="int2_triton")
    else:
        kw.update(attention_backend="triton")
    return kw


def int2_env(args) -> dict:
    k, v = rotation_files(Path(args.rotations))
    return {"SGLANG_ENABLE_MIXED_KV_WINDOWS": "1", "SGLANG_MIXED_KV_PREFIX_TOKENS": str(WINDOW[0]),
            "SGLANG_MIXED_KV_RECENT_TOKENS": str(WINDOW[1]), "SGLANG_OSCAR_K_ROTATION_PATH": str(k),
            "SGLANG_OSCAR_V_ROTATION_PATH": str(v),
            "SGLANG_OSCAR_ABSORB_V_ROTATION": str(args.absorb)}


# ---- SGLang --------------------------------------------------------------------------------
def generate(engine, prompts: dict, batched: bool) -> dict:
    names = list(prompts)
    params = [{"temperature": 0.0, "max_new_tokens": prompts[n][1], "ignore_eos": True}
              for n in names]
    ids = [prompts[n][0] for n in names]
    if batched:
        outs = engine.generate(input_ids=ids, sampling_params=params, return_logprob=True)
    else:
        outs = [engine.generate(input_ids=i, sampling_params=s, return_logprob=True)
                for i, s in zip(ids, params, strict=True)]
    res = {}
    for n, o in zip(names, outs, strict=True):
        lp = o["meta_info"]["output_token_logprobs"]
        res[n] = {"tokens": [int(t[1]) for t in lp], "logprobs": [float(t[0]) for t in lp],
                  "cached_tokens": int(o["meta_info"].get("cached_tokens", 0))}
        if len(lp) != prompts[n][1]:
            raise RuntimeError(f"{n}: {len(lp)} tokens generated, {prompts[n][1]} asked")
    return res


def bench(engine, toks: list[int], args) -> dict:
    ids = [toks[20000 + 97 * i:20000 + 97 * i + args.bench_len] for i in range(args.bench_batch)]
    if any(len(x) != args.bench_len for x in ids):
        raise RuntimeError("not enough held-out tokens for --bench-len x --bench-batch")

    def run(new: int) -> float:
        engine.flush_cache()  # no radix hits: every run prefills every prompt
        t = time.perf_counter()
        engine.generate(input_ids=ids, sampling_params={"temperature": 0.0, "ignore_eos": True,
                                                        "max_new_tokens": new})
        return time.perf_counter() - t

    run(4)  # warm-up (Triton compiles, graph replays)
    t_prefill, t_full = run(1), run(args.bench_new)
    decode = args.bench_batch * (args.bench_new - 1) / max(t_full - t_prefill, 1e-9)
    return {"batch": args.bench_batch, "prompt_len": args.bench_len, "new": args.bench_new,
            "prefill_s": round(t_prefill, 3),
            "prefill_tok_s": round(args.bench_batch * args.bench_len / t_prefill, 1),
            "seconds": round(t_full, 3), "output_tok_s": round(args.bench_batch *
                                                                args.bench_new / t_full, 1),
            "decode_tok_s": round(decode, 1)}


def run_engine(kind: str, prompts: dict, toks: list[int], args) -> dict:
    """One engine's outputs with its flags in the environment (restored afterwards)."""
    from oscar_kv.server_process import scoped_environ

    with scoped_environ(int2_env(args) if kind == "int2" else {}):
        return _run_engine(kind, prompts, toks, args)


def _run_engine(kind: str, prompts: dict, toks: list[int], args) -> dict:
    import sglang

    t0 = time.perf_counter()
    engine = sglang.Engine(**engine_kwargs(args, kind))
    try:
        info = engine.get_server_info()
        out = {"startup_s": round(time.perf_counter() - t0, 1),
               "kv_cache_dtype": info.get("kv_cache_dtype"),
               "attention_backend": info.get("attention_backend"),
               "max_total_num_tokens": info.get("max_total_num_tokens"),
               "disable_radix_cache": info.get("disable_radix_cache"),
               "A": generate(engine, prompts["A"], batched=False),
               "B": generate(engine, prompts["B"], batched=True)}
        if not args.skip_bench:
            out["bench"] = bench(engine, toks, args)
        return out
    finally:
        engine.shutdown()


# ---- HF reference (subprocess) -------------------------------------------------------------
def hf_reference(inp: dict) -> dict:
    """Teacher-force each SGLang continuation through the HF model prepared with `method`,
    prefilling in chunks of `chunk` tokens like SGLang. -> {method: {name: {top1, lp}}}."""
    import torch
    from transformers import AutoModelForCausalLM

    from oscar_kv.config import WindowSpec
    from oscar_kv.hf import prepare_model

    dev = inp.get("device", "cuda")
    model = AutoModelForCausalLM.from_pretrained(inp["model"], dtype=torch.bfloat16)
    model = model.to(dev).eval()
    out = {}
    for method, runs in inp["runs"].items():
        handle = prepare_model(model, method, rotations=inp["rotations"],
                               window=WindowSpec(*WINDOW, 8))
        out[method] = {}
        with torch.no_grad():
            for name, run in runs.items():
                ids = torch.tensor([run["prompt"]], device=dev)
                cache = handle.new_cache()
                for a, b in chunk_bounds(ids.shape[1], inp["chunk"], run.get("cached", 0)):
                    logits = model(input_ids=ids[:, a:b], past_key_values=cache,
                                   use_cache=True).logits[0, -1]
                top1, lps = [], []
                for tok in run["tokens"]:
                    lp = torch.log_softmax(logits.float(), dim=-1)
                    top1.append(int(lp.argmax()))
                    lps.append(float(lp[tok]))
                    logits = model(input_ids=torch.tensor([[tok]], device=dev),
                                   past_key_values=cache, use_cache=True).logits[0, -1]
                out[method][name] = {"top1": top1, "lp": lps}
        handle.restore()
    return out


def chunk_bounds(length: int, chunk: int, cached: int = 0) -> list[tuple[int, int]]:
    """SGLang's prefill chunks of a prompt: [0, cached) (what a radix hit reused, computed by
    the earlier request in one chunk), then chunks of `chunk` tokens from `cached`."""
    bounds = [(0, cached)] if cached else []
    return bounds + [(a, min(a + chunk, length)) for a in range(cached, length, chunk)]


def run_hf_subprocess(args, prompts: dict, results: dict, tmp: Path) -> dict:
    runs = {}
    for method, kind in (("oscar", "int2"), ("bf16", "bf16")):
        runs[method] = {n: {"prompt": prompts[ph][n][0], "tokens": results[kind][ph][n]["tokens"],
                            "cached": results[kind][ph][n]["cached_tokens"]}
                        for ph in ("A", "B") for n in prompts[ph]}
    inp = {"model": str(args.model), "rotations": str(args.rotations), "chunk": args.chunk,
           "runs": runs}
    (tmp / "hf_in.json").write_text(json.dumps(inp))
    env = hf_env(args.overlay)
    proc = subprocess.run([sys.executable, __file__, "--hf-reference", str(tmp / "hf_in.json"),
                           str(tmp / "hf_out.json")], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"HF reference failed:\n{proc.stderr[-4000:]}")
    return json.loads((tmp / "hf_out.json").read_text())


# ---- comparison ----------------------------------------------------------------------------
def agreement(sgl: dict, hf: dict) -> dict:
    n = top1 = 0
    dlp = 0.0
    per = {}
    for name, r in sgl.items():
        h = hf[name]
        a = sum(int(t == g) for t, g in zip(r["tokens"], h["top1"], strict=True))
        d = sum(abs(x - y) for x, y in zip(r["logprobs"], h["lp"], strict=True))
        per[name] = {"top1": round(a / len(r["tokens"]), 4),
                     "mean_abs_dlogprob": round(d / len(r["tokens"]), 5)}
        n, top1, dlp = n + len(r["tokens"]), top1 + a, dlp + d
    return {"top1": round(top1 / n, 4), "mean_abs_dlogprob": round(dlp / n, 5), "tokens": n,
            "per_prompt": per}


def verdict(summary: dict, args) -> list[str]:
    fails = []
    i2, bf = summary["engines"]["int2"], summary["engines"]["bf16"]
    if i2["kv_cache_dtype"] != "int2" or i2["attention_backend"] != "int2_triton":
        fails.append(f"int2 engine runs {i2['kv_cache_dtype']}/{i2['attention_backend']}")
    floor, got = summary["bf16_vs_hf_bf16"], summary["int2_vs_hf_oscar"]
    need_top1 = max(args.min_top1, floor["top1"] - args.top1_slack)
    max_dlp = args.dlp_factor * floor["mean_abs_dlogprob"] + args.dlp_slack
    if got["top1"] < need_top1:
        fails.append(f"int2 top-1 agreement with HF oscar {got['top1']} < {need_top1:.4f}")
    if got["mean_abs_dlogprob"] > max_dlp:
        fails.append(f"int2 mean |dlogprob| vs HF oscar {got['mean_abs_dlogprob']} > "
                     f"{max_dlp:.4f}")
    if bf["A"]["shared_b"]["cached_tokens"] <= 0:
        fails.append("the BF16 engine had no radix hit on the shared-prefix pair")
    hit, want = i2["A"]["shared_b"]["cached_tokens"], summary.get("expected_int2_hit")
    if hit <= 0 or (want is not None and hit != want):
        fails.append(f"the int2 engine's radix hit on shared_b is {hit} tokens, expected {want}")
    per = got["per_prompt"].get("shared_b")
    if per and (per["top1"] < need_top1 or per["mean_abs_dlogprob"] > max_dlp):
        fails.append(f"int2 after its radix hit (shared_b) vs HF oscar: top-1 {per['top1']}, "
                     f"mean |dlogprob| {per['mean_abs_dlogprob']}")
    return fails


def environment() -> dict:
    import importlib.metadata as md

    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for pkg in ("sglang", "triton", "transformers"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    return env


def main(argv=None) -> int:
    args = parse_args(argv)
    args.model, args.rotations = Path(args.model).resolve(), Path(args.rotations).resolve()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"args": {k: str(v) for k, v in vars(args).items()},
                     "environment": environment()}
    tmp = Path(tempfile.mkdtemp(prefix="oscar-sglang-check-"))
    try:
        summary["plugin"] = ensure_plugin_entry_point(tmp / "site")
        rotation_files(args.rotations)
        toks = load_tokens(args.model)
        prompts = build_prompts(toks, args)
        summary["expected_int2_hit"] = expected_int2_hit(prompts, args)
        results = {kind: run_engine(kind, prompts, toks, args) for kind in ("int2", "bf16")}
        summary["engines"] = {k: {x: v for x, v in r.items() if x not in ("A", "B")}
                              for k, r in results.items()}
        for kind in results:
            summary["engines"][kind]["A"] = {n: {"cached_tokens": r["cached_tokens"]}
                                             for n, r in results[kind]["A"].items()}
        hf = run_hf_subprocess(args, prompts, results, tmp)
        flat = lambda kind: {n: r for ph in ("A", "B") for n, r in results[kind][ph].items()}
        summary["int2_vs_hf_oscar"] = agreement(flat("int2"), hf["oscar"])
        summary["bf16_vs_hf_bf16"] = agreement(flat("bf16"), hf["bf16"])
        same = [int(a == b) for n, r in flat("int2").items()
                for a, b in zip(r["tokens"], flat("bf16")[n]["tokens"], strict=True)]
        summary["int2_vs_bf16_engine_token_match"] = round(sum(same) / len(same), 4)
        i2, bf = summary["engines"]["int2"], summary["engines"]["bf16"]
        if i2.get("max_total_num_tokens") and bf.get("max_total_num_tokens"):
            summary["kv_capacity_ratio"] = round(i2["max_total_num_tokens"]
                                                 / bf["max_total_num_tokens"], 2)
        if "bench" in i2 and "bench" in bf:
            summary["decode_throughput_ratio"] = round(
                i2["bench"]["decode_tok_s"] / bf["bench"]["decode_tok_s"], 3)
        summary["failures"] = verdict(summary, args)
    except Exception as e:
        summary["failures"] = [f"{type(e).__name__}: {e}"]
        summary["traceback"] = traceback.format_exc()
    summary["ok"] = not summary["failures"]
    (out_dir / "sglang_check.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "traceback"}, indent=2))
    if not summary["ok"]:
        print("FAILED:\n  " + "\n  ".join(summary["failures"]), file=sys.stderr)
        if "traceback" in summary:
            print(summary["traceback"], file=sys.stderr)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--hf-reference":
        result = hf_reference(json.loads(Path(sys.argv[2]).read_text()))
        Path(sys.argv[3]).write_text(json.dumps(result))
        sys.exit(0)
    sys.exit(main())
