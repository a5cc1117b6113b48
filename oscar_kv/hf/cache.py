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

`decode_backend` ("auto" = "triton" on CUDA, "torch" elsewhere) picks both the body writes
(`kernels.write_int2`, bit-exact with `formats`, so the store is the same either way) and the
single-token decode attention (`DECODE_BACKENDS`). On "triton" the slot tables and the split-K
plan are made once per decode step by a `DecodeStep` shared by all layers, then reused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from oscar_kv.cache.store import MixedKVStore
from oscar_kv.errors import OscarError
from oscar_kv.hf.plan import LayerPlan, rotate_keys
from oscar_kv.kernels import DecodePlan, KVTables, contiguous_token_slots, plan_decode
from oscar_kv.registry import Registry


@dataclass(frozen=True, eq=False)
class OscarKV:
    """What `update` hands the attention function for one layer and one forward chunk.

    chunk_k, chunk_v: bf16 [B, Hkv, T, D] rotated rows of this chunk (positions start..start+T-1);
    store: the layer's store, already holding them (length = start + T);
    step: the cache's per-step decode plan (None outside an `OscarCache`).
    """

    store: MixedKVStore
    plan: LayerPlan
    chunk_k: torch.Tensor
    chunk_v: torch.Tensor
    start: int
    decode_backend: str
    step: DecodeStep | None = None

    @property
    def shape(self) -> torch.Size:  # for code that only inspects key_states.shape
        b, h, _, d = self.chunk_k.shape
        return torch.Size((b, h, self.store.length, d))


class DecodeStep:
    """Slot tables and split-K plan of the current decode step, shared by all layers.

    The stores of one cache advance in lockstep, so the first layer to ask in a step builds
    (or refreshes) them and every later layer gets the same objects: tables over the stores'
    slot views (INT2 row i of sequence b = slot b * capacity + i, likewise for BF16 rows) whose
    widths are the capacities, so they and the plan's scratch are rebuilt only when a capacity,
    the batch or the query shape changes; the lengths are refreshed in place once per step.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._lens: tuple[int, int] | None = None
        self.tables: KVTables | None = None
        self.plan: DecodePlan | None = None

    def prepare(self, store: MixedKVStore, q: torch.Tensor) -> tuple[KVTables, DecodePlan]:
        """Tables and plan for q [B, Hq, D] against `store` (out dtype = q.dtype)."""
        b, hq, d = q.shape
        body_cap, hp_cap = store.capacities()
        hkv = store.hp_slot_view()[0].shape[1]
        key = (b, hq, hkv, d, body_cap, hp_cap, q.dtype, q.device)
        if key != self._key:
            slots = lambda cap: contiguous_token_slots(b, cap, q.device).to(torch.int32)
            lens = lambda: torch.zeros(b, dtype=torch.int32, device=q.device)
            self.tables = KVTables(slots(body_cap), lens(), slots(hp_cap), lens())
            self.plan = plan_decode(b, hq, hkv, d, max_body_len=body_cap, max_hp_len=hp_cap,
                                    device=q.device, out_dtype=q.dtype,
                                    int2_group_size=store.spec.group_size)
            self._key, self._lens = key, None
        lens = (store.body_len, store.hp_len)
        if lens != self._lens:
            self.tables.body_len.fill_(lens[0])
            self.tables.hp_len.fill_(lens[1])
            self._lens = lens
        return self.tables, self.plan


def resolve_backend(name: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA, 'torch' elsewhere; other names are checked and kept."""
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    DECODE_BACKENDS.get(name)
    return name


class OscarLayer(CacheLayerMixin):
    """One layer of an `OscarCache`: a `MixedKVStore` plus the layer's plan."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, plan: LayerPlan, decode_backend: str = "auto",
                 step: DecodeStep | None = None) -> None:
        super().__init__()
        self.plan = plan
        self.decode_backend = decode_backend
        self.step = step if step is not None else DecodeStep()
        self.store = MixedKVStore(plan.window, plan.quant, plan.clip_k, plan.clip_v)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.plan = self.plan.to(key_states.device)
        self.decode_backend = resolve_backend(self.decode_backend, key_states.device)
        self.store.backend = self.decode_backend  # body writes: formats ref or Triton kernel
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[OscarKV, OscarKV]:
        """key_states [B, Hkv, T, D] post-RoPE (unrotated), value_states [B, Hkv, T, D] already
        rotated (absorbed v_proj). Returns (view, view)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k_rot = rotate_keys(key_states, self.plan, torch.bfloat16)
        v_rot = value_states.to(torch.bfloat16)
        start = self.store.length
        self.store.append(k_rot, v_rot)
        view = OscarKV(self.store, self.plan, k_rot, v_rot, start, self.decode_backend,
                       self.step)
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
    decode_backend: "auto" (Triton on CUDA, torch elsewhere), or a name in `DECODE_BACKENDS`
    ("torch": formats reference writes + dense torch attention; "triton": the kernels, also on
    CPU tensors under TRITON_INTERPRET=1). Prefill chunks use the torch path on every backend.
    """

    def __init__(self, plans: list[LayerPlan], decode_backend: str = "auto") -> None:
        if decode_backend != "auto" and decode_backend not in DECODE_BACKENDS:
            raise OscarError(f"unknown decode backend {decode_backend!r}; choose one of: "
                             f"auto, {', '.join(DECODE_BACKENDS.names())}")
        step = DecodeStep()
        super().__init__(layers=[OscarLayer(p, decode_backend, step) for p in plans])

    def stores(self) -> list[MixedKVStore]:
        """The per-layer stores, e.g. for inspection or a kernel's plan step."""
        return [layer.store for layer in self.layers]

    def allocated_bytes(self) -> int:
        """Bytes held by every layer's store (buffer capacities, BF16 and INT2 together)."""
        return sum(store.allocated_bytes() for store in self.stores())


# name -> fn(query [B, Hq, 1, D] post-RoPE, unrotated; kv: OscarKV; scaling: float;
#            mask bool [B, 1, 1, L] | None) -> out [B, Hq, 1, D] in the rotated V domain.
# "torch" and "triton" are registered in attention.py.
DECODE_BACKENDS: Registry = Registry("decode backend")
