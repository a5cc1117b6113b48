"""References, slot tables, prefill helper and dispatch (pure torch; no Triton needed)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from kernel_cases import make_decode_case, max_err

from oscar_kv.cache.windows import bf16_key_mask, window_counts
from oscar_kv.config import QuantSpec, WindowSpec
from oscar_kv.formats import fake_quant
from oscar_kv.kernels import (
    Int2Store,
    contiguous_token_slots,
    decode_attention,
    decode_attention_ref,
    plan_decode,
    prefill_attention,
    tables_from_token_slots,
    write_bf16,
    write_int2,
)
from oscar_kv.kernels.ref import gather_int2_rows

WIN = WindowSpec(sink_tokens=16, recent_tokens=32, flush_block=8)


def test_import_does_not_load_triton():
    code = "import sys, oscar_kv.kernels; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"


@pytest.mark.parametrize("length", [0, 1, 15, 16, 47, 48, 49, 55, 56, 57, 100])
def test_tables_match_window_semantics(length):
    """Body/BF16 lists are exactly the positions windows.py classifies, each once."""
    t = 100
    tok = contiguous_token_slots(1, t) + 1000  # offset: slot ids != positions
    tab = tables_from_token_slots(tok, tok, torch.tensor([length]), WIN)
    sink, body, recent = window_counts(length, WIN) if length else (0, 0, 0)
    assert tab.body_len.item() == body and tab.hp_len.item() == sink + recent
    body_pos = set((tab.int2_slots[0, :body] - 1000).tolist())
    hp_pos = set((tab.bf16_slots[0, :sink + recent] - 1000).tolist())
    assert len(body_pos) == body and len(hp_pos) == sink + recent
    assert body_pos | hp_pos == set(range(length)) and not body_pos & hp_pos
    if length:
        mask = bf16_key_mask(torch.tensor([length - 1]), torch.arange(length), WIN)[0]
        assert hp_pos == set(torch.nonzero(mask).flatten().tolist())


def test_write_refs_roundtrip_formats():
    spec = QuantSpec(group_size=32)
    x = torch.randn(6, 2, 64).to(torch.bfloat16)
    rot, _ = torch.linalg.qr(torch.randn(64, 64))
    st = Int2Store.empty(10, 2, 64, spec)
    slots = torch.tensor([9, 0, 4, 2, 7, 5])
    write_int2(x, rot, 0.9, spec, slots, st.packed, st.scale, st.zero)
    xr = x.float() @ rot
    assert torch.equal(gather_int2_rows(st, slots), fake_quant(xr, spec, 0.9))
    store = torch.zeros(10, 2, 64, dtype=torch.bfloat16)
    write_bf16(x, rot, slots, store)
    assert torch.equal(store[slots], xr.to(torch.bfloat16))


def _naive_decode(case, sm_scale):
    """Independent oracle: per sequence and head, keys classified by bf16_key_mask."""
    b, hq, d = case.q.shape
    hkv = case.k_bf16.shape[1]
    out = torch.zeros(b, hq, d, dtype=torch.float64)
    t = case.k_bf16.shape[0] // b
    for i in range(b):
        length = int(case.tables.body_len[i] + case.tables.hp_len[i])
        if length == 0:
            continue
        slots = torch.arange(length) + i * t
        hp = bf16_key_mask(torch.tensor([length - 1]), torch.arange(length), WIN)[0]
        kq = gather_int2_rows(case.k_int2, slots).double()
        vq = gather_int2_rows(case.v_int2, slots).double()
        k = torch.where(hp[:, None, None], case.k_bf16[slots].double(), kq)
        v = torch.where(hp[:, None, None], case.v_bf16[slots].double(), vq)
        for h in range(hq):
            kv = h // (hq // hkv)
            p = torch.softmax(k[:, kv] @ case.q[i, h].double() * sm_scale, dim=0)
            out[i, h] = p @ v[:, kv]
    return out


@pytest.mark.parametrize("gqa", [1, 3, 6])
def test_decode_ref_against_naive_oracle(gqa):
    case = make_decode_case([0, 1, 20, 48, 57, 90], num_kv_heads=2, gqa=gqa, head_dim=64,
                            window=WIN, q_dtype=torch.float32)
    sm = 0.7 / math.sqrt(64)
    got = decode_attention_ref(case.q, case.k_int2, case.v_int2, case.k_bf16, case.v_bf16,
                               case.tables, sm, compute_dtype=torch.float64,
                               out_dtype=torch.float64)
    assert max_err(got, _naive_decode(case, sm)) < 1e-12


def test_cpu_dispatch_uses_reference_and_fills_plan():
    case = make_decode_case([30, 70], num_kv_heads=1, gqa=2, head_dim=64, window=WIN)
    plan = plan_decode(2, 2, 1, 64, max_body_len=case.tables.int2_slots.shape[1],
                       max_hp_len=case.tables.bf16_slots.shape[1], device="cpu")
    out = decode_attention(case.q, case.k_int2, case.v_int2, case.k_bf16, case.v_bf16,
                           case.tables, plan=plan)
    assert out.data_ptr() == plan.out.data_ptr()
    ref = decode_attention_ref(case.q, case.k_int2, case.v_int2, case.k_bf16, case.v_bf16,
                               case.tables)
    assert torch.equal(out, ref)


def test_prefill_single_token_equals_decode():
    """A one-token chunk after a cached prefix is a decode step."""
    length = 70
    case = make_decode_case([length], num_kv_heads=2, gqa=2, head_dim=64, window=WIN,
                            q_dtype=torch.float32)
    # cache = positions < length-1; the chunk is the last token, BF16 and unquantized
    pre = tables_from_token_slots(contiguous_token_slots(1, length),
                                  contiguous_token_slots(1, length),
                                  torch.tensor([length]), WIN)
    last = (pre.bf16_slots[0, :pre.hp_len[0]] == length - 1).nonzero().item()
    keep = [i for i in range(int(pre.hp_len[0])) if i != last]
    pre_no_last = type(pre)(pre.int2_slots, pre.body_len, pre.bf16_slots[:, keep].contiguous(),
                            pre.hp_len - 1)
    k_new = case.k_bf16[length - 1:length]
    v_new = case.v_bf16[length - 1:length]
    got = prefill_attention(case.q, k_new, v_new, case.k_int2, case.v_int2, case.k_bf16,
                            case.v_bf16, pre_no_last)
    want = decode_attention_ref(case.q, case.k_int2, case.v_int2, case.k_bf16, case.v_bf16,
                                pre)
    assert max_err(got, want) < 1e-5


def test_prefill_chunk_is_causal_within_chunk():
    case = make_decode_case([40], num_kv_heads=1, gqa=2, head_dim=64, window=WIN,
                            q_dtype=torch.float32)
    q = torch.randn(5, 2, 64)
    k, v = torch.randn(5, 1, 64), torch.randn(5, 1, 64)
    a = prefill_attention(q, k, v, case.k_int2, case.v_int2, case.k_bf16, case.v_bf16,
                          case.tables)
    k2, v2 = k.clone(), v.clone()
    k2[3:], v2[3:] = 100.0, 100.0  # future keys of queries 0..2 must not matter
    b = prefill_attention(q, k2, v2, case.k_int2, case.v_int2, case.k_bf16, case.v_bf16,
                          case.tables)
    assert torch.equal(a[:3], b[:3]) and not torch.equal(a[3:], b[3:])
