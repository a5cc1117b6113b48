"""Scheduler side of the mixed pool: SGLang requests -> PoolIndex steps -> one SlotPlan per forward.

SGLang names a request by its `rid` and gives it a row of `req_to_token` (`req_pool_idx`);
`PoolIndex` names it by a handle. `SlotPlanner` keeps rid -> handle and turns one batch into
one `SlotPlan` (host lists, framework-free):

    out_slots[i]                      flat slot id of the i-th new token (SGLang's out_cache_loc)
    req_to_token[rows[i], cols[i]]  = out_slots[i]
    flush: BF16 row flush_src[j] -> INT2 slot flush_dst[j], then
    req_to_token[flush_rows[j], flush_cols[j]] = flush_dst[j]

The flush must run before the forward writes the new tokens (they may reuse the freed ring
rows). Each call is atomic: a batch that does not fit raises `PoolFull` and changes nothing.
Prefix sharing is not supported: a request that arrives with cached tokens the planner did
not give it (a radix-cache hit) is an error, not a silent recompute.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from oscar_kv.errors import OscarError
from oscar_kv.sglang_plugin.pool_index import PoolFull, PoolIndex, Step


@dataclass
class SlotPlan:
    """What one forward allocates (host lists; see the module docstring)."""

    out_slots: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    cols: list[int] = field(default_factory=list)
    flush_src: list[int] = field(default_factory=list)
    flush_dst: list[int] = field(default_factory=list)
    flush_rows: list[int] = field(default_factory=list)
    flush_cols: list[int] = field(default_factory=list)

    def add(self, row: int, start: int, step: Step) -> None:
        """Append one request's step; `start` = its length before the step."""
        n = len(step.new_slots)
        self.out_slots += step.new_slots
        self.rows += [row] * n
        self.cols += range(start, start + n)
        self.flush_src += step.flush_src
        self.flush_dst += step.flush_dst
        self.flush_rows += [row] * len(step.flush_dst)
        self.flush_cols += step.flush_pos


class SlotPlanner:
    """rid -> PoolIndex handle; extend / decode / release for whole SGLang batches."""

    def __init__(self, index: PoolIndex) -> None:
        self.index = index
        self.handles: dict[str, int] = {}

    def length(self, rid: str) -> int:
        return self.index.length(self._handle(rid))

    def live(self) -> int:
        return len(self.handles)

    def check_extend(self, reqs: Sequence[tuple[str, int, int]]) -> None:
        """Raise (changing nothing) unless the batch reqs = (rid, prefix_len, extend_len)
        continues what the planner holds and fits in the free slots and slabs."""
        new, need = 0, 0
        for rid, prefix, n in reqs:
            h = self.handles.get(rid)
            have = 0 if h is None else self.index.length(h)
            if have != prefix:
                raise OscarError(
                    f"request {rid} extends from {prefix} cached tokens but the int2 pool holds "
                    f"{have} for it; the int2 KV cache does not share prefixes, so keep "
                    "--disable-radix-cache (the plugin sets it) and do not reuse KV across "
                    "requests")
            new += h is None
            need += self.index.int2_needed(prefix, n)
        if new > self.index.available_requests() or need > self.index.available_int2():
            raise PoolFull(f"prefill needs {need} INT2 slots and {new} request slabs but "
                           f"{self.index.available_int2()} and "
                           f"{self.index.available_requests()} are free; lower "
                           "--max-running-requests or --chunked-prefill-size")

    def extend(self, reqs: Sequence[tuple[str, int, int, int]]) -> SlotPlan:
        """Prefill / chunked-prefill batch: reqs = (rid, req_pool_idx, prefix_len, extend_len)."""
        self.check_extend([(rid, p, n) for rid, _, p, n in reqs])
        plan = SlotPlan()
        for rid, row, prefix, n in reqs:
            if rid in self.handles:
                step = self.index.extend(self.handles[rid], n)
            else:
                self.handles[rid], step = self.index.alloc(n)
            plan.add(row, prefix, step)
        return plan

    def decode(self, reqs: Sequence[tuple[str, int]]) -> SlotPlan:
        """Decode batch, one token each: reqs = (rid, req_pool_idx)."""
        handles = [self._handle(rid) for rid, _ in reqs]
        starts = [self.index.length(h) for h in handles]
        plan = SlotPlan()
        for (_, row), start, step in zip(reqs, starts, self.index.decode_steps(handles),
                                         strict=True):
            plan.add(row, start, step)
        return plan

    def decode_need(self, rids: Sequence[str]) -> int:
        """INT2 slots the next decode step of these requests takes (flushes included)."""
        return sum(self.index.int2_needed(self.length(rid), 1) for rid in rids)

    def release(self, rid: str, finished: bool) -> None:
        """Give back every slot of a finished (free) or retracted / aborted request."""
        h = self._handle(rid)
        del self.handles[rid]
        if finished:
            self.index.free(h)
        else:
            self.index.retract(h)
            self.index.free(h)  # forget the retracted mark: the planner drops the handle

    def reset(self) -> None:
        """Forget everything (SGLang's flush_cache, only allowed with no live request)."""
        if self.handles:
            raise OscarError(f"cannot reset the int2 pool while {len(self.handles)} requests "
                             "hold KV slots; flush the cache only when the server is idle")
        self.index = PoolIndex(self.index.layout)

    def _handle(self, rid: str) -> int:
        h = self.handles.get(rid)
        if h is None:
            raise OscarError(f"request {rid} holds no int2 KV slots (never allocated or already "
                             "released); the scheduler bookkeeping is out of sync")
        return h
