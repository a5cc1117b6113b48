"""The capture hook sees post-q/k-norm, post-RoPE q/k and raw v on the reference model."""

from __future__ import annotations

import types

import pytest
import torch

from oscar_kv.capture.calibrate import geometry_from_hf_config, load_hf_model
from oscar_kv.capture.hooks import capture_qkv, run_capture
from oscar_kv.errors import OscarError

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def tiny_model(tiny_lm_dir):
    return load_hf_model(tiny_lm_dir, dtype="float32")


def test_geometry_from_config(tiny_model) -> None:
    geo = geometry_from_hf_config(tiny_model.config)
    assert (geo.num_layers, geo.num_q_heads, geo.num_kv_heads, geo.head_dim) == (6, 8, 2, 128)
    assert geo.model_type == "qwen3"


@pytest.mark.parametrize("layer", [0, 3])
def test_captured_qk_equal_manual_recompute(tiny_model, layer: int) -> None:
    attn = tiny_model.model.layers[layer].self_attn
    seen = {}

    def pre_hook(module, args, kwargs):
        seen["hidden"] = kwargs.get("hidden_states", args[0] if args else None)

    handle = attn.register_forward_pre_hook(pre_hook, with_kwargs=True)
    t_len = 37
    ids = torch.randint(1, 8000, (2, t_len), generator=torch.Generator().manual_seed(layer))
    try:
        got = run_capture(tiny_model, ids)
    finally:
        handle.remove()
    assert sorted(got) == list(range(6))
    q, k, v = got[layer]
    assert q.shape == (2, t_len, 8, 128) and k.shape == (2, t_len, 2, 128) and v.shape == k.shape

    # q_proj -> q_norm -> RoPE written out by hand: dims (i, i + D/2) rotate by pos * theta^(-2i/D).
    theta = tiny_model.config.rope_parameters["rope_theta"]
    inv = 1.0 / (theta ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    ang = torch.arange(t_len, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = ang.cos(), ang.sin()

    def rope(x):  # x [B, T, H, D]
        x1, x2 = x[..., :64], x[..., 64:]
        c, s = cos[None, :, None], sin[None, :, None]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

    with torch.no_grad():
        h = seen["hidden"]
        shape = (*h.shape[:-1], -1, 128)
        q_ref = rope(attn.q_norm(attn.q_proj(h).view(shape)))
        k_ref = rope(attn.k_norm(attn.k_proj(h).view(shape)))
        v_ref = attn.v_proj(h).view(shape)
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, v_ref, rtol=0, atol=0)


def test_capture_leaves_outputs_and_attention_impl_unchanged(tiny_model) -> None:
    ids = torch.randint(1, 8000, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = tiny_model(ids).logits
    impl = tiny_model.config._attn_implementation
    calls = []
    with capture_qkv(tiny_model):
        with torch.no_grad():
            during = tiny_model(ids, oscar_kv_recorder=lambda layer, *a: calls.append(layer)).logits
    assert tiny_model.config._attn_implementation == impl
    assert calls == list(range(6))
    torch.testing.assert_close(during, before, rtol=1e-5, atol=1e-5)


def test_unsupported_model_type_raises() -> None:
    fake = types.SimpleNamespace(config=types.SimpleNamespace(model_type="gpt2"))
    with pytest.raises(OscarError, match="qwen3"):
        run_capture(fake, torch.zeros(1, 4, dtype=torch.long))


def test_missing_model_path_raises(tmp_path) -> None:
    with pytest.raises(OscarError, match="config.json"):
        load_hf_model(tmp_path / "missing")
