"""What the kernels read: the slot-indexed KV stores and the per-sequence slot tables.

Two stores per layer and per K/V side, both indexed by a *slot* id (a row of the store):

- `Int2Store`: packed codes uint8 [S, Hkv, D/4] (formats.pack_int2 layout), scale and zero
  [S, Hkv, D/G] in the metadata dtype, and the `QuantSpec` that wrote them;
- a BF16 store: bf16 [S2, Hkv, D] of rotated rows (the sink and recent windows).

Slot tables (`KVTables`) say, per sequence, which slots hold its keys. The caller classifies
positions once per step with `cache/windows.py` (a pure function of the length) and hands the
kernels two padded lists:

    int2_slots [B, max_body] + body_len [B]   INT2 body rows, in any order
    bf16_slots [B, max_hp]   + hp_len [B]     BF16 sink + recent rows, in any order

Entries past a sequence's length are never read (they only need to be valid integers).
Attention is a softmax over the union of both lists, so order does not matter. The same
design serves a contiguous per-sequence cache (slot = b * max_len + position, see
`contiguous_token_slots`) and a paged server pool (slots from its req_to_token map), and its
shapes are static, so a CUDA graph can capture kernels that read them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oscar_kv.cache.windows import body_end_tensor
from oscar_kv.config import QuantSpec, WindowSpec
from oscar_kv.errors import OscarError


@dataclass(frozen=True)
class Int2Store:
    """packed uint8 [S, Hkv, D/4]; scale, zero [S, Hkv, D/G] in spec.scale_dtype."""

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec = QuantSpec()

    @property
    def head_dim(self) -> int:
        return self.packed.shape[-1] * 4

    def check(self) -> None:
        """Raise OscarError if the three tensors do not describe one INT2 store."""
        p, s, z = self.packed, self.scale, self.zero
        if p.dtype != torch.uint8 or p.dim() != 3:
            raise OscarError(f"packed INT2 store must be uint8 [S, Hkv, D/4], got {p.dtype} "
                             f"{tuple(p.shape)}")
        groups = self.spec.groups(self.head_dim)
        want = (*p.shape[:2], groups)
        for name, t in (("scale", s), ("zero", z)):
            if tuple(t.shape) != want or t.dtype != self.spec.torch_scale_dtype:
                raise OscarError(f"INT2 {name} must be {self.spec.scale_dtype} {want} for "
                                 f"group size {self.spec.group_size}, got {t.dtype} "
                                 f"{tuple(t.shape)}")

    @classmethod
    def empty(cls, num_slots: int, num_kv_heads: int, head_dim: int,
              spec: QuantSpec = QuantSpec(), device: torch.device | str = "cpu") -> Int2Store:
        """An uninitialised store with room for `num_slots` rows."""
        g = spec.groups(head_dim)
        dt = spec.torch_scale_dtype
        return cls(torch.empty(num_slots, num_kv_heads, head_dim // 4, dtype=torch.uint8,
                               device=device),
                   torch.empty(num_slots, num_kv_heads, g, dtype=dt, device=device),
                   torch.empty(num_slots, num_kv_heads, g, dtype=dt, device=device), spec)


@dataclass(frozen=True)
class KVTables:
    """Per-sequence slot lists (int32 or int64, last dim contiguous).

    int2_slots [B, max_body], body_len [B]: rows of the Int2Store holding the body;
    bf16_slots [B, max_hp], hp_len [B]: rows of the BF16 store holding sink + recent.
    """

    int2_slots: torch.Tensor
    body_len: torch.Tensor
    bf16_slots: torch.Tensor
    hp_len: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.int2_slots.shape[0]

    def check(self) -> None:
        b = self.batch_size
        for name in ("int2_slots", "body_len", "bf16_slots", "hp_len"):
            t = getattr(self, name)
            if t.dtype not in (torch.int32, torch.int64) or t.shape[0] != b:
                raise OscarError(f"slot table {name} must be int32/int64 with batch {b} "
                                 f"first, got {t.dtype} {tuple(t.shape)}")
        for name in ("int2_slots", "bf16_slots"):
            t = getattr(self, name)
            if t.dim() != 2 or t.stride(-1) != 1:
                raise OscarError(f"slot table {name} must be [B, max_len] with a contiguous "
                                 f"last dim, got shape {tuple(t.shape)} strides {t.stride()}")


def hp_table_len(window: WindowSpec, max_len: int) -> int:
    """The most BF16 rows any sequence of length <= max_len holds: P + R + F - 1 (capped)."""
    return min(max_len, window.sink_tokens + window.recent_tokens + window.flush_block - 1)


def contiguous_token_slots(batch_size: int, max_len: int,
                           device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 [B, max_len]: slot = b * max_len + position (a dense per-sequence cache)."""
    return torch.arange(batch_size * max_len, device=device).view(batch_size, max_len)


def tables_from_token_slots(int2_token_slots: torch.Tensor, bf16_token_slots: torch.Tensor,
                            seq_lens: torch.Tensor, window: WindowSpec) -> KVTables:
    """Classify positions by `cache/windows.py` and gather each class's slots.

    int2_token_slots, bf16_token_slots: int [B, T] position -> slot in the INT2 / BF16 store
    (they may be the same tensor); seq_lens [B] (<= T, the decoded token included).
    Returns KVTables with max_body = max(T - P, 0) and max_hp = hp_table_len(window, T).
    No host synchronisation: shapes depend on T and the window only.
    """
    if int2_token_slots.shape != bf16_token_slots.shape or int2_token_slots.dim() != 2:
        raise OscarError("token slot maps must both be [B, T]; got "
                         f"{tuple(int2_token_slots.shape)} and {tuple(bf16_token_slots.shape)}")
    _, t = int2_token_slots.shape
    p = window.sink_tokens
    dev = int2_token_slots.device
    lens = seq_lens.to(device=dev, dtype=torch.long)
    end = torch.minimum(body_end_tensor(lens, window), lens)
    body_len = (end - p).clamp(min=0)
    sink_len = lens.clamp(max=p)
    recent_start = torch.clamp(end, min=p)
    hp_len = sink_len + (lens - recent_start).clamp(min=0)

    max_body, max_hp = max(t - p, 0), hp_table_len(window, t)
    i = torch.arange(max_body, device=dev)[None, :]
    body_pos = (p + i).clamp(max=t - 1).expand(lens.shape[0], -1)
    int2_slots = torch.gather(int2_token_slots, 1, body_pos) if max_body else \
        int2_token_slots[:, :0]
    j = torch.arange(max_hp, device=dev)[None, :]
    hp_pos = torch.where(j < sink_len[:, None], j, recent_start[:, None] + j - sink_len[:, None])
    bf16_slots = torch.gather(bf16_token_slots, 1, hp_pos.clamp(0, max(t - 1, 0)))
    return KVTables(int2_slots.contiguous(), body_len.to(torch.int32), bf16_slots.contiguous(),
                    hp_len.to(torch.int32))
