"""Prefix sharing on the int2 pool without sglang: `TinyTree` (SGLang's radix-tree protocol)
over the planner + storage + attention path. A request that hits the cache computes what the
oracle says for a prefill split at the match point (cached sink BF16, cached body INT2, its
own chunk BF16); slots are never freed twice or leaked; eviction gives everything back."""

from __future__ import annotations

import random

import pytest
from sglang_sim import SimServer

from oscar_kv.cache.windows import body_end
from oscar_kv.config import QuantSpec, WindowSpec
from oscar_kv.sglang_plugin.pool_index import shareable_prefix

WINDOWS = [WindowSpec(8, 16, 8), WindowSpec(0, 16, 8), WindowSpec(8, 0, 8), WindowSpec(16, 8, 4)]


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 1000) for _ in range(n)]


def prefill(srv: SimServer, rid: str, row: int, prompt: int, start: int = 0) -> None:
    """Chunked prefill from `start` (cached tokens); cache_unfinished_req after each chunk."""
    p = start
    while p < prompt:
        n = prompt - p if srv.chunk is None else min(srv.chunk, prompt - p)
        srv.extend([(rid, row, p, n)])
        p += n
        srv.cache(rid, row, p)


def serve(srv: SimServer, rid: str, row: int, toks: list[int], prompt: int, steps: int) -> int:
    """match -> prefill -> decode -> finish (insert); returns the cached tokens it used."""
    srv.streams.register(rid, toks)
    m = srv.match(rid, prompt)
    prefill(srv, rid, row, prompt, m)
    for _ in range(steps):
        srv.decode([(rid, row)])
    srv.finish(rid, row)
    return m


def idle_accounting(srv: SimServer) -> None:
    """SGLang's idle leak check: free units + what the tree holds == every unit; eviction of
    the whole tree returns every INT2 id and sink row."""
    idx = srv.planner.index
    assert idx.available_units() + srv.tree.size() == idx.layout.num_int2_slots
    srv.tree.evict(10**9)
    assert srv.tree.size() == 0 and idx.available_units() == idx.layout.num_int2_slots
    assert idx.free_sink_rows() == idx.layout.sink_rows
    assert idx.available_requests() == idx.layout.max_requests


@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("chunk", [None, 32, 12], ids=lambda c: f"chunk{c}")
def test_shared_prefix_pair_matches_oracle(window, chunk):
    srv = SimServer(window, QuantSpec(group_size=16), radix=True, chunk=chunk, layers=1)
    shared = tokens(0, 90)
    a = shared + tokens(1, 40) + tokens(2, 20)  # prompt 130, then 20 decoded tokens
    b = shared + tokens(3, 30) + tokens(4, 12)
    assert serve(srv, "a", 1, a, 130, 20) == 0
    m = serve(srv, "b", 2, b, 120, 12)  # the second request hits the cache
    p, body = window.sink_tokens, body_end(120, window)
    assert m == shareable_prefix(90, 120, window, chunk)
    assert m > 0 or (chunk < window.recent_tokens and window.sink_tokens == 0)
    if chunk is None or chunk >= window.recent_tokens + window.flush_block - 1:
        assert m == min(90, max(p, body))  # only the recent window is prefilled again
    # a follow-up turn: a's prompt + its decoded tokens + more, hits into decoded positions
    c = a + tokens(5, 25) + tokens(6, 5)
    hit = cached(srv, c, 175)
    assert hit == min(150, body_end(150, window)) if window.recent_tokens else hit > 130
    m_c = serve(srv, "c", 3, c, 175, 5)
    assert m_c == shareable_prefix(hit, 175, window, chunk)
    assert srv.max_err < 1e-4
    idle_accounting(srv)


def cached(srv: SimServer, toks: list[int], prompt: int) -> int:
    return len(srv.tree.match(toks, prompt - 1))


