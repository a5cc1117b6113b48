"""Host-side bookkeeping of the mixed INT2 / BF16 KV pool (framework-free, no tensors).

One flat slot-id space, so SGLang's `req_to_token` / `out_cache_loc` can hold either kind:

    INT2 ids  [0, int2_rows)                 id 0 = reserved dummy (padding rows, flush padding)
    BF16 ids  [hp_offset, hp_offset + bf16_rows), hp_offset = int2_rows, row = id - hp_offset
        request slab s: rows [s*slab, (s+1)*slab), slab = P + R + F - 1
            sink position p < P        -> row s*slab + p
            recent position p >= P     -> row s*slab + P + (p - P) mod (R + F - 1)
        row max_requests*slab           reserved dummy for CUDA-graph padded decode rows

Which positions are BF16 is exactly `cache/windows.py` for the request's length L: sink
[0, min(P, L)), INT2 body [P, body_end(L)), recent [max(P, body_end(L)), L). Growing L to L+n
moves body_end; the positions in [body_end(L), body_end(L+n)) that are already stored are
*flushed* (their BF16 ring rows are quantized into fresh INT2 slots, before the forward writes
the new tokens, which may reuse those ring rows), new positions in that range go to INT2
directly. The recent range never exceeds R + F - 1 positions, so ring rows never collide.

Bytes: see `PoolLayout.int2_bytes_per_token`, `arena_bytes` and `capacity`; the BF16 arena
is part of the budget (the reference allocated it on top, spec §4.8).
"""

from __future__ import annotations

from dataclasses import dataclass

from oscar_kv.cache.windows import body_end
from oscar_kv.config import QuantSpec, WindowSpec
from oscar_kv.errors import OscarError

DUMMY_INT2 = 0


class PoolFull(OscarError):
    """Not enough free INT2 slots or request slabs; the pool state is unchanged."""


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
    def slab(self) -> int:
        return self.window.sink_tokens + self.ring

    @property
    def int2_rows(self) -> int:
        return self.num_int2_slots + 1

    @property
    def hp_offset(self) -> int:
        return self.int2_rows

    @property
    def bf16_rows(self) -> int:
        return self.max_requests * self.slab + 1

    @property
    def dummy_bf16(self) -> int:
        """Flat id of the reserved BF16 row that padded CUDA-graph rows write to."""
        return self.hp_offset + self.max_requests * self.slab

    def is_bf16(self, slot_id: int) -> bool:
        return slot_id >= self.hp_offset

    def bf16_slot(self, slab_idx: int, pos: int) -> int:
        """Flat id of position `pos` (sink or recent) of the request in slab `slab_idx`."""
        p = self.window.sink_tokens
        row = pos if pos < p else p + (pos - p) % self.ring
        return self.hp_offset + slab_idx * self.slab + row


def int2_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int,
                         spec: QuantSpec) -> int:
    """K + V bytes of one INT2 slot over all layers: packed D/4 + scale/zero per group."""
    per_head = head_dim // 4 + 2 * spec.groups(head_dim) * spec.scale_bits // 8
    return num_layers * 2 * num_kv_heads * per_head


