"""pool_index.py: slot bookkeeping invariants under random alloc/decode/extend/free/retract."""

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
    capacity,
    int2_bytes_per_token,
    pool_bytes,
)

WINDOWS = [WindowSpec(16, 32, 8), WindowSpec(0, 0, 8), WindowSpec(8, 0, 8),
           WindowSpec(0, 16, 8), WindowSpec(64, 256, 8)]


def check_invariants(pool: PoolIndex, contents: dict[int, dict[int, tuple]]) -> None:
    """No slot owned twice, free lists exact, classification == windows.py, data intact."""
    lay, w = pool.layout, pool.window
    owned_int2, owned_bf16, slabs = {}, {}, set()
    for h in pool.live():
        n = pool.length(h)
        slots = pool.token_slots(h)
        assert len(slots) == n
        assert pool.slab(h) not in slabs
        slabs.add(pool.slab(h))
        end = body_end(n, w)
        n_bf16 = 0
        for pos, s in enumerate(slots):
            bf16 = lay.is_bf16(s)
            in_body = w.sink_tokens <= pos < end
            assert bf16 == (not in_body), (h, pos, n)
            table = owned_bf16 if bf16 else owned_int2
            assert s not in table, f"slot {s} owned by {table.get(s)} and {(h, pos)}"
            table[s] = (h, pos)
            assert s not in (DUMMY_INT2, lay.dummy_bf16)
            if bf16:
                n_bf16 += 1
                lo = lay.hp_offset + pool.slab(h) * lay.slab
                assert lo <= s < lo + lay.slab
            # the simulated cache content of position pos lives in slot s
            assert contents[h][pos] == ("tok", h, pos), (h, pos)
        sink, body, recent = window_counts(n, w)
        assert (n_bf16, n - n_bf16) == (sink + recent, body)
        assert sorted(pool.owned_int2(h)) == sorted(s for s in slots if not lay.is_bf16(s))
    free = pool._free_int2
    assert len(free) == len(set(free)) == len(pool._free_int2_set)
    assert set(free) == pool._free_int2_set
    assert set(free).isdisjoint(owned_int2)
    assert set(free) | set(owned_int2) == set(range(1, lay.int2_rows))
    assert DUMMY_INT2 not in free
    assert sorted(pool._free_slabs + sorted(slabs)) == list(range(lay.max_requests))


class Sim:
    """A fake cache memory keyed by slot id, updated exactly as the device would be."""

    def __init__(self, pool: PoolIndex):
        self.pool = pool
        self.mem: dict[int, tuple] = {}

    def apply(self, h: int, start: int, step) -> None:
        # flush first (reads BF16 rows), then the forward writes the new tokens
        moved = [self.mem[s] for s in step.flush_src]
        for s, v, pos in zip(step.flush_dst, moved, step.flush_pos, strict=True):
            assert v == ("tok", h, pos)
            self.mem[s] = v
        for i, s in enumerate(step.new_slots):
            self.mem[s] = ("tok", h, start + i)

    def contents(self) -> dict[int, dict[int, tuple]]:
        return {h: {pos: self.mem.get(s) for pos, s in enumerate(self.pool.token_slots(h))}
                for h in self.pool.live()}


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("window", WINDOWS, ids=str)
def test_random_sequences_keep_invariants(seed, window):
    rng = random.Random(seed)
    pool = PoolIndex(PoolLayout(window, num_int2_slots=rng.choice([40, 200, 1000]),
                                max_requests=rng.choice([1, 3, 6])))
    sim, retracted, freed = Sim(pool), [], []
    for _ in range(300):
        live = pool.live()
        op = rng.random()
        try:
            if op < 0.2 or not live:
                n = rng.choice([1, 2, 7, 8, 9, window.sink_tokens + 1,
                                window.sink_tokens + window.recent_tokens + 9, 100])
                h, st = pool.alloc(n)
                sim.apply(h, 0, st)
            elif op < 0.7:
                batch = rng.sample(live, rng.randint(1, len(live)))
                starts = {h: pool.length(h) for h in batch}
                pad = len(batch) + rng.randint(0, 2)
                out, src, dst = pool.decode_batch(batch, pad_to=pad)
                f = window.flush_block
                assert len(out) == pad and len(src) == len(dst) == pad * f
                assert out[len(batch):] == [pool.layout.dummy_bf16] * (pad - len(batch))
                for i, h in enumerate(batch):
                    srcs = [s for s in src[i * f:(i + 1) * f] if s != pool.layout.dummy_bf16]
                    dsts = [s for s in dst[i * f:(i + 1) * f] if s != DUMMY_INT2]
                    first = body_end(starts[h], window)
                    st_pos = list(range(first, first + len(srcs)))
                    sim.apply(h, starts[h], type("S", (), dict(
                        new_slots=[out[i]], flush_src=srcs, flush_dst=dsts,
                        flush_pos=st_pos))())
            elif op < 0.8:
                h = rng.choice(live)
                start = pool.length(h)
                sim.apply(h, start, pool.extend(h, rng.choice([1, 5, 8, 33])))
            elif op < 0.9:
                h = rng.choice(live)
                assert pool.free(h) is True
                freed.append(h)
            else:
                h = rng.choice(live)
                n = pool.retract(h)
                assert n > 0
                retracted.append(h)
        except PoolFull:
            pass  # atomic: invariants must still hold
        check_invariants(pool, sim.contents())
    for h in retracted:  # a retracted request may be released again: no double free
        assert pool.free(h) is False
        with pytest.raises(OscarError, match="unknown or already freed"):
            pool.free(h)
    for h in freed[:3]:
        with pytest.raises(OscarError, match="already freed"):
            pool.free(h)
    for h in pool.live():
        pool.free(h)
    check_invariants(pool, {})
    assert pool.available_int2() == pool.layout.num_int2_slots


