"""Test helpers for the int2 server's data path (framework-free): random q/k/v streams per
request and layer, random rotations, the attention oracle, and `SimServer`, which runs one
forward exactly as the SGLang hooks + backend do (planner -> apply_slot_plan -> plan_extend /
decode tables -> extend_layer / decode_layer) and checks every layer against the oracle."""

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
from oscar_kv.sglang_plugin.pool_index import PoolIndex, PoolLayout
from oscar_kv.sglang_plugin.storage import MixedKVStorage


def orthogonal(layers: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(layers, d, d, generator=g, dtype=torch.float64))
    return q.float()


class Streams:
    """q [L, T, Hq, D], k, v [L, T, Hkv, D] fp32 per request id (deterministic)."""

    def __init__(self, layers: int, hq: int, hkv: int, d: int, max_len: int = 256) -> None:
        self.shape = (layers, max_len, hq, hkv, d)
        self._cache: dict[str, tuple] = {}

    def __call__(self, rid: str):
        if rid not in self._cache:
            layers, t, hq, hkv, d = self.shape
            g = torch.Generator().manual_seed(zlib.crc32(rid.encode()))
            q = torch.randn(layers, t, hq, d, generator=g)
            k = torch.randn(layers, t, hkv, d, generator=g) * 2 + 0.3
            v = torch.randn(layers, t, hkv, d, generator=g)
            self._cache[rid] = (q, k, v)
        return self._cache[rid]


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
                 kernel_backend: str = "auto", ctx: int = 256, centered: bool = True) -> None:
        self.window, self.spec, self.absorbed = window, spec, absorbed
        self.hq, self.hkv, self.d, self.layers = hq, hkv, d, layers
        lay = PoolLayout(window, n_int2, max_reqs)
        self.planner = SlotPlanner(PoolIndex(lay))
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

    def extend(self, batch, tol: float = 1e-4):
        """batch: [(rid, row, prefix_len, extend_len)]."""
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
