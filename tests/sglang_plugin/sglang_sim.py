"""Test helpers for the int2 server's data path (framework-free): random q/k/v streams per
request and layer (equal rows for equal token prefixes), random rotations, the attention
oracle, `TinyTree` (a per-token stand-in for SGLang's radix tree: one owner per slot, locks,
eviction) and `SimServer`, which runs one forward exactly as the SGLang hooks + backend do
(planner -> apply_slot_plan -> plan_extend / decode tables -> extend_layer / decode_layer),
checks every layer against the oracle and releases slots by SGLang's token protocol."""

from __future__ import annotations

import math
import zlib

import torch

from oscar_kv.cache.windows import body_end
from oscar_kv.config import QuantSpec, WindowSpec
from oscar_kv.formats import fake_quant
from oscar_kv.kernels import hp_table_len, plan_decode
from oscar_kv.sglang_plugin.attention import (
    DecodeMeta,
    decode_layer,
    extend_layer,
    plan_extend,
)
from oscar_kv.sglang_plugin.numerics import PoolNumerics
from oscar_kv.sglang_plugin.planner import SlotPlanner
from oscar_kv.sglang_plugin.pool import apply_slot_plan
from oscar_kv.sglang_plugin.pool_index import (
    PoolIndex,
    PoolLayout,
    cacheable_prefix,
    shareable_prefix,
)
from oscar_kv.sglang_plugin.storage import MixedKVStorage


def orthogonal(layers: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(layers, d, d, generator=g, dtype=torch.float64))
    return q.float()


class Streams:
    """q [L, T, Hq, D], k, v [L, T, Hkv, D] fp32 per request id (deterministic). A request
    registered with tokens gets rows that depend on its token prefix only, so requests that
    share a prefix share those rows (as a real model's K/V would)."""

    def __init__(self, layers: int, hq: int, hkv: int, d: int, max_len: int = 256) -> None:
        self.shape = (layers, max_len, hq, hkv, d)
        self._cache: dict[str, tuple] = {}
        self.tokens: dict[str, list[int]] = {}

    def register(self, rid: str, tokens: list[int]) -> None:
        self.tokens[rid] = list(tokens)
        self._cache.pop(rid, None)

    def __call__(self, rid: str):
        if rid not in self._cache:
            layers, t, hq, hkv, d = self.shape
            if rid in self.tokens:
                seeds = [zlib.crc32(repr(self.tokens[rid][:i + 1]).encode())
                         for i in range(len(self.tokens[rid]))]
            else:
                seeds = [zlib.crc32(f"{rid}/{i}".encode()) for i in range(t)]
            rows = []
            for seed in seeds:
                g = torch.Generator().manual_seed(seed)
                rows.append((torch.randn(layers, hq, d, generator=g),
                             torch.randn(layers, hkv, d, generator=g) * 2 + 0.3,
                             torch.randn(layers, hkv, d, generator=g)))
            self._cache[rid] = tuple(torch.stack(x, dim=1) for x in zip(*rows, strict=True))
        return self._cache[rid]


class TinyTree:
    """Per-token prefix tree (the semantics of SGLang's RadixCache at page size 1): a node per
    prefix, owning one slot id; locked nodes are never evicted; evicted ids are freed."""

    def __init__(self, index: PoolIndex) -> None:
        self.index = index
        self.ids: dict[tuple, int] = {}
        self.locks: dict[tuple, int] = {}

    def match(self, tokens: list[int], limit: int) -> list[int]:
        out = []
        for i in range(min(limit, len(tokens))):
            sid = self.ids.get(tuple(tokens[:i + 1]))
            if sid is None:
                break
            out.append(sid)
        return out

    def insert(self, tokens: list[int], ids: list[int]) -> list[int]:
        """-> the tree's ids for tokens; positions already cached keep the tree's id."""
        return [self.ids.setdefault(tuple(tokens[:i + 1]), s) for i, s in enumerate(ids)]

    def lock(self, tokens: list[int], n: int, delta: int) -> None:
        for i in range(n):
            key = tuple(tokens[:i + 1])
            self.locks[key] = self.locks.get(key, 0) + delta
            assert self.locks[key] >= 0

    def size(self) -> int:
        return len(self.ids)

    def evict(self, n: int) -> int:
        done = 0
        while done < n:
            parents = {k[:-1] for k in self.ids}
            leaves = [k for k in self.ids if k not in parents and not self.locks.get(k)]
            if not leaves:
                break
            for k in leaves[:n - done]:
                self.index.free_slots([self.ids.pop(k)])
                done += 1
        return done


