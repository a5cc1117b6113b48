"""Shared builders for kernel tests and benchmarks: filled stores, tables, tolerances."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oscar_kv.config import QuantSpec, WindowSpec
from oscar_kv.kernels import (
    Int2Store,
    KVTables,
    contiguous_token_slots,
    decode_attention_ref,
    tables_from_token_slots,
    write_int2_ref,
)


@dataclass
class DecodeCase:
    q: torch.Tensor
    k_int2: Int2Store
    v_int2: Int2Store
    k_bf16: torch.Tensor
    v_bf16: torch.Tensor
    tables: KVTables


def make_decode_case(lens: list[int], num_kv_heads: int, gqa: int, head_dim: int,
                     window: WindowSpec, spec: QuantSpec = QuantSpec(), max_len: int | None = None,
                     q_dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                     device: str = "cpu", clip_ratio: float = 0.95) -> DecodeCase:
    """A dense per-sequence cache (slot = b * T + pos) with every position written in both
    stores: INT2 via the reference writer, BF16 as the raw row. Tables classify by window."""
    g = torch.Generator().manual_seed(seed)
    b = len(lens)
    t = max_len or max(max(lens), 1)
    s = b * t
    spec = QuantSpec(group_size=min(spec.group_size, head_dim), scale_dtype=spec.scale_dtype,
                     quantizer=spec.quantizer)
    # outlier channels make the INT2 error visible and exercise the clip
    scale = 1.0 + 4.0 * (torch.rand(head_dim, generator=g) < 0.05)
    k_raw = (torch.randn(s, num_kv_heads, head_dim, generator=g) * scale).to(torch.bfloat16)
    v_raw = torch.randn(s, num_kv_heads, head_dim, generator=g).to(torch.bfloat16)
    k_int2 = Int2Store.empty(s, num_kv_heads, head_dim, spec)
    v_int2 = Int2Store.empty(s, num_kv_heads, head_dim, spec)
    slots = torch.arange(s)
    for st, x in ((k_int2, k_raw), (v_int2, v_raw)):
        write_int2_ref(x, None, clip_ratio, spec, slots, st.packed, st.scale, st.zero)
    tok = contiguous_token_slots(b, t)
    tables = tables_from_token_slots(tok, tok, torch.tensor(lens), window)
    q = torch.randn(b, num_kv_heads * gqa, head_dim, generator=g).to(q_dtype)

    def mv(x):
        return x.to(device)

    return DecodeCase(mv(q), Int2Store(mv(k_int2.packed), mv(k_int2.scale), mv(k_int2.zero), spec),
                      Int2Store(mv(v_int2.packed), mv(v_int2.scale), mv(v_int2.zero), spec),
                      mv(k_raw), mv(v_raw),
                      KVTables(*(mv(getattr(tables, f)) for f in
                                 ("int2_slots", "body_len", "bf16_slots", "hp_len"))))


def reference_outputs(case: DecodeCase, q_rotation=None) -> dict[str, torch.Tensor]:
    """The reference at fp64 (oracle), fp32 and bf16 compute precision, as fp64."""
    out = {}
    for name, dt in (("fp64", torch.float64), ("fp32", torch.float32),
                     ("bf16", torch.bfloat16)):
        out[name] = decode_attention_ref(case.q, case.k_int2, case.v_int2, case.k_bf16,
                                         case.v_bf16, case.tables, q_rotation=q_rotation,
                                         compute_dtype=dt, out_dtype=torch.float64)
    return out


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double().cpu() - b.double().cpu()).abs().max().item()
