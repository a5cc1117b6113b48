"""SGLang serving at 32K context: `--kv-cache-dtype int2` vs BF16 KV, same memory (H200).

A random-weight model with Qwen3-8B geometry (`load_format="dummy"`; the model directory is a
config.json written here, no tokenizer: `skip_tokenizer_init` and input ids) is served by two
`sglang.Engine`s in turn at the same `--mem-fraction-static`: BF16 (stock triton backend) and
int2 (this plugin; Hadamard rotations written here, clips 0.96/0.92, R_V absorbed). Per engine:

  capacity  max_total_num_tokens -> max concurrent requests of context + decode (+ --slack)
            tokens (int2 also bounded by --max-running-requests: each slot's BF16 windows are
            budgeted)
  prefill   B distinct random prompts of --context tokens, max_new_tokens 1 -> prefill tok/s;
            the radix cache keeps the prompts
  decode    the same B prompts again with max_new_tokens 1 + S1, then 1 + S2: each request
            reuses its cached prompt (int2 prefills its BF16 recent window again, <= R + F - 1
            tokens; BF16 one token) and decodes with the batch at B, so
            decode tok/s = B * (S2 - S1) / (T2 - T1): the hit prefill and the ramp cancel.
            An untimed 1 + S1 run goes first (t_s1_warmup): one-time costs of the hit + decode
            path at this batch (first use after a cold start) would otherwise land in T1 only
            and inflate the result; it also gives T1 and T2 the same radix-tree state
  B = min(max concurrent, --max-batch-<kind>)

Reported, with the ratios measured in this run: KV bytes per token (INT2 body with its
scales, BF16), the pool bytes per token SGLang budgets (int2: INT2 rows + BF16 arena divided by
max_total_num_tokens), token capacity, max concurrent 32K requests, output (decode) tok/s at 32K
with the batch memory allows, prefill tok/s; the issue's goals are >= 5x tokens and >= 3x output
tok/s. The JSON (environment included) is rewritten after each engine, so a run cut short by a
time limit keeps what finished. On the device, sglang 0.5.17 staged in /tmp/site and the
transformers overlay in /tmp/ov (see docs/sglang_integration.md):

    PYTHONPATH=/tmp/ov:/tmp/site:$PWD python benchmarks/bench_sglang_serving.py --out $OUT

About 7 minutes on one H200 with the defaults; `--context 8192 --max-batch-int2 32` for a
quick look. SGLang spawns workers, hence the `__main__` guard.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WINDOW = (64, 256, 8)  # sink, recent, flush block: the plugin's defaults
CLIPS = (0.96, 0.92)
QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6)
GOALS = {"token_capacity": 5.0, "output_tok_s": 3.0}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="output directory")
    ap.add_argument("--model", default=None,
                    help="model dir (default: a Qwen3-8B-geometry config written to a temp dir)")
    ap.add_argument("--layers", type=int, default=36, help="depth of the written config")
    ap.add_argument("--context", type=int, default=32768, help="prompt tokens per request")
    ap.add_argument("--s1", type=int, default=8, help="decode tokens of the first timed run")
    ap.add_argument("--s2", type=int, default=72, help="decode tokens of the second timed run")
    ap.add_argument("--slack", type=int, default=128,
                    help="tokens per request kept free for SGLang's admission reserves")
    ap.add_argument("--mem-fraction-static", type=float, default=0.85)
    ap.add_argument("--max-running-requests", type=int, default=64)
    ap.add_argument("--max-batch-bf16", type=int, default=64)
    ap.add_argument("--max-batch-int2", type=int, default=64)
    ap.add_argument("--chunked-prefill-size", type=int, default=16384)
    ap.add_argument("--cuda-graph-max-bs", type=int, default=64)
    ap.add_argument("--kinds", default="bf16,int2", help="engines to run, in order")
    ap.add_argument("--log-level", default="warning",
                    help="SGLang log level (info: the scheduler's decode lines with #running-req, "
                         "cuda graph and gen throughput)")
    ap.add_argument("--absorb", type=int, default=1, help="SGLANG_OSCAR_ABSORB_V_ROTATION")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or set(kinds) - {"bf16", "int2"}:
        ap.error(f"--kinds takes bf16 and/or int2, got {args.kinds!r}")
    if not 0 < args.s1 < args.s2:
        ap.error("need 0 < --s1 < --s2 (decode tok/s comes from their difference)")
    if args.context + args.s2 + 1 > QWEN3_8B["max_position_embeddings"] and args.model is None:
        ap.error(f"--context + --s2 exceeds the {QWEN3_8B['max_position_embeddings']} positions "
                 "of the Qwen3-8B config; lower --context")
    args.kinds = kinds
    return args


# ---- pure helpers (unit-tested on CPU) -----------------------------------------------------
def qwen3_config(layers: int = 36) -> dict:
    """config.json of a Qwen3-8B-geometry causal LM (random weights via load_format=dummy)."""
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **QWEN3_8B,
            "num_hidden_layers": layers, "max_window_layers": layers, "hidden_act": "silu",
            "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "use_sliding_window": False, "sliding_window": None,
            "rope_scaling": None, "initializer_range": 0.02, "use_cache": True,
            "bos_token_id": 151643, "eos_token_id": 151645}


def write_model_dir(path: Path, layers: int = 36) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(qwen3_config(layers), indent=2))
    return path


def write_rotations(path: Path, layers: int, head_dim: int,
                    clips: tuple[float, float] = CLIPS) -> tuple[Path, Path]:
    """Hadamard K/V rotation checkpoints (data-free; the runtime cost of fitted ones)."""
    import torch

    from oscar_kv.fit.checkpoint import build_checkpoint
    from oscar_kv.fit.hadamard import hadamard_matrix

    path.mkdir(parents=True, exist_ok=True)
    h = hadamard_matrix(head_dim).float().expand(layers, head_dim, head_dim).contiguous()
    out = []
    for side, clip in zip("kv", clips, strict=True):
        f = path / f"{side}_rotation_hadamard.pt"
        torch.save(build_checkpoint(h, torch.ones(layers, head_dim), "hadamard",
                                    clip_ratios=[clip] * layers), f)
        out.append(f)
    return out[0], out[1]


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n distinct random prompts (different first tokens: no shared radix prefix)."""
    rng = random.Random(seed)
    firsts = rng.sample(range(1, vocab), n)
    return [[f] + [rng.randrange(1, vocab) for _ in range(length - 1)] for f in firsts]


