"""Clipping: tau = the floor(r*D)-th smallest |x| (0-based) of the whole row, exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from oscar_kv.config import QuantSpec
from oscar_kv.formats import clip_index, clip_rows, clip_threshold, quantize_int2


def tau_by_sort(row: np.ndarray, ratio: float) -> float:
    """Independent oracle: full sort of |x|, index floor(r*D) clamped to [0, D-1]."""
    d = row.shape[-1]
    idx = min(max(math.floor(ratio * d), 0), d - 1)
    return float(np.sort(np.abs(row))[idx])


def _distinct_row(d: int, seed: int) -> torch.Tensor:
    """Distinct magnitudes with random signs, in random order."""
    g = torch.Generator().manual_seed(seed)
    mags = torch.linspace(0.1, 5.0, d)[torch.randperm(d, generator=g)]
    signs = torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0)
    return mags * signs


@pytest.mark.parametrize("ratio", [0.01, 0.25, 0.5, 0.9, 0.92, 0.96, 0.99, 0.999])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_tau_is_order_statistic(ratio, d):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(6, 3, d, generator=g)
    tau = clip_threshold(x, ratio)
    assert tau.shape == (6, 3, 1)
    assert tau.dtype == x.dtype
    xn = x.numpy()
    for i in range(6):
        for h in range(3):
            assert tau[i, h, 0].item() == tau_by_sort(xn[i, h], ratio)


def test_clip_index_values():
    assert clip_index(0.96, 128) == 122
    assert clip_index(0.92, 128) == 117
    assert clip_index(0.5, 128) == 64
    assert clip_index(1e-9, 128) == 0
    assert clip_index(0.9999999, 128) == 127
    for r in (1.0, 1.5, 0.0, -0.3, None):
        assert clip_index(r, 128) is None


@pytest.mark.parametrize("ratio", [1.0, 1.01, 2.0, 0.0, -0.5, -1.0])
def test_disabled_ratios_leave_rows_unchanged(ratio):
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(1)) * 10
    tau = clip_threshold(x, ratio)
    assert torch.isinf(tau).all() and (tau > 0).all()
    assert torch.equal(clip_rows(x, ratio), x)
    spec = QuantSpec()
    for a, b in zip(quantize_int2(x, spec, ratio), quantize_int2(x, spec, 1.0), strict=True):
        assert torch.equal(a, b)


def test_k_096_clamps_exactly_five_largest():
    d = 128
    for seed in range(5):
        x = _distinct_row(d, seed)
        y = clip_rows(x, 0.96)
        changed = (y != x).nonzero().flatten()
        top5 = x.abs().topk(5).indices
        assert sorted(changed.tolist()) == sorted(top5.tolist())
        tau = torch.sort(x.abs()).values[122]
        assert torch.equal(y[changed].abs(), tau.expand(5))
        assert torch.equal(y[changed].sign(), x[changed].sign())
        assert y.abs().max() == tau


def test_v_092_clamps_exactly_ten_largest():
    d = 128
    x = _distinct_row(d, 11)
    y = clip_rows(x, 0.92)
    changed = (y != x).nonzero().flatten()
    assert sorted(changed.tolist()) == sorted(x.abs().topk(10).indices.tolist())
    tau = torch.sort(x.abs()).values[117]
    assert torch.equal(y[changed], tau * x[changed].sign())


def test_tied_magnitudes_at_clip_index_mixed_signs():
    """Many |x| equal the order statistic (both signs): same tau, ties stay, larger clamp."""
    d = 128
    g = torch.Generator().manual_seed(5)
    small = torch.rand(100, generator=g) * 1.0  # < 1.5
    tied = torch.tensor([1.5, -1.5] * 12)  # 24 tied magnitudes covering indices 100..123
    big = torch.tensor([3.0, -4.0, 5.0, -6.0])  # indices 124..127
    x = torch.cat([small, tied, big])[torch.randperm(d, generator=g)]
    for ratio in (100 / 128, 0.9, 0.96, 123.5 / 128):
        assert 100 <= clip_index(ratio, d) <= 123
        tau = clip_threshold(x, ratio)
        assert tau.item() == 1.5
        assert tau.item() == tau_by_sort(x.numpy(), ratio)
        y = clip_rows(x, ratio)
        assert y.abs().max().item() == 1.5
        untouched = x.abs() <= 1.5
        assert torch.equal(y[untouched], x[untouched])  # ties (both signs) unchanged
        assert torch.equal(y[~untouched], 1.5 * x[~untouched].sign())
        assert int((y != x).sum()) == 4


def test_all_tied_row_is_unchanged():
    x = torch.tensor([2.0, -2.0] * 64)
    assert clip_threshold(x, 0.96).item() == 2.0
    assert torch.equal(clip_rows(x, 0.96), x)


def test_tau_over_whole_row_even_with_small_groups():
    """Clipping uses one tau per row, then groups; quantize(x, clip) == quantize(clip_rows(x))."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(8, 128, generator=g)
    x[:, 3] *= 20  # outlier in group 0 only
    for gs in (32, 64, 128):
        spec = QuantSpec(group_size=gs)
        clipped = clip_rows(x, 0.96)
        got = quantize_int2(x, spec, 0.96)
        ref = quantize_int2(clipped, spec, 1.0)
        for a, b in zip(got, ref, strict=True):
            assert torch.equal(a, b)
    # per-row tau is not a per-group statistic: groups without the outlier also see it
    tau = clip_threshold(x, 0.96)
    per_group = clip_threshold(x[:, 32:64], 0.96)
    assert not torch.equal(tau, per_group)


def test_clip_preserves_dtype_and_batch_shape():
    x = torch.randn(2, 3, 4, 128, generator=torch.Generator().manual_seed(2)).bfloat16()
    y = clip_rows(x, 0.96)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    tau = clip_threshold(x, 0.96)
    assert tau.dtype == torch.bfloat16 and tau.shape == (2, 3, 4, 1)
    ref = torch.sort(x.float().abs(), dim=-1).values[..., 122:123]
    assert torch.equal(tau.float(), ref)
