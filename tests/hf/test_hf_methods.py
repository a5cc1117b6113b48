"""End to end on the reference model: simulation, generation consistency, generate, errors."""

from __future__ import annotations

import pytest
import torch
from hf_helpers import random_rotation_set
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.qwen3.modeling_qwen3 import eager_attention_forward

from oscar_kv.config import QuantSpec, WindowSpec
from oscar_kv.errors import OscarError
from oscar_kv.hf import METHODS, prepare_model

W = WindowSpec(16, 32, 8)


def _bf16kv_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
    """Plain eager attention on BF16-rounded K/V: the `bf16` method's numerics, no windows."""
    rnd = lambda x: x.to(torch.bfloat16).to(query.dtype)
    return eager_attention_forward(module, query, rnd(key), rnd(value), attention_mask,
                                   scaling=scaling)


AttentionInterface.register("test_bf16kv", _bf16kv_attention)
AttentionMaskInterface.register("test_bf16kv", eager_mask)


@torch.no_grad()
def test_sim_without_window_equals_plain_model(lm_fp32, heldout):
    ids = heldout[:128][None]
    plain = lm_fp32(ids).logits
    lm_fp32.set_attn_implementation("test_bf16kv")
    bf16kv = lm_fp32(ids).logits
    lm_fp32.set_attn_implementation("sdpa")
    bf16_err = (bf16kv - plain).abs().mean()  # what BF16 K/V storage alone costs
    h = prepare_model(lm_fp32, "bf16")
    try:
        sim = h.simulate(ids)
    finally:
        h.restore()
    assert (sim - bf16kv).abs().max() < 1e-4 * plain.abs().max()
    # rotated K/V (absorbed R_V) without quantization: plain logits up to BF16 rounding
    h = prepare_model(lm_fp32, "oscar", rotations=random_rotation_set(6, 128), window=None)
    try:
        sim_rot = h.simulate(ids)
    finally:
        h.restore()
    assert (sim_rot - plain).abs().mean() < 2 * bf16_err
    assert torch.equal(lm_fp32(ids).logits, plain)  # restore is exact
    assert lm_fp32.config._attn_implementation == "sdpa"
    # key centering: softmax ignores a per-head shift of every key, so with all rows in BF16
    # the centered model gives the plain logits up to the same BF16 rounding
    centered = random_rotation_set(6, 128, kv_heads=2)
    h = prepare_model(lm_fp32, "oscar", rotations=centered, window=None)
    try:
        assert h.plans[0].k_mean is not None
        sim_c = h.simulate(ids)
    finally:
        h.restore()
    assert (sim_c - plain).abs().mean() < 3 * bf16_err
    # a wrong head count is refused before anything is changed
    bad = random_rotation_set(6, 128, kv_heads=3)
    with pytest.raises(OscarError, match="key means"):
        prepare_model(lm_fp32, "oscar", rotations=bad)


@pytest.mark.parametrize("method,prefill,centered", [("naive", 1, False), ("oscar", 1, False),
                                                     ("oscar", 40, False), ("oscar", 40, True)])
@torch.no_grad()
def test_generation_matches_simulation(lm_fp64_cut, heldout, method, prefill, centered):
    """Prefill then decode token by token (teacher-forced) with an OscarCache: the logits at
    every position equal the teacher-forced `oscar_sim` forward. A 40-token prefill stays below
    the first flush (P + R + F = 56), so its chunk semantics coincide with decode semantics."""
    t = 200
    ids = heldout[1000:1000 + t][None]
    rs = random_rotation_set(2, 128, clip_k=0.95, clip_v=0.9, kv_heads=2 if centered else None)
    h = prepare_model(lm_fp64_cut, method, rotations=rs, window=W)
    try:
        sim = h.simulate(ids)
        cache = h.new_cache()
        outs = [lm_fp64_cut(input_ids=ids[:, :prefill], past_key_values=cache).logits]
        for i in range(prefill, t):
            outs.append(lm_fp64_cut(input_ids=ids[:, i:i + 1], past_key_values=cache).logits)
        gen = torch.cat(outs, dim=1)
        assert cache.layers[0].store.window_counts() == (16, 152, 32)
    finally:
        h.restore()
    err = (gen - sim).abs().amax(dim=-1)[0]  # per position
    # measured: median ~5e-6, max ~4e-4 (fp32 attention arithmetic); a flush off by one block
    # or a recent window off by 8 tokens gives median > 4e-2, max > 0.7
    assert err.median() < 1e-4, err.median()
    assert err.max() < 5e-3, err.max()


@pytest.mark.parametrize("method", METHODS.names())
@torch.no_grad()
def test_generate_greedy_each_method(lm_fp32, heldout, method):
    ids = heldout[2000:2024][None]
    rs = random_rotation_set(6, 128)
    h = prepare_model(lm_fp32, method, rotations=rs, window=WindowSpec(16, 8, 8))
    try:
        cache = h.new_cache()
        out = lm_fp32.generate(ids, past_key_values=cache, max_new_tokens=20, do_sample=False,
                               min_new_tokens=20)
        assert out.shape == (1, 44)
        assert torch.equal(out[:, :24], ids)
        counts = cache.layers[0].store.window_counts()
        assert counts == ((0, 0, 43) if method == "bf16" else (16, 16, 11))
        batch = torch.cat([ids, heldout[3000:3024][None]])
        out2 = h.generate(batch, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        assert out2.shape == (2, 28)
    finally:
        h.restore()
    assert lm_fp32.config._attn_implementation == "sdpa"
    assert lm_fp32.generate(ids, max_new_tokens=1, do_sample=False).shape == (1, 25)


def test_errors(lm_fp32, heldout):
    with pytest.raises(OscarError, match="bf16, hadamard, naive, oscar"):
        prepare_model(lm_fp32, "int3")
    with pytest.raises(OscarError, match="needs a rotation set"):
        prepare_model(lm_fp32, "oscar")
    with pytest.raises(OscarError, match=r"head_dim 64.*head_dim 128"):
        prepare_model(lm_fp32, "oscar", rotations=random_rotation_set(6, 64))
    with pytest.raises(OscarError, match=r"5 layers.*6 layers"):
        prepare_model(lm_fp32, "oscar", rotations=random_rotation_set(5, 128))
    h = prepare_model(lm_fp32, "naive", window=W)
    try:
        with pytest.raises(OscarError, match="already prepared"):
            prepare_model(lm_fp32, "naive")
        with pytest.raises(OscarError, match="needs an OscarCache"):
            lm_fp32(heldout[:8][None])
        with pytest.raises(OscarError, match="decode backend"):
            h.new_cache(decode_backend="cuda-magic")
    finally:
        h.restore()
    with pytest.raises(OscarError, match="restored"):
        h.new_cache()


def test_llama_family_and_unsupported_family():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = LlamaForCausalLM(cfg).eval().double()
    ids = torch.randint(0, 64, (1, 40))
    h = prepare_model(model, "hadamard", quant=QuantSpec(group_size=16),
                      window=WindowSpec(4, 8, 4))
    with torch.no_grad():
        sim = h.simulate(ids)
        cache = h.new_cache()
        gen = torch.cat([model(input_ids=ids[:, i:i + 1], past_key_values=cache).logits
                         for i in range(40)], dim=1)
    assert (gen - sim).abs().max() < 1e-4
    h.restore()
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(OscarError, match="not supported"):
        prepare_model(gpt2, "naive")
