"""V absorption: folding R_V into v_proj and R_V^T into o_proj leaves the model's function
unchanged (plain attention, no quantization), and restoring is bit-exact."""

from __future__ import annotations

import torch
from hf_helpers import load_lm, random_rotation_set

from oscar_kv.hf import absorb_v_rotation, restore_weights


def _absorb_all(model, rs):
    cfg = model.config
    saved = []
    for i, layer in enumerate(model.model.layers):
        saved.append(absorb_v_rotation(layer.self_attn, rs.v[i], cfg.num_key_value_heads,
                                       cfg.num_attention_heads, cfg.head_dim))
    return saved


def _restore_all(model, saved):
    for layer, s in zip(model.model.layers, saved, strict=True):
        restore_weights(layer.self_attn, s)


@torch.no_grad()
def test_absorb_fp32_unchanged_and_restore_exact(lm_fp32, heldout):
    ids = heldout[:96][None]
    ref = lm_fp32(ids).logits
    saved = _absorb_all(lm_fp32, random_rotation_set(6, 128))
    try:
        out = lm_fp32(ids).logits
    finally:
        _restore_all(lm_fp32, saved)
    # fp32 weights rounded once more after the fp32 rotation: fp32-level error only
    assert (out - ref).abs().max() < 1e-4 * ref.abs().max()
    assert torch.equal(lm_fp32(ids).logits, ref)


@torch.no_grad()
def test_absorb_bf16_within_bf16_error(lm_fp32, tiny_lm_dir, heldout):
    ids = heldout[:64][None]
    model = load_lm(tiny_lm_dir, torch.bfloat16, layers=2)
    ref32 = load_lm(tiny_lm_dir, torch.float32, layers=2)(ids).logits
    ref = model(ids).logits.float()
    bf16_err = (ref - ref32).abs().mean()  # what bf16 weights alone cost
    saved = _absorb_all(model, random_rotation_set(2, 128, seed=1))
    out = model(ids).logits.float()
    _restore_all(model, saved)
    assert torch.equal(model(ids).logits.float(), ref)
    assert (out - ref).abs().mean() < 1.5 * bf16_err
