"""The int2 server's data path on CPU (no sglang): planner -> flush/req_to_token -> extend and
decode layers, every output checked against the mixed-cache oracle; storage bookkeeping."""

from __future__ import annotations

import pytest
import torch
from sglang_sim import SimServer, oracle

from oscar_kv.cache.reference import mixed_attention_reference
from oscar_kv.config import QuantSpec, WindowSpec
from oscar_kv.sglang_plugin.pool import apply_slot_plan
from oscar_kv.sglang_plugin.pool_index import DUMMY_INT2, PoolLayout, pool_bytes
from oscar_kv.sglang_plugin.storage import MixedKVStorage

WINDOWS = [WindowSpec(8, 16, 8), WindowSpec(0, 0, 8), WindowSpec(8, 0, 8), WindowSpec(0, 24, 8)]


def traffic(srv: SimServer, decode_steps: int = 20) -> None:
    """Chunked prefill, a short prompt, a long one-shot prompt, decodes, a finish and a
    retraction with slot reuse."""
    srv.extend([("a", 1, 0, 20), ("b", 2, 0, 6)])
    srv.extend([("a", 1, 20, 28), ("c", 3, 0, 64)])  # a: second chunk sees its INT2 prefix
    for _ in range(decode_steps):
        srv.decode([("a", 1), ("b", 2), ("c", 3)])
    srv.finish("a", 1)
    srv.finish("b", 2, insert=False)  # retraction
    srv.extend([("d", 1, 0, 32)])  # reuses a's slots and row; lengths hit flush boundaries
    for _ in range(9):
        srv.decode([("c", 3), ("d", 1)])


@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("absorbed", [False, True], ids=["rotate-v", "absorbed"])
def test_extend_and_decode_match_oracle(window, absorbed):
    srv = SimServer(window, QuantSpec(group_size=16), absorbed=absorbed)
    traffic(srv)
    assert srv.max_err < 1e-4


def test_group_per_head_and_bf16_scales():
    srv = SimServer(WindowSpec(8, 16, 8), QuantSpec(group_size=32, scale_dtype="float16"),
                    clips=(1.0, 0.0))
    traffic(srv, decode_steps=9)


def test_decode_equals_mixed_attention_reference():
    """The decode oracle agrees with the project's reference (single sequence, no clip)."""
    w, spec = WindowSpec(8, 16, 8), QuantSpec(group_size=16)
    srv = SimServer(w, spec, clips=(1.0, 1.0), layers=1)
    srv.extend([("a", 1, 0, 50)])
    srv.decode([("a", 1)])
    q, k, v = (x[0, :51] for x in srv.streams("a"))
    r_k, r_v = srv.numerics.r_k[0], srv.numerics.r_v[0]
    heads_first = lambda x: x.permute(1, 0, 2)[None]  # [T, H, D] -> [1, H, T, D]
    ref = mixed_attention_reference(heads_first(q[50:51] @ r_k), heads_first(k @ r_k),
                                    heads_first(v @ r_v), torch.tensor([50]), torch.arange(51),
                                    w, spec)
    mine = oracle(q[50:51] @ r_k, k @ r_k, v @ r_v, 50, w, spec, 1.0, 1.0, chunk_bf16=False)
    torch.testing.assert_close(ref[0].permute(1, 0, 2), mine, atol=1e-5, rtol=1e-5)


def test_eager_width_smaller_than_context():
    srv = SimServer(WindowSpec(8, 16, 8), QuantSpec(group_size=16))
    srv.extend([("a", 1, 0, 40)])
    srv.decode([("a", 1)], width=64)  # tables over 64 columns instead of 256


def test_storage_bytes_are_the_budgeted_bytes():
    w, spec = WindowSpec(16, 32, 8), QuantSpec(group_size=32)
    lay = PoolLayout(w, 300, 5)
    st = MixedKVStorage(lay, 3, 2, 64, spec, "cpu")
    assert sum(st.nbytes()) == pool_bytes(lay, 3, 2, 64, spec)


def test_split_by_value_and_decode_dummy_rows():
    w = WindowSpec(8, 16, 8)
    lay = PoolLayout(w, 50, 2)
    st = MixedKVStorage(lay, 1, 2, 32, QuantSpec(group_size=32), "cpu")
    ids = torch.tensor([3, lay.hp_offset + 5, 7, lay.hp_offset])
    sp = st.split_by_value(ids)
    assert sp.int2_idx.tolist() == [0, 2] and sp.int2_slots.tolist() == [3, 7]
    assert sp.bf16_idx.tolist() == [1, 3] and sp.bf16_rows.tolist() == [5, 0]
    live = st.k_bf16[0].clone()
    k = torch.randn(3, 2, 32)
    # two padded CUDA-graph rows (slot 0) and one real row
    st.write_decode(0, torch.tensor([DUMMY_INT2, lay.hp_offset + 4, DUMMY_INT2]), k, k, 1, 1)
    changed = (st.k_bf16[0] != live).any(-1).any(-1).nonzero().flatten().tolist()
    assert changed == [4, lay.bf16_rows - 1]  # the real row and the reserved dummy row only
    assert (st.k_int2[0].packed == 0).all()  # R > 0: decode never writes INT2


