"""numerics.py: rotations, clips and key means of this rank's layers and KV heads."""

from __future__ import annotations

import pytest
import torch

from oscar_kv.config import ModelGeometry
from oscar_kv.errors import OscarError
from oscar_kv.fit.checkpoint import build_checkpoint
from oscar_kv.sglang_plugin import env as E
from oscar_kv.sglang_plugin.numerics import load_numerics, rank_heads, rotate_keys

GEO = ModelGeometry(num_layers=3, num_q_heads=8, num_kv_heads=4, head_dim=16)


@pytest.fixture
def cfg(tmp_path):
    g = torch.Generator().manual_seed(0)
    r = torch.linalg.qr(torch.randn(3, 16, 16, generator=g, dtype=torch.float64))[0].float()
    mean = torch.randn(3, 4, 16, generator=g)
    torch.save(build_checkpoint(r, torch.ones(3, 16), "qqt_r_h_pbr", [0.9, 0.8, 0.7], k_mean=mean),
               tmp_path / "k.pt")
    torch.save(build_checkpoint(r.flip(-1), torch.ones(3, 16), "sst_r_h_pbr", [0.5] * 3),
               tmp_path / "v.pt")
    env = {E.ENABLE: "1", E.K_ROTATION_PATH: str(tmp_path / "k.pt"),
           E.V_ROTATION_PATH: str(tmp_path / "v.pt")}
    return E.read_plugin_config(env, group_size=16), r, mean


def test_rank_slice_of_layers_and_heads(cfg):
    c, r, mean = cfg
    _, kv = rank_heads(GEO, 1, 2)
    n = load_numerics(c, GEO, 1, 3, "cpu", tuple(kv))
    assert kv == [2, 3] and n.num_layers == 2 and n.start_layer == 1
    assert torch.equal(n.r_k, r[1:]) and n.clip_k == pytest.approx([0.8, 0.7])
    assert torch.equal(n.k_mean, mean[1:, 2:4])
    assert n.local(2) == 1
    with pytest.raises(OscarError, match="not one of this rank's layers"):
        n.local(0)
    assert load_numerics(c, GEO, 1, 3, "cpu", tuple(kv)) is n  # cached per process


def test_rotate_keys_centers_then_rotates(cfg):
    c, r, mean = cfg
    n = load_numerics(c, GEO, 0, 3, "cpu")
    k = torch.randn(5, 4, 16)
    got = rotate_keys(k, n, 2, torch.float32)
    torch.testing.assert_close(got, (k - mean[2]) @ r[2])
    pytest.importorskip("transformers")
    from oscar_kv.hf.plan import LayerPlan
    from oscar_kv.hf.plan import rotate_keys as hf_rotate_keys

    plan = LayerPlan(r[2], 1.0, 1.0, n.spec, None, mean[2])
    hf = hf_rotate_keys(k.permute(1, 0, 2)[None].bfloat16(), plan, torch.bfloat16)
    mine = rotate_keys(k.bfloat16(), n, 2, torch.bfloat16)
    assert torch.equal(hf[0].permute(1, 0, 2), mine)  # bit-identical to the HF key path


def test_key_means_must_match_the_model(cfg):
    c, _, _ = cfg
    with pytest.raises(OscarError, match="KV heads"):
        load_numerics(c, ModelGeometry(3, 8, 2, 16), 0, 3, "cpu")