def max_concurrent(max_total_tokens: int, tokens_per_request: int,
                   max_running: int | None = None) -> int:
    """Requests of `tokens_per_request` the KV pool holds at once (capped by slots)."""
    n = max_total_tokens // tokens_per_request
    return n if max_running is None else min(n, max_running)


def kv_bytes(layers: int, kv_heads: int, head_dim: int) -> dict:
    """KV bytes per token, all layers: BF16; the INT2 body (codes + bf16 scale/zero, one group
    per head); the int2 windows (sink + ring rows, BF16) per request."""
    from oscar_kv.config import QuantSpec, WindowSpec
    from oscar_kv.sglang_plugin.pool_index import (
        PoolLayout,
        bf16_bytes_per_row,
        int2_bytes_per_token,
    )

    spec = QuantSpec(group_size=head_dim, scale_dtype="bfloat16")
    lay = PoolLayout(WindowSpec(*WINDOW), 0, 1)
    row = bf16_bytes_per_row(layers, kv_heads, head_dim)
    return {"bf16": row, "int2_body": int2_bytes_per_token(layers, kv_heads, head_dim, spec),
            "int2_windows_per_request": (lay.sink_rows + lay.ring) * row}


def int2_pool_bytes(max_total_tokens: int, max_running: int, layers: int, kv_heads: int,
                    head_dim: int) -> int:
    """Every byte of the int2 pool SGLang budgeted (INT2 rows incl. reserve + BF16 arena)."""
    from oscar_kv.config import QuantSpec, WindowSpec
    from oscar_kv.sglang_plugin.pool_index import PoolLayout, pool_bytes

    w = WindowSpec(*WINDOW)
    lay = PoolLayout(w, max_total_tokens + w.flush_block - 1, max_running)
    return pool_bytes(lay, layers, kv_heads, head_dim,
                      QuantSpec(group_size=head_dim, scale_dtype="bfloat16"))


def decode_tok_s(batch: int, s1: int, s2: int, t1: float, t2: float) -> float:
    """Output tokens/s of the decode steps between two runs of s1 and s2 new tokens."""
    if t2 <= t1:
        raise ValueError(f"the {s2}-token run ({t2:.3f} s) was not slower than the {s1}-token "
                         f"run ({t1:.3f} s); raise --s2")
    return batch * (s2 - s1) / (t2 - t1)


