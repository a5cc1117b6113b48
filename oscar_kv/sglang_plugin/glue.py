"""Scheduler hooks that drive the int2 pool's `SlotPlanner` from SGLang's batches.

Each hook defers to SGLang's original unless the batch's allocator is the int2 one:

  allocation.alloc_for_extend(batch)          AROUND  evict from the radix tree if short, request
      slots (SGLang's own `alloc_req_slots`), the tree's ids of a prefix hit into req_to_token,
      then planner.extend -> flush + req_to_token + out_cache_loc
  allocation.alloc_for_decode(batch, 1)       AROUND  evict if short, planner.decode
  common.release_kv_cache(req, tree_cache)    AROUND  SGLang's release (its tree / chunk cache
      inserts or frees the request's INT2 ids and sink rows through the allocator), then
      planner.release (the slab: the ring rows)
  ScheduleBatch.new_tokens_required_next_decode  AROUND  exact units of the next decode step
      (flushes and sink rows included), so check_decode_mem / retract_decode admit right
  PrefillAdder.add_one_req                    AROUND  defer a radix hit whose first chunk would be
      too short (`pool_index.prefix_fits`): it is admitted in a later batch

The flush and the req_to_token writes run here, at allocation, on the scheduling stream.
That is ordered before the next forward because the int2 server runs without the overlap
scheduler (server_args.prepare_int2_args turns it off): the previous forward has finished and
the next one waits for this stream.
"""

from __future__ import annotations

import torch

from oscar_kv.errors import OscarError
from oscar_kv.sglang_plugin.pool_index import Need, PoolIndex, prefix_fits


def int2_allocator(allocator):
    """The allocator if it is the int2 one, else None."""
    return allocator if getattr(allocator, "oscar_kv_int2", False) else None


def _set_allocated(req, seq_len: int) -> None:
    from sglang.srt.managers.schedule_batch import ReqKvInfo

    if req.kv is None:
        req.kv = ReqKvInfo(kv_allocated_len=seq_len, swa_evicted_seqlen=0)
    else:
        req.kv.kv_allocated_len = seq_len


def _check_tree(tree_cache) -> None:
    if tree_cache is not None and not getattr(tree_cache, "disable", True) and \
            not getattr(tree_cache, "oscar_kv_int2", False):
        raise OscarError(f"the int2 pool needs --radix-cache-backend oscar_int2 (or "
                         f"--disable-radix-cache) but SGLang built {type(tree_cache).__name__}; "
                         "remove the other --radix-cache-backend")


def make_room(tree_cache, index: PoolIndex, need: Need) -> None:
    """Evict unlocked radix-tree leaves until `need` fits (units and sink rows), or nothing is
    left to evict (the planner then raises PoolFull). SGLang's own eviction only knows units."""
    if tree_cache is None or getattr(tree_cache, "disable", True):
        return
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    step = 1
    while True:
        short = max(need.units - index.available_units(),
                    need.sink_rows - index.free_sink_rows())
        if short <= 0 or tree_cache.evictable_size() <= 0:
            return
        if not tree_cache.evict(EvictParams(num_tokens=max(short, step))).num_tokens_evicted:
            return
        step *= 2  # sink rows sit near the root: evict deeper each round


