"""Extend (prefill) attention over the mixed pool: plan once per forward, run per layer.

A forward extends request i from prefix_len p_i to p_i + n_i tokens. Its queries see

  * the cached prefix [0, p_i) as the pool holds it *after* this step's flush: positions
    [P, min(body_end(p_i + n_i), p_i)) from the INT2 body (dequantized), the sink
    [0, min(P, p_i)) and the rest of the recent window from the BF16 arena;
  * the chunk's own rotated rows in BF16 (unquantized), causally,

the semantics of `kernels.prefill_attention` and of the HF cache. New tokens are written as
the windows say: positions in [P, body_end(p_i + n_i)) go to INT2, the others to BF16.

Decode: `storage.decode_tables` + `kernels.plan_decode` once per step (`DecodeMeta`), then
`decode_layer` per layer: write the new rows (static shapes), `kernels.decode_attention`
with the query rotation fused. `extend_layer` / `decode_layer` are what the SGLang backend
runs for one layer: q, k post-RoPE and unrotated (keys are centered by the checkpoint's key
means before R_K), v pre-rotated iff `absorbed`; the output
is in V's original domain unless absorbed (then o_proj holds R_V^T).

`plan_extend` does the host work once per forward from host lengths (no host sync);
`extend_attention` runs one layer through an implementation from `EXTEND_IMPLS`:

  "torch"  `kernels.prefill_attention` per request (fp32 math; the CPU path and the oracle);
  "sglang" the prefix dequantized to the model dtype (`kernels.dequantize_prefix`), then
           SGLang's Triton `extend_attention_fwd` over [prefix | chunk] for the whole batch
           (the GPU path; its memory is linear in the prefix, not quadratic).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from oscar_kv.cache.windows import body_end
from oscar_kv.kernels import (
    DecodePlan,
    KVTables,
    decode_attention,
    dequantize_prefix,
    prefill_attention,
)
from oscar_kv.registry import Registry
from oscar_kv.sglang_plugin.numerics import PoolNumerics, rotate, rotate_keys, unrotate
from oscar_kv.sglang_plugin.storage import HP_DTYPE, MixedKVStorage, RowSplit


@dataclass(frozen=True)
class ExtendPlan:
    """One extend forward. prefix_lens, extend_lens: host ints per request; split: where
    the new rows go; prefix: per request KVTables (batch 1) of its cached prefix, or None;
    qo_indptr [B+1], kv_indptr [B+1], kv_indices [sum prefix]: device int32/int64 for the
    batched kernel (kv_indices index the concatenated dequantized prefixes)."""

    prefix_lens: list[int]
    extend_lens: list[int]
    split: RowSplit
    prefix: list[KVTables | None]
    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor

    @property
    def max_extend(self) -> int:
        return max(self.extend_lens, default=0)


def _ranges(spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    parts = [torch.arange(a, b, dtype=torch.long) for a, b in spans if b > a]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _indptr(lens: Sequence[int]) -> torch.Tensor:
    out = torch.zeros(len(lens) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(list(lens), dtype=torch.int32).cumsum(0)
    return out


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def plan_extend(storage: MixedKVStorage, req_to_token: torch.Tensor,
                req_pool_indices: torch.Tensor, prefix_lens: Sequence[int],
                extend_lens: Sequence[int], out_cache_loc: torch.Tensor) -> ExtendPlan:
    """Host lengths + device slot maps -> ExtendPlan (no host sync).

    req_to_token [R, T] int32 (already holding this step's slots and flush remaps);
    req_pool_indices [B] device; out_cache_loc [sum extend_lens] flat ids, batch order."""
    w, lay, dev = storage.window, storage.layout, storage.device
    p_sink = w.sink_tokens
    i2_spans, bf_spans, tables = [], [], []
    start = 0
    for i, (p, n) in enumerate(zip(prefix_lens, extend_lens, strict=True)):
        end = body_end(p + n, w)
        lo, hi = max(p, p_sink), min(p + n, end)  # new positions that go to INT2
        if hi > lo:
            i2_spans.append((start + lo - p, start + hi - p))
            bf_spans += [(start, start + lo - p), (start + hi - p, start + n)]
        else:
            bf_spans.append((start, start + n))
        start += n
        if p == 0:
            tables.append(None)
            continue
        row = req_to_token.index_select(0, req_pool_indices[i:i + 1].to(torch.long))
        int2_map, bf16_map = storage.token_maps(row[:, :p])
        body_hi = min(end, p)
        sink = min(p_sink, p)
        int2_slots = int2_map[:, p_sink:body_hi] if body_hi > p_sink else int2_map[:, :0]
        bf16_slots = torch.cat([bf16_map[:, :sink], bf16_map[:, max(p_sink, end):p]], dim=1)
        lens = _to(torch.tensor([[int2_slots.shape[1], bf16_slots.shape[1]]],
                                dtype=torch.int32), dev)
        tables.append(KVTables(int2_slots.contiguous(), lens[:, 0], bf16_slots.contiguous(),
                               lens[:, 1]))
    loc = out_cache_loc.to(torch.long)
    i2, bf = _to(_ranges(i2_spans), dev), _to(_ranges(bf_spans), dev)
    split = RowSplit(i2, loc.index_select(0, i2), bf,
                     loc.index_select(0, bf) - lay.hp_offset)
    return ExtendPlan(list(prefix_lens), list(extend_lens), split, tables,
                      _to(_indptr(extend_lens), dev), _to(_indptr(prefix_lens), dev),
                      torch.arange(sum(prefix_lens), device=dev))


def _empty_tables(device: torch.device) -> KVTables:
    z = torch.zeros(1, 0, dtype=torch.int32, device=device)
    n = torch.zeros(1, dtype=torch.int32, device=device)
    return KVTables(z, n, z, n)


EXTEND_IMPLS: Registry = Registry("extend attention implementation")


@EXTEND_IMPLS.register("torch")
def extend_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, storage: MixedKVStorage,
                 layer: int, plan: ExtendPlan, sm_scale: float) -> torch.Tensor:
    """Per request `kernels.prefill_attention` (fp32 math). q [T, Hq, D] rotated; k, v the
    chunk's rotated bf16 rows [T, Hkv, D]. Returns [T, Hq, D] in q.dtype."""
    out, s = [], 0
    for n, tables in zip(plan.extend_lens, plan.prefix, strict=True):
        tables = tables if tables is not None else _empty_tables(q.device)
        out.append(prefill_attention(q[s:s + n], k[s:s + n], v[s:s + n], storage.k_int2[layer],
                                     storage.v_int2[layer], storage.k_bf16[layer],
                                     storage.v_bf16[layer], tables, sm_scale))
        s += n
    return torch.cat(out) if out else q.new_empty(q.shape)


@EXTEND_IMPLS.register("sglang")
def extend_sglang(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, storage: MixedKVStorage,
                  layer: int, plan: ExtendPlan, sm_scale: float) -> torch.Tensor:
    """Dequantize every prefix to q.dtype, then SGLang's batched Triton extend kernel."""
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

    hkv, d = k.shape[1:]
    kp, vp = [], []
    for tables in plan.prefix:
        if tables is None:
            continue
        kp.append(dequantize_prefix(storage.k_int2[layer], storage.k_bf16[layer], tables,
                                    q.dtype)[0][0])
        vp.append(dequantize_prefix(storage.v_int2[layer], storage.v_bf16[layer], tables,
                                    q.dtype)[0][0])
    empty = q.new_empty(0, hkv, d)
    k_pre = torch.cat(kp) if kp else empty
    v_pre = torch.cat(vp) if vp else empty
    o = torch.empty_like(q)
    extend_attention_fwd(q.contiguous(), k.to(q.dtype).contiguous(), v.to(q.dtype).contiguous(),
                         o, k_pre, v_pre, plan.qo_indptr, plan.kv_indptr, plan.kv_indices, None,
                         True, None, plan.max_extend, 1.0, 1.0, sm_scale=sm_scale)
    return o


def extend_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     storage: MixedKVStorage, layer: int, plan: ExtendPlan,
                     sm_scale: float | None = None, impl: str = "torch") -> torch.Tensor:
    """q [T, Hq, D], k, v [T, Hkv, D] (all rotated) -> [T, Hq, D] in q.dtype."""
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    return EXTEND_IMPLS.get(impl)(q, k, v, storage, layer, plan, sm_scale)


