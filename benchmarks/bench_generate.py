"""End-to-end HF `generate` decode throughput: OSCAR mixed INT2/BF16 cache vs BF16 DynamicCache.

A random-weight model with Qwen3-8B geometry (no checkpoint: built from a config on the GPU,
bf16; `--layers` cuts the depth) is prepared with `--method` (default `hadamard`: a dense R_K
and absorbed R_V, the runtime cost of a fitted `oscar` rotation set). For each (batch,
context) both caches are prefilled with the same random context once (logits of the last
position only), warmed up for a few decode steps (Triton JIT), then `generate` is timed for
`--decode-steps` greedy tokens between torch.cuda.synchronize() calls. The baseline runs the
same weights with SDPA attention + DynamicCache (R_V absorbed, no R_K: the same function).
Also reported: KV bytes per token from `formats` (INT2 body, BF16) and the bytes the caches
actually hold (buffer capacities, OSCAR; key/value tensors, DynamicCache) per cached token.
Results go to benchmarks/results/bench_generate-<gpu>-<date>.json with the environment.

    python benchmarks/bench_generate.py                                 # 36 layers, 4K/32K, B 1/8
    python benchmarks/bench_generate.py --layers 8 --context 4096       # quicker
    python benchmarks/bench_generate.py --smoke                         # CPU, tiny model
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import torch

from oscar_kv.config import QuantSpec, WindowSpec
from oscar_kv.formats import kv_bf16_bytes_per_token, kv_body_bytes_per_token

RESULTS = Path(__file__).resolve().parent / "results"
QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, num_hidden_layers=36,
                max_position_embeddings=40960, rope_theta=1e6)
SMOKE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, vocab_size=256, num_hidden_layers=2,
             max_position_embeddings=1024, rope_theta=1e4)


def environment(device: str) -> dict:
    """GPU name, versions and date for the JSON record."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__,
           "triton": triton_version, "transformers": transformers.__version__,
           "cuda": torch.version.cuda, "host": platform.node(), "device": "cpu"}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env |= {"device": p.name, "sm_count": p.multi_processor_count,
                "memory_gib": round(p.total_memory / 2**30, 1)}
    return env