def test_token_maps_clamp_stale_ids():
    lay = PoolLayout(WindowSpec(8, 16, 8), 50, 2)
    st = MixedKVStorage(lay, 1, 1, 16, QuantSpec(group_size=16), "cpu")
    i2, bf = st.token_maps(torch.tensor([[-5, 10, 10_000, lay.hp_offset + 3]]))
    assert i2.tolist() == [[0, 10, lay.int2_rows - 1, lay.int2_rows - 1]]
    assert bf.tolist() == [[0, 0, lay.bf16_rows - 1, 3]]


def test_flush_of_all_layers_equals_per_layer_writes():
    """The flush quantizes every layer sharing a clip ratio in one write: bit-identical to one
    write_int2 per layer (per-layer clips mixed here)."""
    from oscar_kv.kernels import write_int2

    w, spec = WindowSpec(8, 16, 8), QuantSpec(group_size=16)
    lay = PoolLayout(w, 60, 2)
    st = MixedKVStorage(lay, 3, 2, 32, spec, "cpu")
    g = torch.Generator().manual_seed(0)
    for a in (st.bf16_all["k"], st.bf16_all["v"]):
        a.copy_(torch.randn(a.shape, generator=g))
    ref = [[s.packed.clone(), s.scale.clone(), s.zero.clone()] for s in st.k_int2 + st.v_int2]
    src = torch.tensor([lay.ring_offset + 3, lay.ring_offset + 9, lay.hp_offset + 1])
    dst = torch.tensor([5, 17, 2])
    clip_k, clip_v = [0.9, 0.8, 0.9], [0.7, 0.7, 0.7]
    st.flush(src, dst, clip_k, clip_v)
    rows = src - lay.hp_offset
    for i, (arena, clip) in enumerate(zip(st.k_bf16 + st.v_bf16, clip_k + clip_v, strict=True)):
        write_int2(arena[rows], None, clip, spec, dst, *ref[i])
        got = st.k_int2[i] if i < 3 else st.v_int2[i - 3]
        for want, have in zip(ref[i], (got.packed, got.scale, got.zero), strict=True):
            assert torch.equal(want, have), i


def test_flush_copies_only_the_flushed_rows():
    """With per-layer clip ratios the flush selects the flushed rows before the layers of each
    clip group: no tensor as large as one layer's BF16 arena is materialized."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):  # the largest gather (index_select) output
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if "index_select" in str(func):
                self.numel = max(self.numel, out.numel())
            return out

    lay = PoolLayout(WindowSpec(8, 16, 8), 60, 4)
    st = MixedKVStorage(lay, 3, 2, 32, QuantSpec(group_size=16), "cpu")
    src = torch.tensor([lay.ring_offset + 3, lay.hp_offset + 1])
    with Largest() as probe:
        st.flush(src, torch.tensor([5, 17]), [0.9, 0.8, 0.7], [0.7, 0.7, 0.6])
    assert 0 < probe.numel < st.k_bf16[0].numel() // 4


@pytest.mark.parametrize("budget", [None, 1, 30, 60], ids=lambda b: f"budget{b}")
def test_flat_prefix_plan_equals_per_request_tables(budget):
    """plan_extend gathers every request's prefix at once; the rows the batched kernel reads
    (per group: dequantize_prefixes of the group indexed by its kv_indices) equal, row for row
    and in order, kernels.dequantize_prefix of each request's own tables (the previous
    per-request path). Small budgets split the batch into groups (a request larger than the
    budget alone); the groups' re-based indptrs cover the batch in order."""
    from oscar_kv.cache.windows import body_end
    from oscar_kv.kernels import KVTables, dequantize_prefix
    from oscar_kv.sglang_plugin.attention import dequantize_prefixes, plan_extend, prefix_groups

    w = WindowSpec(8, 16, 8)
    srv = SimServer(w, QuantSpec(group_size=16))
    srv.extend([("a", 1, 0, 40), ("b", 2, 0, 50), ("c", 3, 0, 5)])
    batch = [("a", 1, 40, 3), ("b", 2, 50, 40), ("d", 4, 0, 6), ("c", 3, 5, 1)]
    plan = srv.planner.extend(batch)
    n = srv.numerics
    loc = apply_slot_plan(srv.storage, plan, srv.req_to_token, n.clip_k, n.clip_v)
    prefix, ext = [b[2] for b in batch], [b[3] for b in batch]
    ep = plan_extend(srv.storage, srv.req_to_token, torch.tensor([b[1] for b in batch]),
                     prefix, ext, loc, prefix_budget=budget)
    spans = prefix_groups(prefix, budget or 1 << 16)
    assert [g.reqs for g in ep.groups] == spans
    assert len(spans) == {None: 1, 1: 4, 30: 3, 60: 2}[budget]
    hp = srv.storage.layout.hp_offset
    for g in ep.groups:
        r0, r1 = g.reqs
        assert g.tokens == (sum(ext[:r0]), sum(ext[:r1])) and g.max_extend == max(ext[r0:r1])
        assert g.qo_indptr.tolist() == [sum(ext[r0:i]) for i in range(r0, r1 + 1)]
        assert g.kv_indptr.tolist() == [sum(prefix[r0:i]) for i in range(r0, r1 + 1)]
    for store, arena in ((srv.storage.k_int2[0], srv.storage.k_bf16[0]),
                         (srv.storage.v_int2[1], srv.storage.v_bf16[1])):
        for g in ep.groups:
            flat = dequantize_prefixes(store, arena, ep, torch.bfloat16, g)
            assert flat.shape[0] == sum(prefix[g.reqs[0]:g.reqs[1]])
            for j, i in enumerate(range(*g.reqs)):
                _, row, p, m = batch[i]
                seg = g.kv_indices[g.kv_indptr[j]:g.kv_indptr[j + 1]]
                end = body_end(p + m, w)
                ids = srv.req_to_token[row].long()
                body = ids[8:min(end, p)] if min(end, p) > 8 else ids[:0]
                bf = torch.cat([ids[:min(8, p)], ids[max(8, end):p]]) - hp
                tables = KVTables(body[None], torch.tensor([len(body)]), bf[None],
                                  torch.tensor([len(bf)]))
                want = dequantize_prefix(store, arena, tables, torch.bfloat16)[0][0]
                assert torch.equal(flat[seg], want), (i, p)


