"""Prefill / extend attention: a chunk of queries against a quantized prefix + itself.

The semantics of a chunked prefill in a mixed cache: the T queries of the current chunk
(positions prefix_len .. prefix_len + T - 1) see every prefix key in the form the cache holds
it (INT2 body dequantized, BF16 windows as stored) and the chunk's own rotated BF16 keys
causally. This first version dequantizes the prefix in torch (fp32) and runs one fp32
attention; it is correct on any device and is the oracle for a fused kernel later.
"""

from __future__ import annotations

import math

import torch

from oscar_kv.errors import OscarError
from oscar_kv.kernels.layout import Int2Store, KVTables
from oscar_kv.kernels.ref import gather_int2_rows


def dequantize_prefix(store: Int2Store, bf16_store: torch.Tensor, tables: KVTables,
                      dtype: torch.dtype = torch.float32
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of every sequence's prefix, padded: ([B, max_body + max_hp, Hkv, D] in dtype,
    valid bool [B, max_body + max_hp]). Body rows first, then BF16 rows."""
    dev = bf16_store.device
    rows = torch.cat([gather_int2_rows(store, tables.int2_slots, dtype),
                      bf16_store[tables.bf16_slots.long()].to(dtype)], dim=1)
    nb, nh = tables.int2_slots.shape[1], tables.bf16_slots.shape[1]
    valid = torch.cat([torch.arange(nb, device=dev)[None] < tables.body_len.to(dev)[:, None],
                       torch.arange(nh, device=dev)[None] < tables.hp_len.to(dev)[:, None]],
                      dim=1)
    return rows, valid


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      k_int2: Int2Store, v_int2: Int2Store, k_bf16: torch.Tensor,
                      v_bf16: torch.Tensor, prefix: KVTables, sm_scale: float | None = None,
                      causal: bool = True) -> torch.Tensor:
    """Attention of one sequence's chunk to its cached prefix and to itself.

    q [T, Hq, D] (rotated); k, v [T, Hkv, D] the chunk's rotated rows (BF16, unquantized);
    prefix: KVTables with batch 1 naming the cached prefix rows (any order);
    returns [T, Hq, D] in q.dtype. Math in fp32; GQA: query head j reads KV head j // g.
    """
    t, hq, d = q.shape
    hkv = k.shape[1]
    if prefix.batch_size != 1 or hq % hkv or k.shape != v.shape or k.shape[0] != t:
        raise OscarError("prefill_attention takes one sequence: q [T, Hq, D], k/v [T, Hkv, D] "
                         "with Hq a multiple of Hkv and prefix tables of batch 1")
    g = hq // hkv
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    kp, valid = dequantize_prefix(k_int2, k_bf16, prefix)
    vp, _ = dequantize_prefix(v_int2, v_bf16, prefix)
    keys = torch.cat([kp[0], k.float()], dim=0)  # [Lp + T, Hkv, D]
    vals = torch.cat([vp[0], v.float()], dim=0)
    lp = kp.shape[1]
    chunk_mask = torch.ones(t, t, dtype=torch.bool, device=q.device)
    if causal:
        chunk_mask = chunk_mask.tril()
    mask = torch.cat([valid[0][None].expand(t, lp), chunk_mask], dim=1)  # [T, Lp + T]
    s = torch.einsum("thgd,khd->hgtk", q.float().view(t, hkv, g, d), keys) * sm_scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = torch.einsum("hgtk,khd->thgd", p, vals)
    return o.reshape(t, hq, d).to(q.dtype)
