"""Scheduler side of the mixed pool: SGLang requests -> PoolIndex steps -> one SlotPlan per forward.

SGLang names a request by its `rid` and gives it a row of `req_to_token` (`req_pool_idx`);
`PoolIndex` names it by a handle. `SlotPlanner` keeps rid -> handle and turns one batch into
one `SlotPlan` (host lists, framework-free):

    out_slots[i]                       flat slot id of the i-th new token (SGLang's out_cache_loc)
    request j's new tokens             req_to_token[seg_rows[j], seg_starts[j] + k] for
                                       k < seg_lens[j], in batch order
    flush: BF16 row flush_src[j] -> INT2 slot flush_dst[j], then
    req_to_token[flush_rows[j], flush_cols[j]] = flush_dst[j]

The flush must run before the forward writes the new tokens (they may reuse the freed ring
rows). Each call is atomic: a batch that does not fit raises `PoolFull` and changes nothing.
A request the planner does not hold yet may arrive with cached tokens (a radix-cache hit, see
`pool_index.prefix_fits`); the caller writes the tree's ids for them into req_to_token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from oscar_kv.errors import OscarError
from oscar_kv.sglang_plugin.pool_index import Need, PoolFull, PoolIndex, Step


@dataclass
class SlotPlan:
    """What one forward allocates (host lists; see the module docstring)."""

    out_slots: list[int] = field(default_factory=list)
    seg_rows: list[int] = field(default_factory=list)
    seg_starts: list[int] = field(default_factory=list)
    seg_lens: list[int] = field(default_factory=list)
    flush_src: list[int] = field(default_factory=list)
    flush_dst: list[int] = field(default_factory=list)
    flush_rows: list[int] = field(default_factory=list)
    flush_cols: list[int] = field(default_factory=list)

    def add(self, row: int, start: int, step: Step) -> None:
        """Append one request's step; `start` = its length before the step."""
        self.out_slots += step.new_slots
        self.seg_rows.append(row)
        self.seg_starts.append(start)
        self.seg_lens.append(len(step.new_slots))
        self.flush_src += step.flush_src
        self.flush_dst += step.flush_dst
        self.flush_rows += [row] * len(step.flush_dst)
        self.flush_cols += step.flush_pos

    def token_rows_cols(self) -> tuple[list[int], list[int]]:
        """(req_to_token row, column) of every new token, batch order."""
        rows, cols = [], []
        for row, start, n in zip(self.seg_rows, self.seg_starts, self.seg_lens, strict=True):
            rows += [row] * n
            cols += range(start, start + n)
        return rows, cols


class SlotPlanner:
    """rid -> PoolIndex handle; extend / decode / release for whole SGLang batches."""

    def __init__(self, index: PoolIndex) -> None:
        self.index = index
        self.handles: dict[str, int] = {}
        self._version = 0  # bumped whenever a request's length or the set of handles changes
        self._need_memo: tuple | None = None  # ((version, rids), Need) of the last decode_need

    def length(self, rid: str) -> int:
        return self.index.length(self._handle(rid))

    def holds(self, rid: str) -> bool:
        return rid in self.handles

    def live(self) -> int:
        return len(self.handles)

    def extend_need(self, reqs: Sequence[tuple[str, int, int]]) -> Need:
        """What the batch reqs = (rid, prefix_len, extend_len) takes. Raises unless each
        request continues what the planner holds, or is new (its prefix cached in the tree)."""
        need = Need()
        for rid, prefix, n in reqs:
            h = self.handles.get(rid)
            if h is None:
                need += self.index.alloc_need(prefix, n)
                continue
            have = self.index.length(h)
            if have != prefix:
                raise OscarError(
                    f"request {rid} extends from {prefix} cached tokens but the int2 pool holds "
                    f"{have} for it; the scheduler bookkeeping is out of sync")
            need += self.index.extend_need(h, n)
        return need

    def check_extend(self, reqs: Sequence[tuple[str, int, int]]) -> None:
        """Raise (changing nothing) unless the batch reqs = (rid, prefix_len, extend_len)
        continues what the planner holds and fits in the free slots and slabs."""
        need, idx = self.extend_need(reqs), self.index
        if need.slabs > idx.available_requests() or need.units > idx.available_units() or \
                need.sink_rows > idx.free_sink_rows():
            raise PoolFull(f"prefill needs {need.units} slots ({need.sink_rows} sink rows) and "
                           f"{need.slabs} request slabs but {idx.available_units()} "
                           f"({idx.free_sink_rows()}) and {idx.available_requests()} are free; "
                           "lower --max-running-requests or --chunked-prefill-size")

    def extend(self, reqs: Sequence[tuple[str, int, int, int]]) -> SlotPlan:
        """Prefill / chunked-prefill batch: reqs = (rid, req_pool_idx, prefix_len, extend_len)."""
        self.check_extend([(rid, p, n) for rid, _, p, n in reqs])
        plan = SlotPlan()
        try:
            for rid, row, prefix, n in reqs:
                if rid in self.handles:
                    step = self.index.extend(self.handles[rid], n)
                else:
                    self.handles[rid], step = self.index.alloc(n, prefix)
                plan.add(row, prefix, step)
        finally:
            self._version += 1
        return plan

    def decode(self, reqs: Sequence[tuple[str, int]]) -> SlotPlan:
        """Decode batch, one token each: reqs = (rid, req_pool_idx)."""
        handles = [self._handle(rid) for rid, _ in reqs]
        starts = [self.index.length(h) for h in handles]
        plan = SlotPlan()
        try:
            steps = self.index.decode_steps(handles)
        finally:
            self._version += 1
        for (_, row), start, step in zip(reqs, starts, steps, strict=True):
            plan.add(row, start, step)
        return plan

    def decode_need(self, rids: Sequence[str]) -> Need:
        """Units and sink rows the next decode step of these requests takes (flushes included).
        Remembered for the last batch until a request grows or is released: SGLang asks twice
        per step (check_decode_mem, then the decode allocation's make_room)."""
        key = (self._version, tuple(rids))
        if self._need_memo is not None and self._need_memo[0] == key:
            return self._need_memo[1]
        need = sum((self.index.extend_need(self._handle(rid), 1) for rid in rids), Need())
        self._need_memo = (key, need)
        return need

    def release(self, rid: str) -> None:
        """Forget a finished, retracted or aborted request and return its slab. SGLang frees its
        INT2 ids and sink rows through the allocator (`PoolIndex.free_slots`)."""
        h = self._handle(rid)
        del self.handles[rid]
        self._version += 1
        self.index.release(h)

    def reset(self) -> None:
        """Forget everything (SGLang's flush_cache, only allowed with no live request)."""
        if self.handles:
            raise OscarError(f"cannot reset the int2 pool while {len(self.handles)} requests "
                             "hold KV slots; flush the cache only when the server is idle")
        self.index = PoolIndex(self.index.layout)
        self._version += 1

    def _handle(self, rid: str) -> int:
        h = self.handles.get(rid)
        if h is None:
            raise OscarError(f"request {rid} holds no int2 KV slots (never allocated or already "
                             "released); the scheduler bookkeeping is out of sync")
        return h
