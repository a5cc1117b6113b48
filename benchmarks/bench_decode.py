"""Decode attention over the mixed INT2/BF16 cache vs BF16 baselines measured in the same run.

For each (batch, context) it times, under CUDA graphs with triton.testing.do_bench (median,
L2 flushed between calls):
  int2        our split-K decode: INT2 body (dequantized in registers) + BF16 sink/recent
  bf16_triton the same kernel design over a fully BF16 cache (all tokens in the BF16 tier)
  sdpa        torch scaled_dot_product_attention (enable_gqa) over the same BF16 cache
  flashinfer  FlashInfer's BF16 batch decode over the same store as pages of 16 (when the
              flashinfer package imports, e.g. from the SGLang wheel set; eager launches)
and prints time, bytes read, GB/s, % of peak (4.8 TB/s for the H200) and speedups.
Results go to benchmarks/results/bench_decode-<gpu>-<date>.json with the environment.

    python benchmarks/bench_decode.py                       # Qwen3-8B geometry, 4K..128K, B 1/8/32
    python benchmarks/bench_decode.py --smoke               # CPU, tiny shapes, Triton interpreter
    python benchmarks/bench_decode.py --context 4096 32768 131072 --sweep
                                  # + an INT2 config sweep per case (best config printed)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

if "--smoke" in sys.argv:  # CPU through the interpreter; must precede any Triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from oscar_kv.config import QuantSpec, WindowSpec  # noqa: E402
from oscar_kv.kernels import (  # noqa: E402
    Int2Store,
    KVTables,
    contiguous_token_slots,
    decode_attention,
    decode_attention_ref,
    plan_decode,
    tables_from_token_slots,
)
from oscar_kv.kernels.decode import CODE_VARIANTS, CODES_ENV, MAXNREG  # noqa: E402
from oscar_kv.server_process import scoped_environ  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import bench, environment  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def make_cache(batch: int, ctx: int, hkv: int, d: int, spec: QuantSpec, window: WindowSpec,
               device: str, gen: torch.Generator):
    """Random INT2 + BF16 stores for `batch` sequences of `ctx` tokens (slot = b*ctx + pos),
    the mixed tables, and tables that put every token in the BF16 tier (the baseline)."""
    s = batch * ctx
    groups = d // spec.group_size
    mdt = spec.torch_scale_dtype

    def int2_store() -> Int2Store:
        packed = torch.randint(0, 256, (s, hkv, d // 4), dtype=torch.uint8, device=device,
                               generator=gen)
        scale = (torch.rand(s, hkv, groups, device=device, generator=gen) * 0.5 + 0.1).to(mdt)
        zero = (torch.rand(s, hkv, groups, device=device, generator=gen) * 3.0).to(mdt)
        return Int2Store(packed, scale, zero, spec)

    k_int2, v_int2 = int2_store(), int2_store()
    k_bf16 = torch.randn(s, hkv, d, device=device, generator=gen, dtype=torch.bfloat16)
    v_bf16 = torch.randn(s, hkv, d, device=device, generator=gen, dtype=torch.bfloat16)
    tok = contiguous_token_slots(batch, ctx, device=device)
    lens = torch.full((batch,), ctx, device=device)
    mixed = tables_from_token_slots(tok, tok, lens, window)
    empty = tok[:, :0].contiguous()
    all_bf16 = KVTables(empty, torch.zeros_like(mixed.body_len), tok.contiguous(),
                        lens.to(torch.int32))
    return k_int2, v_int2, k_bf16, v_bf16, mixed, all_bf16


def bytes_mixed(batch: int, tables_body: int, tables_hp: int, hq: int, hkv: int, d: int,
                spec: QuantSpec, slot_bytes: int) -> int:
    """Fewest bytes a mixed decode must read/write: K and V rows, slot ids, q and out."""
    meta = 2 * (d // spec.group_size) * torch.finfo(spec.torch_scale_dtype).bits // 8
    int2_row = d // 4 + meta
    per_seq = 2 * hkv * (tables_body * int2_row + tables_hp * d * 2)
    per_seq += (tables_body + tables_hp) * slot_bytes + 2 * hq * d * 2
    return batch * per_seq


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64 (bf16 outputs land near 4e-3)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


FI_PAGE = 16  # FlashInfer page size over the same BF16 store (slot = b * ctx + pos)


def flashinfer_decode(q, k_bf16, v_bf16, batch: int, ctx: int):
    """FlashInfer's BF16 batch decode over the benchmark's BF16 store viewed as pages of
    FI_PAGE slots (sequence b owns pages b*ctx/P ...). Returns a zero-argument callable (the
    host-side plan is done here, once). Needs flashinfer-python (JIT-compiled with nvcc)."""
    import flashinfer

    _, hq, d = q.shape
    hkv = k_bf16.shape[1]
    if ctx % FI_PAGE:
        raise ValueError(f"context {ctx} is not a multiple of the page size {FI_PAGE}")
    pages = ctx // FI_PAGE
    i32 = {"dtype": torch.int32, "device": q.device}
    ws = torch.zeros(256 << 20, dtype=torch.uint8, device=q.device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
    wrapper.plan(torch.arange(batch + 1, **i32) * pages, torch.arange(batch * pages, **i32),
                 torch.full((batch,), FI_PAGE, **i32), hq, hkv, d, FI_PAGE,
                 pos_encoding_mode="NONE", data_type=k_bf16.dtype, q_data_type=q.dtype)
    cache = (k_bf16.view(-1, FI_PAGE, hkv, d), v_bf16.view(-1, FI_PAGE, hkv, d))
    return lambda: wrapper.run(q, cache)


def run_case(args, batch: int, ctx: int, device: str, gen: torch.Generator) -> dict:
    hq, hkv, d = args.num_q_heads, args.num_kv_heads, args.head_dim
    spec = QuantSpec(group_size=min(args.group_size, d), scale_dtype=args.scale_dtype)
    window = WindowSpec(args.sink_tokens, args.recent_tokens, args.flush_block)
    k_int2, v_int2, k_bf16, v_bf16, mixed, all_bf16 = make_cache(batch, ctx, hkv, d, spec,
                                                                window, device, gen)
    q = torch.randn(batch, hq, d, device=device, generator=gen, dtype=torch.bfloat16)
    body = int(mixed.body_len[0])
    hp = int(mixed.hp_len[0])
    plan = plan_decode(batch, hq, hkv, d, max_body_len=mixed.int2_slots.shape[1],
                       max_hp_len=mixed.bf16_slots.shape[1], device=device,
                       out_dtype=torch.bfloat16, block_n=args.block_n,
                       hp_block_n=args.hp_block_n, num_warps=args.num_warps,
                       num_stages=args.num_stages, programs_per_sm=args.programs_per_sm,
                       maxnreg=args.maxnreg, prefetch=args.prefetch, kv_group=args.kv_group,
                       int2_group_size=spec.group_size)
    plan_bf16 = plan_decode(batch, hq, hkv, d, max_body_len=0, max_hp_len=ctx, device=device,
                            out_dtype=torch.bfloat16, hp_block_n=args.hp_block_n,
                            num_warps=args.num_warps)
    be = "triton"
    ours = lambda: decode_attention(q, k_int2, v_int2, k_bf16, v_bf16, mixed, plan=plan,
                                    backend=be)
    base = lambda: decode_attention(q, k_int2, v_int2, k_bf16, v_bf16, all_bf16,
                                    plan=plan_bf16, backend=be)
    # SDPA reads the same BF16 store through a [B, Hkv, L, D] view
    kv_view = lambda t: t.view(batch, ctx, hkv, d).transpose(1, 2)
    q4 = q[:, :, None, :]
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(
        q4, kv_view(k_bf16), kv_view(v_bf16), enable_gqa=True)

    fi = None
    if args.flashinfer and device == "cuda":
        try:
            fi = flashinfer_decode(q, k_bf16, v_bf16, batch, ctx)
            fi()
        except Exception as e:  # noqa: BLE001 - an optional baseline: report, keep going
            fi = None
            print(f"    flashinfer unavailable: {type(e).__name__}: {str(e)[:200]}", flush=True)

    check = {}
    want = None
    # the reference materialises fp32 K and V of every slot: 2 x 4 GiB at 2^20 tokens
    if args.check and batch * ctx <= args.check_max_tokens:
        want = decode_attention_ref(q, k_int2, v_int2, k_bf16, v_bf16, mixed,
                                    out_dtype=torch.float32)
        check["int2_rel_err"] = rel_err(ours(), want)
        check["bf16_triton_vs_sdpa_rel_err"] = rel_err(base(), sdpa()[:, :, 0])
        if fi is not None:
            check["flashinfer_vs_sdpa_rel_err"] = rel_err(fi(), sdpa()[:, :, 0])

    slot_bytes = mixed.int2_slots.element_size()
    n_ours = bytes_mixed(batch, body, hp, hq, hkv, d, spec, slot_bytes)
    n_bf16 = bytes_mixed(batch, 0, ctx, hq, hkv, d, spec, 0)
    res = {"batch": batch, "context": ctx, "body_tokens": body, "bf16_tokens": hp,
           "int2_splits": plan.int2_splits, "kv_group": plan.kv_group,
           "block_n": plan.block_n, "num_stages": plan.num_stages,
           "hp_splits": plan.hp_splits, "bf16_splits": plan_bf16.hp_splits, **check}
    cases = [("int2", ours, n_ours), ("bf16_triton", base, n_bf16), ("sdpa", sdpa, n_bf16)]
    if fi is not None:
        cases.append(("flashinfer", fi, n_bf16))
    for name, fn, nbytes in cases:
        graph = args.graph and (name not in ("sdpa", "flashinfer") or args.graph_sdpa)
        ms = bench(fn, device, graph, args.reps)
        gbs = nbytes / (ms * 1e-3) / 1e9
        res[name] = {"ms": ms, "bytes": nbytes, "gb_s": gbs,
                     "pct_peak": 100 * gbs / args.peak_gbs}
    res["speedup_vs_bf16_triton"] = res["bf16_triton"]["ms"] / res["int2"]["ms"]
    res["speedup_vs_sdpa"] = res["sdpa"]["ms"] / res["int2"]["ms"]
    if fi is not None:
        res["speedup_vs_flashinfer"] = res["flashinfer"]["ms"] / res["int2"]["ms"]
    best = min(res[n]["ms"] for n in ("bf16_triton", "sdpa", "flashinfer") if n in res)
    res["speedup_vs_best_bf16"] = best / res["int2"]["ms"]
    for codes in args.also_codes:  # other INT2 code variants, same plan, same run
        name = f"{codes}_codes"
        with scoped_environ({CODES_ENV: codes}):
            ms = bench(ours, device, args.graph, args.reps)
            row = {"ms": ms, "gb_s": n_ours / (ms * 1e-3) / 1e9,
                   "x_default": res["int2"]["ms"] / ms}
            if want is not None:
                row["rel_err"] = rel_err(ours(), want)
        res[f"int2_{name}"] = row
        print(f"    {name.replace('_', ' ')}: {ms:.4f} ms ({row['x_default']:.3f}x the default's "
              f"speed), {row['gb_s']:.0f} GB/s"
              + (f", rel err {row['rel_err']:.3g} (default {check['int2_rel_err']:.3g})"
                 if want is not None else ""), flush=True)
    if args.sweep:
        res["sweep"] = sweep(args, q, k_int2, v_int2, k_bf16, v_bf16, mixed,
                             ours().float() if want is None else want, n_ours,
                             res["bf16_triton"]["ms"], exact_ref=want is not None)
    return res


# (BLOCK_N, num_warps, programs per SM, KV heads per program, hand prefetch, num_stages);
# programs per SM = the occupancy of the sm_90 build (scripts/sass_stats.py: registers, smem)
SWEEP = [(128, 4, 3, 1, False, 2), (128, 4, 4, 1, False, 2), (64, 4, 2, 4, False, 2),
         (64, 4, 2, 4, False, 3), (32, 4, 3, 4, False, 2), (32, 4, 3, 4, False, 3),
         (32, 4, 4, 4, False, 3), (64, 8, 1, 4, False, 2), (128, 8, 1, 4, False, 2),
         (64, 4, 3, 2, False, 2), (128, 4, 2, 2, False, 2), (64, 4, 2, 4, True, 1),
         (128, 4, 4, 2, False, 2), (128, 4, 4, 4, False, 2), (128, 4, 2, 4, False, 3),
         (64, 4, 3, 4, False, 3), (64, 4, 2, 2, False, 3)]


def sweep(args, q, k_int2, v_int2, k_bf16, v_bf16, mixed, want, nbytes, bf16_ms,
          exact_ref: bool = True) -> dict:
    """Time the INT2 decode over SWEEP; every config's output is checked against `want`: the
    fp32 reference when the case is small enough (exact_ref, rel. err. < 1e-2), else the
    default config's bf16 output (two bf16 results of different split orders: < 3e-2; the
    long-context outputs are averages of ~1e5 rows, small against their rounding)."""
    tol = 1e-2 if exact_ref else 3e-2
    b, hq, d = q.shape
    device = q.device.type
    rows = []
    for bn, nw, pps, kvg, pf, ns in SWEEP:
        row = {"block_n": bn, "num_warps": nw, "programs_per_sm": pps, "kv_group": kvg,
               "prefetch": pf, "num_stages": ns}
        try:
            plan = plan_decode(b, hq, k_bf16.shape[1], d,
                               max_body_len=mixed.int2_slots.shape[1],
                               max_hp_len=mixed.bf16_slots.shape[1], device=q.device,
                               out_dtype=torch.bfloat16, block_n=bn,
                               hp_block_n=args.hp_block_n, num_warps=nw,
                               num_stages=ns, programs_per_sm=pps, prefetch=pf,
                               kv_group=kvg)
            fn = lambda plan=plan: decode_attention(q, k_int2, v_int2, k_bf16, v_bf16, mixed,
                                                    plan=plan, backend="triton")
            err = rel_err(fn(), want)
            ms = bench(fn, device, args.graph, 1)
            row |= {"int2_splits": plan.int2_splits, "hp_splits": plan.hp_splits, "ms": ms,
                    "rel_err": err, "gb_s": nbytes / (ms * 1e-3) / 1e9, "x_bf16T": bf16_ms / ms}
            print(f"      BLOCK_N={bn} warps={nw} pps={pps} kv_group={kvg} prefetch={pf} "
                  f"stages={ns} splits={plan.int2_splits}+{plan.hp_splits}: {ms:.4f} ms "
                  f"{row['gb_s']:.0f} GB/s rel_err {err:.2g}", flush=True)
        except Exception as e:  # noqa: BLE001 - report and keep sweeping
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
    ok = [r for r in rows if "ms" in r and r["rel_err"] < tol]
    best = min(ok, key=lambda r: r["ms"]) if ok else None
    if best:
        print(f"    sweep best: BLOCK_N={best['block_n']} warps={best['num_warps']} "
              f"pps={best['programs_per_sm']} kv_group={best['kv_group']} "
              f"prefetch={best['prefetch']} stages={best['num_stages']} "
              f"splits={best['int2_splits']}+{best['hp_splits']} "
              f"{best['ms']:.4f} ms {best['gb_s']:.0f} GB/s x{best['x_bf16T']:.2f} vs bf16T",
              flush=True)
    for r in rows:
        if r not in ok:
            print(f"    sweep FAILED: {r}", flush=True)
    return {"best": best, "rows": rows}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--context", type=int, nargs="+",
                    default=[4096, 8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--num-q-heads", type=int, default=32)
    ap.add_argument("--num-kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--scale-dtype", default="bfloat16")
    ap.add_argument("--sink-tokens", type=int, default=64)
    ap.add_argument("--recent-tokens", type=int, default=256)
    ap.add_argument("--flush-block", type=int, default=8)
    ap.add_argument("--block-n", type=int, default=None, help="default: plan_decode's")
    ap.add_argument("--hp-block-n", type=int, default=64)
    ap.add_argument("--num-warps", type=int, default=4)
    ap.add_argument("--num-stages", type=int, default=None, help="default: plan_decode's")
    ap.add_argument("--programs-per-sm", type=int, default=None,
                    help="split target per SM (default: by KV heads per program, see "
                         "oscar_kv.kernels.decode.PROGRAMS_PER_SM)")
    ap.add_argument("--maxnreg", type=int, default=MAXNREG,
                    help="stage-1 register cap; 0 = the compiler's choice")
    ap.add_argument("--kv-group", type=int, default=None,
                    help="KV heads per INT2 program (default: plan_decode's choice)")
    ap.add_argument("--prefetch", action="store_true",
                    help="the hand-pipelined INT2 loop instead of Triton's pipeliner")
    ap.add_argument("--also-codes", nargs="*", default=[], choices=CODE_VARIANTS,
                    help="also time the INT2 decode with these OSCAR_KV_INT2_CODES variants "
                         "(the plan made for the default)")
    ap.add_argument("--sweep", action="store_true",
                    help="also time an INT2 config sweep per case and print the best")
    ap.add_argument("--check-max-tokens", type=int, default=1 << 20,
                    help="check against the fp32 reference when batch*context <= this")
    ap.add_argument("--reps", type=int, default=3, help="CPU timing repetitions")
    ap.add_argument("--peak-gbs", type=float, default=4800.0, help="H200 HBM3e: 4.8 TB/s")
    ap.add_argument("--no-graph", dest="graph", action="store_false",
                    help="time eager launches instead of CUDA graph replays")
    ap.add_argument("--graph-sdpa", action="store_true",
                    help="also graph-capture SDPA and FlashInfer")
    ap.add_argument("--no-flashinfer", dest="flashinfer", action="store_false",
                    help="skip the FlashInfer BF16 baseline (used when flashinfer imports)")
    ap.add_argument("--no-check", dest="check", action="store_false")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on CPU through the Triton interpreter (CI)")
    args = ap.parse_args(argv)
    args.maxnreg = args.maxnreg or None
    if args.smoke:
        args.batch, args.context = [2], [45, 133]
        args.num_q_heads, args.num_kv_heads, args.head_dim = 4, 2, 64
        args.sink_tokens, args.recent_tokens, args.flush_block = 8, 16, 4
        args.block_n = args.hp_block_n = 32
        args.reps = 1
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.smoke:
        raise SystemExit("bench_decode needs a CUDA GPU; use --smoke for the CPU check")
    gen = torch.Generator(device=device).manual_seed(0)
    env = environment(device)
    print(f"# {env['device']}  torch {env['torch']}  triton {env['triton']}  "
          f"Hq={args.num_q_heads} Hkv={args.num_kv_heads} D={args.head_dim}")
    head = (f"{'B':>3} {'ctx':>7} | {'int2 ms':>8} {'GB/s':>7} {'%pk':>5} | {'bf16T ms':>8} "
            f"{'GB/s':>7} {'%pk':>5} | {'sdpa ms':>8} {'fi ms':>8} | {'x bf16T':>7} "
            f"{'x sdpa':>7} {'x best':>7}")
    print(head)
    results = []
    for batch in args.batch:
        for ctx in args.context:
            r = run_case(args, batch, ctx, device, gen)
            results.append(r)
            a, b, s = r["int2"], r["bf16_triton"], r["sdpa"]
            print(f"{batch:>3} {ctx:>7} | {a['ms']:>8.4f} {a['gb_s']:>7.0f} "
                  f"{a['pct_peak']:>5.1f} | {b['ms']:>8.4f} {b['gb_s']:>7.0f} "
                  f"{b['pct_peak']:>5.1f} | {s['ms']:>8.4f} "
                  f"{r.get('flashinfer', {}).get('ms', float('nan')):>8.4f} | "
                  f"{r['speedup_vs_bf16_triton']:>7.2f} {r['speedup_vs_sdpa']:>7.2f} "
                  f"{r['speedup_vs_best_bf16']:>7.2f}", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "smoke" if args.smoke else env["device"].replace(" ", "_")
    path = args.out / f"bench_decode-{tag}-{env['date'][:10]}.json"
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path.write_text(json.dumps({"env": env, "args": cfg, "results": results}, indent=1))
    print(f"# wrote {path}")
    worst = max((r.get(k, 0.0) for r in results
                 for k in ("int2_rel_err", "bf16_triton_vs_sdpa_rel_err",
                           "flashinfer_vs_sdpa_rel_err")), default=0.0)
    if not math.isfinite(worst) or worst > 2e-2:  # bf16 output rounding is ~4e-3
        raise SystemExit(f"a decode kernel disagrees with its reference (rel err {worst:.3g})")
    return results


if __name__ == "__main__":
    main()
