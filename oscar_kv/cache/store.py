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

The body buffers are allocated token-major, [B, capacity, Hkv, ...], so `slot_view` can hand
them to the slot-indexed decode kernels (oscar_kv.kernels.Int2Store [S, Hkv, D/4]) without a
copy: body row i of sequence b is slot b * capacity + i. `body_packed` returns the
[B, Hkv, T_body, ...] views of the same memory.

`append` adds new rows (any float dtype, rounded to bf16) and then flushes the oldest recent
rows into the body so that the body ends exactly at `body_end(L)`: F tokens at a time during
decoding, many blocks at once after a long prefill (quantization is per row, so the result is
the same). The body buffers grow geometrically in `grow_tokens` chunks (amortised O(T)).
`window=None` means no quantization: every row stays BF16 in the recent part (sink/body empty).

Framework-free: no transformers import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oscar_kv.cache.windows import body_end
from oscar_kv.config import QuantSpec, WindowSpec
from oscar_kv.errors import OscarError
from oscar_kv.formats import dequantize_int2, pack_int2, quantize_int2, unpack_int2

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


def quantize_rows(x: torch.Tensor, spec: QuantSpec, clip_ratio: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The single write-quantization point: x [..., D] bf16 -> (packed uint8 [..., D/4],
    scale [..., D/G], zero [..., D/G]). The fused Triton write kernel plugs in here."""
    codes, scale, zero = quantize_int2(x, spec, clip_ratio)
    return pack_int2(codes), scale, zero


class MixedKVStore:
    """One layer's mixed BF16/INT2 K/V rows for a batch of equal-length sequences."""

    def __init__(self, window: WindowSpec | None, spec: QuantSpec = QuantSpec(),
                 clip_k: float = 1.0, clip_v: float = 1.0, grow_tokens: int = 256) -> None:
        self.window = window
        self.spec = spec
        self.clip_k = float(clip_k)
        self.clip_v = float(clip_v)
        self.grow_tokens = max(int(grow_tokens), 1)
        self.sink_tokens = window.sink_tokens if window is not None else 0
        self.reset()

    # ---------------------------------------------------------------- bookkeeping
    def reset(self) -> None:
        """Drop every row (the store forgets its batch shape too)."""
        self.length = 0
        self.recent_start = self.sink_tokens
        self.body_len = 0
        self._sink: tuple[torch.Tensor, torch.Tensor] | None = None
        self._recent: tuple[torch.Tensor, torch.Tensor] | None = None
        self._body: list[torch.Tensor] | None = None  # kc, ks, kz, vc, vs, vz [B, cap, H, .]

    @property
    def is_initialized(self) -> bool:
        return self._sink is not None

    def target_body_end(self, length: int) -> int:
        """Position where the body must end for a cache of `length` tokens."""
        return body_end(length, self.window) if self.window is not None else 0

    def _init_buffers(self, k: torch.Tensor) -> None:
        b, h, _, d = k.shape
        self.groups = self.spec.groups(d) if self.window is not None else 1
        empty = k.new_empty(b, h, 0, d, dtype=HP_DTYPE)
        self._sink = (empty, empty.clone())
        self._recent = (empty.clone(), empty.clone())
        meta = dict(dtype=self.spec.torch_scale_dtype, device=k.device)
        codes = dict(dtype=torch.uint8, device=k.device)
        self._body = [torch.empty(b, 0, h, d // 4, **codes) if i % 3 == 0
                      else torch.empty(b, 0, h, self.groups, **meta) for i in range(6)]

    def _ensure_capacity(self, extra: int) -> None:
        need = self.body_len + extra
        cap = self._body[0].shape[1]
        if need <= cap:
            return
        g = self.grow_tokens
        new_cap = -(-max(need, 2 * cap) // g) * g
        grown = []
        for buf in self._body:
            nb = buf.new_empty(buf.shape[0], new_cap, *buf.shape[2:])
            nb[:, : self.body_len] = buf[:, : self.body_len]
            grown.append(nb)
        self._body = grown

    # ---------------------------------------------------------------- writes
    def append(self, k_rot: torch.Tensor, v_rot: torch.Tensor) -> None:
        """Add T new tokens. k_rot, v_rot: [B, Hkv, T, D] rotated rows (any float dtype; stored
        as bf16). Afterwards the body ends exactly at `target_body_end(length)`."""
        if k_rot.shape != v_rot.shape or k_rot.dim() != 4:
            raise OscarError(f"append needs K and V of equal shape [B, Hkv, T, D], got "
                             f"{tuple(k_rot.shape)} and {tuple(v_rot.shape)}")
        if not self.is_initialized:
            self._init_buffers(k_rot)
        elif k_rot.shape[:2] != self._sink[0].shape[:2] or k_rot.shape[3] != self._sink[0].shape[3]:
            raise OscarError(f"append got rows of shape {tuple(k_rot.shape)} but the store holds "
                             f"[B, Hkv, *, D] = {tuple(self._sink[0].shape)}; reset it first")
        k = k_rot.to(HP_DTYPE)
        v = v_rot.to(HP_DTYPE)
        n_sink = max(0, min(self.sink_tokens, self.length + k.shape[2]) - self.length)
        if n_sink:
            self._sink = (torch.cat([self._sink[0], k[:, :, :n_sink]], dim=2),
                          torch.cat([self._sink[1], v[:, :, :n_sink]], dim=2))
        if n_sink < k.shape[2]:
            self._recent = (torch.cat([self._recent[0], k[:, :, n_sink:]], dim=2),
                            torch.cat([self._recent[1], v[:, :, n_sink:]], dim=2))
        self.length += k.shape[2]
        self._flush()

    def _flush(self) -> None:
        """Move recent rows below target_body_end(length) into the INT2 body."""
        n = self.target_body_end(self.length) - self.recent_start
        if n <= 0:
            return
        rk, rv = self._recent
        kc, ks, kz = quantize_rows(rk[:, :, :n], self.spec, self.clip_k)
        vc, vs, vz = quantize_rows(rv[:, :, :n], self.spec, self.clip_v)
        self._ensure_capacity(n)
        sl = slice(self.body_len, self.body_len + n)
        for buf, val in zip(self._body, (kc, ks, kz, vc, vs, vz), strict=True):
            buf[:, sl] = val.transpose(1, 2)
        self.body_len += n
        self.recent_start += n
        self._recent = (rk[:, :, n:], rv[:, :, n:])

    # ---------------------------------------------------------------- reads
    def sink(self) -> tuple[torch.Tensor, torch.Tensor]:
        """BF16 sink rows (k, v): [B, Hkv, min(P, L), D], positions 0..n_sink-1."""
        return self._sink

    def recent(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """BF16 recent rows (k, v) [B, Hkv, n_recent, D] and the position of the first one."""
        return self._recent[0], self._recent[1], self.recent_start

    def bf16_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sink + recent rows concatenated: k, v bf16 [B, Hkv, S, D], positions int64 [S]."""
        sk, sv = self._sink
        rk, rv, start = self.recent()
        dev = sk.device
        pos = torch.cat([torch.arange(sk.shape[2], device=dev),
                         torch.arange(start, start + rk.shape[2], device=dev)])
        return torch.cat([sk, rk], dim=2), torch.cat([sv, rv], dim=2), pos

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
        sk, sv = self._sink
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

    # ---------------------------------------------------------------- batch ops
    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self._sink = tuple(fn(t) for t in self._sink)
        self._recent = tuple(fn(t) for t in self._recent)
        self._body = [fn(t) for t in self._body]

    def select_batch(self, indices: torch.Tensor) -> None:
        """Keep (or reorder to) batch rows `indices` (int64 [B'])."""
        self._map_batch(lambda t: t.index_select(0, indices.to(t.device)))

    def repeat_batch(self, repeats: int) -> None:
        """Repeat each sequence `repeats` times along the batch (as repeat_interleave)."""
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    @property
    def batch_size(self) -> int:
        return self._sink[0].shape[0] if self.is_initialized else 0

    def window_counts(self) -> tuple[int, int, int]:
        """(sink, body, recent) token counts currently held."""
        if not self.is_initialized:
            return 0, 0, 0
        return self._sink[0].shape[2], self.body_len, self._recent[0].shape[2]
