"""pool_index.py: slot bookkeeping invariants under random alloc/decode/extend/free, the sink
pool, units, SGLang's free protocol and the prefix-sharing rules (exact, framework-free)."""

from __future__ import annotations

import random

import pytest

from oscar_kv.cache.windows import body_end, window_counts
from oscar_kv.config import QuantSpec, WindowSpec
from oscar_kv.errors import OscarError
from oscar_kv.sglang_plugin.pool_index import (
    DUMMY_INT2,
    PoolFull,
    PoolIndex,
    PoolLayout,
    arena_bytes,
    cacheable_prefix,
    capacity,
    int2_bytes_per_token,
    pool_bytes,
    prefix_fits,
    shareable_prefix,
)

WINDOWS = [WindowSpec(16, 32, 8), WindowSpec(0, 0, 8), WindowSpec(8, 0, 8),
           WindowSpec(0, 16, 8), WindowSpec(64, 256, 8)]


class Model:
    """What SGLang's req_to_token and KV memory would hold, updated from each Step; frees a
    request's INT2 ids and sink rows through `free_slots` like SGLang's release."""

    def __init__(self, pool: PoolIndex):
        self.pool = pool
        self.slots: dict[int, list[int]] = {}  # handle -> slot of each position
        self.mem: dict[int, tuple] = {}

    def apply(self, h: int, step) -> None:
        slots = self.slots.setdefault(h, [])
        for s, d, pos in zip(step.flush_src, step.flush_dst, step.flush_pos, strict=True):
            assert slots[pos] == s and self.mem[s] == ("tok", h, pos)
            self.mem[d] = self.mem[s]
            slots[pos] = d
        for s in step.new_slots:
            self.mem[s] = ("tok", h, len(slots))
            slots.append(s)

    def finish(self, h: int) -> None:
        self.pool.free_slots(self.slots.pop(h))  # ring ids are skipped
        self.pool.release(h)

    def check(self) -> None:
        pool, lay, w = self.pool, self.pool.layout, self.pool.window
        owned: dict[int, tuple] = {}
        slabs, sinks = set(), 0
        for h in pool.live():
            n = pool.length(h)
            slots = self.slots[h]
            assert len(slots) == n and pool.slab(h) not in slabs
            slabs.add(pool.slab(h))
            end = body_end(n, w)
            for pos, s in enumerate(slots):
                assert s not in owned, f"slot {s} owned by {owned.get(s)} and {(h, pos)}"
                owned[s] = (h, pos)
                assert s not in (DUMMY_INT2, lay.dummy_bf16)
                if pos < w.sink_tokens:
                    assert lay.is_sink(s)
                    sinks += 1
                elif pos < end:
                    assert not lay.is_bf16(s)
                else:
                    assert s == lay.ring_slot(pool.slab(h), pos)
                assert self.mem[s] == ("tok", h, pos)
            sink, body, recent = window_counts(n, w)
            assert sum(lay.is_bf16(s) for s in slots) == sink + recent
        used_int2 = {s for s in owned if not lay.is_bf16(s)}
        assert set(pool._free_int2) == pool._free_int2_set and \
            len(pool._free_int2) == len(pool._free_int2_set)
        assert pool._free_int2_set.isdisjoint(used_int2)
        assert pool._free_int2_set | used_int2 == set(range(1, lay.int2_rows))
        assert pool._free_sink_set | {s for s in owned if lay.is_sink(s)} == \
            set(range(lay.hp_offset, lay.ring_offset))
        assert pool.available_units() == lay.num_int2_slots - len(used_int2) - sinks
        assert sorted(pool._free_slabs + sorted(slabs)) == list(range(lay.max_requests))


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("window", WINDOWS, ids=str)
def test_random_sequences_keep_invariants(seed, window):
    rng = random.Random(seed)
    pool = PoolIndex(PoolLayout(window, num_int2_slots=rng.choice([40, 200, 1000]),
                                max_requests=rng.choice([1, 3, 6])))
    model = Model(pool)
    for _ in range(300):
        live = pool.live()
        op = rng.random()
        try:
            if op < 0.2 or not live:
                n = rng.choice([1, 2, 7, 8, 9, window.sink_tokens + 1,
                                window.sink_tokens + window.recent_tokens + 9, 100])
                h, st = pool.alloc(n)
                model.apply(h, st)
            elif op < 0.7:
                batch = rng.sample(live, rng.randint(1, len(live)))
                for h, st in zip(batch, pool.decode_steps(batch), strict=True):
                    model.apply(h, st)
            elif op < 0.85:
                h = rng.choice(live)
                model.apply(h, pool.extend(h, rng.choice([1, 5, 8, 33])))
            else:
                model.finish(rng.choice(live))
        except PoolFull:
            pass  # atomic: invariants must still hold
        model.check()
    for h in pool.live():
        model.finish(h)
    model.check()
    assert pool.available_units() == pool.layout.num_int2_slots
    assert pool.free_sink_rows() == pool.layout.sink_rows


