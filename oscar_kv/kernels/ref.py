"""Pure-torch twins of the kernels: the test oracle, the benchmark baseline, the CPU fallback.

Same signatures as the Triton wrappers. The numerics are `oscar_kv.formats` (quantize_int2,
pack_int2, dequantize_int2); rotations are x @ R with fp32 accumulation. Nothing here syncs
with the host, so the references also run (slowly) inside a CUDA graph.
"""

from __future__ import annotations

import math

import torch

from oscar_kv.config import QuantSpec
from oscar_kv.formats import dequantize_int2, pack_int2, quantize_int2, unpack_int2
from oscar_kv.kernels.layout import Int2Store, KVTables


def rotate_rows(x: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """x [..., D] (any float) -> fp32 x @ R (R [D, D]), or x in fp32 when R is None."""
    xf = x.float()
    return xf if rotation is None else xf @ rotation.float()


def write_int2_ref(x: torch.Tensor, rotation: torch.Tensor | None, clip_ratio: float,
                   spec: QuantSpec, slots: torch.Tensor, packed: torch.Tensor,
                   scale: torch.Tensor, zero: torch.Tensor) -> None:
    """Rotate, clip, quantize and pack rows into a slot-indexed INT2 store, in place.

    x [N, H, D] bf16/fp16/fp32; rotation fp32 [D, D] or None; slots int [N] (distinct);
    packed uint8 [S, H, D/4]; scale, zero [S, H, D/G] in spec.scale_dtype.
    Row n goes to packed[slots[n]], scale[slots[n]], zero[slots[n]].
    """
    codes, s, z = quantize_int2(rotate_rows(x, rotation), spec, clip_ratio)
    idx = slots.to(device=packed.device, dtype=torch.long)
    packed.index_copy_(0, idx, pack_int2(codes))
    scale.index_copy_(0, idx, s)
    zero.index_copy_(0, idx, z)


def write_bf16_ref(x: torch.Tensor, rotation: torch.Tensor | None, slots: torch.Tensor,
                   store: torch.Tensor) -> None:
    """store[slots[n]] = (x[n] @ R) rounded to store.dtype. x [N, H, D]; store [S, H, D]."""
    rows = rotate_rows(x, rotation).to(store.dtype)
    store.index_copy_(0, slots.to(device=store.device, dtype=torch.long), rows)


def rotate_query(q: torch.Tensor, rotation: torch.Tensor | None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, D] -> q @ R (fp32 accumulation), written to `out` (default: fp32, new)."""
    if rotation is None:
        return q if out is None else out.copy_(q)
    if out is None:
        return q.float() @ rotation.float()
    if out.dtype == torch.float32 and q.dtype == torch.float32:
        return torch.matmul(q, rotation, out=out)
    return out.copy_(q.float() @ rotation.float())


def gather_int2_rows(store: Int2Store, slots: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize store rows at slots [...] -> [..., Hkv, D] in `dtype` (fp32 math)."""
    idx = slots.long()
    codes = unpack_int2(store.packed[idx])
    return dequantize_int2(codes, store.scale[idx], store.zero[idx], store.spec, out_dtype=dtype)


def decode_attention_ref(q: torch.Tensor, k_int2: Int2Store, v_int2: Int2Store,
                         k_bf16: torch.Tensor, v_bf16: torch.Tensor, tables: KVTables,
                         sm_scale: float | None = None, q_rotation: torch.Tensor | None = None,
                         compute_dtype: torch.dtype = torch.float32,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One query token per sequence against its INT2 body and BF16 windows, one softmax.

    q [B, Hq, D] (already rotated, or rotated here by q_rotation [D, D]);
    k_int2/v_int2 stores [S, Hkv, ...]; k_bf16/v_bf16 [S2, Hkv, D]; tables: KVTables.
    Query head j reads KV head j // (Hq / Hkv). Math in `compute_dtype` (fp32 by default; the
    tests use fp64 as the oracle and bf16 to measure the precision's own error).
    Returns out [B, Hq, D] in out_dtype (default q.dtype); a sequence with no keys gives 0.
    """
    b, hq, d = q.shape
    hkv = k_bf16.shape[1]
    g = hq // hkv
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    out_dtype = q.dtype if out_dtype is None else out_dtype
    qr = rotate_query(q, q_rotation).to(compute_dtype)

    nb = tables.int2_slots.shape[1]
    nh = tables.bf16_slots.shape[1]
    k = torch.cat([gather_int2_rows(k_int2, tables.int2_slots, compute_dtype),
                   k_bf16[tables.bf16_slots.long()].to(compute_dtype)], dim=1)
    v = torch.cat([gather_int2_rows(v_int2, tables.int2_slots, compute_dtype),
                   v_bf16[tables.bf16_slots.long()].to(compute_dtype)], dim=1)
    dev = q.device
    valid = torch.cat([torch.arange(nb, device=dev)[None] < tables.body_len.to(dev)[:, None],
                       torch.arange(nh, device=dev)[None] < tables.hp_len.to(dev)[:, None]],
                      dim=1)  # [B, Lk]
    # scores [B, Hkv, g, Lk]
    s = torch.einsum("bhgd,bkhd->bhgk", qr.view(b, hkv, g, d), k) * sm_scale
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    m = s.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(compute_dtype).min)
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    o = torch.einsum("bhgk,bkhd->bhgd", p, v) / denom.clamp(min=torch.finfo(compute_dtype).tiny)
    return o.reshape(b, hq, d).to(out_dtype)
