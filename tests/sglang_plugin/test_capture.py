"""capture.py: per-rank pass-1 capture + merge == the HF calibration's two-pass statistics."""

from __future__ import annotations

import pytest
import torch

from oscar_kv.capture.stats import StatsAccumulator, load_stats
from oscar_kv.config import ModelGeometry
from oscar_kv.errors import OscarError
from oscar_kv.sglang_plugin.capture import RankCapture, merge_capture
from oscar_kv.sglang_plugin.numerics import rank_heads

GEO = ModelGeometry(num_layers=2, num_q_heads=8, num_kv_heads=2, head_dim=16)
LENS = [[5, 12], [7, 9, 3]]  # two forwards (server batches) of whole prompts


def data(seed=0):
    """{forward: [(q [T, Hq, D], k, v [T, Hkv, D]) per sequence]} per layer (fp32)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for lens in LENS:
        fw = []
        for t in lens:
            fw.append([(torch.randn(t, 8, 16, generator=g), torch.randn(t, 2, 16, generator=g),
                        torch.randn(t, 2, 16, generator=g)) for _ in range(GEO.num_layers)])
        out.append(fw)
    return out


def reference(d) -> dict:
    acc = StatsAccumulator(GEO, token_source="ref")
    for layer in range(GEO.num_layers):
        for fw in d:
            for seq in fw:
                acc.add_pass1(layer, *seq[layer])
        for fw in d:
            for seq in fw:
                acc.add_pass2(layer, *seq[layer][1:])
    return acc.finalize()


def capture(tmp_path, d, tp: int, skip_piece: bool = True, max_tokens: int = 0):
    caps = []
    for rank in range(tp):
        qh, kvh = rank_heads(GEO, rank, tp)
        caps.append(RankCapture(tmp_path, rank, GEO, qh, kvh, max_tokens=max_tokens))
    junk = torch.randn(4, 8, 16), torch.randn(4, 2, 16), torch.randn(4, 2, 16)
    for fw in d:
        for cap in caps:
            qh, kvh = cap.q_heads, cap.kv_heads
            cap.begin_forward()
            for layer in range(GEO.num_layers):
                parts = [s[layer] for s in fw] + ([junk] if skip_piece else [])
                q = torch.cat([p[0][:, qh] for p in parts]).flatten(1)
                k = torch.cat([p[1][:, kvh] for p in parts]).flatten(1)
                v = torch.cat([p[2][:, kvh] for p in parts]).flatten(1)
                lens = [p[0].shape[0] for p in parts]
                prefix = [0] * len(fw) + ([11] if skip_piece else [])  # a chunked continuation
                cap.record(layer, q, k, v, lens, prefix)
            cap.end_forward()
    for cap in caps:
        cap.finish()
    return caps


def assert_same_stats(got: dict, want: dict) -> None:
    for key in ("num_tokens", "num_sequences", "seq_len"):
        assert got[key] == want[key], key
    assert got["model"]["num_kv_heads"] == want["model"]["num_kv_heads"]
    for layer, w in want["layers"].items():
        g = got["layers"][layer]
        assert set(g) == set(w)
        for name, x in w.items():
            if isinstance(x, torch.Tensor):
                torch.testing.assert_close(g[name], x, rtol=1e-10, atol=1e-9, msg=name)
            else:
                assert g[name] == x, (layer, name)


@pytest.mark.parametrize("tp", [1, 2, 4, 8], ids=lambda t: f"tp{t}")
def test_merged_ranks_equal_single_pass_statistics(tmp_path, tp):
    """tp 1-2: KV heads split; tp 4, 8: KV heads replicated, query groups split over ranks."""
    d = data()
    caps = capture(tmp_path, d, tp)
    assert all(c.skipped == 2 and c.chunk == 2 for c in caps)
    merge_capture(tmp_path)
    assert_same_stats(load_stats(tmp_path), reference(d))


def test_rank_heads_follow_sglang_sharding():
    assert rank_heads(GEO, 1, 2) == ([4, 5, 6, 7], [1])
    assert rank_heads(GEO, 3, 4) == ([6, 7], [1])  # replicas = 2: rank 3 holds kv head 1
    assert rank_heads(ModelGeometry(1, 8, 4, 16), 1, 2) == ([4, 5, 6, 7], [2, 3])
    with pytest.raises(OscarError, match="do not split"):
        rank_heads(GEO, 0, 3)


def test_token_budget_stops_and_saves(tmp_path):
    d = data()
    caps = capture(tmp_path, d, tp=1, max_tokens=10)
    cap = caps[0]
    assert cap.finished and cap.tokens == 17 and cap.chunk == 1  # stopped after forward 1
    merge_capture(tmp_path)
    stats = load_stats(tmp_path)
    assert stats["num_tokens"] == 17 and stats["num_sequences"] == 2


def test_incomplete_captures_fail_clearly(tmp_path):
    with pytest.raises(OscarError, match="no rank"):
        merge_capture(tmp_path)
    d = data()
    qh, kvh = rank_heads(GEO, 0, 2)
    cap = RankCapture(tmp_path, 0, GEO, qh, kvh)
    cap.begin_forward()
    for layer in range(2):
        s = d[0][0][layer]
        cap.record(layer, s[0][:, qh], s[1][:, kvh], s[2][:, kvh], [5], [0])
    cap.end_forward()
    cap.finish()
    with pytest.raises(OscarError, match="all tensor-parallel ranks"):
        merge_capture(tmp_path)  # rank 1 (KV head 1) is missing
    with pytest.raises(OscarError, match="already holds"):
        RankCapture(tmp_path, 0, GEO, qh, kvh)


@pytest.mark.model
def test_equals_hf_calibration_on_the_reference_model(tmp_path, tiny_lm_dir):
    """The same post-RoPE q/k and v of the reference model (HF capture), fed as SGLang's two
    TP ranks would see them, give the stats.pt of `oscar_kv calibrate`."""
    pytest.importorskip("transformers")
    from oscar_kv.capture.calibrate import calibrate, geometry_from_hf_config, load_hf_model
    from oscar_kv.capture.hooks import run_capture

    model = load_hf_model(tiny_lm_dir)
    geo = geometry_from_hf_config(model.config)
    ids = torch.randint(1, 8000, (2, 40), generator=torch.Generator().manual_seed(0))
    calibrate(model, [ids], tmp_path / "hf", progress=False)
    qkv = run_capture(model, ids)
    for rank in range(2):
        qh, kvh = rank_heads(geo, rank, 2)
        cap = RankCapture(tmp_path / "sgl", rank, geo, qh, kvh)
        cap.begin_forward()
        for layer, (q, k, v) in qkv.items():
            flat = lambda x, h: x[:, :, h].reshape(-1, len(h) * geo.head_dim)
            cap.record(layer, flat(q, qh), flat(k, kvh), flat(v, kvh), [40, 40], [0, 0])
        cap.end_forward()
        cap.finish()
    merge_capture(tmp_path / "sgl")
    want, got = load_stats(tmp_path / "hf"), load_stats(tmp_path / "sgl")
    got["token_source"] = want["token_source"]
    assert_same_stats(got, want)