def test_needs_are_exact():
    w = WindowSpec(8, 16, 8)
    pool = PoolIndex(PoolLayout(w, 300, 3))
    for prefix, n in ((0, 5), (0, 40), (6, 3), (8, 30)):
        need = pool.alloc_need(prefix, n)
        before = (pool.available_units(), pool.free_sink_rows())
        h, _ = pool.alloc(n, prefix)
        assert before[0] - pool.available_units() == need.units
        assert before[1] - pool.free_sink_rows() == need.sink_rows
        for _ in range(12):
            need = pool.extend_need(h, 1)
            before = pool.available_units()
            pool.extend(h, 1)
            assert before - pool.available_units() == need.units
        pool.release(h)  # (the test does not free its slots: units stay used)


def test_pool_full_is_atomic():
    w = WindowSpec(8, 8, 8)
    pool = PoolIndex(PoolLayout(w, num_int2_slots=24, max_requests=2))
    h, _ = pool.alloc(8 + 16 + 8)  # 8 sink rows (8 units), body 16, recent 8
    assert pool.available_units() == 0
    for _ in range(7):
        pool.extend(h, 1)  # recent grows to R + F - 1 without INT2
    state = lambda: (pool._free_int2[:], pool._free_sink[:], pool._free_slabs[:],  # noqa: E731
                     pool.length(h))
    before = state()
    with pytest.raises(PoolFull):
        pool.extend(h, 1)  # this step would flush 8 tokens
    with pytest.raises(PoolFull):
        pool.decode_steps([h])
    with pytest.raises(PoolFull):
        pool.alloc(100)
    assert before == state()
    pool.free_slots(range(1, 9))  # pretend SGLang freed 8 INT2 ids of a tree leaf
    h2, _ = pool.alloc(3)  # 3 sink rows
    with pytest.raises(PoolFull, match="slabs"):
        pool.alloc(1)
    pool.release(h2)


def test_flush_follows_body_end_exactly():
    w = WindowSpec(16, 32, 8)
    pool = PoolIndex(PoolLayout(w, 500, 1))
    h, st = pool.alloc(1)
    assert st.flush_src == []
    for length in range(2, 200):
        st = pool.extend(h, 1)
        moved = body_end(length, w) - body_end(length - 1, w)
        assert len(st.flush_dst) == moved and moved in (0, w.flush_block)
        if moved:
            assert st.flush_pos == list(range(body_end(length - 1, w), body_end(length, w)))
            assert (length - 16 - 32) % 8 == 0
        assert pool.layout.is_bf16(st.new_slots[0])  # decoded tokens land in BF16 (R > 0)


def test_sink_rows_are_token_slots_by_position():
    """Positions < P get pool sink rows (decoded ones too, the reference demoted them); the
    sink pool holds max_requests * P rows and each used row takes one unit."""
    w = WindowSpec(64, 16, 8)
    lay = PoolLayout(w, 300, 2)
    pool = PoolIndex(lay)
    h, st = pool.alloc(3)
    slots = list(st.new_slots)
    for _ in range(200):
        slots += pool.extend(h, 1).new_slots
    assert all(lay.is_sink(s) for s in slots[:64]) and not any(lay.is_sink(s) for s in slots[64:])
    assert pool.free_sink_rows() == lay.sink_rows - 64
    assert lay.sink_rows == 128 and lay.bf16_rows == 2 * (64 + lay.ring) + 1