def test_concurrent_duplicates_and_retraction():
    """Two requests prefill the same prompt at once (neither hits): the second insert finds
    the first's ids, frees its own copies and reads the tree's; a retracted request frees
    what it owns and keeps the tree's; a hit request locks the prefix against eviction."""
    w = WindowSpec(8, 16, 8)
    srv = SimServer(w, QuantSpec(group_size=16), radix=True, chunk=None, layers=1)
    prompt = tokens(7, 70)
    for rid in ("x", "y"):
        srv.streams.register(rid, prompt + tokens(8, 20))
        assert srv.match(rid, 70) == 0
    srv.extend([("x", 1, 0, 70), ("y", 2, 0, 70)])
    used = srv.planner.index.available_units()
    srv.cache("x", 1, 70)
    srv.cache("y", 2, 70)  # duplicates freed: y now reads x's ids
    assert srv.planner.index.available_units() == used + body_end(70, w)
    assert srv.req_to_token[1, :body_end(70, w)].tolist() == \
        srv.req_to_token[2, :body_end(70, w)].tolist()
    for _ in range(9):
        srv.decode([("x", 1), ("y", 2)])
    srv.finish("y", 2, insert=False)  # retraction
    srv.streams.register("z", prompt + tokens(9, 3) + tokens(10, 5))
    m = srv.match("z", 73)
    assert m == body_end(70, w)  # what x cached after its prefill (< body_end(73))
    assert srv.tree.evict(10**9) == 0  # everything cached is locked by x and z
    srv.extend([("z", 3, m, 73 - m)])
    srv.cache("z", 3, 73)
    for _ in range(3):
        srv.decode([("x", 1), ("z", 3)])
    srv.finish("x", 1)
    srv.finish("z", 3)
    assert srv.max_err < 1e-4
    idle_accounting(srv)


@pytest.mark.parametrize("seed", range(3))
def test_random_radix_traffic_accounting(seed):
    """Random prompts from a few shared stems under memory pressure (evictions), chunked
    prefill, decode, finish and retraction: every layer output equals the oracle and the
    units always add up."""
    rng = random.Random(seed)
    w = WindowSpec(8, 16, 8)
    srv = SimServer(w, QuantSpec(group_size=16), radix=True, chunk=24, layers=1, n_int2=130,
                    max_reqs=3)
    stems = [tokens(100 + i, 60) for i in range(3)]
    live: dict[str, tuple[int, int]] = {}  # rid -> (row, steps left)
    hits = evicted = 0
    for step in range(60):
        free_rows = [r for r in (1, 2, 3) if r not in {v[0] for v in live.values()}]
        if free_rows and (not live or rng.random() < 0.4):
            rid, row = f"r{step}", free_rows[0]
            prompt = rng.choice([20, 45, 70])
            toks = (rng.choice(stems) + tokens(step, 80))[:prompt] + tokens(1000 + step, 30)
            srv.streams.register(rid, toks)
            m = srv.match(rid, prompt)
            want = srv.planner.index.alloc_need(m, prompt - m).units + 40  # + decode room
            if srv.planner.index.available_units() < want:
                evicted += srv.tree.evict(want - srv.planner.index.available_units())
            if srv.planner.index.available_units() < want:  # no room: stays waiting
                srv.tree.lock(toks, m, -1)
                continue
            hits += m > 0
            prefill(srv, rid, row, prompt, m)
            live[rid] = (row, rng.randint(1, 25))
        else:
            for rid, (row, left) in list(live.items()):
                if left == 0:
                    srv.finish(rid, row, insert=rng.random() < 0.8)
                    del live[rid]
                else:
                    live[rid] = (row, left - 1)
            while live:  # check_decode_mem: evict, else retract_decode
                need = srv.planner.decode_need(list(live)).units
                if srv.planner.index.available_units() < need:
                    evicted += srv.tree.evict(need)
                if srv.planner.index.available_units() >= need:
                    break
                rid, (row, _) = next(iter(live.items()))
                srv.finish(rid, row, insert=False)
                del live[rid]
            if live:
                srv.decode([(rid, row) for rid, (row, _) in live.items()])
        idx = srv.planner.index
        own = sum(srv.planner.length(r) - srv.protected[r] for r in live)
        ring = sum(max(0, srv.planner.length(r) - max(w.sink_tokens, body_end(
            srv.planner.length(r), w), srv.protected[r])) for r in live)
        assert idx.available_units() + srv.tree.size() + own - ring == \
            idx.layout.num_int2_slots
    for rid, (row, _) in live.items():
        srv.finish(rid, row)
    assert hits and evicted and srv.max_err < 1e-4
    idle_accounting(srv)
