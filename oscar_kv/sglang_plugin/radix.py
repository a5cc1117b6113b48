"""Prefix sharing for the int2 pool: SGLang's radix tree with window-aware caps (imports sglang).

`Int2RadixCache(RadixCache)` is SGLang's own tree, eviction and locking, with three caps that
keep the tree to what can be shared (`pool_index` has the rules as pure functions):

  insert   (cache_unfinished_req / cache_finished_req) only the first
           `cacheable_prefix(L)` = min(L, body_end(L)) positions: sink rows and INT2 ids,
           never the request's BF16 recent ring. The ring positions stay the request's and
           go back with its slab; everything else follows SGLang's token protocol
           (the tree takes new ids, duplicates are freed, req_to_token points at the tree).
  match    (a request's prefix lookup) at most `shareable_prefix(m, L, chunk)`, so a hit never
           covers positions the request's window keeps in BF16 (its recent window is prefilled
           again, at most R + F - 1 tokens, like SGLang's sliding-window re-prefill tail).
  admit    `glue.add_one_req_around` defers a hit whose first chunk would be too short for the
           same rule (the next batch gives it the whole chunk budget).

So a request with a hit of m tokens computes exactly what a prefill of the same prompt split
into chunks at m would: its queries see the cached sink in BF16, the cached positions [P, m)
as INT2 (as the pool would hold them after that chunk's flush) and their own chunk in BF16.
Where it still differs from a fresh prefill: the cached rows are the K/V the first request
computed (under its own chunk boundaries, or by decode for inserted output tokens), not a
recomputation.

`register_radix_backend` makes `--radix-cache-backend oscar_int2` build this class (the int2
server-arg defaults select it whenever the radix cache is on).
"""

from __future__ import annotations

import dataclasses

import torch

from oscar_kv.errors import OscarError
from oscar_kv.sglang_plugin.pool_index import cacheable_prefix, shareable_prefix
from oscar_kv.sglang_plugin.server_args import RADIX_BACKEND

_CLASSES: dict[str, type] = {}


def int2_radix_cache_class() -> type:
    """Int2RadixCache(RadixCache), built on first use (imports sglang)."""
    if "radix" in _CLASSES:
        return _CLASSES["radix"]
    from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

    class Int2RadixCache(RadixCache):
        """SGLang's radix tree over the int2 pool (see the module docstring)."""

        oscar_kv_int2 = True

        def __init__(self, params, window, chunk: int | None) -> None:
            super().__init__(params)
            self.oscar_window = window
            self.oscar_chunk = chunk if chunk and chunk > 0 else None

        def match_prefix(self, params):
            res = super().match_prefix(params)
            if params.req is None or self.disable:  # internal re-match after an insert
                return res
            key, m = params.key, len(res.device_indices)
            fit = shareable_prefix(m, len(key.token_ids), self.oscar_window, self.oscar_chunk)
            if fit == m:
                return res
            capped = RadixKey(key.token_ids, key.extra_key, is_bigram=key.is_bigram, limit=fit)
            return super().match_prefix(dataclasses.replace(params, key=capped))

        def _check_protected(self, req, cap: int) -> None:
            if cap < req.cache_protected_len:
                raise OscarError(f"request {req.rid} holds {req.cache_protected_len} tree-owned "
                                 f"tokens but only {cap} are outside its BF16 recent window; the "
                                 "int2 prefix-cache bookkeeping is out of sync")

        def cache_unfinished_req(self, req, chunked: bool = False):
            rng = getattr(req, "extend_range", None)
            if self.disable or rng is None:
                return super().cache_unfinished_req(req, chunked=chunked)
            start, end = rng.start, rng.end
            cap = cacheable_prefix(end, self.oscar_window)
            if cap >= end:
                return super().cache_unfinished_req(req, chunked=chunked)
            self._check_protected(req, cap)
            req.set_extend_range(min(start, cap), cap)  # get_fill_ids() -> the first cap ids
            try:
                super().cache_unfinished_req(req, chunked=chunked)
            finally:
                req.set_extend_range(start, end)
            # the next chunk continues from `end`: keep the request's own ring ids after the tree's
            tail = self.req_to_token_pool.req_to_token[req.req_pool_idx, cap:end]
            req.prefix_indices = torch.cat([req.prefix_indices,
                                            tail.to(req.prefix_indices.dtype)])

        def cache_finished_req(self, req, is_insert: bool = True, *, kv_len_to_handle: int):
            if self.disable:
                return super().cache_finished_req(req, is_insert,
                                                  kv_len_to_handle=kv_len_to_handle)
            cap = cacheable_prefix(kv_len_to_handle, self.oscar_window)
            self._check_protected(req, cap)
            # positions [cap, kv_len) are ring rows: not inserted, not freed (the slab's)
            return super().cache_finished_req(req, is_insert, kv_len_to_handle=cap)

    _CLASSES["radix"] = Int2RadixCache
    return Int2RadixCache


def int2_radix_cache_factory(ctx):
    """SGLang radix-cache factory (`TreeCacheBuildContext` -> prefix cache) for int2."""
    alloc = ctx.params.token_to_kv_pool_allocator
    if not getattr(alloc, "oscar_kv_int2", False):
        raise OscarError(f"--radix-cache-backend {RADIX_BACKEND} serves --kv-cache-dtype int2 "
                         "only; remove --radix-cache-backend")
    if ctx.disable_radix_cache:
        from sglang.srt.mem_cache.registry import default_radix_cache_factory

        return default_radix_cache_factory(ctx)  # SGLang's chunk cache
    window = alloc.get_kvcache().layout.window
    return int2_radix_cache_class()(ctx.params, window, ctx.effective_chunked_prefill_size)


def register_radix_backend() -> None:
    from sglang.srt.mem_cache.registry import (
        register_radix_cache_backend,
        registered_radix_cache_backends,
    )

    if RADIX_BACKEND not in registered_radix_cache_backends():
        register_radix_cache_backend(RADIX_BACKEND, int2_radix_cache_factory)
