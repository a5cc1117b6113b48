"""Launch the INT2 (or BF16 baseline) decode a few times on one case, for Nsight Compute.

No timing here (that is bench_decode.py); this only gives ncu a clean, repeatable launch:

    ncu -k regex:_decode_stage1 --launch-skip 2 --launch-count 1 --set full -o $OUT/dec \
        python benchmarks/profile_decode.py --batch 8 --context 32768
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from oscar_kv.config import QuantSpec, WindowSpec
from oscar_kv.kernels import decode_attention, plan_decode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import make_cache  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--num-q-heads", type=int, default=32)
    ap.add_argument("--num-kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-n", type=int, default=128)
    ap.add_argument("--num-warps", type=int, default=4)
    ap.add_argument("--num-stages", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="the all-BF16 baseline instead")
    ap.add_argument("--launches", type=int, default=4)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_decode.py needs a CUDA GPU (it exists for ncu)")
    gen = torch.Generator("cuda").manual_seed(0)
    hq, hkv, d = a.num_q_heads, a.num_kv_heads, a.head_dim
    k2, v2, kb, vb, mixed, all_bf16 = make_cache(a.batch, a.context, hkv, d, QuantSpec(),
                                                 WindowSpec(64, 256, 8), "cuda", gen)
    q = torch.randn(a.batch, hq, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    tables = all_bf16 if a.bf16 else mixed
    plan = plan_decode(a.batch, hq, hkv, d, max_body_len=tables.int2_slots.shape[1],
                       max_hp_len=tables.bf16_slots.shape[1], block_n=a.block_n,
                       num_warps=a.num_warps, num_stages=a.num_stages)
    for _ in range(a.launches):
        decode_attention(q, k2, v2, kb, vb, tables, plan=plan, backend="triton")
    torch.cuda.synchronize()
    print(f"profiled case: B={a.batch} ctx={a.context} bf16={a.bf16} splits="
          f"{plan.int2_splits}+{plan.hp_splits}")


if __name__ == "__main__":
    main()