def test_prefix_groups():
    from oscar_kv.errors import OscarError
    from oscar_kv.sglang_plugin.attention import prefix_groups

    assert prefix_groups([], 10) == []
    assert prefix_groups([3, 3, 4, 0, 0], 10) == [(0, 5)]
    assert prefix_groups([3, 3, 5, 0, 11, 2], 10) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert prefix_groups([20], 10) == [(0, 1)]
    with pytest.raises(OscarError, match="budget"):
        prefix_groups([1], 0)


def test_dequantize_rows_in_chunks_is_one_gather():
    """The chunked dequantization (bounded fp32 temporaries) is bit-identical to one gather."""
    from oscar_kv.kernels.ref import gather_int2_rows
    from oscar_kv.sglang_plugin.attention import dequantize_rows

    srv = SimServer(WindowSpec(8, 16, 8), QuantSpec(group_size=16))
    srv.extend([("a", 1, 0, 90)])
    st, arena = srv.storage.k_int2[1], srv.storage.k_bf16[1]
    slots = torch.randperm(st.packed.shape[0], generator=torch.Generator().manual_seed(1))[:70]
    rows = torch.tensor([0, 5, 3, 9])
    for dtype in (torch.float32, torch.bfloat16):
        want = torch.cat([gather_int2_rows(st, slots, dtype), arena[rows].to(dtype)])
        for chunk in (1, 7, 70, 1000):
            got = dequantize_rows(st, arena, slots, rows, dtype, chunk_rows=chunk)
            assert got.dtype == dtype and torch.equal(got, want), (dtype, chunk)


def test_torch_extend_in_query_blocks(monkeypatch):
    """A score budget below one request's scores runs the torch path in blocks of queries
    (prefill_attention's math over the same keys): against the oracle, and against the
    one-block path to fp32 rounding."""
    from oscar_kv.sglang_plugin import attention

    srv = SimServer(WindowSpec(8, 16, 8), QuantSpec(group_size=16))
    srv.extend([("a", 1, 0, 20), ("b", 2, 0, 7)])
    plan = srv.planner.extend([("a", 1, 20, 28), ("c", 3, 0, 5), ("b", 2, 7, 9)])
    n = srv.numerics
    loc = apply_slot_plan(srv.storage, plan, srv.req_to_token, n.clip_k, n.clip_v)
    ep = attention.plan_extend(srv.storage, srv.req_to_token, torch.tensor([1, 3, 2]),
                               [20, 0, 7], [28, 5, 9], loc)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(42, h, 32, generator=g) for h in (4, 2, 2))
    whole = attention.extend_torch(q, k, v, srv.storage, 0, ep, 0.2)
    monkeypatch.setattr(attention, "EXTEND_TORCH_SCORE_BUDGET", 4 * 45 * 3)  # blocks of <= 3
    blocked = attention.extend_torch(q, k, v, srv.storage, 0, ep, 0.2)
    torch.testing.assert_close(blocked, whole, atol=1e-5, rtol=1e-5)
    srv = SimServer(WindowSpec(8, 16, 8), QuantSpec(group_size=16))  # every layer vs the oracle
    traffic(srv, decode_steps=3)
