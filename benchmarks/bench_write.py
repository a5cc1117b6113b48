"""Fused INT2 write (rotate + exact clip + min/max + pack + scatter) vs torch, same run.

For each token count N (decode flushes are B * flush_block rows, prefill chunks thousands)
it times, with triton.testing.do_bench (median) under CUDA graphs:
  int2_triton  the fused Triton kernel (oscar_kv.kernels.write_int2, backend="triton")
  int2_torch   the torch reference (fp32 GEMM, formats.quantize_int2, pack, index_copy)
  bf16_write   the BF16 window write (fp32 GEMM + cast + index_copy), the unquantized floor
and prints time, bytes moved, GB/s, % of peak and speedups; checks the kernel's bytes against
the reference first. JSON goes to benchmarks/results/bench_write-<gpu>-<date>.json.

    python benchmarks/bench_write.py            # H=8 KV heads, D=128, N = 8 .. 32768
    python benchmarks/bench_write.py --smoke    # CPU, tiny shapes, Triton interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if "--smoke" in sys.argv:  # CPU through the interpreter; must precede any Triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from oscar_kv.config import QuantSpec  # noqa: E402
from oscar_kv.kernels import Int2Store, write_bf16, write_int2  # noqa: E402
from oscar_kv.kernels.write import write_int2_triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import bench, environment  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def run_case(args, n: int, device: str, gen: torch.Generator) -> dict:
    h, d = args.num_kv_heads, args.head_dim
    spec = QuantSpec(group_size=min(args.group_size, d), scale_dtype=args.scale_dtype)
    x = torch.randn(n, h, d, device=device, generator=gen).to(torch.bfloat16)
    rot = None
    if args.rotate:
        rot = torch.linalg.qr(torch.randn(d, d, device=device, generator=gen))[0].float()
    slots = torch.randperm(args.num_slots, device=device, generator=gen)[:n]
    stores = [Int2Store.empty(args.num_slots, h, d, spec, device=device) for _ in range(2)]
    bf16_store = torch.empty(args.num_slots, h, d, device=device, dtype=torch.bfloat16)

    def writer(st: Int2Store, backend: str):
        return lambda: write_int2(x, rot, args.clip_ratio, spec, slots, st.packed, st.scale,
                                  st.zero, backend=backend)

    fused, ref = writer(stores[0], "triton"), writer(stores[1], "torch")
    fused()
    ref()
    idx = slots.long()
    same = bool(torch.equal(stores[0].packed[idx], stores[1].packed[idx]))
    code_mismatch = (stores[0].packed[idx] != stores[1].packed[idx]).float().mean().item()
    bf16 = lambda: write_bf16(x, rot, slots, bf16_store)

    meta_bytes = 2 * (d // spec.group_size) * torch.finfo(spec.torch_scale_dtype).bits // 8
    n_in = n * h * d * 2 + n * slots.element_size() + (d * d * 4 if rot is not None else 0)
    res = {"tokens": n, "bytes_identical": same, "byte_mismatch_frac": code_mismatch}
    for name, fn, out_bytes in (("int2_triton", fused, n * h * (d // 4 + meta_bytes)),
                                ("int2_torch", ref, n * h * (d // 4 + meta_bytes)),
                                ("bf16_write", bf16, n * h * d * 2)):
        ms = bench(fn, device, args.graph, args.reps)
        nbytes = n_in + out_bytes
        gbs = nbytes / (ms * 1e-3) / 1e9
        res[name] = {"ms": ms, "bytes": nbytes, "gb_s": gbs,
                     "pct_peak": 100 * gbs / args.peak_gbs}
    res["speedup_vs_torch"] = res["int2_torch"]["ms"] / res["int2_triton"]["ms"]
    for prec in args.also_precision:  # the fused rotation's dot mode (default "ieee")
        st = Int2Store.empty(args.num_slots, h, d, spec, device=device)
        fn = lambda st=st, prec=prec: write_int2_triton(x, rot, args.clip_ratio, spec, slots,
                                                        st.packed, st.scale, st.zero,
                                                        precision=prec)
        fn()
        ms = bench(fn, device, args.graph, args.reps)
        mism = (st.packed[idx] != stores[1].packed[idx]).float().mean().item()
        res[f"int2_triton_{prec}"] = {
            "ms": ms, "gb_s": res["int2_triton"]["bytes"] / (ms * 1e-3) / 1e9,
            "x_ieee": res["int2_triton"]["ms"] / ms, "byte_mismatch_frac": mism}
        print(f"    {n} tokens, rotation dot {prec}: {ms:.4f} ms "
              f"({res['int2_triton']['ms'] / ms:.2f}x ieee), bytes differing from the "
              f"reference {100 * mism:.3f} %", flush=True)
    return res


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+",
                    default=[8, 64, 256, 1024, 4096, 8192, 32768])
    ap.add_argument("--num-kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--scale-dtype", default="bfloat16")
    ap.add_argument("--clip-ratio", type=float, default=0.96)
    ap.add_argument("--no-rotate", dest="rotate", action="store_false")
    ap.add_argument("--num-slots", type=int, default=65536)
    ap.add_argument("--reps", type=int, default=3, help="CPU timing repetitions")
    ap.add_argument("--peak-gbs", type=float, default=4800.0, help="H200 HBM3e: 4.8 TB/s")
    ap.add_argument("--no-graph", dest="graph", action="store_false")
    ap.add_argument("--also-precision", nargs="*", default=[], choices=["tf32", "tf32x3"],
                    help="also time the fused rotation with these tl.dot modes (vs ieee fp32)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on CPU through the Triton interpreter (CI)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.tokens, args.num_kv_heads, args.head_dim = [5, 19], 2, 64
        args.num_slots, args.reps = 64, 1
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.smoke:
        raise SystemExit("bench_write needs a CUDA GPU; use --smoke for the CPU check")
    gen = torch.Generator(device=device).manual_seed(0)
    env = environment(device)
    print(f"# {env['device']}  torch {env['torch']}  triton {env['triton']}  "
          f"H={args.num_kv_heads} D={args.head_dim} rotate={args.rotate} clip={args.clip_ratio}")
    print(f"{'N':>6} | {'triton ms':>9} {'GB/s':>7} {'%pk':>5} | {'torch ms':>9} | "
          f"{'bf16 ms':>9} | {'x torch':>7} {'bytes==':>7}")
    results = []
    for n in args.tokens:
        r = run_case(args, n, device, gen)
        results.append(r)
        t = r["int2_triton"]
        print(f"{n:>6} | {t['ms']:>9.4f} {t['gb_s']:>7.0f} {t['pct_peak']:>5.1f} | "
              f"{r['int2_torch']['ms']:>9.4f} | {r['bf16_write']['ms']:>9.4f} | "
              f"{r['speedup_vs_torch']:>7.2f} {str(r['bytes_identical']):>7}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "smoke" if args.smoke else env["device"].replace(" ", "_")
    path = args.out / f"bench_write-{tag}-{env['date'][:10]}.json"
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path.write_text(json.dumps({"env": env, "args": cfg, "results": results}, indent=1))
    print(f"# wrote {path}")
    # with the rotation fused, a few codes may flip at rounding boundaries (write.py docs)
    worst = max(r["byte_mismatch_frac"] for r in results)
    if worst > 1e-2:
        raise SystemExit(f"fused write disagrees with the reference on {worst:.2%} of bytes")
    return results


if __name__ == "__main__":
    main()
