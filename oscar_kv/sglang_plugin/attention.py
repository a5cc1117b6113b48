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

`plan_extend` does the host work once per forward from host lengths (no host sync, one H2D
copy, one gather of every prefix's slot ids); `extend_attention` runs one layer through an
implementation from `EXTEND_IMPLS`:

  "torch"  `kernels.prefill_attention` per request (fp32 math; the CPU path and the oracle);
  "sglang" every request's prefix dequantized to the model dtype in one gather per layer and
           side (`dequantize_prefixes`, row for row `kernels.dequantize_prefix`), then SGLang's
           Triton `extend_attention_fwd` over [prefix | chunk] for the whole batch (the GPU
           path; its memory is linear in the prefix, not quadratic).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from oscar_kv.cache.windows import body_end
from oscar_kv.kernels import (
    DecodePlan,
    Int2Store,
    KVTables,
    decode_attention,
    prefill_attention,
)
from oscar_kv.kernels.ref import gather_int2_rows
from oscar_kv.registry import Registry
from oscar_kv.sglang_plugin.numerics import PoolNumerics, rotate, rotate_keys, unrotate
from oscar_kv.sglang_plugin.storage import HP_DTYPE, DecodeTargets, MixedKVStorage, RowSplit


@dataclass(frozen=True)
class ExtendPlan:
    """One extend forward. prefix_lens, extend_lens, body_lens, hp_lens: host ints per request
    (hp = BF16 sink + recent rows of the prefix); split: where the new rows go;
    body_slots [sum body_lens] INT2 ids and hp_rows [sum hp_lens] BF16 store rows of every
    request's cached prefix, batch order (request i: body then sink, then recent);
    qo_indptr, kv_indptr [B+1] int32 and kv_indices [sum prefix] int64 for the batched kernel:
    kv_indices index cat(body rows, hp rows), so request i reads its body rows, then its BF16
    rows, in the order above."""

    prefix_lens: list[int]
    extend_lens: list[int]
    body_lens: list[int]
    hp_lens: list[int]
    split: RowSplit
    body_slots: torch.Tensor
    hp_rows: torch.Tensor
    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor

    @property
    def max_extend(self) -> int:
        return max(self.extend_lens, default=0)

    def prefix_tables(self, i: int) -> KVTables | None:
        """Request i's prefix as batch-1 KVTables (views), None without a prefix."""
        if not self.prefix_lens[i]:
            return None
        nb, nh = self.body_lens[i], self.hp_lens[i]
        b0, h0 = sum(self.body_lens[:i]), sum(self.hp_lens[:i])  # CPU path only
        lens = torch.tensor([nb, nh], dtype=torch.int32, device=self.body_slots.device)
        return KVTables(self.body_slots[None, b0:b0 + nb], lens[:1],
                        self.hp_rows[None, h0:h0 + nh], lens[1:])


def _upload(parts: Sequence[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Host int64 arrays -> device tensors in one (pinned) copy."""
    flat = torch.from_numpy(np.concatenate(parts).astype(np.int64, copy=False))
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    else:
        flat = flat.to(device)
    return list(torch.split(flat, [len(p) for p in parts]))


def plan_extend(storage: MixedKVStorage, req_to_token: torch.Tensor,
                req_pool_indices: torch.Tensor, prefix_lens: Sequence[int],
                extend_lens: Sequence[int], out_cache_loc: torch.Tensor) -> ExtendPlan:
    """Host lengths + device slot maps -> ExtendPlan (no host sync; one H2D copy).

    req_to_token [R, T] int32 (already holding this step's slots and flush remaps);
    req_pool_indices [B] device; out_cache_loc [sum extend_lens] flat ids, batch order."""
    w, lay, dev = storage.window, storage.layout, storage.device
    p_sink = w.sink_tokens
    i2_idx, bf_idx, body_pos, hp_pos, body_lens, hp_lens = [], [], [], [], [], []
    start = 0
    ar = np.arange
    for p, n in zip(prefix_lens, extend_lens, strict=True):
        end = body_end(p + n, w)
        lo, hi = max(p, p_sink), min(p + n, end)  # new positions that go to INT2
        if hi > lo:
            i2_idx.append(ar(start + lo - p, start + hi - p))
            bf_idx += [ar(start, start + lo - p), ar(start + hi - p, start + n)]
        else:
            bf_idx.append(ar(start, start + n))
        start += n
        # the prefix as the pool holds it after this step's flush
        body = ar(p_sink, min(end, p)) if min(end, p) > p_sink else ar(0)
        hp = np.concatenate([ar(min(p_sink, p)), ar(max(p_sink, end), p)])
        body_pos.append(body)
        hp_pos.append(hp)
        body_lens.append(len(body))
        hp_lens.append(len(hp))
    b = len(body_lens)
    req_of = lambda lens: np.repeat(ar(b), lens)  # noqa: E731
    indptr = lambda lens: np.concatenate([[0], np.cumsum(lens, dtype=np.int64)])  # noqa: E731
    bo, ho = indptr(body_lens), indptr(hp_lens)
    nb = int(bo[-1])
    kv_idx = [np.concatenate([ar(bo[i], bo[i + 1]), nb + ar(ho[i], ho[i + 1])]) for i in range(b)]
    cat = lambda xs: np.concatenate(xs) if xs else ar(0)  # noqa: E731
    i2, bf, reqs, pos, qo_indptr, kv_indptr, kv_indices = _upload(
        [cat(i2_idx), cat(bf_idx), cat([req_of(body_lens), req_of(hp_lens)]),
         cat(body_pos + hp_pos), indptr(list(extend_lens)), indptr(list(prefix_lens)),
         cat(kv_idx)], dev)
    ids = req_to_token[req_pool_indices.to(torch.long).index_select(0, reqs), pos].to(torch.long)
    int2_map, bf16_map = storage.token_maps(ids)  # clamped into each store
    loc = out_cache_loc.to(torch.long)
    split = RowSplit(i2, loc.index_select(0, i2), bf, loc.index_select(0, bf) - lay.hp_offset)
    return ExtendPlan(list(prefix_lens), list(extend_lens), body_lens, hp_lens, split,
                      int2_map[:nb], bf16_map[nb:], qo_indptr.to(torch.int32),
                      kv_indptr.to(torch.int32), kv_indices)


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
    for i, n in enumerate(plan.extend_lens):
        tables = plan.prefix_tables(i) or _empty_tables(q.device)
        out.append(prefill_attention(q[s:s + n], k[s:s + n], v[s:s + n], storage.k_int2[layer],
                                     storage.v_int2[layer], storage.k_bf16[layer],
                                     storage.v_bf16[layer], tables, sm_scale))
        s += n
    return torch.cat(out) if out else q.new_empty(q.shape)


def dequantize_prefixes(store: Int2Store, bf16_store: torch.Tensor, plan: ExtendPlan,
                        dtype: torch.dtype) -> torch.Tensor:
    """Every request's cached prefix rows in `dtype`: cat(INT2 body rows dequantized,
    BF16 rows) [sum prefix, Hkv, D], row for row what `kernels.dequantize_prefix` gives."""
    return torch.cat([gather_int2_rows(store, plan.body_slots, dtype),
                      bf16_store.index_select(0, plan.hp_rows).to(dtype)])


@EXTEND_IMPLS.register("sglang")
def extend_sglang(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, storage: MixedKVStorage,
                  layer: int, plan: ExtendPlan, sm_scale: float) -> torch.Tensor:
    """Dequantize all prefixes to q.dtype at once, then SGLang's batched Triton extend kernel."""
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

    k_pre = dequantize_prefixes(storage.k_int2[layer], storage.k_bf16[layer], plan, q.dtype)
    v_pre = dequantize_prefixes(storage.v_int2[layer], storage.v_bf16[layer], plan, q.dtype)
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
                 k: torch.Tensor | None, v: torch.Tensor | None,
                 loc: torch.Tensor | DecodeTargets,
                 meta: DecodeMeta, sm_scale: float, absorbed: bool,
                 kernel_backend: str = "auto") -> torch.Tensor:
    """One layer of a decode step: q [B, Hq, D]; k, v [B, Hkv, D] (None: nothing to write);
    loc [B] flat ids (or their `storage.decode_targets`, computed once per step) -> [B, Hq, D]
    in the plan's dtype, a fresh tensor (the plan's output buffer is reused by the next
    layer). Static shapes, no host sync: CUDA-graph safe."""
    if k is not None:
        k_rot, v_rot = _rotate_kv(numerics, i, k, v, absorbed)
        storage.write_decode(i, loc, k_rot, v_rot, numerics.clip_k[i], numerics.clip_v[i])
    o = decode_attention(q, storage.k_int2[i], storage.v_int2[i], storage.k_bf16[i],
                         storage.v_bf16[i], meta.tables, sm_scale, meta.plan,
                         q_rotation=numerics.r_k[i], backend=kernel_backend)
    return o.clone() if absorbed else unrotate(o, numerics.r_v[i])
