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
           a request whose fp32 scores would exceed `EXTEND_TORCH_SCORE_BUDGET` elements runs
           in blocks of queries over the same keys (`_prefill_blocked`);
  "sglang" per group of consecutive requests (`ExtendGroup`, at most `EXTEND_PREFIX_BUDGET`
           cached prefix tokens each; a longer prefix is a group of its own), the group's
           prefixes dequantized to the model dtype (`dequantize_prefixes`, row for row
           `kernels.dequantize_prefix`, fp32 temporaries bounded by `DEQUANT_CHUNK_ROWS`
           rows), then SGLang's Triton `extend_attention_fwd` over [prefix | chunk] for the
           group (the GPU path; the workspace is bounded by the budget, not by the batch).
           Each request's rows are computed by the same kernel programs whatever the
           grouping, so the output does not depend on the budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from oscar_kv.cache.windows import body_end
from oscar_kv.errors import OscarError
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

EXTEND_PREFIX_BUDGET = 1 << 16  # "sglang": cached prefix tokens dequantized per kernel call
DEQUANT_CHUNK_ROWS = 1 << 14  # INT2 rows per dequantization step (bounds fp32 temporaries)
EXTEND_TORCH_SCORE_BUDGET = 1 << 26  # "torch": fp32 score elements per request and block


