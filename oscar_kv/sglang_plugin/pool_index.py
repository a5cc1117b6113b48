"""Host-side bookkeeping of the mixed INT2 / BF16 KV pool (framework-free, no tensors).

One flat slot-id space, so SGLang's `req_to_token`, `out_cache_loc` and radix-tree values can
hold either kind:

    INT2 ids  [0, int2_rows)             id 0 = reserved dummy (padding rows, flush padding)
    BF16 ids  [hp_offset, hp_offset + bf16_rows), hp_offset = int2_rows, row = id - hp_offset
        rows [0, sink_rows)              sink rows, one per sink position p < P, token slots;
                                         sink_rows = max_requests * P
        sink_rows + s*ring + (p-P) % ring  the ring: recent position p of the request in slab s,
                                         ring = R + F - 1
        row bf16_rows - 1                reserved dummy for CUDA-graph padded decode rows

Which positions are BF16 is exactly `cache/windows.py` for the request's length L: sink
[0, min(P, L)), INT2 body [P, body_end(L)), recent [max(P, body_end(L)), L). Growing L to L+n
moves body_end; the positions in [body_end(L), body_end(L+n)) that sit in the ring are *flushed*
(their BF16 rows are quantized into fresh INT2 slots, before the forward writes the new tokens,
which may reuse those ring rows); new positions in that range go to INT2 directly. The recent
range never exceeds R + F - 1 positions, so ring rows never collide.

Ownership follows SGLang's token protocol, so the radix cache can share prefixes: INT2 ids and
sink ids are *token slots*. `alloc` / `extend` / `decode_steps` hand them out; they come back
through `free_slots` when SGLang frees them (a finished or retracted request's positions past
its tree-owned prefix, the request's copy of a prefix the tree already holds, an evicted tree
leaf). Ring rows belong to the request's slab: they never enter the tree (`cacheable_prefix`
stops at the body end), `free_slots` skips them, and `release` returns the slab. A request
admitted with m cached positions (a radix hit) starts at length m and only reads them; its first
chunk of n tokens must keep every cached position outside its BF16 recent window
(`prefix_fits`), which `shareable_prefix` (the match cap) and the scheduler hook guarantee.

Units: every INT2 id and sink row in use costs one unit of `num_int2_slots`, so SGLang's token
count (positions held by the radix tree or by requests outside their ring) is exact:
`available_units() = free INT2 ids - sink rows in use`. Bytes: see `int2_bytes_per_token`,
`arena_bytes`, `capacity`; the BF16 arena is part of the budget (the reference allocated it on
top, spec §4.8).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from oscar_kv.cache.windows import body_end
from oscar_kv.config import QuantSpec, WindowSpec
from oscar_kv.errors import OscarError

DUMMY_INT2 = 0


class PoolFull(OscarError):
    """Not enough free units, sink rows or request slabs; the pool state is unchanged."""


@dataclass(frozen=True)
class PoolLayout:
    """Slot namespaces and sizes. num_int2_slots excludes the dummy slot."""

    window: WindowSpec
    num_int2_slots: int
    max_requests: int

    def __post_init__(self) -> None:
        if self.num_int2_slots < 0 or self.max_requests < 1:
            raise OscarError(f"pool needs >= 0 INT2 slots and >= 1 request slab, got "
                             f"{self.num_int2_slots} and {self.max_requests}")

    @property
    def ring(self) -> int:
        return self.window.recent_tokens + self.window.flush_block - 1

    @property
    def sink_rows(self) -> int:
        return self.max_requests * self.window.sink_tokens

    @property
    def int2_rows(self) -> int:
        return self.num_int2_slots + 1

    @property
    def hp_offset(self) -> int:
        return self.int2_rows

    @property
    def bf16_rows(self) -> int:
        return self.sink_rows + self.max_requests * self.ring + 1

    @property
    def ring_offset(self) -> int:
        """Flat id of the first ring row."""
        return self.hp_offset + self.sink_rows

    @property
    def dummy_bf16(self) -> int:
        """Flat id of the reserved BF16 row that padded CUDA-graph rows write to."""
        return self.hp_offset + self.bf16_rows - 1

    def is_bf16(self, slot_id: int) -> bool:
        return slot_id >= self.hp_offset

    def is_sink(self, slot_id: int) -> bool:
        return self.hp_offset <= slot_id < self.ring_offset

    def is_ring(self, slot_id: int) -> bool:
        return self.ring_offset <= slot_id < self.dummy_bf16

    def ring_slot(self, slab_idx: int, pos: int) -> int:
        """Flat id of recent position `pos` (>= P) of the request in slab `slab_idx`."""
        return self.ring_offset + slab_idx * self.ring + (pos - self.window.sink_tokens) % self.ring


def int2_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int,
                         spec: QuantSpec) -> int:
    """K + V bytes of one INT2 slot over all layers: packed D/4 + scale/zero per group."""
    per_head = head_dim // 4 + 2 * spec.groups(head_dim) * spec.scale_bits // 8
    return num_layers * 2 * num_kv_heads * per_head


def bf16_bytes_per_row(num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """K + V bytes of one BF16 row over all layers."""
    return num_layers * 2 * num_kv_heads * head_dim * 2


def arena_bytes(layout: PoolLayout, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """The whole BF16 arena: sink rows, every request's ring and the dummy row."""
    return layout.bf16_rows * bf16_bytes_per_row(num_layers, num_kv_heads, head_dim)