def test_free_slots_protocol():
    lay = PoolLayout(WindowSpec(8, 8, 8), 40, 2)
    pool = PoolIndex(lay)
    h, st = pool.alloc(30)  # 8 sink, 8 INT2, 14 ring
    sink, int2, ring = st.new_slots[:8], st.new_slots[8:16], st.new_slots[16:]
    assert all(lay.is_ring(s) for s in ring) and lay.dummy_bf16 not in ring
    for bad in ([DUMMY_INT2], [lay.dummy_bf16], [lay.int2_rows + lay.bf16_rows], [int2[0]] * 2):
        with pytest.raises(OscarError, match="corrupt"):
            pool.free_slots(bad)
    units = pool.available_units()
    pool.free_slots(sink + int2 + ring)  # SGLang frees every position; the ring is skipped
    assert pool.available_units() == units + 16
    with pytest.raises(OscarError, match="double free"):
        pool.free_slots([int2[3], 1000 % lay.int2_rows or 1])
    assert pool.available_units() == units + 16  # atomic
    pool.release(h)
    with pytest.raises(OscarError, match="already released"):
        pool.release(h)
    assert pool.available_requests() == 2


def test_prefix_alloc_reads_cached_positions_only():
    w = WindowSpec(8, 16, 8)
    pool = PoolIndex(PoolLayout(w, 200, 2))
    # 40 cached tokens (8 sink + 32 body), a chunk of 30: body_end(70) = 48 >= 40
    assert prefix_fits(40, 30, w) and not prefix_fits(40, 15, w) and prefix_fits(8, 1, w)
    h, st = pool.alloc(30, prefix=40)
    assert st.flush_src == [] and pool.length(h) == 70
    assert len(st.new_slots) == 30 and sum(not pool.layout.is_bf16(s) for s in st.new_slots) == 8
    with pytest.raises(OscarError, match="recent window"):
        pool.alloc(15, prefix=40)
    h2, st = pool.alloc(4, prefix=5)  # inside the sink: new sink rows for positions 5..8
    assert [pool.layout.is_sink(s) for s in st.new_slots] == [True] * 3 + [False]


@pytest.mark.parametrize("window", [WindowSpec(8, 16, 8), WindowSpec(0, 16, 8),
                                    WindowSpec(8, 0, 8), WindowSpec(16, 8, 4),
                                    WindowSpec(0, 0, 1)], ids=str)
def test_shareable_prefix_is_the_longest_fitting(window):
    for chunk in (None, 1, 5, 8, 15, 16, 20, 23, 24, 40):
        for total in range(1, 90, 3):
            for matched in range(0, total):
                want = max(m for m in range(matched + 1) if prefix_fits(
                    m, total - m if chunk is None else min(chunk, total - m), window))
                assert shareable_prefix(matched, total, window, chunk) == want, \
                    (chunk, total, matched)


def test_cacheable_prefix_stops_at_the_ring():
    w = WindowSpec(8, 16, 8)
    assert [cacheable_prefix(n, w) for n in (0, 5, 8, 20, 24, 31, 32, 40)] == \
        [0, 5, 8, 8, 8, 8, 16, 24]


def test_memory_accounting_includes_bf16_arena():
    w, spec = WindowSpec(64, 256, 8), QuantSpec(group_size=128, scale_dtype="bfloat16")
    layers, hkv, d = 36, 8, 128
    per = int2_bytes_per_token(layers, hkv, d, spec)
    assert per == layers * 2 * hkv * (32 + 4)  # D/4 codes + bf16 scale and zero
    lay = PoolLayout(w, 1000, 64)
    arena = arena_bytes(lay, layers, hkv, d)
    assert arena == (64 * (64 + 256 + 7) + 1) * layers * 2 * hkv * d * 2
    assert pool_bytes(lay, layers, hkv, d, spec) == 1001 * per + arena
    budget = 40 * 2**30
    cap = capacity(budget, w, 64, layers, hkv, d, spec)
    assert pool_bytes(cap, layers, hkv, d, spec) <= budget
    bigger = PoolLayout(w, cap.num_int2_slots + 1, 64)
    assert pool_bytes(bigger, layers, hkv, d, spec) > budget
    with pytest.raises(OscarError, match="max-running-requests"):
        capacity(arena, w, 64, layers, hkv, d, spec)


def test_bad_inputs():
    with pytest.raises(OscarError):
        PoolLayout(WindowSpec(), 10, 0)
    pool = PoolIndex(PoolLayout(WindowSpec(8, 8, 8), 10, 2))
    with pytest.raises(OscarError, match="at least one"):
        pool.alloc(0)
    h, _ = pool.alloc(2)
    with pytest.raises(OscarError, match="twice"):
        pool.decode_steps([h, h])
    with pytest.raises(OscarError, match="unknown"):
        pool.extend(99)
    pool.release(h)
    with pytest.raises(OscarError, match="already released"):
        pool.extend(h)
