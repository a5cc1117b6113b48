"""planner.py: SGLang batches -> PoolIndex steps -> SlotPlan (framework-free, exact)."""

from __future__ import annotations

import random

import pytest

from oscar_kv.cache.windows import body_end
from oscar_kv.config import WindowSpec
from oscar_kv.errors import OscarError
from oscar_kv.sglang_plugin.planner import SlotPlanner
from oscar_kv.sglang_plugin.pool_index import PoolFull, PoolIndex, PoolLayout

W = WindowSpec(8, 16, 8)


class Table:
    """A fake req_to_token (dict rows) and slot memory, updated as apply_slot_plan does."""

    def __init__(self):
        self.rows: dict[int, dict[int, int]] = {}
        self.mem: dict[int, tuple] = {}

    def apply(self, plan, rids_by_row):
        for src, dst, r, c in zip(plan.flush_src, plan.flush_dst, plan.flush_rows,
                                  plan.flush_cols, strict=True):
            assert self.rows[r][c] == src and self.mem[src] == (rids_by_row[r], c)
            self.mem[dst] = self.mem[src]
            self.rows[r][c] = dst
        rows, cols = plan.token_rows_cols()
        for s, r, c in zip(plan.out_slots, rows, cols, strict=True):
            self.rows.setdefault(r, {})[c] = s
            self.mem[s] = (rids_by_row[r], c)

    def release(self, p: SlotPlanner, rid: str, row: int) -> None:
        """SGLang's release without a radix tree: free every position, then the slab."""
        p.index.free_slots(self.rows.pop(row).values())
        p.release(rid)


def planner(n_int2=200, reqs=4):
    return SlotPlanner(PoolIndex(PoolLayout(W, n_int2, reqs)))


def test_chunked_prefill_then_decode_matches_pool_index():
    p, t = planner(), Table()
    rid, row = "a", 3
    by_row = {row: rid}
    for prefix, n in ((0, 20), (20, 7), (27, 30)):
        t.apply(p.extend([(rid, row, prefix, n)]), by_row)
    for _ in range(25):
        t.apply(p.decode([(rid, row)]), by_row)
    slots = [t.rows[row][c] for c in range(p.length(rid))]
    assert all(t.mem[s] == (rid, c) for c, s in enumerate(slots))
    assert p.length(rid) == 57 + 25


def test_decode_need_is_exact():
    p = planner()
    p.extend([("a", 1, 0, 23), ("b", 2, 0, 3)])
    for _ in range(40):
        need = p.decode_need(["a", "b"])
        before = p.index.available_units()
        p.decode([("a", 1), ("b", 2)])
        assert before - p.index.available_units() == need.units
        lens = [p.length("a"), p.length("b")]
        assert need.units == sum(body_end(n, W) - body_end(n - 1, W) + (n <= W.sink_tokens)
                                 for n in lens)


def test_decode_need_is_remembered_until_the_state_changes():
    """SGLang asks for the same batch's need twice per step: the second answer is the first
    one; growing, admitting or releasing a request (or a reset) recomputes it."""
    p = planner()
    p.extend([("a", 1, 0, 7), ("b", 2, 0, 15)])  # a still fills its sink (P = 8), b does not flush
    first = p.decode_need(["a", "b"])
    assert p.decode_need(["a", "b"]) is first and first.units == 1 and first.sink_rows == 1
    assert p.decode_need(["b"]).units == 0
    p.decode([("a", 1), ("b", 2)])
    again = p.decode_need(["a", "b"])
    assert again is not first
    assert again == sum((p.index.extend_need(p.handles[r], 1) for r in "ab"), type(again)())
    p.extend([("c", 3, 0, 4)])
    assert p.decode_need(["a", "b", "c"]).sink_rows == 1
    p.release("c")
    with pytest.raises(OscarError, match="holds no int2 KV slots"):
        p.decode_need(["a", "b", "c"])
    for _ in range(9):
        need = p.decode_need(["a", "b"])
        before = p.index.available_units()
        p.decode([("a", 1), ("b", 2)])
        assert before - p.index.available_units() == need.units


def test_release_frees_everything():
    p, t = planner(n_int2=100, reqs=2), Table()
    t.apply(p.extend([("a", 1, 0, 60), ("b", 2, 0, 30)]), {1: "a", 2: "b"})
    t.release(p, "a", 1)
    t.release(p, "b", 2)
    assert p.index.available_units() == 100 and p.index.available_requests() == 2
    assert p.live() == 0
    with pytest.raises(OscarError, match="never allocated or already released"):
        p.release("a")
    p.extend([("b", 1, 0, 30)])  # a retracted request comes back from scratch


def test_prefix_hits_and_bad_continuations():
    p = planner()
    p.extend([("a", 1, 0, 10)])
    plan = p.extend([("b", 2, 8, 4)])  # b arrives with 8 cached (tree) tokens: its own from 8
    assert plan.seg_starts == [8] and p.length("b") == 12
    with pytest.raises(OscarError, match="recent window"):
        p.extend([("c", 3, 30, 2)])  # 30 cached tokens would sit in c's recent window
    with pytest.raises(OscarError, match="holds 10"):
        p.extend([("a", 1, 5, 4)])


def test_batches_are_atomic():
    p = planner(n_int2=46, reqs=3)
    p.extend([("a", 1, 0, 8 + 16)])
    free = p.index.available_units()
    with pytest.raises(PoolFull):
        p.extend([("b", 2, 0, 20), ("c", 3, 0, 60)])  # c alone does not fit
    assert p.index.available_units() == free and p.live() == 1
    with pytest.raises(PoolFull, match="slabs"):
        p.extend([("b", 2, 0, 1), ("c", 3, 0, 1), ("d", 4, 0, 1)])
    assert p.live() == 1


def test_reset_only_when_idle():
    p = planner()
    p.extend([("a", 1, 0, 5)])
    with pytest.raises(OscarError, match="idle"):
        p.reset()
    p.release("a")
    p.reset()
    assert p.index.available_units() == 200


@pytest.mark.parametrize("seed", range(6))
def test_random_server_traffic(seed):
    """Random admissions, chunked prefills, decodes, finishes and retractions: every position's
    slot holds its own token and the units add up."""
    rng = random.Random(seed)
    p, t = planner(n_int2=300, reqs=4), Table()
    rows = {}  # rid -> row
    for step in range(200):
        free_rows = [r for r in range(1, 5) if r not in rows.values()]
        try:
            if free_rows and rng.random() < 0.3:
                rid = f"r{step}"
                row = rng.choice(free_rows)
                n = rng.choice([1, 5, 24, 40, 90])
                rows[rid] = row
                chunk = rng.choice([n, 7, 16])
                done = 0
                while done < n:
                    m = min(chunk, n - done)
                    t.apply(p.extend([(rid, row, done, m)]), {row: rid})
                    done += m
            elif rows and rng.random() < 0.8:
                batch = rng.sample(sorted(rows), rng.randint(1, len(rows)))
                t.apply(p.decode([(r, rows[r]) for r in batch]),
                        {rows[r]: r for r in batch})
            elif rows:
                rid = rng.choice(sorted(rows))
                t.release(p, rid, rows.pop(rid))
        except PoolFull:
            for rid in [r for r in rows if r not in p.handles]:  # failed first chunk
                t.rows.pop(rows.pop(rid), None)
        own = 0
        for rid, row in rows.items():
            slots = [t.rows[row][c] for c in range(p.length(rid))]
            assert all(t.mem[s] == (rid, c) for c, s in enumerate(slots))
            own += sum(not p.index.layout.is_ring(s) for s in slots)
        assert p.index.available_units() + own == 300