def pool_bytes(layout: PoolLayout, num_layers: int, num_kv_heads: int, head_dim: int,
               spec: QuantSpec) -> int:
    """Every byte the pool allocates: INT2 rows (dummy included) + the BF16 arena."""
    return (layout.int2_rows * int2_bytes_per_token(num_layers, num_kv_heads, head_dim, spec)
            + arena_bytes(layout, num_layers, num_kv_heads, head_dim))


def capacity(budget_bytes: int, window: WindowSpec, max_requests: int, num_layers: int,
             num_kv_heads: int, head_dim: int, spec: QuantSpec) -> PoolLayout:
    """The largest layout whose `pool_bytes` fits `budget_bytes` with `max_requests` slabs."""
    probe = PoolLayout(window, 0, max_requests)
    fixed = pool_bytes(probe, num_layers, num_kv_heads, head_dim, spec)
    per = int2_bytes_per_token(num_layers, num_kv_heads, head_dim, spec)
    if budget_bytes < fixed + per:
        raise OscarError(f"a KV budget of {budget_bytes / 2**20:.1f} MiB cannot hold the BF16 "
                         f"windows of {max_requests} requests ({fixed / 2**20:.1f} MiB); raise "
                         "--mem-fraction-static or lower --max-running-requests")
    return PoolLayout(window, (budget_bytes - fixed) // per, max_requests)


# ---- prefix sharing rules (pure functions of lengths) -------------------------------------
def prefix_fits(prefix: int, first_chunk: int, window: WindowSpec) -> bool:
    """True if `prefix` cached positions (sink or INT2) may start a request whose first chunk
    has `first_chunk` tokens: all of them are sink or body at the new length."""
    return prefix <= window.sink_tokens or prefix <= body_end(prefix + first_chunk, window)


def shareable_prefix(matched: int, total: int, window: WindowSpec,
                     chunk: int | None = None) -> int:
    """The longest m <= matched that a request of `total` tokens may take from the radix tree
    when its first chunk is min(chunk, total - m) tokens (chunk None: no chunking)."""
    p, f = window.sink_tokens, window.flush_block

    def fits(m: int) -> bool:
        first = total - m if chunk is None else min(chunk, total - m)
        return prefix_fits(m, first, window)

    m = min(matched, max(p, body_end(total, window)))  # the last chunk ends at `total`
    if fits(m):
        return m
    aligned = p + f * ((m - p) // f)  # within one flush block, the block start fits first
    if fits(aligned):
        return aligned
    return min(matched, p)


def cacheable_prefix(length: int, window: WindowSpec) -> int:
    """How many leading positions of a request of `length` tokens the radix tree may own:
    everything but the recent window (ring rows are per request)."""
    return min(length, body_end(length, window))


@dataclass(frozen=True)
class Step:
    """What one alloc/extend decided for a request (flat ids, host lists).

    new_slots [n]: slot of each new position L..L+n-1 (the forward writes K/V there);
    flush_src [m] BF16 ids -> flush_dst [m] INT2 ids for positions flush_pos [m] (to be
    quantized before the forward writes new tokens)."""

    new_slots: list[int]
    flush_src: list[int]
    flush_dst: list[int]
    flush_pos: list[int]


@dataclass(frozen=True)
class Need:
    """Units (INT2 ids + sink rows), sink rows and request slabs a batch takes."""

    units: int = 0
    sink_rows: int = 0
    slabs: int = 0

    def __add__(self, other: Need) -> Need:
        return Need(self.units + other.units, self.sink_rows + other.sink_rows,
                    self.slabs + other.slabs)


class _Req:
    __slots__ = ("slab", "length", "body_hi")

    def __init__(self, slab: int, length: int, body_hi: int) -> None:
        self.slab = slab
        self.length = length
        self.body_hi = body_hi  # positions [P, body_hi) are INT2 (own or tree-owned)


class PoolIndex:
    """Free lists of the mixed pool and each request's slab and length (see module docstring).

    Handles are integers, never reused."""

    def __init__(self, layout: PoolLayout) -> None:
        self.layout = layout
        self._free_int2 = list(range(layout.int2_rows - 1, DUMMY_INT2, -1))  # pop() -> 1 first
        self._free_int2_set = set(self._free_int2)
        self._free_sink = list(range(layout.ring_offset - 1, layout.hp_offset - 1, -1))
        self._free_sink_set = set(self._free_sink)
        self._free_slabs = list(range(layout.max_requests - 1, -1, -1))
        self._reqs: dict[int, _Req] = {}
        self._next = 0

    # ---- queries -------------------------------------------------------------------------
    @property
    def window(self) -> WindowSpec:
        return self.layout.window

    def available_units(self) -> int:
        """Free INT2 ids minus the sink rows in use (each used sink row takes one unit)."""
        return len(self._free_int2) - (self.layout.sink_rows - len(self._free_sink))

    def free_sink_rows(self) -> int:
        return len(self._free_sink)

    def available_requests(self) -> int:
        return len(self._free_slabs)

    def live(self) -> list[int]:
        return list(self._reqs)

    def length(self, handle: int) -> int:
        return self._req(handle).length

    def slab(self, handle: int) -> int:
        return self._req(handle).slab

    def alloc_need(self, prefix: int, n: int) -> Need:
        """What admitting a request with `prefix` cached positions and a chunk of n takes."""
        return self._need(prefix, n, max(self.window.sink_tokens, prefix)) + Need(slabs=1)

    def extend_need(self, handle: int, n: int) -> Need:
        r = self._req(handle)
        return self._need(r.length, n, r.body_hi)

    # ---- mutations -----------------------------------------------------------------------
    def alloc(self, n: int, prefix: int = 0) -> tuple[int, Step]:
        """Admit a request: `prefix` positions are already cached (tree-owned ids the caller
        writes to req_to_token), its first chunk has n tokens -> (handle, Step). Atomic."""
        if prefix < 0 or not prefix_fits(prefix, n, self.window):
            raise OscarError(f"a request with {prefix} cached tokens and a first chunk of {n} "
                             "would hold cached INT2 rows inside its BF16 recent window; the "
                             "int2 radix cache caps matches so this cannot happen (scheduler "
                             "and plugin are out of sync)")
        self._check(n, self.alloc_need(prefix, n))
        r = _Req(self._free_slabs.pop(), prefix, max(self.window.sink_tokens, prefix))
        h, self._next = self._next, self._next + 1
        self._reqs[h] = r
        return h, self._grow(r, n)

    def extend(self, handle: int, n: int = 1) -> Step:
        """Append n tokens (n = 1 for decode, a chunk for chunked prefill). Atomic."""
        self._check(n, self.extend_need(handle, n))
        return self._grow(self._req(handle), n)

    def decode_steps(self, handles: Sequence[int]) -> list[Step]:
        """One token for each request, atomic over the batch: the Step of each (its flush
        entries carry their positions, for the req_to_token remap)."""
        if len(set(handles)) != len(handles):
            raise OscarError(f"decode batch of {len(handles)} requests names a request twice")
        need = sum((self.extend_need(h, 1) for h in handles), Need())
        self._check(1, need)
        return [self._grow(self._req(h), 1) for h in handles]

    def release(self, handle: int) -> None:
        """Return the request's slab (its ring rows). Its INT2 ids and sink rows come back
        through `free_slots`, as SGLang frees them."""
        r = self._req(handle)
        self._free_slabs.append(r.slab)
        del self._reqs[handle]

    def free_slots(self, slot_ids: Iterable[int]) -> None:
        """Return INT2 ids and sink rows to the free lists; ring ids are skipped (the slab owns
        them). Atomic: a dummy, unknown or already free id raises and frees nothing."""
        lay = self.layout
        int2, sink, seen = [], [], set()
        for s in slot_ids:
            s = int(s)
            if s in seen:
                raise OscarError(f"slot {s} is freed twice in one call; the pool bookkeeping is "
                                 "corrupt")
            seen.add(s)
            if DUMMY_INT2 < s < lay.int2_rows:
                bucket, free = int2, self._free_int2_set
            elif lay.is_sink(s):
                bucket, free = sink, self._free_sink_set
            elif lay.is_ring(s):
                continue
            else:
                raise OscarError(f"slot {s} is a reserved dummy or outside the int2 pool "
                                 f"[1, {lay.dummy_bf16}); the pool bookkeeping is corrupt")
            if s in free:
                raise OscarError(f"slot {s} is already free (double free); the pool "
                                 "bookkeeping is corrupt")
            bucket.append(s)
        self._free_int2.extend(reversed(int2))
        self._free_int2_set.update(int2)
        self._free_sink.extend(reversed(sink))
        self._free_sink_set.update(sink)

    # ---- internals -----------------------------------------------------------------------
    def _req(self, handle: int) -> _Req:
        r = self._reqs.get(handle)
        if r is None:
            raise OscarError(f"request handle {handle} is unknown or already released; it owns "
                             "no KV slots")
        return r

    def _need(self, length: int, n: int, body_hi: int) -> Need:
        w = self.window
        sinks = max(0, min(w.sink_tokens, length + n) - length)
        return Need(sinks + max(0, body_end(length + n, w) - body_hi), sinks)

    def _check(self, n: int, need: Need) -> None:
        if n < 1:
            raise OscarError(f"a request must grow by at least one token, got {n}")
        if need.slabs > len(self._free_slabs):
            raise PoolFull(f"{need.slabs} request slabs needed but {len(self._free_slabs)} of "
                           f"{self.layout.max_requests} are free; lower the batch or raise "
                           "--max-running-requests")
        if need.units > self.available_units() or need.sink_rows > len(self._free_sink):
            raise PoolFull(f"{need.units} slots ({need.sink_rows} sink rows) needed but "
                           f"{self.available_units()} ({len(self._free_sink)}) are free; evict, "
                           "retract or finish a request first")

    @staticmethod
    def _take(free: list[int], free_set: set[int], k: int) -> list[int]:
        taken = free[len(free) - k:][::-1]  # the order pop() would give
        del free[len(free) - k:]
        free_set.difference_update(taken)
        return taken

    def _grow(self, r: _Req, n: int) -> Step:
        w, lay = self.window, self.layout
        p = w.sink_tokens
        old, new = r.length, r.length + n
        end_new = body_end(new, w)
        fpos = list(range(r.body_hi, min(end_new, old)))  # stored ring rows -> INT2
        src = [lay.ring_slot(r.slab, pos) for pos in fpos]
        dst = self._take(self._free_int2, self._free_int2_set, len(fpos))
        n_sink = max(0, min(p, new) - old)
        n_int2 = max(0, min(end_new, new) - max(old, p))
        slots = (self._take(self._free_sink, self._free_sink_set, n_sink)
                 + self._take(self._free_int2, self._free_int2_set, n_int2)
                 + [lay.ring_slot(r.slab, pos) for pos in range(old + n_sink + n_int2, new)])
        r.body_hi = max(r.body_hi, min(end_new, new))
        r.length = new
        return Step(slots, src, dst, fpos)
