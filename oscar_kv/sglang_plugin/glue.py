"""Scheduler hooks that drive the int2 pool's `SlotPlanner` from SGLang's batches.

Each hook defers to SGLang's original unless the batch's allocator is the int2 one:

  allocation.alloc_for_extend(batch)          AROUND  request slots (SGLang's own
      `alloc_req_slots`), then planner.extend -> flush + req_to_token + out_cache_loc
  allocation.alloc_for_decode(batch, 1)       AROUND  planner.decode (one token each)
  common.release_kv_cache(req, tree_cache)    AROUND  planner.release (finished: free,
      otherwise retract), then SGLang's release of the request slot
  ScheduleBatch.new_tokens_required_next_decode  AROUND  exact INT2 need of the next decode
      step (flushes included), so check_decode_mem / retract_decode admit and retract right

The flush and the req_to_token writes run here, at allocation, on the scheduling stream.
That is ordered before the next forward because the int2 server runs without the overlap
scheduler (server_args.prepare_int2_args turns it off): the previous forward has finished and
the next one waits for this stream.
"""

from __future__ import annotations

import torch

from oscar_kv.errors import OscarError


def int2_allocator(allocator):
    """The allocator if it is the int2 one, else None."""
    return allocator if getattr(allocator, "oscar_kv_int2", False) else None


def _set_allocated(req, seq_len: int) -> None:
    from sglang.srt.managers.schedule_batch import ReqKvInfo

    if req.kv is None:
        req.kv = ReqKvInfo(kv_allocated_len=seq_len, swa_evicted_seqlen=0)
    else:
        req.kv.kv_allocated_len = seq_len


def alloc_for_extend_around(orig, batch):
    """-> (out_cache_loc [N] int64 device, req_pool_indices device, req_pool_indices cpu)."""
    allocator = int2_allocator(batch.token_to_kv_pool_allocator)
    if allocator is None:
        return orig(batch)
    from sglang.srt.mem_cache.allocation import alloc_req_slots

    if batch.is_dllm():
        raise OscarError("diffusion LMs are not supported with --kv-cache-dtype int2")
    pool, planner = allocator.get_kvcache(), allocator.planner
    lens = list(zip(batch.prefix_lens, batch.extend_lens, strict=True))
    planner.check_extend([(r.rid, p, n) for r, (p, n) in zip(batch.reqs, lens, strict=True)])
    rows = alloc_req_slots(batch.req_to_token_pool, batch.reqs, batch.tree_cache)
    plan = planner.extend([(r.rid, row, p, n)
                           for r, row, (p, n) in zip(batch.reqs, rows, lens, strict=True)])
    out = pool.apply_plan(plan, batch.req_to_token_pool.req_to_token)
    for req, seq_len in zip(batch.reqs, batch.seq_lens_cpu.tolist(), strict=True):
        _set_allocated(req, seq_len)
    rows_cpu = torch.tensor(rows, dtype=torch.int64)
    return out, rows_cpu.to(batch.device, non_blocking=True), rows_cpu


def alloc_for_decode_around(orig, batch, token_per_req: int):
    """-> out_cache_loc [B] int64 device (one new BF16 slot per request)."""
    allocator = int2_allocator(batch.token_to_kv_pool_allocator)
    if allocator is None:
        return orig(batch, token_per_req)
    if token_per_req != 1:
        raise OscarError(f"int2 decode allocates one token per request, got {token_per_req}; "
                         "speculative decoding is not supported with --kv-cache-dtype int2")
    plan = allocator.planner.decode([(r.rid, r.req_pool_idx) for r in batch.reqs])
    out = allocator.get_kvcache().apply_plan(plan, batch.req_to_token_pool.req_to_token)
    for req in batch.reqs:
        req.kv.kv_allocated_len += 1
    return out


def release_kv_cache_around(orig, req, tree_cache, is_insert: bool = True):
    allocator = int2_allocator(getattr(tree_cache, "token_to_kv_pool_allocator", None))
    if allocator is not None and req.req_pool_idx is not None:
        allocator.planner.release(req.rid, finished=req.finished())
    return orig(req, tree_cache, is_insert)


def new_tokens_required_around(orig, self, selected_indices=None) -> int:
    allocator = int2_allocator(self.token_to_kv_pool_allocator)
    if allocator is None:
        return orig(self, selected_indices)
    reqs = self.reqs if selected_indices is None else [self.reqs[i] for i in selected_indices]
    return allocator.planner.decode_need([r.rid for r in reqs])