def bf16_bytes_per_row(num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """K + V bytes of one BF16 row over all layers."""
    return num_layers * 2 * num_kv_heads * head_dim * 2


def arena_bytes(layout: PoolLayout, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """The whole BF16 arena: every request slab plus the dummy row."""
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


class _Req:
    __slots__ = ("slab", "length", "body")

    def __init__(self, slab: int) -> None:
        self.slab = slab
        self.length = 0
        self.body: list[int] = []  # body[i] is the INT2 id of position P + i


class PoolIndex:
    """Per-request slots of the mixed pool: alloc / extend / free / retract, exact free lists.

    Handles are integers, never reused. `free` of a retracted request is a no-op (SGLang
    releases retracted requests again when they are aborted); any other double free raises."""

    def __init__(self, layout: PoolLayout) -> None:
        self.layout = layout
        self._free_int2 = list(range(layout.int2_rows - 1, DUMMY_INT2, -1))  # pop() -> 1 first
        self._free_int2_set = set(self._free_int2)
        self._free_slabs = list(range(layout.max_requests - 1, -1, -1))
        self._reqs: dict[int, _Req] = {}
        self._retracted: set[int] = set()
        self._next = 0

    # ---- queries -------------------------------------------------------------------------
    @property
    def window(self) -> WindowSpec:
        return self.layout.window

    def available_int2(self) -> int:
        return len(self._free_int2)

    def available_requests(self) -> int:
        return len(self._free_slabs)

    def live(self) -> list[int]:
        return list(self._reqs)

    def length(self, handle: int) -> int:
        return self._req(handle).length

    def slab(self, handle: int) -> int:
        return self._req(handle).slab

    def int2_needed(self, length: int, n: int) -> int:
        """INT2 slots an extend of a length-`length` request by n tokens takes (<= n + F)."""
        return body_end(length + n, self.window) - body_end(length, self.window)

    def token_slots(self, handle: int) -> list[int]:
        """Flat ids of positions [0, L) (what req_to_token[slab, :L] holds)."""
        r = self._req(handle)
        p = self.window.sink_tokens
        end = body_end(r.length, self.window)
        out = []
        for pos in range(r.length):
            out.append(r.body[pos - p] if p <= pos < end else
                       self.layout.bf16_slot(r.slab, pos))
        return out

    def owned_int2(self, handle: int) -> list[int]:
        return list(self._req(handle).body)

    # ---- mutations -----------------------------------------------------------------------
    def alloc(self, n: int) -> tuple[int, Step]:
        """Admit a request whose first chunk has n tokens -> (handle, Step). Atomic."""
        if not self._free_slabs:
            raise PoolFull(f"all {self.layout.max_requests} request slabs are in use; lower "
                           "the batch or raise --max-running-requests")
        self._check_n(n, self.int2_needed(0, n))
        r = _Req(self._free_slabs.pop())
        h, self._next = self._next, self._next + 1
        self._reqs[h] = r
        return h, self._grow(r, n)

    def extend(self, handle: int, n: int = 1) -> Step:
        """Append n tokens (n = 1 for decode, a chunk for chunked prefill). Atomic."""
        r = self._req(handle)
        self._check_n(n, self.int2_needed(r.length, n))
        return self._grow(r, n)

    def decode_batch(self, handles: list[int], pad_to: int | None = None
                     ) -> tuple[list[int], list[int], list[int]]:
        """One token for each request (atomic over the batch) -> (out_slots [B'],
        flush_src [B'*F], flush_dst [B'*F]) with B' = pad_to or B. Padding rows and unused
        flush entries point at the reserved dummies, so the shapes are static per B'."""
        b = len(handles)
        pad_to = b if pad_to is None else pad_to
        if pad_to < b or len(set(handles)) != b:
            raise OscarError(f"decode batch of {b} distinct requests cannot be padded to "
                             f"{pad_to}")
        need = sum(self.int2_needed(self._req(h).length, 1) for h in handles)
        self._check_n(1, need)
        f, lay = self.window.flush_block, self.layout
        out, src, dst = [], [], []
        for h in handles:
            st = self._grow(self._req(h), 1)
            out += st.new_slots
            src += st.flush_src + [lay.dummy_bf16] * (f - len(st.flush_src))
            dst += st.flush_dst + [DUMMY_INT2] * (f - len(st.flush_dst))
        pad = pad_to - b
        return (out + [lay.dummy_bf16] * pad, src + [lay.dummy_bf16] * (pad * f),
                dst + [DUMMY_INT2] * (pad * f))

    def decode_steps(self, handles: list[int]) -> list[Step]:
        """One token for each request, atomic over the batch, unpadded: the Step of each
        (its flush entries carry their positions, for the req_to_token remap)."""
        if len(set(handles)) != len(handles):
            raise OscarError(f"decode batch of {len(handles)} requests names a request twice")
        need = sum(self.int2_needed(self._req(h).length, 1) for h in handles)
        self._check_n(1, need)
        return [self._grow(self._req(h), 1) for h in handles]

    def free(self, handle: int) -> bool:
        """Release a finished request's INT2 slots and slab. False if it was retracted."""
        if handle in self._retracted:
            self._retracted.discard(handle)
            return False
        self._release(handle)
        return True

    def retract(self, handle: int) -> int:
        """Release everything of a live request; returns its length (to recompute later)."""
        n = self._req(handle).length
        self._release(handle)
        self._retracted.add(handle)
        return n

    # ---- internals -----------------------------------------------------------------------
    def _req(self, handle: int) -> _Req:
        r = self._reqs.get(handle)
        if r is None:
            state = "retracted" if handle in self._retracted else "unknown or already freed"
            raise OscarError(f"request handle {handle} is {state}; it owns no KV slots")
        return r

    def _check_n(self, n: int, need: int) -> None:
        if n < 1:
            raise OscarError(f"a request must grow by at least one token, got {n}")
        if need > len(self._free_int2):
            raise PoolFull(f"{need} INT2 slots needed but {len(self._free_int2)} are free; "
                           "retract or finish a request first")

    def _take_int2(self) -> int:
        s = self._free_int2.pop()
        self._free_int2_set.discard(s)
        return s

    def _grow(self, r: _Req, n: int) -> Step:
        w, lay = self.window, self.layout
        old, new = r.length, r.length + n
        end_old, end_new = body_end(old, w), body_end(new, w)
        src, dst, fpos = [], [], []
        for pos in range(end_old, min(end_new, old)):  # stored BF16 recent rows -> INT2
            s = self._take_int2()
            src.append(lay.bf16_slot(r.slab, pos))
            dst.append(s)
            fpos.append(pos)
            r.body.append(s)
        slots = []
        for pos in range(old, new):
            if w.sink_tokens <= pos < end_new:
                s = self._take_int2()
                r.body.append(s)
            else:
                s = lay.bf16_slot(r.slab, pos)
            slots.append(s)
        r.length = new
        return Step(slots, src, dst, fpos)

    def _release(self, handle: int) -> None:
        r = self._req(handle)
        for s in r.body:
            if s in self._free_int2_set or s == DUMMY_INT2:
                raise OscarError(f"INT2 slot {s} of request {handle} is already free; the pool "
                                 "bookkeeping is corrupt")
        self._free_int2.extend(reversed(r.body))
        self._free_int2_set.update(r.body)
        self._free_slabs.append(r.slab)
        del self._reqs[handle]
