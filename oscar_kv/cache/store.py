"""Per-layer contiguous mixed KV store: BF16 sink + INT2 body + BF16 recent window.

One store holds one layer's rotated K/V for a batch of B sequences of equal length (the common
case of HF `generate`). Positions are cache slots 0..L-1, shared by the whole batch; a
left-padded batch is treated position-wise (pad slots take part in the window bookkeeping like
any other token, the attention mask hides them).

With `WindowSpec(P, R, F)` and L tokens held (see `windows.py`):

    sink   positions [0, min(P, L))            bf16 [B, Hkv, n_sink, D]
    body   positions [P, body_end(L))           packed uint8 [B, Hkv, T_body, D/4]
                                                + scale/zero [B, Hkv, T_body, D/G] (spec dtype)
    recent positions [body_end(L), L)           bf16 [B, Hkv, n_recent, D]

Every buffer is allocated token-major, so the slot-indexed kernels (oscar_kv.kernels) read the
store without a copy:

    body  [B, capacity, Hkv, ...]     body row i of sequence b is INT2 slot b * capacity + i
    bf16  [B, hp_capacity, Hkv, D]    sink rows then recent rows: BF16 row j of sequence b
                                      (j < n_sink + n_recent) is slot b * hp_capacity + j

`slot_view` / `hp_slot_view` give those flattened views; `sink`, `recent`, `body_packed` return
[B, Hkv, T, ...] views of the same memory.

`append` adds new rows (any float dtype, rounded to bf16); the oldest recent rows (held ones
first, then the chunk's) are quantized straight into the body so that it ends exactly at
`body_end(L)`: F tokens at a time during decoding, many blocks at once after a long prefill
(quantization is per row, so the result is the same). The BF16 buffer therefore never holds
more than P + R + F - 1 rows; the body grows geometrically in `grow_tokens` chunks. Body
writes go through `kernels.write_int2` (`backend` "torch" = the formats reference, "triton" =
the fused kernel, bit-exact with it for already rotated rows). `window=None` means no
quantization: every row stays BF16 in the recent part (sink/body empty, the buffer grows).

Framework-free: no transformers import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oscar_kv.cache.windows import body_end
from oscar_kv.config import QuantSpec, WindowSpec
from oscar_kv.errors import OscarError
from oscar_kv.formats import dequantize_int2, unpack_int2

HP_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class PackedBody:
    """Views of the INT2 body rows (positions start .. start + T_body - 1).

    k_codes, v_codes: uint8 [B, Hkv, T_body, D/4] (formats.pack_int2 layout);
    k_scale, k_zero, v_scale, v_zero: [B, Hkv, T_body, D/G] in the QuantSpec scale dtype.
    """

    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    start: int

    @property
    def num_tokens(self) -> int:
        return self.k_codes.shape[2]


def _grown(buf: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
    """A [B, capacity, ...] copy of buf holding its first `used` rows (dim 1)."""
    out = buf.new_empty(buf.shape[0], capacity, *buf.shape[2:])
    out[:, :used] = buf[:, :used]
    return out


class MixedKVStore:
    """One layer's mixed BF16/INT2 K/V rows for a batch of equal-length sequences."""

    def __init__(self, window: WindowSpec | None, spec: QuantSpec = QuantSpec(),
                 clip_k: float = 1.0, clip_v: float = 1.0, grow_tokens: int = 256,
                 backend: str = "torch") -> None:
        self.window = window
        self.spec = spec
        self.clip_k = float(clip_k)
        self.clip_v = float(clip_v)
        self.grow_tokens = max(int(grow_tokens), 1)
        self.backend = backend
        self.sink_tokens = window.sink_tokens if window is not None else 0
        self.reset()

    # ---------------------------------------------------------------- bookkeeping
    def reset(self) -> None:
        """Drop every row (the store forgets its batch shape too)."""
        self.length = 0
        self.recent_start = self.sink_tokens
        self.body_len = 0
        self.hp_len = 0  # BF16 rows held: n_sink + n_recent
        self._hp: list[torch.Tensor] | None = None  # k, v bf16 [B, hp_cap, H, D]
        self._body: list[torch.Tensor] | None = None  # kc, ks, kz, vc, vs, vz [B, cap, H, .]

    @property
    def is_initialized(self) -> bool:
        return self._hp is not None

    @property
    def n_sink(self) -> int:
        return min(self.sink_tokens, self.length)

    def target_body_end(self, length: int) -> int:
        """Position where the body must end for a cache of `length` tokens."""
        return body_end(length, self.window) if self.window is not None else 0

    def _init_buffers(self, k: torch.Tensor) -> None:
        b, _, h, d = k.shape
        self.groups = self.spec.groups(d) if self.window is not None else 1
        w = self.window
        hp_cap = w.sink_tokens + w.recent_tokens + w.flush_block - 1 if w is not None else 0
        self._hp = [k.new_empty(b, hp_cap, h, d, dtype=HP_DTYPE) for _ in range(2)]
        meta = dict(dtype=self.spec.torch_scale_dtype, device=k.device)
        codes = dict(dtype=torch.uint8, device=k.device)
        self._body = [torch.empty(b, 0, h, d // 4, **codes) if i % 3 == 0
                      else torch.empty(b, 0, h, self.groups, **meta) for i in range(6)]

    def _capacity(self, need: int, cap: int) -> int:
        if need <= cap:
            return cap
        g = self.grow_tokens
        return -(-max(need, 2 * cap) // g) * g

    def _ensure_capacity(self, extra: int) -> None:
        cap = self._body[0].shape[1]
        new_cap = self._capacity(self.body_len + extra, cap)
        if new_cap != cap:
            self._body = [_grown(buf, self.body_len, new_cap) for buf in self._body]

    def _ensure_hp_capacity(self, extra: int) -> None:
        cap = self._hp[0].shape[1]
        new_cap = self._capacity(self.hp_len + extra, cap)
        if new_cap != cap:  # only without a window: a windowed store is sized at init
            self._hp = [_grown(buf, self.hp_len, new_cap) for buf in self._hp]

    # ---------------------------------------------------------------- writes
    def append(self, k_rot: torch.Tensor, v_rot: torch.Tensor) -> None:
        """Add T new tokens. k_rot, v_rot: [B, Hkv, T, D] rotated rows (any float dtype; stored
        as bf16). Afterwards the body ends exactly at `target_body_end(length)`."""
        if k_rot.shape != v_rot.shape or k_rot.dim() != 4:
            raise OscarError(f"append needs K and V of equal shape [B, Hkv, T, D], got "
                             f"{tuple(k_rot.shape)} and {tuple(v_rot.shape)}")
        k = k_rot.to(HP_DTYPE).transpose(1, 2)  # [B, T, H, D] token-major views
        v = v_rot.to(HP_DTYPE).transpose(1, 2)
        if not self.is_initialized:
            self._init_buffers(k)
        elif k.shape[0] != self._hp[0].shape[0] or k.shape[2:] != self._hp[0].shape[2:]:
            raise OscarError(f"append got rows of shape {tuple(k_rot.shape)} but the store holds "
                             f"B, Hkv, D = {self._hp[0].shape[0]}, {self._hp[0].shape[2]}, "
                             f"{self._hp[0].shape[3]}; reset it first")
        t = k.shape[1]
        n_new_sink = max(0, min(self.sink_tokens, self.length + t) - self.length)
        self._push_hp(k[:, :n_new_sink], v[:, :n_new_sink])
        self.length += t
        n_flush = max(self.target_body_end(self.length) - self.recent_start, 0)
        held = self.hp_len - self.n_sink  # recent rows held before this chunk
        from_held = min(n_flush, held)
        from_chunk = n_flush - from_held
        if n_flush:
            rows = [self._hp[i][:, self.n_sink:self.n_sink + from_held] for i in range(2)]
            if from_chunk:
                rows = [torch.cat([r, x[:, n_new_sink:n_new_sink + from_chunk]], dim=1)
                        for r, x in zip(rows, (k, v), strict=True)]
            self._write_body(*rows)
            if from_held:  # shift the remaining held recent rows to the front of the window
                lo, hi = self.n_sink + from_held, self.hp_len
                for buf in self._hp:
                    buf[:, self.n_sink:hi - from_held] = buf[:, lo:hi].clone()
                self.hp_len -= from_held
            self.recent_start += n_flush
        rest = n_new_sink + from_chunk
        self._push_hp(k[:, rest:], v[:, rest:])

    def _push_hp(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append token-major rows k, v [B, n, H, D] to the BF16 buffer."""
        n = k.shape[1]
        if n == 0:
            return
        self._ensure_hp_capacity(n)
        self._hp[0][:, self.hp_len:self.hp_len + n] = k
        self._hp[1][:, self.hp_len:self.hp_len + n] = v
        self.hp_len += n

    def _write_body(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize token-major bf16 rows k, v [B, n, H, D] into body rows body_len.. ."""
        from oscar_kv.kernels import write_int2

        b, n, h, d = k.shape
        self._ensure_capacity(n)
        bufs, cap = self.slot_view()
        slots = (torch.arange(b, device=k.device)[:, None] * cap + self.body_len
                 + torch.arange(n, device=k.device)[None, :]).reshape(-1)
        for x, clip, (packed, scale, zero) in ((k, self.clip_k, bufs[:3]),
                                               (v, self.clip_v, bufs[3:])):
            write_int2(x.reshape(b * n, h, d), None, clip, self.spec, slots, packed, scale,
                       zero, backend=self.backend)
        self.body_len += n

    # ---------------------------------------------------------------- reads
    def sink(self) -> tuple[torch.Tensor, torch.Tensor]:
        """BF16 sink rows (k, v): [B, Hkv, min(P, L), D], positions 0..n_sink-1."""
        n = self.n_sink
        return self._hp[0][:, :n].transpose(1, 2), self._hp[1][:, :n].transpose(1, 2)

    def recent(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """BF16 recent rows (k, v) [B, Hkv, n_recent, D] and the position of the first one."""
        lo, hi = self.n_sink, self.hp_len
        return (self._hp[0][:, lo:hi].transpose(1, 2), self._hp[1][:, lo:hi].transpose(1, 2),
                self.recent_start)

    def bf16_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sink + recent rows concatenated: k, v bf16 [B, Hkv, S, D], positions int64 [S]."""
        dev = self._hp[0].device
        pos = torch.cat([torch.arange(self.n_sink, device=dev),
                         torch.arange(self.recent_start, self.recent_start + self.hp_len
                                      - self.n_sink, device=dev)])
        n = self.hp_len
        return self._hp[0][:, :n].transpose(1, 2), self._hp[1][:, :n].transpose(1, 2), pos

    def body_packed(self) -> PackedBody:
        """The INT2 body as packed [B, Hkv, T_body, ...] views (no copy, not contiguous)."""
        b = [buf[:, : self.body_len].transpose(1, 2) for buf in self._body]
        return PackedBody(*b, start=self.sink_tokens)

    def slot_view(self) -> tuple[list[torch.Tensor], int]:
        """Body buffers flattened to slot-major [B * capacity, Hkv, ...] views (k codes, k scale,
        k zero, v codes, v scale, v zero) and the capacity: body row i of sequence b is slot
        b * capacity + i (rows >= body_len are unused)."""
        cap = self._body[0].shape[1]
        return [buf.reshape(-1, *buf.shape[2:]) for buf in self._body], cap

    def hp_slot_view(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """BF16 buffers flattened to [B * hp_capacity, Hkv, D] views (k, v) and hp_capacity:
        sink/recent row j (j < hp_len, sink first) of sequence b is slot b * hp_capacity + j."""
        cap = self._hp[0].shape[1]
        return (*(buf.reshape(-1, *buf.shape[2:]) for buf in self._hp), cap)

    def capacities(self) -> tuple[int, int]:
        """(body capacity, BF16 capacity) in rows per sequence: the slot-view row strides."""
        if not self.is_initialized:
            return 0, 0
        return self._body[0].shape[1], self._hp[0].shape[1]

    def body_dequant(self, dtype: torch.dtype = torch.float32
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized body (k, v): [B, Hkv, T_body, D] in dtype, equal bit for bit to
        formats.fake_quant of the same bf16 rows (computed in fp32)."""
        p = self.body_packed()
        k = dequantize_int2(unpack_int2(p.k_codes), p.k_scale, p.k_zero, self.spec, dtype)
        v = dequantize_int2(unpack_int2(p.v_codes), p.v_scale, p.v_zero, self.spec, dtype)
        return k, v

    def dense(self, dtype: torch.dtype = torch.float32, upto: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """All rows in position order with the body dequantized: k, v [B, Hkv, upto, D]
        (default upto = L). BF16 rows are exact; INT2 rows are their dequantized values."""
        sk, sv = self.sink()
        rk, rv, _ = self.recent()
        ks, vs = [sk.to(dtype)], [sv.to(dtype)]
        if self.body_len:
            bk, bv = self.body_dequant(dtype)
            ks.append(bk)
            vs.append(bv)
        k = torch.cat([*ks, rk.to(dtype)], dim=2)
        v = torch.cat([*vs, rv.to(dtype)], dim=2)
        if upto is not None:
            k, v = k[:, :, :upto], v[:, :, :upto]
        return k, v

    def allocated_bytes(self) -> int:
        """Bytes of every buffer the store holds (capacity, not just the rows in use)."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (*self._hp, *self._body))

    # ---------------------------------------------------------------- batch ops
    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self._hp = [fn(t) for t in self._hp]
        self._body = [fn(t) for t in self._body]

    def select_batch(self, indices: torch.Tensor) -> None:
        """Keep (or reorder to) batch rows `indices` (int64 [B'])."""
        self._map_batch(lambda t: t.index_select(0, indices.to(t.device)))

    def repeat_batch(self, repeats: int) -> None:
        """Repeat each sequence `repeats` times along the batch (as repeat_interleave)."""
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    @property
    def batch_size(self) -> int:
        return self._hp[0].shape[0] if self.is_initialized else 0

    def window_counts(self) -> tuple[int, int, int]:
        """(sink, body, recent) token counts currently held."""
        if not self.is_initialized:
            return 0, 0, 0
        return self.n_sink, self.body_len, self.hp_len - self.n_sink
