"""Per-layer clip search: objectives vs a brute-force oracle, argmin choice, edge cases."""

from __future__ import annotations

import json
import math

import pytest
import torch

from oscar_kv.config import QuantSpec, WindowSpec
from oscar_kv.errors import OscarError
from oscar_kv.fit import clip_search
from oscar_kv.fit.clip_search import (
    DEFAULT_GRID,
    pick_ratio,
    search_clip_ratios,
    search_layer_clip,
)
from oscar_kv.formats import fake_quant

WIN = WindowSpec(sink_tokens=4, recent_tokens=8, flush_block=4)


def _orth(d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0].float()


def _oracle(q, k, v, rk, rv, quant, window, ratio):
    """Brute force in fp64: every (sequence, head, query) row on its own, window rule inline."""
    s_n, t, hq, d = q.shape
    g = hq // k.shape[2]
    p_, r_, f_ = window.sink_tokens, window.recent_tokens, window.flush_block
    kl_sum, kl_rows, err2, out2 = 0.0, 0, 0.0, 0.0
    for s in range(s_n):
        qs, ks, vs = q[s].float() @ rk, k[s].float() @ rk, v[s].float() @ rv
        khat, vhat = fake_quant(ks, quant, ratio), fake_quant(vs, quant, ratio)
        for j in range(hq):
            h = j // g
            for i in range(t):
                be = p_ + f_ * (max(i + 1 - p_ - r_, 0) // f_)
                body = [p_ <= tk < be for tk in range(i + 1)]
                if not any(body):
                    continue
                kq = torch.stack([khat[tk, h] if body[tk] else ks[tk, h] for tk in range(i + 1)])
                vq = torch.stack([vhat[tk, h] if body[tk] else vs[tk, h] for tk in range(i + 1)])
                qi = qs[i, j].double()
                pe = torch.softmax(ks[: i + 1, h].double() @ qi / math.sqrt(d), dim=0)
                pq = torch.softmax(kq.double() @ qi / math.sqrt(d), dim=0)
                kl_sum += float((pe * (pe.log() - pq.log())).sum())
                kl_rows += 1
                o = pe @ vs[: i + 1, h].double()
                err2 += float((pe @ vq.double() - o).square().sum())
                out2 += float(o.square().sum())
    return kl_sum / kl_rows, err2 / out2


def test_objectives_match_bruteforce_oracle():
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 30, h, 16, generator=gen).bfloat16() for h in (4, 2, 2))
    rk, rv = _orth(16, 1), _orth(16, 2)
    quant = QuantSpec(group_size=16)
    grid = [0.8, 0.9, 1.0]
    lc = search_layer_clip(q, k, v, rk, rv, quant, WIN, grid)
    for j, r in enumerate(grid):
        kl, rel = _oracle(q, k, v, rk, rv, quant, WIN, r)
        assert lc.k_curve[j] == pytest.approx(kl, rel=1e-3)
        assert lc.v_curve[j] == pytest.approx(rel, rel=1e-3)
    assert lc.int2_rows == 2 * (30 - (4 + 8 + 4 - 1))  # from cache length P + R + F on


def test_chunking_does_not_change_curves(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 50, h, 16, generator=gen) for h in (4, 2, 2))
    eye = torch.eye(16)
    quant = QuantSpec(group_size=16)
    full = search_layer_clip(q, k, v, eye, eye, quant, WIN, k_objective="logit_mse")
    monkeypatch.setattr(clip_search, "BLOCK_ELEMS", 2 * 50 * 3)  # 3 query rows per block
    small = search_layer_clip(q, k, v, eye, eye, quant, WIN, k_objective="logit_mse")
    assert full.k_curve == pytest.approx(small.k_curve, rel=1e-6)
    assert full.v_curve == pytest.approx(small.v_curve, rel=1e-6)


def _laplace(shape, gen):
    u = torch.rand(*shape, generator=gen) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs())