def build_model(geometry: dict, layers: int | None, device: str, dtype: torch.dtype):
    """A random-weight Qwen3ForCausalLM built directly on `device` in `dtype` (no checkpoint)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    geo = dict(geometry)
    if layers is not None:
        geo["num_hidden_layers"] = layers
    rope = {"rope_type": "default", "rope_theta": geo.pop("rope_theta")}
    cfg = Qwen3Config(**geo, rope_parameters=rope, tie_word_embeddings=False,
                      attn_implementation="sdpa", eos_token_id=None, pad_token_id=0)
    before = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = Qwen3ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(before)
    model.generation_config.eos_token_id = None
    return model.eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def dynamic_cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))


@torch.no_grad()
def time_decode(model, cache, ids: torch.Tensor, steps: int, warmup: int, device: str) -> dict:
    """Prefill ids [B, ctx] into `cache`, warm up, then time `generate` for `steps` tokens."""
    b = ids.shape[0]
    sync(device)
    t0 = time.perf_counter()
    logits = model(input_ids=ids, past_key_values=cache, logits_to_keep=1).logits
    sync(device)
    prefill_s = time.perf_counter() - t0
    seq = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    gen = dict(past_key_values=cache, do_sample=False, eos_token_id=None)
    if warmup:
        seq = model.generate(seq, max_new_tokens=warmup, min_new_tokens=warmup, **gen)
    sync(device)
    t0 = time.perf_counter()
    seq = model.generate(seq, max_new_tokens=steps, min_new_tokens=steps, **gen)
    sync(device)
    dt_s = time.perf_counter() - t0
    assert seq.shape[1] == ids.shape[1] + 1 + warmup + steps
    return {"prefill_s": prefill_s, "decode_s": dt_s, "ms_per_step": 1e3 * dt_s / steps,
            "tokens_per_s": b * steps / dt_s, "cached_tokens": cache.get_seq_length()}


def run_case(args, model, handle, batch: int, ctx: int, device: str) -> dict:
    from transformers import DynamicCache

    geom = handle.geometry
    gen = torch.Generator(device=device).manual_seed(ctx + batch)
    ids = torch.randint(1, model.config.vocab_size, (batch, ctx), device=device, generator=gen)
    res = {"batch": batch, "context": ctx}

    model.set_attn_implementation("sdpa")  # baseline: same weights, plain attention
    cache = DynamicCache(config=model.config)
    res["bf16"] = time_decode(model, cache, ids, args.decode_steps, args.warmup, device)
    res["bf16"]["allocated_bytes"] = dynamic_cache_bytes(cache)
    del cache
    if device == "cuda":
        torch.cuda.empty_cache()

    handle.set_mode("generate")
    cache = handle.new_cache(decode_backend=args.backend)
    res["oscar"] = time_decode(model, cache, ids, args.decode_steps, args.warmup, device)
    res["oscar"]["allocated_bytes"] = cache.allocated_bytes()
    res["oscar"]["decode_backend"] = cache.layers[0].decode_backend
    res["oscar"]["window_counts"] = list(cache.layers[0].store.window_counts())
    del cache
    if device == "cuda":
        torch.cuda.empty_cache()

    spec = handle.plans[0].quant
    for name in ("bf16", "oscar"):
        r = res[name]
        r["allocated_bytes_per_token"] = r["allocated_bytes"] / (batch * r["cached_tokens"])
    res["kv_bytes_per_token"] = {
        "bf16": kv_bf16_bytes_per_token(geom.num_layers, geom.num_kv_heads, geom.head_dim),
        "int2_body": kv_body_bytes_per_token(geom.num_layers, geom.num_kv_heads,
                                             geom.head_dim, spec)}
    res["speedup"] = res["oscar"]["tokens_per_s"] / res["bf16"]["tokens_per_s"]
    res["memory_ratio"] = res["bf16"]["allocated_bytes"] / res["oscar"]["allocated_bytes"]
    return res


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--context", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=4, help="decode steps before timing (JIT)")
    ap.add_argument("--layers", type=int, default=None, help="default: 36 (Qwen3-8B)")
    ap.add_argument("--method", default="hadamard", help="naive | hadamard (no weights)")
    ap.add_argument("--backend", default="auto", help="OSCAR decode backend: auto|triton|torch")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--scale-dtype", default="bfloat16")
    ap.add_argument("--sink-tokens", type=int, default=64)
    ap.add_argument("--recent-tokens", type=int, default=256)
    ap.add_argument("--flush-block", type=int, default=8)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny random model on CPU with the torch backend (CI)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.context, args.decode_steps, args.warmup = [2], [40, 70], 3, 1
        args.group_size, args.backend = 32, "torch"
        args.sink_tokens, args.recent_tokens, args.flush_block = 8, 16, 4
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    from oscar_kv.hf import prepare_model

    args = parse(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_generate needs a CUDA GPU; use --smoke for the CPU check")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    model = build_model(SMOKE if args.smoke else QWEN3_8B, args.layers, device, dtype)
    quant = QuantSpec(group_size=args.group_size, scale_dtype=args.scale_dtype)
    window = WindowSpec(args.sink_tokens, args.recent_tokens, args.flush_block)
    handle = prepare_model(model, args.method, quant=quant, window=window)
    env = environment(device)
    geom = handle.geometry
    print(f"# {env['device']}  torch {env['torch']}  triton {env['triton']}  transformers "
          f"{env['transformers']}  L={geom.num_layers} Hq={geom.num_q_heads} "
          f"Hkv={geom.num_kv_heads} D={geom.head_dim}  method={args.method} "
          f"backend={args.backend}")
    print(f"{'B':>3} {'ctx':>7} | {'bf16 tok/s':>10} {'ms/step':>8} | {'oscar tok/s':>11} "
          f"{'ms/step':>8} | {'x':>5} | {'bf16 B/tok':>10} {'oscar B/tok':>11} {'x mem':>6}")
    results = []
    try:
        for batch in args.batch:
            for ctx in args.context:
                r = run_case(args, model, handle, batch, ctx, device)
                results.append(r)
                a, o = r["bf16"], r["oscar"]
                print(f"{batch:>3} {ctx:>7} | {a['tokens_per_s']:>10.1f} "
                      f"{a['ms_per_step']:>8.2f} | {o['tokens_per_s']:>11.1f} "
                      f"{o['ms_per_step']:>8.2f} | {r['speedup']:>5.2f} | "
                      f"{a['allocated_bytes_per_token']:>10.0f} "
                      f"{o['allocated_bytes_per_token']:>11.0f} {r['memory_ratio']:>6.2f}",
                      flush=True)
    finally:
        handle.restore()
    bpt = results[0]["kv_bytes_per_token"] if results else {}
    print(f"# formats: BF16 {bpt.get('bf16')} B/token, INT2 body {bpt.get('int2_body')} "
          f"B/token (all layers, K+V)")
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "smoke" if args.smoke else env["device"].replace(" ", "_")
    path = args.out / f"bench_generate-{tag}-{env['date'][:10]}.json"
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    record = {"env": env, "args": cfg, "argv": sys.argv[1:] if argv is None else argv,
              "geometry": dataclasses.asdict(geom),
              "results": results}
    path.write_text(json.dumps(record, indent=1, default=str))
    print(f"# wrote {path}")
    return results


if __name__ == "__main__":
    main()