def alloc_for_extend_around(orig, batch):
    """-> (out_cache_loc [N] int64 device, req_pool_indices device, req_pool_indices cpu)."""
    allocator = int2_allocator(batch.token_to_kv_pool_allocator)
    if allocator is None:
        return orig(batch)
    from sglang.srt.mem_cache.allocation import alloc_req_slots

    if batch.is_dllm():
        raise OscarError("diffusion LMs are not supported with --kv-cache-dtype int2")
    _check_tree(batch.tree_cache)
    pool, planner = allocator.get_kvcache(), allocator.planner
    lens = list(zip(batch.prefix_lens, batch.extend_lens, strict=True))
    items = [(r.rid, p, n) for r, (p, n) in zip(batch.reqs, lens, strict=True)]
    make_room(batch.tree_cache, planner.index, planner.extend_need(items))
    planner.check_extend(items)
    rows = alloc_req_slots(batch.req_to_token_pool, batch.reqs, batch.tree_cache)
    req_to_token = batch.req_to_token_pool.req_to_token
    for req, row, (p, _) in zip(batch.reqs, rows, lens, strict=True):
        if p and not planner.holds(req.rid):  # radix hit: the tree's ids, read-only
            req_to_token[row, :p] = req.prefix_indices[:p].to(req_to_token.dtype)
    plan = planner.extend([(r.rid, row, p, n)
                           for r, row, (p, n) in zip(batch.reqs, rows, lens, strict=True)])
    out = pool.apply_plan(plan, req_to_token)
    for req, seq_len in zip(batch.reqs, batch.seq_lens_cpu.tolist(), strict=True):
        _set_allocated(req, seq_len)
    rows_cpu = torch.tensor(rows, dtype=torch.int64)
    if torch.device(batch.device).type == "cuda":  # a pageable copy would sync the stream
        rows_cpu = rows_cpu.pin_memory()
    return out, rows_cpu.to(batch.device, non_blocking=True), rows_cpu


def alloc_for_decode_around(orig, batch, token_per_req: int):
    """-> out_cache_loc [B] int64 device (one new BF16 slot per request)."""
    allocator = int2_allocator(batch.token_to_kv_pool_allocator)
    if allocator is None:
        return orig(batch, token_per_req)
    if token_per_req != 1:
        raise OscarError(f"int2 decode allocates one token per request, got {token_per_req}; "
                         "speculative decoding is not supported with --kv-cache-dtype int2")
    planner = allocator.planner
    make_room(batch.tree_cache, planner.index, planner.decode_need([r.rid for r in batch.reqs]))
    plan = planner.decode([(r.rid, r.req_pool_idx) for r in batch.reqs])
    out = allocator.get_kvcache().apply_plan(plan, batch.req_to_token_pool.req_to_token)
    for req in batch.reqs:
        req.kv.kv_allocated_len += 1
    return out


def release_kv_cache_around(orig, req, tree_cache, is_insert: bool = True):
    allocator = int2_allocator(getattr(tree_cache, "token_to_kv_pool_allocator", None))
    held = allocator is not None and req.req_pool_idx is not None
    result = orig(req, tree_cache, is_insert)
    if held:
        allocator.planner.release(req.rid)
    return result


def new_tokens_required_around(orig, self, selected_indices=None) -> int:
    allocator = int2_allocator(self.token_to_kv_pool_allocator)
    if allocator is None:
        return orig(self, selected_indices)
    reqs = self.reqs if selected_indices is None else [self.reqs[i] for i in selected_indices]
    return allocator.planner.decode_need([r.rid for r in reqs]).units


def first_chunk_len(rem_chunk_tokens: int | None, todo: int,
                    truncation_align_size: int | None = None) -> int:
    """The extend length PrefillAdder.add_one_req gives a request with `todo` tokens left
    (page size 1): all of them, or the chunk budget left (aligned down if asked)."""
    if rem_chunk_tokens is None or todo <= rem_chunk_tokens:
        return todo
    if truncation_align_size:
        return truncation_align_size * (rem_chunk_tokens // truncation_align_size)
    return rem_chunk_tokens


def add_one_req_around(orig, self, req, *args, **kwargs):
    window = getattr(self.tree_cache, "oscar_window", None)
    prefix = len(req.prefix_indices) if window is not None else 0
    if prefix:
        align = kwargs.get("truncation_align_size", args[1] if len(args) > 1 else None)
        n = first_chunk_len(self.rem_chunk_tokens,
                            len(req.full_untruncated_fill_ids) - prefix, align)
        if n > 0 and not prefix_fits(prefix, n, window):
            from sglang.srt.managers.schedule_policy import AddReqResult

            return AddReqResult.OTHER  # stop this batch; the hit gets a whole chunk later
    return orig(self, req, *args, **kwargs)