def prefix_groups(prefix_lens: Sequence[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive request ranges [a, b) covering the batch in order (greedy), each holding at
    most `budget` cached prefix tokens in total; a request with more goes alone."""
    if budget < 1:
        raise OscarError(f"the extend prefix budget must be >= 1 token, got {budget}")
    groups, a, total = [], 0, 0
    for i, p in enumerate(prefix_lens):
        if i > a and total + p > budget:
            groups.append((a, i))
            a, total = i, 0
        total += p
    if len(prefix_lens):
        groups.append((a, len(prefix_lens)))
    return groups


@dataclass(frozen=True)
class ExtendGroup:
    """Requests [r0, r1) of an ExtendPlan that one extend kernel call runs (see
    `prefix_groups`): their chunk rows tokens = (t0, t1) of q/k/v, their prefix rows
    body = (b0, b1) of plan.body_slots and hp = (h0, h1) of plan.hp_rows; qo_indptr,
    kv_indptr [r1 - r0 + 1] int32 from 0 and kv_indices [sum prefix of the group] int64 into
    cat(the group's body rows, its hp rows): request i reads its body rows, then its BF16
    rows (sink, then recent)."""

    reqs: tuple[int, int]
    tokens: tuple[int, int]
    body: tuple[int, int]
    hp: tuple[int, int]
    max_extend: int
    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor


@dataclass(frozen=True)
class ExtendPlan:
    """One extend forward. prefix_lens, extend_lens, body_lens, hp_lens: host ints per request
    (hp = BF16 sink + recent rows of the prefix); split: where the new rows go;
    body_slots [sum body_lens] INT2 ids and hp_rows [sum hp_lens] BF16 store rows of every
    request's cached prefix, batch order (request i: body then sink, then recent);
    groups: the batch in `ExtendGroup`s for the batched kernel (one when every prefix fits
    the budget together)."""

    prefix_lens: list[int]
    extend_lens: list[int]
    body_lens: list[int]
    hp_lens: list[int]
    split: RowSplit
    body_slots: torch.Tensor
    hp_rows: torch.Tensor
    groups: tuple[ExtendGroup, ...]

    @property
    def max_extend(self) -> int:
        return max(self.extend_lens, default=0)

    def prefix_rows(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Request i's prefix: (INT2 body slots, BF16 store rows), views."""
        b0, h0 = sum(self.body_lens[:i]), sum(self.hp_lens[:i])  # CPU path only
        return (self.body_slots[b0:b0 + self.body_lens[i]],
                self.hp_rows[h0:h0 + self.hp_lens[i]])

    def prefix_tables(self, i: int) -> KVTables | None:
        """Request i's prefix as batch-1 KVTables (views), None without a prefix."""
        if not self.prefix_lens[i]:
            return None
        body, hp = self.prefix_rows(i)
        lens = torch.tensor([body.numel(), hp.numel()], dtype=torch.int32,
                            device=self.body_slots.device)
        return KVTables(body[None], lens[:1], hp[None], lens[1:])


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
                extend_lens: Sequence[int], out_cache_loc: torch.Tensor,
                prefix_budget: int | None = None) -> ExtendPlan:
    """Host lengths + device slot maps -> ExtendPlan (no host sync; one H2D copy).

    req_to_token [R, T] int32 (already holding this step's slots and flush remaps);
    req_pool_indices [B] device; out_cache_loc [sum extend_lens] flat ids, batch order;
    prefix_budget: prefix tokens per `ExtendGroup` (default `EXTEND_PREFIX_BUDGET`)."""
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
    bo, ho, so = indptr(body_lens), indptr(hp_lens), indptr(list(extend_lens))
    nb = int(bo[-1])
    spans = prefix_groups(prefix_lens, EXTEND_PREFIX_BUDGET if prefix_budget is None
                          else prefix_budget)
    kv_idx, g_qo, g_kv = [], [], []
    for r0, r1 in spans:  # kv_indices of each group index cat(its body rows, its hp rows)
        nb_g = bo[r1] - bo[r0]
        kv_idx += [np.concatenate([ar(bo[i], bo[i + 1]) - bo[r0],
                                   nb_g + ar(ho[i], ho[i + 1]) - ho[r0]]) for i in range(r0, r1)]
        g_qo.append(so[r0:r1 + 1] - so[r0])
        g_kv.append(indptr(list(prefix_lens[r0:r1])))
    cat = lambda xs: np.concatenate(xs) if xs else ar(0)  # noqa: E731
    i2, bf, reqs, pos, kv_indices, qo_indptr, kv_indptr = _upload(
        [cat(i2_idx), cat(bf_idx), cat([req_of(body_lens), req_of(hp_lens)]),
         cat(body_pos + hp_pos), cat(kv_idx), cat(g_qo), cat(g_kv)], dev)
    ids = req_to_token[req_pool_indices.to(torch.long).index_select(0, reqs), pos].to(torch.long)
    int2_map, bf16_map = storage.token_maps(ids)  # clamped into each store
    loc = out_cache_loc.to(torch.long)
    split = RowSplit(i2, loc.index_select(0, i2), bf, loc.index_select(0, bf) - lay.hp_offset)
    qo_indptr, kv_indptr = qo_indptr.to(torch.int32), kv_indptr.to(torch.int32)
    groups, kv0, ip0 = [], 0, 0
    for r0, r1 in spans:
        n_kv, n_ip = int(sum(prefix_lens[r0:r1])), r1 - r0 + 1
        groups.append(ExtendGroup((r0, r1), (int(so[r0]), int(so[r1])),
                                  (int(bo[r0]), int(bo[r1])), (int(ho[r0]), int(ho[r1])),
                                  max(extend_lens[r0:r1]), qo_indptr[ip0:ip0 + n_ip],
                                  kv_indptr[ip0:ip0 + n_ip], kv_indices[kv0:kv0 + n_kv]))
        kv0, ip0 = kv0 + n_kv, ip0 + n_ip
    return ExtendPlan(list(prefix_lens), list(extend_lens), body_lens, hp_lens, split,
                      int2_map[:nb], bf16_map[nb:], tuple(groups))


def _empty_tables(device: torch.device) -> KVTables:
    z = torch.zeros(1, 0, dtype=torch.int32, device=device)
    n = torch.zeros(1, dtype=torch.int32, device=device)
    return KVTables(z, n, z, n)


def dequantize_rows(store: Int2Store, bf16_store: torch.Tensor, body_slots: torch.Tensor,
                    hp_rows: torch.Tensor, dtype: torch.dtype,
                    chunk_rows: int | None = None) -> torch.Tensor:
    """cat(INT2 rows at body_slots dequantized, BF16 store rows hp_rows) in `dtype`
    [nb + nh, Hkv, D], written in place: `gather_int2_rows` on at most chunk_rows (default
    `DEQUANT_CHUNK_ROWS`) rows at a time, so its fp32 temporaries stay bounded; rows are
    dequantized independently, so the values equal one gather of all of them."""
    nb, nh = body_slots.numel(), hp_rows.numel()
    out = torch.empty(nb + nh, *bf16_store.shape[1:], dtype=dtype, device=bf16_store.device)
    step = max(1, DEQUANT_CHUNK_ROWS if chunk_rows is None else chunk_rows)
    for a in range(0, nb, step):
        e = min(a + step, nb)
        out[a:e].copy_(gather_int2_rows(store, body_slots[a:e], dtype))
    if nh:
        out[nb:].copy_(bf16_store.index_select(0, hp_rows))  # == .to(dtype)
    return out


def dequantize_prefixes(store: Int2Store, bf16_store: torch.Tensor, plan: ExtendPlan,
                        dtype: torch.dtype, group: ExtendGroup | None = None) -> torch.Tensor:
    """The cached prefix rows of a group's requests (default: the whole batch) in `dtype`:
    cat(their INT2 body rows dequantized, their BF16 rows) [sum prefix, Hkv, D], what the
    group's kv_indices index; row for row what `kernels.dequantize_prefix` gives."""
    (b0, b1), (h0, h1) = ((0, plan.body_slots.numel()), (0, plan.hp_rows.numel())) \
        if group is None else (group.body, group.hp)
    return dequantize_rows(store, bf16_store, plan.body_slots[b0:b1], plan.hp_rows[h0:h1],
                           dtype)


EXTEND_IMPLS: Registry = Registry("extend attention implementation")


def _prefill_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     storage: MixedKVStorage, layer: int, plan: ExtendPlan, i: int,
                     sm_scale: float) -> torch.Tensor:
    """`kernels.prefill_attention` of request i (q [n, Hq, D], k, v [n, Hkv, D]) in blocks of
    queries: the prefix dequantized once (fp32), each block's scores within
    `EXTEND_TORCH_SCORE_BUDGET` elements. Same math, fp32 rounding aside."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    body, hp = plan.prefix_rows(i)
    kp = dequantize_rows(storage.k_int2[layer], storage.k_bf16[layer], body, hp, torch.float32)
    vp = dequantize_rows(storage.v_int2[layer], storage.v_bf16[layer], body, hp, torch.float32)
    lp = kp.shape[0]
    keys, vals = torch.cat([kp, k.float()]), torch.cat([vp, v.float()])
    del kp, vp
    qf = q.float().view(t, hkv, hq // hkv, d)
    pos = torch.arange(t, device=q.device)
    out = q.new_empty(q.shape)
    blk = max(1, EXTEND_TORCH_SCORE_BUDGET // (hq * (lp + t)))
    for a in range(0, t, blk):
        e = min(a + blk, t)
        s = torch.einsum("thgd,khd->hgtk", qf[a:e], keys[:lp + e]) * sm_scale
        s[..., lp:].masked_fill_(pos[None, :e] > pos[a:e, None], float("-inf"))  # causal
        p = torch.softmax(s, dim=-1)
        del s
        out[a:e] = torch.einsum("hgtk,khd->thgd", p, vals[:lp + e]).reshape(e - a, hq, d)
    return out


@EXTEND_IMPLS.register("torch")
def extend_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, storage: MixedKVStorage,
                 layer: int, plan: ExtendPlan, sm_scale: float) -> torch.Tensor:
    """Per request `kernels.prefill_attention` (fp32 math), in blocks of queries when its
    scores would exceed `EXTEND_TORCH_SCORE_BUDGET` elements. q [T, Hq, D] rotated; k, v the
    chunk's rotated bf16 rows [T, Hkv, D]. Returns [T, Hq, D] in q.dtype."""
    out, s = q.new_empty(q.shape), 0
    for i, n in enumerate(plan.extend_lens):
        qi, ki, vi = q[s:s + n], k[s:s + n], v[s:s + n]
        if q.shape[1] * n * (plan.prefix_lens[i] + n) <= EXTEND_TORCH_SCORE_BUDGET:
            tables = plan.prefix_tables(i) or _empty_tables(q.device)
            out[s:s + n] = prefill_attention(qi, ki, vi, storage.k_int2[layer],
                                             storage.v_int2[layer], storage.k_bf16[layer],
                                             storage.v_bf16[layer], tables, sm_scale)
        else:
            out[s:s + n] = _prefill_blocked(qi, ki, vi, storage, layer, plan, i, sm_scale)
        s += n
    return out


@EXTEND_IMPLS.register("sglang")
def extend_sglang(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, storage: MixedKVStorage,
                  layer: int, plan: ExtendPlan, sm_scale: float) -> torch.Tensor:
    """Per `ExtendGroup`: its prefixes dequantized to q.dtype, then SGLang's batched Triton
    extend kernel on its rows (the workspace of one group is freed before the next)."""
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

    q = q.contiguous()
    k, v = k.to(q.dtype).contiguous(), v.to(q.dtype).contiguous()
    o = torch.empty_like(q)
    for g in plan.groups:
        t0, t1 = g.tokens
        if t1 == t0:
            continue
        k_pre = dequantize_prefixes(storage.k_int2[layer], storage.k_bf16[layer], plan, q.dtype,
                                    g)
        v_pre = dequantize_prefixes(storage.v_int2[layer], storage.v_bf16[layer], plan, q.dtype,
                                    g)
        extend_attention_fwd(q[t0:t1], k[t0:t1], v[t0:t1], o[t0:t1], k_pre, v_pre, g.qo_indptr,
                             g.kv_indptr, g.kv_indices, None, True, None, g.max_extend, 1.0,
                             1.0, sm_scale=sm_scale)
        del k_pre, v_pre
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