def _rotate_kv(numerics: PoolNumerics, i: int, k: torch.Tensor, v: torch.Tensor,
               absorbed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    k_rot = rotate_keys(k, numerics, i, HP_DTYPE)
    v_rot = v.to(HP_DTYPE) if absorbed else rotate(v, numerics.r_v[i], HP_DTYPE)
    return k_rot, v_rot


def extend_layer(storage: MixedKVStorage, numerics: PoolNumerics, i: int, q: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor, plan: ExtendPlan, sm_scale: float,
                 absorbed: bool, impl: str = "torch") -> torch.Tensor:
    """One layer of an extend forward (local layer i): q [T, Hq, D], k, v [T, Hkv, D]
    -> [T, Hq, D] in q.dtype. Rotates, writes the chunk, attends."""
    q_rot = rotate(q, numerics.r_k[i], q.dtype)
    k_rot, v_rot = _rotate_kv(numerics, i, k, v, absorbed)
    storage.write_split(i, plan.split, k_rot, v_rot, numerics.clip_k[i], numerics.clip_v[i])
    o = extend_attention(q_rot, k_rot, v_rot, storage, i, plan, sm_scale, impl)
    return o if absorbed else unrotate(o, numerics.r_v[i])


@dataclass(frozen=True)
class DecodeMeta:
    """One decode step, shared by every layer: slot tables and the split-K plan."""

    tables: KVTables
    plan: DecodePlan


def decode_layer(storage: MixedKVStorage, numerics: PoolNumerics, i: int, q: torch.Tensor,
                 k: torch.Tensor | None, v: torch.Tensor | None, loc: torch.Tensor,
                 meta: DecodeMeta, sm_scale: float, absorbed: bool,
                 kernel_backend: str = "auto") -> torch.Tensor:
    """One layer of a decode step: q [B, Hq, D]; k, v [B, Hkv, D] (None: nothing to write);
    loc [B] flat ids -> [B, Hq, D] in the plan's dtype, a fresh tensor (the plan's output
    buffer is reused by the next layer). Static shapes, no host sync: CUDA-graph safe."""
    if k is not None:
        k_rot, v_rot = _rotate_kv(numerics, i, k, v, absorbed)
        storage.write_decode(i, loc, k_rot, v_rot, numerics.clip_k[i], numerics.clip_v[i])
    o = decode_attention(q, storage.k_int2[i], storage.v_int2[i], storage.k_bf16[i],
                         storage.v_bf16[i], meta.tables, sm_scale, meta.plan,
                         q_rotation=numerics.r_k[i], backend=kernel_backend)
    return o.clone() if absorbed else unrotate(o, numerics.r_v[i])