def decode_runs(run, s1: int, s2: int) -> dict:
    """The decode measurement over the same prompts: run(new) -> (seconds, metas) generates
    `new` tokens per prompt. An untimed warm-up of 1 + s1 tokens, then T1 (1 + s1) and
    T2 (1 + s2), so a one-time cost of the first hit + decode run cannot shrink T2 - T1."""
    t_w, _ = run(1 + s1)
    t1, m1 = run(1 + s1)
    t2, m2 = run(1 + s2)
    return {"t_s1_warmup": t_w, "t_s1": t1, "t_s2": t2, "metas": m1 + m2}


def summarize(engines: dict) -> dict:
    """Ratios int2 / BF16 of what both engines measured, and the goals."""
    i2, bf = engines.get("int2", {}), engines.get("bf16", {})
    ratios = {}
    for key, name in (("max_total_num_tokens", "token_capacity"),
                      ("max_concurrent", "max_concurrent_requests"),
                      ("decode_tok_s", "output_tok_s"), ("prefill_tok_s", "prefill_tok_s")):
        if i2.get(key) and bf.get(key):
            ratios[name] = round(i2[key] / bf[key], 3)
    goals = {k: {"goal": g, "measured": ratios.get(k),
                 "met": None if k not in ratios else ratios[k] >= g} for k, g in GOALS.items()}
    return {"ratios": ratios, "goals": goals}


def engine_kwargs(kind: str, model: Path, args) -> dict:
    kw = dict(model_path=str(model), load_format="dummy", skip_tokenizer_init=True,
              sampling_backend="pytorch", random_seed=args.seed,
              mem_fraction_static=args.mem_fraction_static,
              max_running_requests=args.max_running_requests,
              chunked_prefill_size=args.chunked_prefill_size,
              max_prefill_tokens=args.chunked_prefill_size,
              context_length=args.context + args.s2 + 8,
              cuda_graph_max_bs_decode=args.cuda_graph_max_bs, log_level=args.log_level)
    if kind == "int2":
        kw.update(kv_cache_dtype="int2", attention_backend="int2_triton")
    else:
        kw.update(attention_backend="triton")
    return kw


def int2_env(rot_k: Path, rot_v: Path, absorb: int) -> dict:
    return {"SGLANG_ENABLE_MIXED_KV_WINDOWS": "1", "SGLANG_MIXED_KV_PREFIX_TOKENS": str(WINDOW[0]),
            "SGLANG_MIXED_KV_RECENT_TOKENS": str(WINDOW[1]),
            "SGLANG_OSCAR_K_ROTATION_PATH": str(rot_k), "SGLANG_OSCAR_V_ROTATION_PATH": str(rot_v),
            "SGLANG_OSCAR_ABSORB_V_ROTATION": str(absorb)}


