"""MixedKVStore: flush positions follow windows.body_end exactly; the body is formats' INT2."""

from __future__ import annotations

import pytest
import torch

from oscar_kv.cache import body_end
from oscar_kv.cache.store import MixedKVStore
from oscar_kv.config import QuantSpec, WindowSpec
from oscar_kv.formats import fake_quant

P, R, F = 16, 32, 8
W = WindowSpec(P, R, F)
B, H, D = 2, 2, 128
LENGTHS = [1, P - 1, P, P + 1, P + R - 1, P + R, P + R + F - 1, P + R + F, 239, 400]


def _rows(t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, t, D, generator=g) * 3
    v = torch.randn(B, H, t, D, generator=g)
    return k, v


def _check_layout(store: MixedKVStore, length: int) -> None:
    sink, body, recent = store.window_counts()
    end = body_end(length, W)
    assert store.length == length
    assert sink == min(P, length)
    assert body == max(min(end, length) - P, 0)
    assert sink + body + recent == length
    _, _, start = store.recent()
    assert start == max(end, P)
    _, _, pos = store.bf16_rows()
    want = [p for p in range(length) if p < P or p >= end]
    assert pos.tolist() == want


@pytest.mark.parametrize("length", LENGTHS)
def test_decode_flush_follows_body_end(length):
    k, v = _rows(length)
    store = MixedKVStore(W, grow_tokens=16)
    for i in range(length):
        store.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
        _check_layout(store, i + 1)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("chunks", [1, 3])
def test_prefill_then_decode_layout(length, chunks):
    k, v = _rows(length + 20)
    store = MixedKVStore(W, grow_tokens=8)
    bounds = torch.linspace(0, length, chunks + 1).round().long().tolist()
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        store.append(k[:, :, s:e], v[:, :, s:e])
    _check_layout(store, length)
    for i in range(length, length + 20):
        store.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
        _check_layout(store, i + 1)


@pytest.mark.parametrize("spec,clip", [(QuantSpec(), 1.0), (QuantSpec(group_size=32), 0.9),
                                       (QuantSpec(scale_dtype="float32"), 0.95),
                                       (QuantSpec(quantizer="lloyd_max"), 1.0)])
def test_body_equals_fake_quant_bit_exact(spec, clip):
    t = 300
    k, v = _rows(t, seed=1)
    store = MixedKVStore(W, spec, clip_k=clip, clip_v=clip, grow_tokens=32)
    store.append(k[:, :, :100], v[:, :, :100])
    for i in range(100, t):
        store.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
    end = body_end(t, W)
    kb = k.to(torch.bfloat16).float()
    vb = v.to(torch.bfloat16).float()
    bk, bv = store.body_dequant()
    assert torch.equal(bk, fake_quant(kb[:, :, P:end], spec, clip))
    assert torch.equal(bv, fake_quant(vb[:, :, P:end], spec, clip))
    dk, dv = store.dense()
    assert torch.equal(dk[:, :, :P], kb[:, :, :P]) and torch.equal(dk[:, :, end:], kb[:, :, end:])
    assert torch.equal(dv[:, :, P:end], bv)
    packed = store.body_packed()
    assert packed.k_codes.dtype == torch.uint8 and packed.k_codes.shape == (B, H, end - P, D // 4)
    assert packed.k_scale.dtype == spec.torch_scale_dtype
    assert packed.k_scale.shape == (B, H, end - P, D // spec.group_size)


def test_no_window_keeps_everything_bf16():
    k, v = _rows(50)
    store = MixedKVStore(None)
    store.append(k[:, :, :20], v[:, :, :20])
    for i in range(20, 50):
        store.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
    assert store.window_counts() == (0, 0, 50)
    dk, dv = store.dense()
    assert torch.equal(dk, k.to(torch.bfloat16).float())
    assert torch.equal(dv, v.to(torch.bfloat16).float())


def test_batch_select_and_repeat():
    k, v = _rows(120)
    store = MixedKVStore(W)
    store.append(k, v)
    dk, _ = store.dense()
    store.repeat_batch(2)
    assert store.batch_size == 2 * B
    store.select_batch(torch.tensor([3, 0]))
    dk2, _ = store.dense()
    assert torch.equal(dk2[0], dk[1]) and torch.equal(dk2[1], dk[0])
    store.reset()
    assert store.length == 0 and not store.is_initialized


def test_slot_view_addresses_body_rows():
    k, v = _rows(200)
    store = MixedKVStore(W, grow_tokens=64)
    store.append(k, v)
    bufs, cap = store.slot_view()
    packed = store.body_packed()
    assert bufs[0].shape == (B * cap, H, D // 4) and bufs[0].is_contiguous()
    for b in range(B):
        for i in (0, packed.num_tokens - 1):
            assert torch.equal(bufs[0][b * cap + i], packed.k_codes[b, :, i])
            assert torch.equal(bufs[5][b * cap + i], packed.v_zero[b, :, i])


def test_bf16_rows_are_slot_addressable_and_bounded():
    k, v = _rows(300)
    store = MixedKVStore(W, grow_tokens=64)
    store.append(k[:, :, :250], v[:, :, :250])  # a long prefill never overfills the window
    for i in range(250, 300):
        store.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
    kh, vh, cap = store.hp_slot_view()
    assert cap == P + R + F - 1 and store.capacities()[1] == cap
    assert kh.shape == (B * cap, H, D) and kh.is_contiguous()
    rk, rv, pos = store.bf16_rows()
    for b in range(B):
        rows = torch.arange(store.hp_len) + b * cap
        assert torch.equal(kh[rows].transpose(0, 1), rk[b])
        assert torch.equal(vh[rows].transpose(0, 1), rv[b])
    body_cap, hp_cap = store.capacities()
    want = B * H * (2 * hp_cap * D * 2 + 2 * body_cap * (D // 4 + 2 * 2))
    assert store.allocated_bytes() == want


def test_triton_writes_give_the_same_store():
    """Body writes through the fused kernel (interpreted on CPU) are bit-exact with formats."""
    pytest.importorskip("triton")
    k, v = _rows(70, seed=3)
    stores = [MixedKVStore(W, QuantSpec(group_size=64), 0.9, 0.95, grow_tokens=16,
                           backend=be) for be in ("torch", "triton")]
    for s in stores:
        s.append(k[:, :, :60], v[:, :, :60])
        for i in range(60, 70):
            s.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
    assert stores[0].body_len == stores[1].body_len == 16
    ref, tri = (s.body_packed() for s in stores)
    for name in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"):
        assert torch.equal(getattr(ref, name), getattr(tri, name)), name
    assert torch.equal(stores[0].dense()[0], stores[1].dense()[0])
