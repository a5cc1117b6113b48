"""A transformers `Cache` holding the OSCAR mixed BF16/INT2 KV store of every layer.

HF attention modules call `past_key_values.update(k, v, layer_idx)` after RoPE (and k_norm) and
pass whatever it returns straight to the attention function. `OscarCache.update`

  * rotates K by the layer's R_K (fp32 accumulation, bf16 storage); V arrives already rotated
    because R_V is absorbed into v_proj;
  * appends both to the layer's `MixedKVStore` (which flushes recent -> INT2 body per
    `windows.body_end`);
  * returns an `OscarKV` view (the same object in the key and the value slot) that the
    `"oscar"` attention function reads: the store, the plan, and this chunk's BF16 rows.

Use it only with the `"oscar"` attention implementation (`prepare_model` sets it).
Sequences of one batch share positions (no per-row lengths): left-padded batches are treated
position-wise, pad slots being hidden by the attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from oscar_kv.cache.store import MixedKVStore
from oscar_kv.errors import OscarError
from oscar_kv.hf.plan import LayerPlan, rotate
from oscar_kv.registry import Registry


@dataclass(frozen=True, eq=False)
class OscarKV:
    """What `update` hands the attention function for one layer and one forward chunk.

    chunk_k, chunk_v: bf16 [B, Hkv, T, D] rotated rows of this chunk (positions start..start+T-1);
    store: the layer's store, already holding them (length = start + T).
    """

    store: MixedKVStore
    plan: LayerPlan
    chunk_k: torch.Tensor
    chunk_v: torch.Tensor
    start: int
    decode_backend: str

    @property
    def shape(self) -> torch.Size:  # for code that only inspects key_states.shape
        b, h, _, d = self.chunk_k.shape
        return torch.Size((b, h, self.store.length, d))


class OscarLayer(CacheLayerMixin):
    """One layer of an `OscarCache`: a `MixedKVStore` plus the layer's plan."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, plan: LayerPlan, decode_backend: str = "torch") -> None:
        super().__init__()
        self.plan = plan
        self.decode_backend = decode_backend
        self.store = MixedKVStore(plan.window, plan.quant, plan.clip_k, plan.clip_v)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.plan = self.plan.to(key_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[OscarKV, OscarKV]:
        """key_states [B, Hkv, T, D] post-RoPE (unrotated), value_states [B, Hkv, T, D] already
        rotated (absorbed v_proj). Returns (view, view)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k_rot = rotate(key_states, self.plan.r_k, torch.bfloat16)
        v_rot = value_states.to(torch.bfloat16)
        start = self.store.length
        self.store.append(k_rot, v_rot)
        view = OscarKV(self.store, self.plan, k_rot, v_rot, start, self.decode_backend)
        return view, view

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.store.length

    def get_max_length(self) -> int:
        return -1

    def offload(self) -> None:  # rows live in the store; nothing to move
        return None

    def prefetch(self) -> None:
        return None

    def reset(self) -> None:
        self.store.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.store.select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.store.select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.store.repeat_batch(repeats)

    def crop(self, tokens_to_remove: int) -> None:
        raise OscarError("an OscarCache cannot be cropped (INT2 rows cannot be un-flushed); "
                         "disable assisted/speculative decoding with OSCAR")

    @property
    def batch_size(self) -> int:
        return self.store.batch_size


class OscarCache(Cache):
    """Mixed BF16/INT2 KV cache for `model.generate(..., past_key_values=OscarCache(...))`.

    plans: one `LayerPlan` per decoder layer (build it with `prepare_model(...).new_cache()`).
    decode_backend: name in `DECODE_BACKENDS` used for single-token decode steps ("torch", or
    "triton" once oscar_kv.kernels registers it).
    """

    def __init__(self, plans: list[LayerPlan], decode_backend: str = "torch") -> None:
        DECODE_BACKENDS.get(decode_backend)  # fail early with the list of valid names
        super().__init__(layers=[OscarLayer(p, decode_backend) for p in plans])

    def stores(self) -> list[MixedKVStore]:
        """The per-layer stores, e.g. for inspection or a kernel's plan step."""
        return [layer.store for layer in self.layers]


# name -> fn(q_rot [B, Hq, 1, D], kv: OscarKV, scaling: float, mask bool [B, 1, 1, L] | None)
#         -> out [B, Hq, 1, D] in the rotated V domain. "torch" is registered in attention.py;
# the fused Triton decode kernel registers "triton" from oscar_kv.kernels.
DECODE_BACKENDS: Registry = Registry("decode backend")
