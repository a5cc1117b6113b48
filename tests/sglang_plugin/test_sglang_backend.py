"""The pool, allocator, scheduler glue and int2_triton backend against real sglang==0.5.17 classes
on CPU (MHATokenToKVPool base, ReqToTokenPool, ForwardMode, AttentionBackend, SGLang's Triton
extend kernel under TRITON_INTERPRET=1), with fake ScheduleBatch / ForwardBatch objects (an
Engine cannot run on CPU). Every layer output is checked against the mixed-cache oracle."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

try:
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.chunk_cache import ChunkCache
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
except Exception as e:  # ImportError, or torchvision's RuntimeError without the stub
    pytest.skip(f"sglang is not importable ({type(e).__name__}: {e}); run "
                "scripts/ci_sglang_cpu.sh for these tests", allow_module_level=True)

from sglang_sim import Streams, oracle  # noqa: E402

from oscar_kv.cache.windows import body_end  # noqa: E402
from oscar_kv.config import ModelGeometry, WindowSpec  # noqa: E402
from oscar_kv.errors import OscarError  # noqa: E402
from oscar_kv.fit.checkpoint import build_checkpoint  # noqa: E402
from oscar_kv.sglang_plugin import env as E  # noqa: E402
from oscar_kv.sglang_plugin import glue  # noqa: E402
from oscar_kv.sglang_plugin.backend import int2_backend_class  # noqa: E402
from oscar_kv.sglang_plugin.pool import (  # noqa: E402
    ABSORBED_ATTR,
    PoolSetup,
    int2_allocator_class,
    int2_pool_class,
)
from oscar_kv.sglang_plugin.pool_index import (  # noqa: E402
    DUMMY_INT2,
    Need,
    pool_bytes,
    shareable_prefix,
)
from oscar_kv.sglang_plugin.radix import int2_radix_cache_class  # noqa: E402
from oscar_kv.sglang_plugin.storage import HP_DTYPE  # noqa: E402

LAYERS, HQ, HKV, CTX = 2, 4, 2, 192


def _not_called(*a, **k):
    raise AssertionError("the int2 glue must not fall back to SGLang's allocator")


class FakeReq:
    def __init__(self, rid: str) -> None:
        self.rid, self.req_pool_idx, self.kv = rid, None, None
        self.inflight_middle_chunks, self.kv_committed_len, self.done = 0, 0, False
        self.cache_protected_len = 0

    def finished(self) -> bool:
        return self.done


class Harness:
    """Real pool + allocator + ReqToTokenPool + backend; batches go through glue.py."""

    def __init__(self, tmp_path, window=WindowSpec(8, 16, 8), d=32, group=16, absorbed=False,
                 impl="torch", kernel_backend="auto", n_int2=400, clips=(0.9, 0.8),
                 dtype=torch.float32, radix=False, chunk=None):
        self.d, self.window, self.absorbed, self.dtype = d, window, absorbed, dtype
        # fp32: summation order only; bf16: the activations' own rounding (outputs ~1)
        self.tol = 2e-4 if dtype == torch.float32 else 6e-2
        rots = {}
        self.k_mean = torch.randn(LAYERS, HKV, d, generator=torch.Generator().manual_seed(4))
        for t, seed, clip in (("k", 1, clips[0]), ("v", 2, clips[1])):
            g = torch.Generator().manual_seed(seed)
            r, _ = torch.linalg.qr(torch.randn(LAYERS, d, d, generator=g, dtype=torch.float64))
            rots[t] = r.float()
            torch.save(build_checkpoint(r.float(), torch.ones(LAYERS, d), "qqt_r_h_pbr",
                                        clip_ratios=[clip] * LAYERS,
                                        k_mean=self.k_mean if t == "k" else None),
                       tmp_path / f"{t}.pt")
        env = {E.ENABLE: "1", E.K_ROTATION_PATH: str(tmp_path / "k.pt"),
               E.V_ROTATION_PATH: str(tmp_path / "v.pt"),
               E.PREFIX_TOKENS: str(window.sink_tokens),
               E.RECENT_TOKENS: str(window.recent_tokens)}
        cfg = E.read_plugin_config(env, group_size=group)
        self.spec, self.clips = cfg.quant_spec(d), clips
        self.pool = int2_pool_class()(
            n_int2, page_size=1, dtype=torch.float32, head_num=HKV, head_dim=d, v_head_dim=d,
            layer_num=LAYERS, device="cpu", enable_memory_saver=False, start_layer=0,
            end_layer=LAYERS, enable_alt_stream=False, enable_kv_cache_copy=False,
            post_capture_active=False,
            oscar_setup=PoolSetup(cfg, ModelGeometry(LAYERS, HQ, HKV, d), 4, kernel_backend))
        self.allocator = int2_allocator_class()(n_int2, dtype=torch.float32, device="cpu",
                                                kvcache=self.pool)
        self.req_pool = ReqToTokenPool(4, CTX, "cpu", False)
        self.backend = int2_backend_class()(self.pool, self.req_pool.req_to_token, HQ, dtype,
                                            kernel_backend, impl)
        self.r_k, self.r_v = rots["k"], rots["v"]
        self.layers = [SimpleNamespace(
            layer_id=i, tp_q_head_num=HQ, tp_k_head_num=HKV, head_dim=d, qk_head_dim=d,
            v_head_dim=d, scaling=1 / math.sqrt(d), logit_cap=0.0, sliding_window_size=-1,
            is_cross_attention=False, **({ABSORBED_ATTR: True} if absorbed else {}))
            for i in range(LAYERS)]
        self.streams = Streams(LAYERS, HQ, HKV, d, CTX)
        params = CacheInitParams(disable=not radix, req_to_token_pool=self.req_pool,
                                 token_to_kv_pool_allocator=self.allocator, page_size=1)
        self.tree_cache = (int2_radix_cache_class()(params, window, chunk) if radix
                           else ChunkCache(params))
        self.max_err = 0.0

    def _qkv(self, req, layer, a, b):
        q, k, v = (x[layer, a:b] for x in self.streams(req.rid))
        v = v @ self.r_v[layer] if self.absorbed else v
        return q.to(self.dtype), k.to(self.dtype), v.to(self.dtype)

    def _check(self, got, req, layer, start, n, chunk_bf16):
        q, k, v = (x[layer].to(self.dtype).float() for x in self.streams(req.rid))
        k = k - self.k_mean[layer]  # keys are stored centered: (k - k_mean) R_K
        r_k, r_v, end = self.r_k[layer], self.r_v[layer], start + n
        want = oracle(q[start:end] @ r_k, k[:end] @ r_k, v[:end] @ r_v, start, self.window,
                      self.spec, self.clips[0], self.clips[1], chunk_bf16)
        want = want if self.absorbed else want @ r_v.T
        err = (got.reshape(n, HQ, self.d).float() - want).abs().max().item()
        self.max_err = max(self.max_err, err)
        assert err < self.tol, (req.rid, layer, start, n, err)

    def extend(self, items):
        """items: [(req, prefix_len, extend_len)] -> one extend forward, checked."""
        reqs = [r for r, _, _ in items]
        batch = SimpleNamespace(
            reqs=reqs, prefix_lens=[p for _, p, _ in items], extend_lens=[n for *_, n in items],
            seq_lens_cpu=torch.tensor([p + n for _, p, n in items]), device="cpu",
            req_to_token_pool=self.req_pool, token_to_kv_pool_allocator=self.allocator,
            tree_cache=self.tree_cache, is_dllm=lambda: False)
        out, rows, rows_cpu = glue.alloc_for_extend_around(_not_called, batch)
        for r, p, n in items:
            r.kv_committed_len = p + n
        assert [r.req_pool_idx for r in reqs] == rows_cpu.tolist()
        fb = SimpleNamespace(
            forward_mode=ForwardMode.EXTEND, batch_size=len(items), req_pool_indices=rows,
            seq_lens=batch.seq_lens_cpu, seq_lens_cpu=batch.seq_lens_cpu, out_cache_loc=out,
            extend_prefix_lens_cpu=batch.prefix_lens, extend_seq_lens_cpu=batch.extend_lens,
            spec_info=None)
        self.backend.init_forward_metadata(fb)
        for i, layer in enumerate(self.layers):
            q, k, v = (torch.cat(x) for x in zip(*[self._qkv(r, i, p, p + n)
                                                   for r, p, n in items], strict=True))
            o = self.backend.forward_extend(q.reshape(-1, HQ * self.d), k, v, layer, fb)
            s = 0
            for r, p, n in items:
                self._check(o[s:s + n], r, i, p, n, chunk_bf16=True)
                s += n

    def _decode_batch(self, reqs):
        batch = SimpleNamespace(reqs=reqs, req_to_token_pool=self.req_pool,
                                token_to_kv_pool_allocator=self.allocator,
                                tree_cache=self.tree_cache)
        assert glue.new_tokens_required_around(_not_called, batch) == \
            self.allocator.planner.decode_need([r.rid for r in reqs]).units
        starts = [r.kv_committed_len for r in reqs]
        out = glue.alloc_for_decode_around(_not_called, batch, 1)
        for r in reqs:
            r.kv_committed_len += 1
        return starts, out

    def decode(self, reqs, graph_bs: int | None = None, capture: bool = False):
        """One decode step; graph_bs pads the batch like a CUDA-graph replay."""
        starts, out = self._decode_batch(reqs)
        lens = torch.tensor(starts) + 1
        rows = torch.tensor([r.req_pool_idx for r in reqs])
        bs = graph_bs or len(reqs)
        pad = bs - len(reqs)
        fb = SimpleNamespace(
            forward_mode=ForwardMode.DECODE, batch_size=bs, spec_info=None,
            req_pool_indices=torch.cat([rows, torch.zeros(pad, dtype=torch.long)]),
            seq_lens=torch.cat([lens, torch.ones(pad, dtype=torch.long)]),
            out_cache_loc=torch.cat([out, torch.full((pad,), DUMMY_INT2)]))
        fb.seq_lens_cpu = fb.seq_lens.clone()
        if graph_bs is None:
            self.backend.init_forward_metadata(fb)
        else:
            self.backend.init_forward_metadata_out_graph(fb, in_capture=capture)
        for i, layer in enumerate(self.layers):
            parts = [self._qkv(r, i, s, s + 1) for r, s in zip(reqs, starts, strict=True)]
            q, k, v = (torch.cat(x) for x in zip(*parts, strict=True))
            q, k, v = (torch.cat([x, (torch.randn(pad, *x.shape[1:]) * 50).to(x.dtype)])
                       for x in (q, k, v))
            o = self.backend.forward_decode(q.reshape(bs, HQ * self.d), k, v, layer, fb)
            for j, (r, s) in enumerate(zip(reqs, starts, strict=True)):
                self._check(o[j], r, i, s, 1, chunk_bf16=False)

    def release(self, req, finished: bool):
        def orig(req, tree_cache, is_insert=True):  # common.release_kv_cache, page size 1
            tree_cache.cache_finished_req(req, is_insert=is_insert,
                                          kv_len_to_handle=req.kv_committed_len)
            self.req_pool.free(req)
            req.kv = None
        req.done = finished
        glue.release_kv_cache_around(orig, req, self.tree_cache, is_insert=finished)


def _traffic(h: Harness, steps: int = 12, graph_bs: int | None = None) -> None:
    a, b, c, d = (FakeReq(x) for x in "abcd")
    h.extend([(a, 0, 20), (b, 0, 5)])
    h.extend([(a, 20, 28), (c, 0, 64)])  # chunked prefill: a's 2nd chunk reads its INT2 prefix
    if graph_bs:
        h.backend.init_cuda_graph_state(4, 4)
    for t in range(steps):
        h.decode([a, b, c], graph_bs=graph_bs, capture=graph_bs is not None and t == 0)
    h.release(a, finished=True)
    h.release(b, finished=False)  # retraction: b comes back later and is prefilled again
    h.extend([(d, 0, 32), (FakeReq("b"), 0, 9)])


@pytest.mark.parametrize("window", [WindowSpec(8, 16, 8), WindowSpec(0, 0, 8),
                                    WindowSpec(8, 0, 8)], ids=str)
@pytest.mark.parametrize("absorbed", [False, True], ids=["rotate-v", "absorbed"])
def test_server_traffic_matches_oracle(tmp_path, window, absorbed):
    h = Harness(tmp_path, window=window, absorbed=absorbed)
    _traffic(h)
    assert 0 < h.max_err < 2e-4
    assert h.allocator.available_size() == h.pool.planner.index.available_units() - 7


def test_cuda_graph_path_with_padded_rows(tmp_path):
    """Static tables + per-bs plans (capture on the first step, replay after), two padded rows
    writing to the reserved dummies: real rows exact, live KV untouched."""
    h = Harness(tmp_path)
    _traffic(h, steps=10, graph_bs=4)
    assert set(h.backend.graph_plans) == {4}
    lay = h.pool.layout
    a = FakeReq("z")
    h.extend([(a, 0, 3)])
    before = h.pool.storage.k_bf16[0][:lay.bf16_rows - 1].clone()
    h.decode([a], graph_bs=4)
    after = h.pool.storage.k_bf16[0][:lay.bf16_rows - 1]
    changed = (after != before).any(-1).any(-1).nonzero().flatten().tolist()
    assert len(changed) == 1  # only z's new token row; padded rows went to the dummy row


def test_sglang_triton_extend_kernel_matches(tmp_path):
    """The GPU extend path (dequantized prefix + SGLang's extend_attention_fwd), run by the
    Triton interpreter on fp32 tensors, against the same oracle."""
    h = Harness(tmp_path, impl="sglang")
    a, b, c = FakeReq("a"), FakeReq("b"), FakeReq("c")
    h.extend([(a, 0, 20), (b, 0, 7)])
    h.extend([(a, 20, 28), (c, 0, 5), (b, 7, 9)])  # two prefixes gathered in one plan


def test_sglang_extend_in_prefix_groups_matches(tmp_path, monkeypatch):
    """A prefix budget that splits the batch into several SGLang kernel calls (prefixes 20+0,
    7, then 30 > budget alone) and dequantization in chunks of 5 rows, against the oracle."""
    from oscar_kv.sglang_plugin import attention

    h = Harness(tmp_path, impl="sglang")
    a, b, c, d = (FakeReq(x) for x in "abcd")
    h.extend([(a, 0, 20), (b, 0, 7)])
    h.extend([(d, 0, 30)])
    monkeypatch.setattr(attention, "EXTEND_PREFIX_BUDGET", 25)
    monkeypatch.setattr(attention, "DEQUANT_CHUNK_ROWS", 5)
    h.extend([(a, 20, 28), (c, 0, 5), (b, 7, 9), (d, 30, 4)])
    assert [g.reqs for g in h.backend.forward_metadata.groups] == [(0, 2), (2, 3), (3, 4)]


def test_sglang_extend_groups_are_bit_identical(monkeypatch):
    """extend_sglang's output does not depend on the grouping: one kernel call for the batch
    and budgets of 1 (one request per call), 20, 60, 100 tokens give the same bits."""
    from sglang_sim import SimServer

    from oscar_kv.config import QuantSpec
    from oscar_kv.sglang_plugin import attention
    from oscar_kv.sglang_plugin.pool import apply_slot_plan

    srv = SimServer(WindowSpec(8, 16, 8), QuantSpec(group_size=16), impl="sglang")
    srv.extend([("a", 1, 0, 40), ("b", 2, 0, 50), ("c", 3, 0, 5)])
    batch = [("a", 1, 40, 3), ("b", 2, 50, 40), ("d", 4, 0, 6), ("c", 3, 5, 1)]
    n = srv.numerics
    loc = apply_slot_plan(srv.storage, srv.planner.extend(batch), srv.req_to_token, n.clip_k,
                          n.clip_v)
    args = (srv.storage, srv.req_to_token, torch.tensor([b[1] for b in batch]),
            [b[2] for b in batch], [b[3] for b in batch], loc)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(50, heads, 32, generator=g) for heads in (4, 2, 2))
    one = attention.plan_extend(*args)
    assert len(one.groups) == 1
    want = attention.extend_sglang(q, k, v, srv.storage, 1, one, 0.17)
    monkeypatch.setattr(attention, "DEQUANT_CHUNK_ROWS", 7)
    for budget, groups in ((1, 4), (20, 3), (60, 2), (100, 1)):
        ep = attention.plan_extend(*args, prefix_budget=budget)
        assert len(ep.groups) == groups
        assert torch.equal(attention.extend_sglang(q, k, v, srv.storage, 1, ep, 0.17), want)


@pytest.mark.slow
def test_triton_decode_kernel_in_interpreter(tmp_path):
    h = Harness(tmp_path, d=64, group=64, kernel_backend="triton")
    a = FakeReq("a")
    h.extend([(a, 0, 40)])
    h.decode([a])


def test_pool_sizes_and_refusals(tmp_path):
    h = Harness(tmp_path)
    lay, spec = h.pool.layout, h.spec
    assert sum(h.pool.get_kv_size_bytes()) == pool_bytes(lay, LAYERS, HKV, h.d, spec)
    assert lay.num_int2_slots == 400 + 7 and lay.max_requests == 4  # + the chunk reserve
    for fn in (h.pool.get_key_buffer, h.pool.get_value_buffer, h.pool.get_kv_buffer):
        with pytest.raises(OscarError, match="no dense"):
            fn(0)
    with pytest.raises(OscarError, match="per request"):
        h.allocator.alloc(3)
    with pytest.raises(OscarError, match="double free"):
        h.allocator.free(torch.tensor([1, 2]))  # ids the pool never handed out
    assert h.allocator.available_size() == 400


def test_generic_set_kv_buffer_rotates_and_routes(tmp_path):
    h = Harness(tmp_path)
    lay, st = h.pool.layout, h.pool.storage
    loc = torch.tensor([5, lay.hp_offset + 2])
    k, v = torch.randn(2, HKV, h.d), torch.randn(2, HKV, h.d)
    h.pool.set_kv_buffer(h.layers[1], loc, k, v)
    k = k - h.k_mean[1]  # centered keys
    torch.testing.assert_close(st.k_bf16[1][2], (k[1] @ h.r_k[1]).to(HP_DTYPE))
    torch.testing.assert_close(st.v_bf16[1][2], (v[1] @ h.r_v[1]).to(HP_DTYPE))
    from oscar_kv.kernels import Int2Store, write_int2

    ref = Int2Store.empty(lay.int2_rows, HKV, h.d, h.spec)
    write_int2((k[:1] @ h.r_k[1]).to(HP_DTYPE), None, h.clips[0], h.spec, torch.tensor([5]),
               ref.packed, ref.scale, ref.zero)
    assert torch.equal(st.k_int2[1].packed[5], ref.packed[5])


def test_retraction_and_finish_leave_no_slots(tmp_path):
    h = Harness(tmp_path)
    reqs = [FakeReq(x) for x in "abc"]
    h.extend([(r, 0, 30) for r in reqs])
    for _ in range(9):
        h.decode(reqs)
    for r, fin in zip(reqs, (True, False, True), strict=True):
        h.release(r, finished=fin)
    assert h.allocator.available_size() == 400
    assert h.pool.planner.live() == 0 and h.req_pool.available_size() == 4
    h.allocator.clear()  # SGLang's flush_cache when idle


def test_unsupported_layer_features_rejected(tmp_path):
    h = Harness(tmp_path)
    a = FakeReq("a")
    h.extend([(a, 0, 4)])
    bad = SimpleNamespace(**vars(h.layers[0]))
    bad.layer_id = 1
    bad.logit_cap = 30.0
    h.backend._checked.clear()
    with pytest.raises(OscarError, match="soft-capping"):
        h.backend.forward_extend(torch.zeros(1, HQ * h.d), torch.zeros(1, HKV, h.d),
                                 torch.zeros(1, HKV, h.d), bad, None)
    with pytest.raises(OscarError, match="sinks"):
        h.backend.forward_extend(None, None, None, h.layers[0], None, sinks=torch.zeros(1))


def test_bf16_activations(tmp_path):
    """bf16 q/k/v and a bf16 decode plan (the served dtype): within bf16 error of the oracle."""
    h = Harness(tmp_path, dtype=torch.bfloat16)
    a, b = FakeReq("a"), FakeReq("b")
    h.extend([(a, 0, 30), (b, 0, 9)])
    for _ in range(9):
        h.decode([a, b])
    assert h.max_err < h.tol


def test_chunk_continuation_uses_the_hidden_reserve(tmp_path):
    """SGLang admits a 1-token chunk when available_size() >= 1, but continuing a prompt whose
    recent window is full flushes F = 8 rows: the F - 1 reserve makes that fit."""
    h = Harness(tmp_path, n_int2=9)
    a = FakeReq("a")
    h.extend([(a, 0, 8 + 16 + 7)])  # 8 sink rows (8 units) + a full ring of R + F - 1
    assert h.allocator.available_size() == 1
    h.extend([(a, 31, 1)])  # body_end jumps by 8: 7 stored rows + the new one
    assert h.allocator.available_size() == 0


# ---- prefix sharing through SGLang's own radix tree (Int2RadixCache) ----------------------
def _req(h: Harness, rid: str, toks: list[int], prompt: int):
    """A real sglang Req for the first `prompt` tokens, matched against the tree (as
    init_next_round_input does) and locked (as PrefillAdder does) -> (req, cached tokens)."""
    from array import array

    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    h.streams.register(rid, toks)
    r = Req(rid, "", array("q", toks[:prompt]), SamplingParams(max_new_tokens=64))
    r.init_next_round_input(h.tree_cache)
    m = len(r.prefix_indices)
    assert r.cache_protected_len == m
    h.tree_cache.inc_lock_ref(r.last_node)
    return r, m


def _serve(h: Harness, r, m: int, toks: list[int], prompt: int, chunk: int | None,
           steps: int) -> None:
    """Chunked prefill from the cached prefix (cache_unfinished_req after each chunk, as the
    scheduler does), `steps` decodes, then release (cache_finished_req inserts)."""
    from array import array

    p = m
    while p < prompt:
        n = prompt - p if chunk is None else min(chunk, prompt - p)
        r.set_extend_range(p, p + n)
        h.extend([(r, p, n)])
        p += n
        h.tree_cache.cache_unfinished_req(r, chunked=p < prompt)
        assert len(r.prefix_indices) == p  # the next chunk continues from here
    for _ in range(steps):
        h.decode([r])
    r.output_ids = array("q", toks[prompt:prompt + steps + 1])
    h.release(r, finished=True)


def _idle_leak_check(h: Harness) -> None:
    """SGLang's idle check (available + evictable + protected == max_total_num_tokens), then
    evicting the whole tree gives every slot back."""
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    t = h.tree_cache
    assert h.allocator.available_size() + t.evictable_size() + t.protected_size() == 400
    t.evict(EvictParams(num_tokens=10**9))
    idx = h.pool.planner.index
    assert t.evictable_size() == 0 and h.allocator.available_size() == 400
    assert idx.free_sink_rows() == idx.layout.sink_rows and idx.available_requests() == 4


@pytest.mark.parametrize("chunk", [None, 24, 12], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("window", [WindowSpec(8, 16, 8), WindowSpec(0, 16, 8)], ids=str)
def test_radix_hit_matches_oracle(tmp_path, window, chunk):
    """A shared-prefix pair through SGLang's RadixCache (our subclass): the second request
    hits the cache and every layer output equals the oracle of a prefill split at the match
    point; a third request re-sends the first prompt plus its answer (a chat follow-up)."""
    h = Harness(tmp_path, window=window, radix=True, chunk=chunk)
    base = list(range(1, 91))
    a = base + list(range(500, 540)) + list(range(900, 920))
    b = base + list(range(600, 630)) + list(range(950, 962))
    ra, m = _req(h, "a", a, 130)
    assert m == 0
    _serve(h, ra, m, a, 130, chunk, 20)
    rb, m = _req(h, "b", b, 120)
    assert m == shareable_prefix(90, 120, window, chunk)
    assert m > 0 or (window.sink_tokens == 0 and chunk < window.recent_tokens)
    _serve(h, rb, m, b, 120, chunk, 12)
    c = a[:150] + list(range(700, 730))
    rc, m = _req(h, "c", c, 170)
    assert m == shareable_prefix(min(150, body_end(150, window)), 170, window, chunk)
    _serve(h, rc, m, c, 170, chunk, 4)
    assert 0 < h.max_err < 2e-4
    _idle_leak_check(h)


def test_radix_duplicates_retraction_and_eviction(tmp_path):
    """Two requests prefill the same prompt in one batch (no hit): the second insert frees
    its duplicates and points it at the tree's ids; a retracted request frees only its own
    slots; the decode-time eviction frees unlocked leaves for sink rows and units."""
    h = Harness(tmp_path, radix=True, n_int2=400)
    toks = list(range(1, 71)) + list(range(300, 330))
    rx, _ = _req(h, "x", toks, 70)
    ry, _ = _req(h, "y", toks, 70)
    for r in (rx, ry):
        r.set_extend_range(0, 70)
    h.extend([(rx, 0, 70), (ry, 0, 70)])
    before = h.allocator.available_size()
    h.tree_cache.cache_unfinished_req(rx)
    h.tree_cache.cache_unfinished_req(ry)
    end = body_end(70, h.window)
    assert h.allocator.available_size() == before + end  # y's copies of [0, end) freed
    rt = h.req_pool.req_to_token
    assert torch.equal(rt[rx.req_pool_idx, :end], rt[ry.req_pool_idx, :end])
    for _ in range(9):
        h.decode([rx, ry])
    h.release(ry, finished=False)  # retraction: no insert, frees its own, keeps the tree's
    for _ in range(3):
        h.decode([rx])
    from array import array

    rx.output_ids = array("q", toks[70:83])
    h.release(rx, finished=True)
    assert 0 < h.max_err < 2e-4
    # a full pool: the glue evicts unlocked leaves before allocating
    idx = h.pool.planner.index
    cached = h.tree_cache.evictable_size()
    assert cached == body_end(82, h.window)
    glue.make_room(h.tree_cache, idx, Need(units=idx.available_units() + 5, sink_rows=0))
    assert h.tree_cache.evictable_size() < cached
    _idle_leak_check(h)


def test_prefill_adder_defers_a_too_short_first_chunk():
    """A hit whose first chunk (what is left of the chunk budget) would leave cached INT2
    positions inside its BF16 recent window waits for a later batch; everything else passes."""
    from sglang.srt.managers.schedule_policy import AddReqResult

    w = WindowSpec(8, 16, 8)
    calls = []
    orig = lambda self, req, *a, **k: calls.append(req) or AddReqResult.CONTINUE  # noqa: E731
    req = SimpleNamespace(prefix_indices=torch.zeros(40), full_untruncated_fill_ids=[0] * 100)
    tree = SimpleNamespace(oscar_window=w)
    for rem, align, deferred in ((None, None, False), (200, None, False), (30, None, False),
                                 (15, None, True), (20, None, False), (20, 15, True),
                                 (0, None, False)):
        adder = SimpleNamespace(tree_cache=tree, rem_chunk_tokens=rem)
        res = glue.add_one_req_around(orig, adder, req, has_chunked_req=False,
                                      truncation_align_size=align)
        assert (res is AddReqResult.OTHER) == deferred, (rem, align)
    assert glue.first_chunk_len(15, 60) == 15 and glue.first_chunk_len(None, 60) == 60
    stock = SimpleNamespace(tree_cache=SimpleNamespace(), rem_chunk_tokens=1)
    assert glue.add_one_req_around(orig, stock, req, False, None) is AddReqResult.CONTINUE