def oracle(q_rot: torch.Tensor, k_rot: torch.Tensor, v_rot: torch.Tensor, start: int,
           window: WindowSpec, spec: QuantSpec, clip_k: float, clip_v: float,
           chunk_bf16: bool) -> torch.Tensor:
    """Queries at positions start..start+n-1 (q_rot [n, Hq, D]) against keys 0..L-1
    (k_rot, v_rot [L, Hkv, D] rotated, unrounded fp32) as the mixed cache of length L holds
    them: INT2 for [P, body_end(L)) (the chunk itself BF16 if chunk_bf16), else BF16; causal.
    Returns fp32 [n, Hq, D] (rotated V domain)."""
    n, hq, d = q_rot.shape
    length, hkv = k_rot.shape[:2]
    kb, vb = k_rot.bfloat16().float(), v_rot.bfloat16().float()
    kq, vq = fake_quant(kb, spec, clip_k), fake_quant(vb, spec, clip_v)
    pos = torch.arange(length)
    int2 = (pos >= window.sink_tokens) & (pos < body_end(length, window))
    if chunk_bf16:
        int2 &= pos < start
    keys = torch.where(int2[:, None, None], kq, kb).repeat_interleave(hq // hkv, dim=1)
    vals = torch.where(int2[:, None, None], vq, vb).repeat_interleave(hq // hkv, dim=1)
    s = torch.einsum("qhd,khd->hqk", q_rot.double(), keys.double()) / math.sqrt(d)
    causal = pos[None, :] <= (start + torch.arange(n))[:, None]
    p = s.masked_fill(~causal, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", p, vals.double()).float()


class SimServer:
    """planner + storage + req_to_token on CPU, driven like the SGLang glue + backend."""

    def __init__(self, window: WindowSpec, spec: QuantSpec, layers: int = 2, hq: int = 4,
                 hkv: int = 2, d: int = 32, n_int2: int = 400, max_reqs: int = 4,
                 absorbed: bool = False, clips=(0.9, 0.85), impl: str = "torch",
                 kernel_backend: str = "auto", ctx: int = 256, centered: bool = True,
                 radix: bool = False, chunk: int | None = None) -> None:
        self.window, self.spec, self.absorbed = window, spec, absorbed
        self.hq, self.hkv, self.d, self.layers = hq, hkv, d, layers
        lay = PoolLayout(window, n_int2, max_reqs)
        self.planner = SlotPlanner(PoolIndex(lay))
        self.tree = TinyTree(self.planner.index) if radix else None
        self.chunk = chunk
        self.protected: dict[str, int] = {}  # rid -> tree-owned prefix (cache_protected_len)
        self.hits: dict[str, list[int]] = {}  # rid -> the tree's ids of its matched prefix
        self.storage = MixedKVStorage(lay, layers, hkv, d, spec, "cpu", kernel_backend)
        g = torch.Generator().manual_seed(3)
        k_mean = torch.randn(layers, hkv, d, generator=g) * 0.5 + 0.3 if centered else None
        self.numerics = PoolNumerics(window, spec, orthogonal(layers, d, 1),
                                     orthogonal(layers, d, 2), [clips[0]] * layers,
                                     [clips[1]] * layers, k_mean=k_mean)
        self.req_to_token = torch.zeros(max_reqs + 1, ctx, dtype=torch.int32)
        self.streams = Streams(layers, hq, hkv, d, ctx)
        self.impl, self.kernel_backend = impl, kernel_backend
        self.max_err = 0.0

    def _inputs(self, rid: str, layer: int, a: int, b: int):
        q, k, v = (x[layer, a:b] for x in self.streams(rid))
        if self.absorbed:  # v_proj emits v R_V
            v = v @ self.numerics.r_v[layer]
        return q, k, v

    def _check(self, got, rid, layer, start, n, chunk_bf16):
        n_, r_k, r_v = self.numerics, self.numerics.r_k[layer], self.numerics.r_v[layer]
        q, k, v = (x[layer] for x in self.streams(rid))
        length = start + n
        if n_.k_mean is not None:  # keys are stored centered: (k - k_mean) R_K
            k = k - n_.k_mean[layer]
        want = oracle(q[start:length] @ r_k, k[:length] @ r_k, v[:length] @ r_v, start,
                      self.window, self.spec, n_.clip_k[layer], n_.clip_v[layer], chunk_bf16)
        if not self.absorbed:
            want = want @ r_v.T
        err = (got.float() - want).abs().max().item()
        self.max_err = max(self.max_err, err)
        return err

    # ---- SGLang's prefix-cache protocol ----------------------------------------------------
    def match(self, rid: str, prompt_len: int) -> int:
        """A waiting request's radix lookup for its first prompt_len tokens (capped like
        Int2RadixCache) -> cached tokens; locks the matched path, remembers the tree's ids."""
        tokens = self.streams.tokens[rid]
        ids = self.tree.match(tokens, prompt_len - 1) if self.tree else []
        m = shareable_prefix(len(ids), prompt_len, self.window, self.chunk)
        if self.tree:
            self.tree.lock(tokens, m, +1)
        self.protected[rid] = m
        self.hits[rid] = ids[:m]
        return m

    def cache(self, rid: str, row: int, length: int, finished: bool = False,
              insert: bool = True) -> None:
        """cache_unfinished_req / cache_finished_req (+ release) for positions [0, length)."""
        tokens = self.streams.tokens.get(rid)
        prot = self.protected.get(rid, 0)
        if self.tree is None or tokens is None:  # chunk cache: the request frees its own slots
            if finished:
                self.planner.index.free_slots(self.req_to_token[row, prot:length].tolist())
                self.planner.release(rid)
            return
        cap = cacheable_prefix(length, self.window)
        assert cap >= prot
        mine = self.req_to_token[row, :cap].tolist()
        if insert:
            tree_ids = self.tree.insert(tokens[:cap], mine)
            dups = [s for s, t in zip(mine[prot:], tree_ids[prot:], strict=True) if s != t]
            self.planner.index.free_slots(dups)
            self.req_to_token[row, :cap] = torch.tensor(tree_ids, dtype=torch.int32)
        else:
            self.planner.index.free_slots(mine[prot:])
        self.tree.lock(tokens, prot, -1)
        if finished:
            self.planner.release(rid)
            self.protected.pop(rid)
        else:
            self.tree.lock(tokens, cap, +1)
            self.protected[rid] = cap

    def finish(self, rid: str, row: int, insert: bool = True) -> None:
        """release_kv_cache of a finished (insert) or retracted (no insert) request."""
        self.cache(rid, row, self.planner.length(rid), finished=True, insert=insert)

    def extend(self, batch, tol: float = 1e-4):
        """batch: [(rid, row, prefix_len, extend_len)]."""
        for rid, row, p, _ in batch:
            if p and not self.planner.holds(rid):  # radix hit: the tree's ids
                self.req_to_token[row, :p] = torch.tensor(self.hits[rid][:p], dtype=torch.int32)
        plan = self.planner.extend(batch)
        n = self.numerics
        loc = apply_slot_plan(self.storage, plan, self.req_to_token, n.clip_k, n.clip_v)
        rows = torch.tensor([b[1] for b in batch])
        ep = plan_extend(self.storage, self.req_to_token, rows, [b[2] for b in batch],
                         [b[3] for b in batch], loc)
        for layer in range(self.layers):
            parts = [self._inputs(rid, layer, p, p + m) for rid, _, p, m in batch]
            q, k, v = (torch.cat(x) for x in zip(*parts, strict=True))
            o = extend_layer(self.storage, n, layer, q, k, v, ep, 1 / math.sqrt(self.d),
                             self.absorbed, self.impl)
            s = 0
            for rid, _, p, m in batch:
                err = self._check(o[s:s + m], rid, layer, p, m, chunk_bf16=True)
                assert err < tol, (rid, layer, p, m, err)
                s += m

    def decode(self, batch, tol: float = 1e-4, width: int | None = None):
        """batch: [(rid, row)]; one token each."""
        starts = [self.planner.length(rid) for rid, _ in batch]
        plan = self.planner.decode(batch)
        n = self.numerics
        loc = apply_slot_plan(self.storage, plan, self.req_to_token, n.clip_k, n.clip_v)
        rows = torch.tensor([b[1] for b in batch])
        lens = torch.tensor(starts) + 1
        width = width or self.req_to_token.shape[1]
        meta = DecodeMeta(self.storage.decode_tables(self.req_to_token, rows, lens, width),
                          plan_decode(len(batch), self.hq, self.hkv, self.d,
                                      max_body_len=max(width - self.window.sink_tokens, 0),
                                      max_hp_len=hp_table_len(self.window, width),
                                      device="cpu", out_dtype=torch.float32))
        for layer in range(self.layers):
            parts = [self._inputs(rid, layer, s, s + 1)
                     for (rid, _), s in zip(batch, starts, strict=True)]
            q, k, v = (torch.cat(x) for x in zip(*parts, strict=True))
            o = decode_layer(self.storage, n, layer, q, k, v, loc, meta, 1 / math.sqrt(self.d),
                             self.absorbed, self.kernel_backend)
            for j, ((rid, _), s) in enumerate(zip(batch, starts, strict=True)):
                err = self._check(o[j:j + 1], rid, layer, s, 1, chunk_bf16=False)
                assert err < tol, (rid, layer, s, err)