# ---- device --------------------------------------------------------------------------------
def environment() -> dict:
    import importlib.metadata as md
    import platform

    import torch

    env = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "host": platform.node(), "gpu": None}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env |= {"gpu": p.name, "gpu_memory_gib": round(p.total_memory / 2**30, 1)}
    for pkg in ("sglang", "sglang-kernel", "triton", "transformers"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    return env


def ensure_plugin() -> str:
    """Register the plugin's entry point for a PYTHONPATH checkout (the device check's shim)."""
    spec = importlib.util.spec_from_file_location(
        "sglang_device_check", REPO / "scripts" / "sglang_device_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ensure_plugin_entry_point(Path(tempfile.mkdtemp(prefix="oscar-bench-")) / "site")


def timed_generate(engine, prompts: list[list[int]], new: int) -> tuple[float, list[dict]]:
    params = {"temperature": 0.0, "max_new_tokens": new, "ignore_eos": True}
    t = time.perf_counter()
    outs = engine.generate(input_ids=prompts, sampling_params=params)
    dt = time.perf_counter() - t
    return dt, [o["meta_info"] for o in outs]


def run_engine(kind: str, model: Path, env: dict, args, cfg: dict) -> dict:
    """One engine's measurements with its flags in the environment (restored afterwards)."""
    from oscar_kv.server_process import scoped_environ

    with scoped_environ(env):
        return _run_engine(kind, model, args, cfg)


def _run_engine(kind: str, model: Path, args, cfg: dict) -> dict:
    import sglang

    t0 = time.perf_counter()
    engine = sglang.Engine(**engine_kwargs(kind, model, args))
    res: dict = {"startup_s": round(time.perf_counter() - t0, 1)}
    try:
        info = engine.get_server_info()
        total = int(info["max_total_num_tokens"])
        slots = int(info.get("max_running_requests") or args.max_running_requests)
        per_req = args.context + args.s2 + 1 + args.slack
        conc = max_concurrent(total, per_req, slots if kind == "int2" else None)
        batch = min(conc, getattr(args, f"max_batch_{kind}"))
        res |= {"kv_cache_dtype": info.get("kv_cache_dtype"),
                "attention_backend": info.get("attention_backend"),
                "radix_cache_backend": info.get("radix_cache_backend"),
                "max_total_num_tokens": total, "max_running_requests": slots,
                "max_concurrent": conc, "batch": batch}
        layers, heads, d = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]
        pool = (int2_pool_bytes(total, slots, layers, heads, d) if kind == "int2"
                else total * kv_bytes(layers, heads, d)["bf16"])
        res |= {"kv_pool_gib": round(pool / 2**30, 2),
                "pool_bytes_per_token": round(pool / total, 1)}
        if batch < 1:
            raise RuntimeError(f"{kind}: no {per_req}-token request fits ({total} tokens)")
        prompts = random_prompts(batch, args.context, cfg["vocab_size"], args.seed)
        engine.generate(input_ids=[p[:256] for p in prompts[:2]],
                        sampling_params={"max_new_tokens": 4, "ignore_eos": True})  # warm-up
        engine.flush_cache()
        t_pre, _ = timed_generate(engine, prompts, 1)
        d = decode_runs(lambda new: timed_generate(engine, prompts, new), args.s1, args.s2)
        t1, t2 = d["t_s1"], d["t_s2"]
        res |= {"prefill_s": round(t_pre, 2),
                "prefill_tok_s": round(batch * args.context / t_pre, 1),
                "t_s1_warmup": round(d["t_s1_warmup"], 3), "t_s1": round(t1, 3),
                "t_s2": round(t2, 3),
                "cached_tokens": sorted({int(m.get("cached_tokens", 0)) for m in d["metas"]}),
                "decode_tok_s": round(decode_tok_s(batch, args.s1, args.s2, t1, t2), 1)}
        res["decode_tok_s_per_request"] = round(res["decode_tok_s"] / batch, 2)
        return res
    finally:
        engine.shutdown()


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="oscar-bench-sglang-"))
    model = Path(args.model) if args.model else write_model_dir(tmp / "qwen3-8b-dummy",
                                                                args.layers)
    cfg = json.loads((model / "config.json").read_text())
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "environment": environment(),
              "model": {k: cfg[k] for k in ("num_hidden_layers", "hidden_size",
                                            "num_attention_heads", "num_key_value_heads",
                                            "head_dim", "vocab_size")},
              "window": dict(zip(("sink", "recent", "flush_block"), WINDOW, strict=True)),
              "kv_bytes_per_token": kv_bytes(cfg["num_hidden_layers"],
                                             cfg["num_key_value_heads"], cfg["head_dim"]),
              "engines": {}, "errors": {}}
    record["plugin"] = ensure_plugin()
    rot_k, rot_v = write_rotations(tmp / "rot", cfg["num_hidden_layers"], cfg["head_dim"])
    dest = out / "bench_sglang_serving.json"
    for kind in args.kinds:
        env = int2_env(rot_k, rot_v, args.absorb) if kind == "int2" else {}
        try:
            record["engines"][kind] = run_engine(kind, model, env, args, cfg)
        except Exception as e:  # keep the other engine's numbers
            record["errors"][kind] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        record |= summarize(record["engines"])
        dest.write_text(json.dumps(record, indent=2))
        print(json.dumps({kind: record["engines"].get(kind), "error":
                          record["errors"].get(kind, "")[:2000]}, indent=2), flush=True)
    b = record["kv_bytes_per_token"]
    print(f"KV bytes/token: bf16 {b['bf16']}, int2 body {b['int2_body']} "
          f"({b['bf16'] / b['int2_body']:.2f}x)")
    print(json.dumps({"ratios": record["ratios"], "goals": record["goals"]}, indent=2))
    print(f"wrote {dest}")
    return 1 if record["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
