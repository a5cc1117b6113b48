"""Kernels for the mixed INT2/BF16 KV cache, dispatched by device.

CUDA tensors go to the Triton kernels (`write.py`, `decode.py`, bodies in `triton/`); CPU
tensors go to the pure-torch twins in `ref.py`. `backend="torch"` / `"triton"` forces one.
Importing this package does not import Triton (the wrappers import it on first launch).

    write_int2(x [N,H,D], rotation [D,D]|None, clip_ratio, spec, slots [N], packed, scale, zero)
    write_bf16(x [N,H,D], rotation [D,D]|None, slots [N], store [S,H,D])
    plan_decode(B, Hq, Hkv, D, max_body_len=, max_hp_len=, device=) -> DecodePlan
    decode_attention(q [B,Hq,D], k_int2, v_int2, k_bf16, v_bf16, tables, sm_scale, plan,
                     q_rotation) -> [B,Hq,D]
    prefill_attention(q [T,Hq,D], k, v [T,Hkv,D], k_int2, v_int2, k_bf16, v_bf16, prefix)
"""

from __future__ import annotations

import torch

from oscar_kv.config import QuantSpec
from oscar_kv.errors import OscarError
from oscar_kv.kernels.decode import DecodePlan, plan_decode
from oscar_kv.kernels.layout import (
    Int2Store,
    KVTables,
    contiguous_token_slots,
    hp_table_len,
    tables_from_token_slots,
)
from oscar_kv.kernels.prefill import dequantize_prefix, prefill_attention
from oscar_kv.kernels.ref import (
    decode_attention_ref,
    rotate_query,
    write_bf16_ref,
    write_int2_ref,
)

BACKENDS = ("auto", "triton", "torch")


def _use_triton(t: torch.Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise OscarError(f"unknown kernel backend {backend!r}; choose one of: "
                         f"{', '.join(BACKENDS)}")
    return backend == "triton" or (backend == "auto" and t.is_cuda)


def write_int2(x: torch.Tensor, rotation: torch.Tensor | None, clip_ratio: float,
               spec: QuantSpec, slots: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
               zero: torch.Tensor, backend: str = "auto") -> None:
    """Rotate, clip, quantize, pack and scatter x [N, H, D] into the INT2 store (in place)."""
    if _use_triton(x, backend):
        from oscar_kv.kernels.write import write_int2_triton

        write_int2_triton(x, rotation, clip_ratio, spec, slots, packed, scale, zero)
    else:
        write_int2_ref(x, rotation, clip_ratio, spec, slots, packed, scale, zero)


def write_bf16(x: torch.Tensor, rotation: torch.Tensor | None, slots: torch.Tensor,
               store: torch.Tensor, backend: str = "auto") -> None:
    """store[slots] = bf16(x @ R): one fp32 GEMM and a scatter (torch on every device)."""
    write_bf16_ref(x, rotation, slots, store)


def decode_attention(q: torch.Tensor, k_int2: Int2Store, v_int2: Int2Store,
                     k_bf16: torch.Tensor, v_bf16: torch.Tensor, tables: KVTables,
                     sm_scale: float | None = None, plan: DecodePlan | None = None,
                     q_rotation: torch.Tensor | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """One decode token per sequence over INT2 body + BF16 windows -> out [B, Hq, D]."""
    if _use_triton(q, backend):
        from oscar_kv.kernels.decode import decode_attention_triton

        return decode_attention_triton(q, k_int2, v_int2, k_bf16, v_bf16, tables, sm_scale,
                                       plan, q_rotation)
    out = decode_attention_ref(q, k_int2, v_int2, k_bf16, v_bf16, tables, sm_scale,
                               q_rotation)
    if plan is not None:
        return plan.out.copy_(out)
    return out


__all__ = ["BACKENDS", "DecodePlan", "Int2Store", "KVTables", "contiguous_token_slots",
           "hp_table_len",
           "tables_from_token_slots", "write_int2", "write_bf16", "plan_decode",
           "decode_attention", "prefill_attention", "dequantize_prefix", "rotate_query",
           "write_int2_ref", "write_bf16_ref", "decode_attention_ref"]