@pytest.mark.parametrize("seed", [0, 1])
def test_clipping_helps_on_gaussian_keys_and_laplace_values(seed):
    """Min/max INT2 puts levels on the row's extremes: on Gaussian and heavier (Laplace) tails
    a clip below the max must win, and the returned ratio must be the curve's argmin."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 96, 4, 32, generator=gen)
    k = torch.randn(2, 96, 2, 32, generator=gen)
    v = _laplace((2, 96, 2, 32), gen)
    eye = torch.eye(32)
    lc = search_layer_clip(q, k, v, eye, eye, QuantSpec(group_size=32), WIN)
    off = DEFAULT_GRID.index(1.0)
    for ratio, curve in ((lc.k_ratio, lc.k_curve), (lc.v_ratio, lc.v_curve)):
        best = curve[DEFAULT_GRID.index(ratio)]
        assert ratio < 1.0 and best < 0.95 * curve[off]
        assert best == min(curve) and ratio == pick_ratio(DEFAULT_GRID, curve)


def test_clipping_only_hurts_on_grid_valued_rows():
    """Rows already on the 4-level min/max grid {-1, 1/3, 5/3, 3} (one 3 per row) are exact
    at r = 1 up to bf16 metadata rounding; every r < 1 clips the 3 and loses it."""
    gen = torch.Generator().manual_seed(3)
    d, t = 128, 40

    def rows(h):
        x = torch.tensor([-1.0, 1 / 3, 5 / 3])[torch.randint(0, 3, (1, t, h, d), generator=gen)]
        x[..., 0], x[..., 1] = 3.0, -1.0
        return x

    q = torch.randn(1, t, 2, d, generator=gen)
    eye = torch.eye(d)
    lc = search_layer_clip(q, rows(1), rows(1), eye, eye, QuantSpec(group_size=d), WIN)
    assert lc.k_ratio == 1.0 and lc.v_ratio == 1.0
    for curve in (lc.k_curve, lc.v_curve):
        assert all(c > 10 * curve[-1] for c in curve[:-1])


def test_no_int2_keys_picks_off():
    q, k, v = torch.randn(1, 12, 2, 16), torch.randn(1, 12, 1, 16), torch.randn(1, 12, 1, 16)
    lc = search_layer_clip(q, k, v, torch.eye(16), torch.eye(16), QuantSpec(group_size=16), WIN)
    assert lc.k_ratio == lc.v_ratio == 1.0 and lc.int2_rows == 0
    assert set(lc.k_curve) == {0.0}


def test_pick_ratio_ties_go_to_less_clipping():
    assert pick_ratio([0.8, 0.9, 1.0], [0.5, 0.2, 0.2]) == 1.0
    assert pick_ratio([0.8, 0.9, 1.0], [0.1, 0.2, 0.2]) == 0.8


def test_default_grid():
    assert DEFAULT_GRID[0] == 0.8 and DEFAULT_GRID[-1] == 1.0 and len(DEFAULT_GRID) == 21
    assert DEFAULT_GRID[5] == 0.85


def test_report_over_layers_and_validation():
    gen = torch.Generator().manual_seed(2)
    hold = {n: {str(i): torch.randn(1, 24, h, 16, generator=gen).bfloat16() for i in range(2)}
            for n, h in (("q", 4), ("k", 2), ("v", 2))}
    rots = torch.stack([torch.eye(16)] * 2)
    rep = search_clip_ratios(hold, rots, rots, QuantSpec(group_size=16), WIN, grid=[0.9, 1.0],
                             k_objective="logit_mse")
    assert len(rep.layers) == 2 and rep.clip_k == [lc.k_ratio for lc in rep.layers]
    d = json.loads(rep.to_json())
    assert d["k_objective"] == "logit_mse" and d["grid"] == [0.9, 1.0]
    assert len(d["layers"][1]["v_curve"]) == 2
    assert "layer" in rep.format() and len(rep.format().splitlines()) == 4
    with pytest.raises(OscarError, match="unknown K clip objective 'nope'; choose one of: "
                                         "attn_kl, attn_kl_peak, logit_mse"):
        search_clip_ratios(hold, rots, rots, k_objective="nope")
    with pytest.raises(OscarError, match="V clip objective"):
        search_clip_ratios(hold, rots, rots, v_objective="attn_kl")
    with pytest.raises(OscarError, match="rotations have head_dim 8"):
        search_clip_ratios(hold, rots[:, :8, :8], rots[:, :8, :8], QuantSpec(group_size=8))
    three = torch.stack([torch.eye(16)] * 3)
    with pytest.raises(OscarError, match="layer 2 is missing"):
        search_clip_ratios(hold, three, three, QuantSpec(group_size=16))
    with pytest.raises(OscarError, match="must both be"):
        search_clip_ratios(hold, three, rots, QuantSpec(group_size=16))
    with pytest.raises(OscarError, match="not divisible by group size 128"):
        search_clip_ratios(hold, rots, rots)
    bad = dict(hold, v={i: torch.full((1, 24, 2, 16), float("nan")) for i in range(2)})
    with pytest.raises(OscarError, match="NaN or Inf"):
        search_clip_ratios(bad, rots, rots, QuantSpec(group_size=16))
    with pytest.raises(OscarError, match="non-empty list of positive ratios"):
        search_clip_ratios(hold, rots, rots, QuantSpec(group_size=16), grid=[])


@pytest.mark.gpu
def test_gpu_matches_cpu():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 300, h, 128, generator=gen).bfloat16() for h in (8, 2, 2))
    rk, rv = _orth(128, 3), _orth(128, 4)
    win = WindowSpec(16, 32, 8)
    a = search_layer_clip(q, k, v, rk, rv, QuantSpec(), win, device="cpu")
    b = search_layer_clip(q, k, v, rk, rv, QuantSpec(), win, device="cuda")
    # fp32 attention on different backends: a few fp32 ulp of relative error in the sums.
    assert a.k_curve == pytest.approx(b.k_curve, rel=1e-5)
    assert a.v_curve == pytest.approx(b.v_curve, rel=1e-5)
    assert (a.k_ratio, a.v_ratio) == (b.k_ratio, b.v_ratio)
