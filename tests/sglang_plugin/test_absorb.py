"""absorb.py: R_V folded into a fused qkv_proj V slice and o_proj == the HF path's math."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")  # oscar_kv.hf (the shared math's package) imports it

from oscar_kv.errors import OscarError  # noqa: E402
from oscar_kv.hf.absorb import absorb_v_rotation as hf_absorb  # noqa: E402
from oscar_kv.sglang_plugin.absorb import absorb_model, absorb_v_rotation  # noqa: E402
from oscar_kv.sglang_plugin.numerics import PoolNumerics  # noqa: E402
from oscar_kv.sglang_plugin.pool import ABSORBED_ATTR  # noqa: E402

HIDDEN, D = 48, 16


def fused(hq: int, hkv: int, layer: int = 0, dtype=torch.float32, bias=True):
    m = nn.Module()
    m.qkv_proj = nn.Linear(HIDDEN, (hq + 2 * hkv) * D, bias=bias).to(dtype)
    m.o_proj = nn.Linear(hq * D, HIDDEN, bias=False).to(dtype)
    m.attn = SimpleNamespace(layer_id=layer, tp_q_head_num=hq, tp_k_head_num=hkv, head_dim=D)
    return m


def split_like(m, hq: int, hkv: int):
    """The HF layout of the same weights: separate q/k/v projections."""
    h = nn.Module()
    w, b = m.qkv_proj.weight.detach(), m.qkv_proj.bias
    h.v_proj = nn.Linear(HIDDEN, hkv * D, bias=b is not None).to(w.dtype)
    h.o_proj = nn.Linear(hq * D, HIDDEN, bias=False).to(w.dtype)
    v = slice((hq + hkv) * D, (hq + 2 * hkv) * D)
    with torch.no_grad():
        h.v_proj.weight.copy_(w[v])
        if b is not None:
            h.v_proj.bias.copy_(b.detach()[v])
        h.o_proj.weight.copy_(m.o_proj.weight)
    return h


def rotation(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0].float()


@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 1), (2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_slice_equals_hf_absorption(hq, hkv, dtype):
    """Bit-identical to oscar_kv.hf.absorb on separate projections; q/k rows untouched.
    (hq, hkv) = (4, 1) is a TP rank holding one replicated KV head of a GQA group."""
    m, r = fused(hq, hkv, dtype=dtype), rotation()
    h = split_like(m, hq, hkv)
    qk_before = m.qkv_proj.weight[:(hq + hkv) * D].clone()
    absorb_v_rotation(m, r)
    hf_absorb(h, r, hkv, hq, D)
    v = slice((hq + hkv) * D, (hq + 2 * hkv) * D)
    assert torch.equal(m.qkv_proj.weight[v], h.v_proj.weight)
    assert torch.equal(m.qkv_proj.bias[v], h.v_proj.bias)
    assert torch.equal(m.o_proj.weight, h.o_proj.weight)
    assert torch.equal(m.qkv_proj.weight[:(hq + hkv) * D], qk_before)
    assert getattr(m.attn, ABSORBED_ATTR) is True


def test_absorbed_v_and_output_are_rotated_and_restored():
    """v_proj emits v R; o_proj of (o R) equals o_proj of o before absorption."""
    hq, hkv = 4, 2
    m, r = fused(hq, hkv, bias=True), rotation(3)
    x = torch.randn(5, HIDDEN)
    v_rows = slice((hq + hkv) * D, (hq + 2 * hkv) * D)
    v0 = m.qkv_proj(x)[:, v_rows].reshape(5, hkv, D)
    o = torch.randn(5, hq, D)
    y0 = m.o_proj(o.reshape(5, -1))
    absorb_v_rotation(m, r)
    v1 = m.qkv_proj(x)[:, v_rows].reshape(5, hkv, D)
    torch.testing.assert_close(v1, v0 @ r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.o_proj((o @ r).reshape(5, -1)), y0, atol=1e-5, rtol=1e-5)


def test_model_walk_and_refusals():
    model = nn.Module()
    model.layers = nn.ModuleList([fused(4, 2, layer=i) for i in range(3)])
    rs = torch.stack([rotation(i) for i in range(3)])
    num = PoolNumerics(None, None, rs, rs, [1.0] * 3, [1.0] * 3)
    assert absorb_model(model, num) == 3
    with pytest.raises(OscarError, match="already absorbed"):
        absorb_model(model, num)
    with pytest.raises(OscarError, match="no attention module"):
        absorb_model(nn.Linear(2, 2), num)
    q = fused(4, 2)
    q.qkv_proj.quant_method = type("Fp8LinearMethod", (), {})()
    with pytest.raises(OscarError, match="SGLANG_OSCAR_ABSORB_V_ROTATION=0"):
        absorb_v_rotation(q, rotation())
    wrong = fused(4, 2)
    wrong.attn.tp_k_head_num = 1
    with pytest.raises(OscarError, match="do not match"):
        absorb_v_rotation(wrong, rotation())


def test_load_model_hook_absorbs_only_when_asked(tmp_path, monkeypatch):
    """hooks.load_model_after: int2 + SGLANG_OSCAR_ABSORB_V_ROTATION=1 -> every layer absorbed
    with the checkpoint's R_V; otherwise the weights are untouched."""
    from oscar_kv.fit.checkpoint import build_checkpoint
    from oscar_kv.sglang_plugin import env as E
    from oscar_kv.sglang_plugin import hooks as H

    rs = torch.stack([rotation(i) for i in range(2)])
    for t in ("k", "v"):
        torch.save(build_checkpoint(rs, torch.ones(2, D), "qqt_r_h_pbr"), tmp_path / f"{t}.pt")
    for k in E.FLAGS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv(E.ENABLE, "1")
    monkeypatch.setenv(E.K_ROTATION_PATH, str(tmp_path / "k.pt"))
    monkeypatch.setenv(E.V_ROTATION_PATH, str(tmp_path / "v.pt"))

    def runner(kv_dtype):
        model = nn.Module()
        model.layers = nn.ModuleList([fused(4, 2, layer=i) for i in range(2)])
        mc = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, head_dim=D,
                             get_total_num_kv_heads=lambda: 2, hf_config=None)
        return SimpleNamespace(server_args=SimpleNamespace(kv_cache_dtype=kv_dtype),
                               is_draft_worker=False, model=model, model_config=mc,
                               device="cpu")

    for dtype, absorb in (("auto", "1"), ("int2", "0")):
        monkeypatch.setenv(E.ABSORB_V_ROTATION, absorb)
        r = runner(dtype)
        before = r.model.layers[0].o_proj.weight.clone()
        H.load_model_after(None, r)
        assert torch.equal(r.model.layers[0].o_proj.weight, before)
    monkeypatch.setenv(E.ABSORB_V_ROTATION, "1")
    r = runner("int2")
    ref = [split_like(m, 4, 2) for m in r.model.layers]
    H.load_model_after(None, r)
    for i, (m, h) in enumerate(zip(r.model.layers, ref, strict=True)):
        hf_absorb(h, rs[i], 2, 4, D)
        assert torch.equal(m.o_proj.weight, h.o_proj.weight)
        assert getattr(m.attn, ABSORBED_ATTR) is True
