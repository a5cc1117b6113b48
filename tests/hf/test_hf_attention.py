"""The "oscar" attention's torch path against the semantic oracle, on random tensors."""

from __future__ import annotations

import pytest
import torch

from oscar_kv.cache import bf16_key_mask
from oscar_kv.cache.reference import mixed_attention_reference
from oscar_kv.cache.store import MixedKVStore
from oscar_kv.config import QuantSpec, WindowSpec
from oscar_kv.formats import fake_quant
from oscar_kv.hf import OscarKV
from oscar_kv.hf.attention import chunk_attention_torch

B, HQ, HKV, D = 2, 8, 2, 128
W = WindowSpec(16, 32, 8)
SPEC = QuantSpec(group_size=64)


def _qkv(t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, t, D, generator=g)
    k = (torch.randn(B, HKV, t, D, generator=g) * 2).to(torch.bfloat16)
    v = torch.randn(B, HKV, t, D, generator=g).to(torch.bfloat16)
    return q, k, v


def _view(store, k, v, start):
    return OscarKV(store, None, k, v, start, "torch")


@pytest.mark.parametrize("window", [W, WindowSpec(0, 8, 4), None])
def test_decode_steps_match_reference(window):
    t = 150
    q, k, v = _qkv(t)
    pos = torch.arange(t)
    ref = mixed_attention_reference(q, k, v, pos, pos, window, SPEC, 0.95, 0.9)
    store = MixedKVStore(window, SPEC, 0.95, 0.9)
    outs = []
    for i in range(t):
        store.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
        kv = _view(store, k[:, :, i:i + 1], v[:, :, i:i + 1], i)
        outs.append(chunk_attention_torch(q[:, :, i:i + 1], kv, D**-0.5, None))
    assert (torch.cat(outs, dim=2) - ref).abs().max() < 1e-5


def test_prefill_chunk_sees_itself_bf16_and_earlier_as_stored():
    t0, t = 130, 70
    q, k, v = _qkv(t0 + t, seed=1)
    store = MixedKVStore(W, SPEC, 0.95, 0.9)
    store.append(k[:, :, :t0], v[:, :, :t0])
    store.append(k[:, :, t0:], v[:, :, t0:])
    kv = _view(store, k[:, :, t0:], v[:, :, t0:], t0)
    out = chunk_attention_torch(q[:, :, t0:], kv, D**-0.5, None)
    # oracle: earlier keys follow the store after the chunk (length t0 + t), chunk keys BF16
    length = t0 + t
    kf, vf = k.float(), v.float()
    hp = bf16_key_mask(torch.tensor([length - 1]), torch.arange(length), W)[0]
    hp[t0:] = True
    kk = torch.where(hp[:, None], kf, fake_quant(kf, SPEC, 0.95)).repeat_interleave(4, dim=1)
    vv = torch.where(hp[:, None], vf, fake_quant(vf, SPEC, 0.9)).repeat_interleave(4, dim=1)
    logits = q[:, :, t0:] @ kk.transpose(-1, -2) * D**-0.5
    causal = torch.arange(length)[None, :] <= torch.arange(t0, length)[:, None]
    want = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1) @ vv
    assert (out - want).abs().max() < 1e-5


def test_padding_mask_hides_keys():
    t = 40
    q, k, v = _qkv(t, seed=2)
    store = MixedKVStore(W, SPEC)
    store.append(k, v)
    mask = torch.ones(B, 1, 1, t, dtype=torch.bool)
    mask[0, :, :, :5] = False
    store.append(k[:, :, :1], v[:, :, :1])
    mask = torch.cat([mask, torch.ones(B, 1, 1, 1, dtype=torch.bool)], dim=-1)
    out = chunk_attention_torch(q[:, :, :1], _view(store, k[:, :, :1], v[:, :, :1], t),
                                D**-0.5, mask)
    # dropping the masked keys of row 0 gives the same result
    kk = torch.cat([k[0:1, :, 5:], k[0:1, :, :1]], dim=2).float().repeat_interleave(4, dim=1)
    vv = torch.cat([v[0:1, :, 5:], v[0:1, :, :1]], dim=2).float().repeat_interleave(4, dim=1)
    want = torch.softmax(q[0:1, :, :1] @ kk.transpose(-1, -2) * D**-0.5, dim=-1) @ vv
    assert (out[0:1] - want).abs().max() < 1e-5
