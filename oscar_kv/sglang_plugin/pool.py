"""SGLang classes of the mixed pool: the KV pool (H4) and its token allocator (imports sglang).

`Int2MHATokenToKVPool(MHATokenToKVPool)` holds, for this rank's layers, a `MixedKVStorage`
(INT2 rows [size + F, Hkv, D/4] + scale/zero, BF16 arena [max_requests * (P + ring) + 1, Hkv,
D]: sink rows, rings, dummy),
the `PoolNumerics` (rotations, key means, clips) and the scheduler's `SlotPlanner`. `size` is
SGLang's `max_total_num_tokens`, which H5 already computed net of the BF16 arena, so
everything here is inside the memory budget. Generic dense-buffer accessors raise: only the
int2 backend reads this pool. `set_kv_buffer` is the generic write (unrotated post-RoPE K,
raw V -> rotated, routed by slot id); the backend writes pre-rotated rows with precomputed
routing instead.

The INT2 store has `size + F - 1` slots (+ the dummy): SGLang's prefill admission counts a
chunk's own tokens, but continuing a chunked prompt also moves up to F - 1 already stored
recent rows into the body; the hidden reserve covers them (one chunked request per batch).

`Int2TokenAllocator` reports the free units (INT2 ids minus sink rows in use, see
`pool_index`) minus that reserve as SGLang's `available_size()`, so an idle pool reports
`max_total_num_tokens` minus what the radix tree holds (SGLang's idle leak check). Slots are
handed out per request by the scheduler hooks in `glue.py` (through the planner), so its
per-token `alloc` refuses; its `free` is SGLang's token-granular release (finished/retracted
requests, duplicate prefixes, evicted tree leaves) and returns INT2 ids and sink rows to the
pool, skipping ring rows (returned with the request's slab).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from oscar_kv.config import ModelGeometry
from oscar_kv.errors import OscarError
from oscar_kv.sglang_plugin.env import PluginConfig
from oscar_kv.sglang_plugin.numerics import load_numerics, rotate, rotate_keys
from oscar_kv.sglang_plugin.planner import SlotPlan, SlotPlanner
from oscar_kv.sglang_plugin.pool_index import PoolIndex, PoolLayout
from oscar_kv.sglang_plugin.storage import HP_DTYPE, MixedKVStorage

ABSORBED_ATTR = "oscar_v_rotation_absorbed"  # set on a RadixAttention whose V is pre-rotated
NO_DENSE = ("the int2 KV pool has no dense {what} buffer; only --attention-backend int2_triton "
            "can read it, so do not combine --kv-cache-dtype int2 with features that copy or "
            "read raw KV (hierarchical cache, PD disaggregation, speculative decoding)")


@dataclass(frozen=True)
class PoolSetup:
    """What H4 knows and the pool constructor does not: the env config, the model's global
    attention geometry, the number of request slots (`req_to_token_pool.size`) and the global
    ids of the KV heads this rank holds (None: all)."""

    cfg: PluginConfig
    geometry: ModelGeometry
    max_requests: int
    kernel_backend: str = "auto"
    kv_heads: tuple[int, ...] | None = None


def apply_slot_plan(storage: MixedKVStorage, plan: SlotPlan, req_to_token: torch.Tensor,
                    clip_k: list[float], clip_v: list[float]) -> torch.Tensor:
    """Run one forward's allocation on the device: flush (BF16 -> INT2, all layers), remap
    the flushed positions and write the new ones in req_to_token. -> out_cache_loc int64 [N].

    All host lists travel in one pinned copy; per-token rows/columns are expanded on the
    device from the per-request segments. No host sync."""
    n = len(plan.out_slots)
    col_base, offset = [], 0
    for start, k in zip(plan.seg_starts, plan.seg_lens, strict=True):
        col_base.append(start - offset)  # column of token i of the segment = base + i
        offset += k
    parts = (plan.out_slots, plan.seg_rows, col_base, plan.seg_lens, plan.flush_src,
             plan.flush_dst, plan.flush_rows, plan.flush_cols)
    sizes = [len(p) for p in parts]
    flat = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(parts), dtype=np.int64,
                                        count=sum(sizes)))
    dev = req_to_token.device
    flat = flat.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else flat.to(dev)
    out, seg_rows, col_base, seg_lens, src, dst, frows, fcols = torch.split(flat, sizes)
    if dst.numel():
        storage.flush(src, dst, clip_k, clip_v)
        req_to_token[frows, fcols] = dst.to(req_to_token.dtype)
    if n:
        rows = torch.repeat_interleave(seg_rows, seg_lens, output_size=n)
        cols = torch.repeat_interleave(col_base, seg_lens, output_size=n) + \
            torch.arange(n, device=dev)
        req_to_token[rows, cols] = out.to(req_to_token.dtype)
    return out


_CLASSES: dict[str, type] = {}


def int2_pool_class() -> type:
    """Int2MHATokenToKVPool(MHATokenToKVPool), built on first use (imports sglang)."""
    if "pool" in _CLASSES:
        return _CLASSES["pool"]
    from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, unwrap_write_loc

    class Int2MHATokenToKVPool(MHATokenToKVPool):
        """The mixed INT2 / BF16 pool of one rank (see the module docstring)."""

        oscar_kv_int2 = True

        def __init__(self, size: int, *args, oscar_setup: PoolSetup, **kwargs) -> None:
            if kwargs.get("page_size", 1) != 1:
                raise OscarError(f"the int2 pool is token-granular but SGLang asked for page "
                                 f"size {kwargs['page_size']}; remove --page-size")
            if kwargs.get("post_capture_active"):
                raise OscarError("the int2 pool does not support post-capture KV backing; "
                                 "disable it for --kv-cache-dtype int2")
            head_dim, v_dim = kwargs.get("head_dim"), kwargs.get("v_head_dim")
            if v_dim not in (None, head_dim):
                raise OscarError(f"the int2 pool needs equal K and V head dims, got {head_dim} "
                                 f"and {v_dim}; serve this model without --kv-cache-dtype int2")
            s = oscar_setup
            self.setup = s
            self.reserve = s.cfg.window.flush_block - 1
            self.layout = PoolLayout(s.cfg.window, size + self.reserve, s.max_requests)
            self.planner = SlotPlanner(PoolIndex(self.layout))
            start = kwargs.get("start_layer") or 0
            if s.kv_heads is not None and len(s.kv_heads) != kwargs.get("head_num"):
                raise OscarError(f"the pool holds {kwargs.get('head_num')} KV heads but the "
                                 f"rank's head map names {len(s.kv_heads)}; this TP layout is "
                                 "not supported")
            self.numerics = load_numerics(s.cfg, s.geometry, start,
                                          start + kwargs["layer_num"], kwargs["device"],
                                          s.kv_heads)
            super().__init__(size, *args, **kwargs)

        def _create_buffers(self) -> None:
            with self.memory_saver_adapter.region(GPU_MEMORY_TYPE_KV_CACHE):
                self.storage = MixedKVStorage(self.layout, self.layer_num, self.head_num,
                                              self.head_dim, self.numerics.spec, self.device,
                                              kernel_backend=self.setup.kernel_backend)

        def get_kv_size_bytes(self) -> tuple[int, int]:
            return self.storage.nbytes()

        def apply_plan(self, plan: SlotPlan, req_to_token: torch.Tensor) -> torch.Tensor:
            n = self.numerics
            return apply_slot_plan(self.storage, plan, req_to_token, n.clip_k, n.clip_v)

        def set_kv_buffer(self, layer, loc_info, cache_k: torch.Tensor, cache_v: torch.Tensor,
                          k_scale=None, v_scale=None, layer_id_override=None,
                          dcp_kv_mask=None) -> None:
            """Generic write: cache_k [N, Hkv, D] post-RoPE (unrotated), cache_v [N, Hkv, D]
            (pre-rotated iff the layer's V rotation is absorbed); flat ids loc [N]. Routes by
            value (one host sync): the int2 backend uses its own precomputed routing."""
            if dcp_kv_mask is not None:
                raise OscarError("the int2 pool does not support decode context parallelism; "
                                 "remove --dcp-size")
            loc, _, _ = unwrap_write_loc(loc_info)
            layer_id = layer_id_override if layer_id_override is not None else layer.layer_id
            n, i = self.numerics, self.numerics.local(layer_id)
            k = rotate_keys(cache_k, n, i, HP_DTYPE)
            v = cache_v.to(HP_DTYPE) if getattr(layer, ABSORBED_ATTR, False) \
                else rotate(cache_v, n.r_v[i], HP_DTYPE)
            self.storage.write_split(i, self.storage.split_by_value(loc), k, v, n.clip_k[i],
                                     n.clip_v[i])

        def _refuse(self, what: str):
            raise OscarError(NO_DENSE.format(what=what))

        def get_key_buffer(self, layer_id: int):
            self._refuse("K")

        def get_value_buffer(self, layer_id: int):
            self._refuse("V")

        def get_kv_buffer(self, layer_id: int):
            self._refuse("K/V")

        _get_key_buffer = get_key_buffer
        _get_value_buffer = get_value_buffer

        def get_cpu_copy(self, indices, mamba_indices=None):
            self._refuse("host-copy")

        def load_cpu_copy(self, kv_cache_cpu, indices, mamba_indices=None):
            self._refuse("host-copy")

        def move_kv_cache(self, tgt_loc, src_loc):
            self._refuse("move")

        def get_contiguous_buf_infos(self):
            self._refuse("transfer")

        def set_kv_buffer_prefix_valid(self, *args, **kwargs):
            self._refuse("prefix")

    _CLASSES["pool"] = Int2MHATokenToKVPool
    return Int2MHATokenToKVPool


def int2_allocator_class() -> type:
    """Int2TokenAllocator(BaseTokenToKVPoolAllocator), built on first use (imports sglang)."""
    if "allocator" in _CLASSES:
        return _CLASSES["allocator"]
    from sglang.srt.mem_cache.allocator.base import BaseTokenToKVPoolAllocator

    class Int2TokenAllocator(BaseTokenToKVPoolAllocator):
        """SGLang's view of the int2 pool's free INT2 slots (see the module docstring)."""

        oscar_kv_int2 = True

        def __init__(self, size: int, dtype: torch.dtype, device: str, kvcache,
                     need_sort: bool = False) -> None:
            if not getattr(kvcache, "oscar_kv_int2", False):
                raise OscarError("the int2 token allocator needs the int2 KV pool")
            super().__init__(size, 1, dtype, device, kvcache, need_sort)

        @property
        def planner(self) -> SlotPlanner:
            return self._kvcache.planner

        def available_size(self) -> int:
            return max(0, self.planner.index.available_units() - self._kvcache.reserve)

        def clear(self) -> None:
            self.planner.reset()
            self.is_not_in_free_group, self.free_group = True, []

        def alloc(self, need_size: int):
            raise OscarError("the int2 KV pool allocates per request (prefill/decode hooks), "
                             "not per token; this SGLang feature is not supported with "
                             "--kv-cache-dtype int2")

        def free(self, free_index: torch.Tensor) -> None:
            """INT2 ids and sink rows back to the pool (ring ids are skipped: the request's
            slab owns them). One host copy of the ids; SGLang batches the frees of one
            result step in a free group, so that is one copy per step."""
            if free_index.numel() == 0:
                return
            if not self.is_not_in_free_group:
                self.free_group.append(free_index)
                return
            self.planner.index.free_slots(free_index.flatten().tolist())

        def debug_print(self) -> str:
            idx = self.planner.index
            return (f"int2 pool: {idx.available_units()} slots ({idx.free_sink_rows()} sink "
                    f"rows) and {idx.available_requests()} request slabs free")

    _CLASSES["allocator"] = Int2TokenAllocator
    return Int2TokenAllocator