def test_pool_full_is_atomic():
    w = WindowSpec(8, 8, 8)
    pool = PoolIndex(PoolLayout(w, num_int2_slots=16, max_requests=2))
    h, _ = pool.alloc(8 + 16 + 8)  # sink 8, body 16, recent 8
    assert pool.available_int2() == 0
    before = (pool.token_slots(h), pool._free_int2[:], pool._free_slabs[:])
    for _ in range(7):
        pool.extend(h, 1)  # recent grows to R + F - 1 without INT2
    before = (pool.token_slots(h), pool._free_int2[:], pool._free_slabs[:])
    with pytest.raises(PoolFull):
        pool.extend(h, 1)  # this step would flush 8 tokens
    with pytest.raises(PoolFull):
        pool.decode_batch([h])
    with pytest.raises(PoolFull):
        pool.alloc(100)
    assert before == (pool.token_slots(h), pool._free_int2[:], pool._free_slabs[:])
    h2, _ = pool.alloc(3)
    with pytest.raises(PoolFull, match="slabs"):
        pool.alloc(1)
    pool.free(h2)


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


def test_sink_is_by_position_for_short_prompts():
    """Decoded tokens at positions < P stay BF16 forever (the reference demoted them)."""
    w = WindowSpec(64, 16, 8)
    pool = PoolIndex(PoolLayout(w, 300, 1))
    h, _ = pool.alloc(3)
    for _ in range(200):
        pool.extend(h, 1)
    slots = pool.token_slots(h)
    assert all(pool.layout.is_bf16(s) for s in slots[:64])


def test_dummy_slots_are_reserved():
    lay = PoolLayout(WindowSpec(8, 8, 8), 10, 2)
    assert lay.dummy_bf16 == lay.hp_offset + 2 * lay.slab
    assert lay.bf16_rows == 2 * lay.slab + 1 and lay.int2_rows == 11
    pool = PoolIndex(lay)
    hs = [pool.alloc(8)[0] for _ in range(2)]
    used = {s for h in hs for s in pool.token_slots(h)}
    assert lay.dummy_bf16 not in used and DUMMY_INT2 not in used
    assert DUMMY_INT2 not in pool._free_int2


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
    with pytest.raises(OscarError, match="padded"):
        pool.decode_batch([h, h])
    with pytest.raises(OscarError, match="unknown"):
        pool.extend(99)
    pool.retract(h)
    with pytest.raises(OscarError, match="retracted"):
        pool.extend(h)
