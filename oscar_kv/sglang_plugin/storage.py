"""The device tensors of the mixed pool on one rank, addressed by `PoolLayout` flat slot ids.

Per local layer l (framework-free; kernels from `oscar_kv.kernels`):

    k_int2[l], v_int2[l]   Int2Store: packed uint8 [int2_rows, Hkv, D/4], scale/zero [.., D/G]
    k_bf16[l], v_bf16[l]   bf16 [bf16_rows, Hkv, D]   (row = flat id - hp_offset)

each a view of one tensor per kind and side holding every layer (`int2_all`: layer l's rows at
[l * int2_rows, (l + 1) * int2_rows); `bf16_all` [L, bf16_rows, Hkv, D]), so the flush
quantizes the rows of all layers that share a clip ratio in one launch.

Every row holds *rotated* K / V ((k - k_mean) R_K, v R_V): callers rotate once, to bf16, and
hand the rows here, so INT2 rows are quantized from exactly the bf16 values a BF16 row would
hold (as the HF cache does). INT2 slot 0 and the last BF16 row are the reserved dummies that padded
CUDA-graph rows and unused entries write to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oscar_kv.config import QuantSpec, WindowSpec
from oscar_kv.errors import OscarError
from oscar_kv.kernels import Int2Store, KVTables, tables_from_token_slots, write_int2
from oscar_kv.sglang_plugin.pool_index import DUMMY_INT2, PoolLayout

HP_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class RowSplit:
    """Where the rows of one write go (device int64 tensors, built once per forward).

    int2_idx [n1] rows of the input -> INT2 slots int2_slots [n1];
    bf16_idx [n2] rows of the input -> BF16 store rows bf16_rows [n2] (id - hp_offset)."""

    int2_idx: torch.Tensor
    int2_slots: torch.Tensor
    bf16_idx: torch.Tensor
    bf16_rows: torch.Tensor


@dataclass(frozen=True)
class DecodeTargets:
    """A decode step's write targets, shared by every layer: bf16_rows [B] int64 store rows;
    int2_slots [B] int64 or None (only with recent_tokens == 0)."""

    bf16_rows: torch.Tensor
    int2_slots: torch.Tensor | None


class MixedKVStorage:
    """INT2 stores and the BF16 arena of `num_layers` local layers (see module docstring)."""

    def __init__(self, layout: PoolLayout, num_layers: int, num_kv_heads: int, head_dim: int,
                 spec: QuantSpec, device: torch.device | str,
                 kernel_backend: str = "auto") -> None:
        spec.groups(head_dim)
        self.layout, self.spec = layout, spec
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.device = torch.device(device)
        self.kernel_backend = kernel_backend
        g, dt = spec.groups(head_dim), spec.torch_scale_dtype
        n, rows, h = num_layers, layout.int2_rows, num_kv_heads
        z = lambda *shape, dtype: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        # one tensor per kind for all layers (per-layer views below), so the flush can quantize
        # every layer's rows in one kernel launch per clip ratio instead of one per layer
        self.int2_all = {side: Int2Store(z(n * rows, h, head_dim // 4, dtype=torch.uint8),
                                         z(n * rows, h, g, dtype=dt), z(n * rows, h, g, dtype=dt),
                                         spec) for side in "kv"}
        self.bf16_all = {side: z(n, layout.bf16_rows, h, head_dim, dtype=HP_DTYPE)
                         for side in "kv"}

        def int2(side: str, layer: int) -> Int2Store:
            st, sl = self.int2_all[side], slice(layer * rows, (layer + 1) * rows)
            return Int2Store(st.packed[sl], st.scale[sl], st.zero[sl], spec)

        self.k_int2 = [int2("k", i) for i in range(n)]
        self.v_int2 = [int2("v", i) for i in range(n)]
        self.k_bf16 = list(self.bf16_all["k"].unbind(0))
        self.v_bf16 = list(self.bf16_all["v"].unbind(0))
        self._groups: dict[tuple, list[tuple]] = {}

    @property
    def window(self) -> WindowSpec:
        return self.layout.window

    def nbytes(self) -> tuple[int, int]:
        """(K bytes, V bytes) of every tensor held."""
        def size(side):
            st = self.int2_all[side]
            return st.packed.nbytes + st.scale.nbytes + st.zero.nbytes + \
                self.bf16_all[side].nbytes
        return size("k"), size("v")

    # ---- writes (rows already rotated, any float dtype; rounded to bf16 first) -----------
    def write_split(self, layer: int, split: RowSplit, k: torch.Tensor, v: torch.Tensor,
                    clip_k: float, clip_v: float) -> None:
        """k, v [N, Hkv, D] -> INT2 / BF16 rows as `split` says."""
        k, v = k.to(HP_DTYPE), v.to(HP_DTYPE)
        if split.int2_idx.numel():
            for x, st, clip in ((k, self.k_int2[layer], clip_k), (v, self.v_int2[layer], clip_v)):
                write_int2(x.index_select(0, split.int2_idx), None, clip, self.spec,
                           split.int2_slots, st.packed, st.scale, st.zero,
                           backend=self.kernel_backend)
        if split.bf16_idx.numel():
            # bf16 rows straight into the bf16 arena (what write_bf16 stores, without its fp32
            # round trip, which is exact for bf16 input)
            self.k_bf16[layer].index_copy_(0, split.bf16_rows, k.index_select(0, split.bf16_idx))
            self.v_bf16[layer].index_copy_(0, split.bf16_rows, v.index_select(0, split.bf16_idx))

    def split_by_value(self, slots: torch.Tensor) -> RowSplit:
        """RowSplit of flat ids by value (nonzero: one host sync; generic callers only)."""
        slots = slots.to(device=self.device, dtype=torch.long)
        is_bf16 = slots >= self.layout.hp_offset
        i2, ib = (~is_bf16).nonzero().flatten(), is_bf16.nonzero().flatten()
        return RowSplit(i2, slots[i2], ib, slots[ib] - self.layout.hp_offset)

    def decode_targets(self, loc: torch.Tensor) -> DecodeTargets:
        """Where a decode step's rows go, for every layer: loc [B] flat ids -> BF16 store rows
        (BF16 ids to their row; any other id, e.g. a padded CUDA-graph row at INT2 slot 0, to
        the dummy row) and, with recent_tokens == 0 (a decoded token can land in the body),
        INT2 slots (BF16 ids to the dummy slot 0). Static shapes, no host sync."""
        lay = self.layout
        loc = loc.to(torch.long)
        is_bf16 = loc >= lay.hp_offset
        rows = torch.where(is_bf16, loc - lay.hp_offset, lay.bf16_rows - 1)
        slots = torch.where(is_bf16, torch.zeros_like(loc) + DUMMY_INT2, loc) \
            if self.window.recent_tokens == 0 else None
        return DecodeTargets(rows, slots)

    def write_decode(self, layer: int, loc: torch.Tensor | DecodeTargets, k: torch.Tensor,
                     v: torch.Tensor, clip_k: float, clip_v: float) -> None:
        """One decode token per row, static shapes (CUDA-graph safe), no host sync. loc: the
        step's flat ids [B] or their `decode_targets` (computed once for all layers)."""
        t = loc if isinstance(loc, DecodeTargets) else self.decode_targets(loc)
        k, v = k.to(HP_DTYPE), v.to(HP_DTYPE)
        self.k_bf16[layer].index_copy_(0, t.bf16_rows, k)  # == write_bf16 for bf16 rows
        self.v_bf16[layer].index_copy_(0, t.bf16_rows, v)
        if t.int2_slots is not None:
            for x, st, clip in ((k, self.k_int2[layer], clip_k), (v, self.v_int2[layer], clip_v)):
                write_int2(x, None, clip, self.spec, t.int2_slots, st.packed, st.scale, st.zero,
                           backend=self.kernel_backend)

    def flush(self, src: torch.Tensor, dst: torch.Tensor, clip_k: list[float],
              clip_v: list[float]) -> None:
        """Quantize BF16 rows of flat ids src [m] into INT2 slots dst [m], every layer: one
        `write_int2` per side and distinct clip ratio over the rows of all layers that share
        it (rows are quantized independently, so this equals a launch per layer)."""
        if src.numel() == 0:
            return
        rows = src.to(device=self.device, dtype=torch.long) - self.layout.hp_offset
        dst = dst.to(device=self.device, dtype=torch.long)
        m = rows.numel()
        for side, clips in (("k", clip_k), ("v", clip_v)):
            arena, store = self.bf16_all[side], self.int2_all[side]
            picked = arena.index_select(1, rows)  # [L, m, Hkv, D]: the flushed rows only
            for clip, sel, base in self._clip_groups(tuple(clips)):
                # rows first, then the group's layers: never a copy of whole arenas
                x = picked if sel is None else picked.index_select(0, sel)
                x = x.reshape(base.numel() * m, *arena.shape[2:])
                slots = (base[:, None] + dst[None, :]).reshape(-1)
                write_int2(x, None, clip, self.spec, slots, store.packed, store.scale,
                           store.zero, backend=self.kernel_backend)

    def _clip_groups(self, clips: tuple[float, ...]) -> list[tuple]:
        """[(clip, layer index tensor or None for all layers, first INT2 row of each layer)],
        built once per clip tuple (no host-to-device copy per flush)."""
        if clips not in self._groups:
            if len(clips) != self.num_layers:
                raise OscarError(f"{len(clips)} clip ratios for {self.num_layers} layers")
            groups = []
            for clip in dict.fromkeys(clips):
                layers = [i for i, c in enumerate(clips) if c == clip]
                sel = torch.tensor(layers, device=self.device)
                groups.append((clip, None if len(layers) == len(clips) else sel,
                               sel * self.layout.int2_rows))
            self._groups[clips] = groups
        return self._groups[clips]

    # ---- reads ---------------------------------------------------------------------------
    def token_maps(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, T] flat slot ids -> (INT2 row map, BF16 row map), each clamped into its
        store so stale entries past a sequence's length stay valid indices."""
        lay = self.layout
        return (ids.clamp(0, lay.int2_rows - 1),
                (ids - lay.hp_offset).clamp(0, lay.bf16_rows - 1))

    def decode_tables(self, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                      seq_lens: torch.Tensor, width: int) -> KVTables:
        """Slot tables of a decode batch (lengths include the new token), width <= T of
        req_to_token columns read. No host sync."""
        if width > req_to_token.shape[1]:
            raise OscarError(f"decode tables of width {width} exceed req_to_token's "
                             f"{req_to_token.shape[1]} columns")
        ids = req_to_token[:, :width].index_select(0, req_pool_indices.to(torch.long))
        return tables_from_token_slots(*self.token_maps(ids), seq_lens, self.window)
