"""Streaming statistics vs. the formulas evaluated directly on the raw tensors (fp64)."""

from __future__ import annotations

import math

import pytest
import torch

from oscar_kv.capture.stats import (
    HoldoutCollector,
    StatsAccumulator,
    load_holdout,
    load_stats,
    save_stats,
)
from oscar_kv.config import ModelGeometry
from oscar_kv.errors import OscarError


def random_sequences(geo: ModelGeometry, lengths: list[int], seed: int = 0) -> list[dict]:
    """Per layer and sequence: q [T, Hq, D], k/v [T, Hkv, D] random fp32 with some scale."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in lengths:
        seq = {}
        for layer in range(geo.num_layers):
            q = torch.randn(t, geo.num_q_heads, geo.head_dim, generator=gen) * 2.0
            k = torch.randn(t, geo.num_kv_heads, geo.head_dim, generator=gen) * 1.5 + 0.3
            v = torch.randn(t, geo.num_kv_heads, geo.head_dim, generator=gen)
            seq[layer] = (q, k, v)
        out.append(seq)
    return out


def reference_stats(geo: ModelGeometry, seqs: list[dict], layer: int) -> dict:
    """Direct, loop-based evaluation of every statistic for one layer."""
    g, hkv, d = geo.gqa_ratio, geo.num_kv_heads, geo.head_dim
    qs = [s[layer][0].double() for s in seqs]
    ks = [s[layer][1].double() for s in seqs]
    vs = [s[layer][2].double() for s in seqs]
    q_all, k_all, v_all = torch.cat(qs), torch.cat(ks), torch.cat(vs)
    n = q_all.shape[0]
    ref = {name: torch.zeros(hkv, d, d, dtype=torch.float64) for name in
           ("qq", "kk", "vv", "wvv", "svv")}
    ref["w_sum"] = torch.zeros(hkv, dtype=torch.float64)
    ref["s_sum"] = torch.zeros(hkv, dtype=torch.float64)
    ref["k_sum"] = torch.zeros(hkv, d, dtype=torch.float64)
    for h in range(hkv):
        q_h = torch.cat([q_all[:, j] for j in range(h * g, (h + 1) * g)])  # [N g, D]
        ref["qq"][h] = q_h.T @ q_h
        ref["kk"][h] = k_all[:, h].T @ k_all[:, h]
        ref["k_sum"][h] = k_all[:, h].sum(dim=0)
        ref["vv"][h] = v_all[:, h].T @ v_all[:, h]
        c_h = q_h.T @ q_h / (n * g)
        w = torch.stack([k_all[t, h] @ c_h @ k_all[t, h] for t in range(n)])
        ref["w_sum"][h] = w.sum()
        ref["wvv"][h] = sum(w[t] * torch.outer(v_all[t, h], v_all[t, h]) for t in range(n))
        for q, k, v in zip(qs, ks, vs, strict=True):
            t_len = q.shape[0]
            s = torch.zeros(t_len, dtype=torch.float64)
            for j in range(h * g, (h + 1) * g):
                logits = q[:, j] @ k[:, h].T / math.sqrt(d)
                mask = torch.triu(torch.ones(t_len, t_len, dtype=torch.bool), diagonal=1)
                probs = torch.softmax(logits.masked_fill(mask, -math.inf), dim=-1)
                s += (probs**2).sum(dim=0) / g
            ref["s_sum"][h] += s.sum()
            ref["svv"][h] += (v[:, h] * s[:, None]).T @ v[:, h]
    return ref


def run_accumulator(geo: ModelGeometry, seqs: list[dict]) -> dict:
    acc = StatsAccumulator(geo, token_source="random")
    for seq in seqs:
        for layer, (q, k, v) in seq.items():
            acc.add_pass1(layer, q, k, v)
    for seq in seqs:
        for layer, (_, k, v) in seq.items():
            acc.add_pass2(layer, k, v)
    return acc.finalize()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(8, 2), (2, 2)])
def test_streaming_stats_match_formulas(num_q_heads: int, num_kv_heads: int) -> None:
    geo = ModelGeometry(num_layers=2, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                        head_dim=16, model_type="test")
    lengths = [1, 7, 23, 40]
    seqs = random_sequences(geo, lengths)
    stats = run_accumulator(geo, seqs)
    assert stats["format"] == "oscar-kv-stats" and stats["version"] == 1
    assert stats["num_tokens"] == sum(lengths) and stats["num_sequences"] == len(lengths)
    assert stats["seq_len"] == max(lengths) and stats["token_source"] == "random"
    assert stats["model"]["num_q_heads"] == num_q_heads
    for layer in range(geo.num_layers):
        got, ref = stats["layers"][layer], reference_stats(geo, seqs, layer)
        assert got["n"] == sum(lengths) and got["n_q"] == sum(lengths) * geo.gqa_ratio
        for name, want in ref.items():
            assert got[name].dtype == torch.float64
            assert rel_err(got[name], want) < 1e-10, name


def test_softmax_weights_sum_to_row_energy() -> None:
    # sum_t s_t equals mean over heads of sum_i ||S[i]||^2; the first token alone gives 1.
    geo = ModelGeometry(num_layers=1, num_q_heads=4, num_kv_heads=1, head_dim=8)
    seqs = random_sequences(geo, [1])
    stats = run_accumulator(geo, seqs)
    assert abs(float(stats["layers"][0]["s_sum"][0]) - 1.0) < 1e-12


def test_nan_input_raises_naming_layer() -> None:
    geo = ModelGeometry(num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=8)
    acc = StatsAccumulator(geo)
    q, k, v = torch.randn(5, 4, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    k[2, 1, 3] = float("nan")
    with pytest.raises(OscarError, match="layer 2"):
        acc.add_pass1(2, q, k, v)
    v[0, 0, 0] = float("inf")
    acc.add_pass1(1, q, torch.randn(5, 2, 8), torch.randn(5, 2, 8))
    with pytest.raises(OscarError, match="layer 1"):
        acc.add_pass2(1, torch.randn(5, 2, 8), v)


def test_shape_and_order_errors() -> None:
    geo = ModelGeometry(num_layers=1, num_q_heads=4, num_kv_heads=2, head_dim=8)
    acc = StatsAccumulator(geo)
    with pytest.raises(OscarError, match="expected"):
        acc.add_pass1(0, torch.randn(5, 2, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8))
    with pytest.raises(OscarError, match="pass 1"):
        acc.add_pass2(0, torch.randn(5, 2, 8), torch.randn(5, 2, 8))
    acc.add_pass1(0, torch.randn(5, 4, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8))
    with pytest.raises(OscarError, match="pass 2"):
        acc.finalize()
    acc.add_pass2(0, torch.randn(5, 2, 8), torch.randn(5, 2, 8))
    with pytest.raises(OscarError, match="pass 1"):
        acc.add_pass1(0, torch.randn(5, 4, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8))


def test_save_load_round_trip(tmp_path) -> None:
    geo = ModelGeometry(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=8)
    seqs = random_sequences(geo, [6, 6])
    stats = run_accumulator(geo, seqs)
    hold = HoldoutCollector()
    for layer, (q, k, v) in seqs[0].items():
        hold.add(layer, q, k, v)
    out = save_stats(tmp_path / "stats", stats, hold.to_dict())
    loaded = load_stats(out)
    assert loaded.keys() == stats.keys()
    for layer in range(2):
        for name, x in stats["layers"][layer].items():
            y = loaded["layers"][layer][name]
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    held = load_holdout(out)
    assert held["q"][1].shape == (1, 6, 4, 8) and held["q"][1].dtype == torch.bfloat16
    # saving again into the existing directory replaces the files and keeps others
    (out / "keep.txt").write_text("x")
    save_stats(out, stats)
    assert (out / "keep.txt").exists() and load_stats(out)["num_tokens"] == 12
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".stats.tmp")]


def test_load_missing_stats_names_the_command(tmp_path) -> None:
    with pytest.raises(OscarError, match="oscar_kv calibrate"):
        load_stats(tmp_path)
    with pytest.raises(OscarError, match="holdout"):
        load_holdout(tmp_path)


def test_stats_module_does_not_import_transformers() -> None:
    import subprocess
    import sys

    code = ("import sys, oscar_kv.capture.stats, oscar_kv.capture.rawdump; "
            "assert 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("block_elems", [1, 8 * 40 * 3])
def test_softmax_weights_independent_of_query_blocking(monkeypatch, block_elems: int) -> None:
    import oscar_kv.capture.stats as stats_mod

    geo = ModelGeometry(num_layers=1, num_q_heads=8, num_kv_heads=2, head_dim=16)
    seqs = random_sequences(geo, [40, 13], seed=3)
    whole = run_accumulator(geo, seqs)["layers"][0]
    monkeypatch.setattr(stats_mod, "_SCORE_BLOCK_ELEMS", block_elems)
    blocked = run_accumulator(geo, seqs)["layers"][0]
    for name in ("svv", "s_sum"):
        assert rel_err(blocked[name], whole[name]) < 1e-12
