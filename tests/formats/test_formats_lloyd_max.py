"""Lloyd-Max quantizers: exact Gaussian centroids and the reference's 1.16-scaled uniform grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from oscar_kv.config import QuantSpec
from oscar_kv.formats import clip_rows, dequantize_int2, fake_quant, quantize_int2

LM = QuantSpec(quantizer="lloyd_max", scale_dtype="float32")
U116 = QuantSpec(quantizer="lloyd_max_uniform116", scale_dtype="float32")
MINMAX = QuantSpec(quantizer="minmax", scale_dtype="float32")
ALL_CODES = torch.tensor([[0, 1, 2, 3] * 32], dtype=torch.uint8)


def _phi(t: float) -> float:
    return math.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)


def _cdf(t: float) -> float:
    return 0.5 * (1 + math.erf(t / math.sqrt(2)))


def gaussian_lloyd_max_4() -> tuple[float, float]:
    """Independent derivation: Lloyd iterations on N(0, 1) with 4 symmetric levels.

    Returns (outer threshold t, (inner level a, outer level b)); the inner threshold is 0.
    """
    a, b = 0.5, 1.5
    for _ in range(500):
        t = 0.5 * (a + b)
        a = (_phi(0.0) - _phi(t)) / (_cdf(t) - 0.5)  # centroid of [0, t]
        b = _phi(t) / (1 - _cdf(t))  # centroid of [t, inf)
    return 0.5 * (a + b), (a, b)


def _gauss(shape, seed, std=1.0, mean=0.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std + mean


def test_exact_constants_are_the_gaussian_lloyd_max_solution():
    t, (a, b) = gaussian_lloyd_max_4()
    assert abs(t - 0.9816) < 1e-4 and abs(a - 0.4528) < 1e-4 and abs(b - 1.5104) < 1e-4
    # what the format actually does: dequant levels of codes 0..3 for mu = 0, sigma = 1
    xh = dequantize_int2(ALL_CODES, torch.ones(1, 1), torch.zeros(1, 1), LM)[0, :4]
    assert xh.tolist() == pytest.approx([-b, -a, a, b], abs=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_lloyd_max_levels_around_mean(dtype):
    spec = QuantSpec(quantizer="lloyd_max", scale_dtype=dtype)
    x = _gauss((16, 128), seed=1, std=1.7, mean=0.3)
    codes, scale, zero = quantize_int2(x, spec)
    assert scale.dtype == zero.dtype == spec.torch_scale_dtype
    # stored scale := sigma (population), zero := mu, rounded to the metadata dtype
    xd = x.double()
    mu = xd.mean(-1, keepdim=True)
    sigma = torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-8)
    unit = {"float32": 2.0**-22, "bfloat16": 2.0**-8, "float16": 2.0**-11}[dtype]
    assert ((scale.double() - sigma).abs() <= unit * sigma).all()
    assert ((zero.double() - mu).abs() <= unit * mu.abs() + 1e-6).all()
    # dequant of each code is mu + sigma * level, with the stored mu/sigma
    xh = dequantize_int2(codes, scale, zero, spec)
    levels = torch.tensor([-1.5104, -0.4528, 0.4528, 1.5104])
    ref = zero.float() + scale.float() * levels[codes.long()]
    assert torch.allclose(xh, ref, rtol=0, atol=1e-6)
    assert set(codes.unique().tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lloyd_max_thresholds_on_stored_stats(dtype):
    """code = [z >= -0.9816] + [z >= 0] + [z >= 0.9816], z from the stored (rounded) mu/sigma."""
    spec = QuantSpec(quantizer="lloyd_max", scale_dtype=dtype)
    x = _gauss((64, 128), seed=2, std=0.8, mean=-0.2)
    codes, scale, zero = quantize_int2(x, spec)
    z = (x.numpy() - zero.float().numpy()) / scale.float().numpy()  # float32, IEEE division
    t = np.float32(0.9816)
    ref = (z >= -t).astype(np.uint8) + (z >= 0) + (z >= t)
    np.testing.assert_array_equal(codes.numpy(), ref)


def test_lloyd_max_thresholds_hand_built_row():
    """A row with known mu = 0, sigma = 1: values just either side of each threshold."""
    # Symmetric entries keep mu = 0; a bulk at +-s fixes sigma = 1 exactly enough.
    probe = torch.tensor([-1.2, -0.98, -0.5, -1e-3, 1e-3, 0.5, 0.98, 1.2])
    fill = 128 - 2 * probe.numel()
    s = math.sqrt((128 - 2 * float((probe**2).sum())) / fill)
    row = torch.cat([probe, -probe, torch.full((fill // 2,), s), torch.full((fill // 2,), -s)])
    codes, scale, zero = quantize_int2(row[None], LM)
    assert abs(zero.item()) < 1e-6 and abs(scale.item() - 1) < 1e-5
    assert codes[0, :8].tolist() == [0, 1, 1, 1, 2, 2, 2, 3]
    assert codes[0, 8:16].tolist() == [3, 2, 2, 2, 1, 1, 1, 0]


@pytest.mark.parametrize("quantizer", ["lloyd_max", "lloyd_max_uniform116"])
def test_clip_applies_before_stats(quantizer):
    spec = QuantSpec(quantizer=quantizer)
    x = _gauss((8, 128), seed=3)
    x[:, 7] = 12.0
    for a, b in zip(
        quantize_int2(x, spec, 0.96), quantize_int2(clip_rows(x, 0.96), spec, 1.0), strict=True
    ):
        assert torch.equal(a, b)


def test_lloyd_max_mse_beats_minmax_on_gaussian():
    """Large Gaussian sample, no clip: LM MSE ~ 0.1175 sigma^2 (the 2-bit Gaussian optimum) vs
    minmax ~ 0.2 sigma^2 for D = 128 groups."""
    x = _gauss((2048, 128), seed=4)
    mse_lm = (fake_quant(x, LM) - x).square().mean().item()
    mse_mm = (fake_quant(x, MINMAX) - x).square().mean().item()
    mse_u = (fake_quant(x, U116) - x).square().mean().item()
    assert mse_lm < mse_mm
    assert mse_lm < mse_u
    assert 0.110 < mse_lm < 0.125  # theory 0.1175 (per-group mu/sigma adds a little)
    assert mse_mm > 1.3 * mse_lm


def test_uniform116_dequant_levels():
    """Stored affine params dequantize to mu + sigma * {-1.7511, -0.5837, 0.5837, 1.7511}."""
    x = _gauss((32, 128), seed=5, std=2.5, mean=0.4)
    codes, scale, zero = quantize_int2(x, U116)
    xd = x.double()
    mu = xd.mean(-1, keepdim=True)
    sigma = torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-8)
    # the scale is (2 * C0 / 3) * 1.16 * sigma ~ 1.167392 sigma
    assert torch.allclose(scale.double(), 1.167392 * sigma, rtol=1e-5, atol=0)
    xh = dequantize_int2(ALL_CODES.expand(32, 128), scale, zero, U116)[:, :4].double()
    expect = mu + sigma * torch.tensor([-1.7511, -0.5837, 0.5837, 1.7511], dtype=torch.float64)
    assert ((xh - expect).abs() <= 1e-3 * sigma).all()
    # the levels are evenly spaced (it is an affine grid)
    steps = xh.diff(dim=-1)
    assert torch.allclose(steps, steps[:, :1].expand_as(steps), rtol=1e-5)


def test_uniform116_codes_use_reference_thresholds():
    x = _gauss((64, 128), seed=6, std=1.3, mean=-0.6)
    codes, _, _ = quantize_int2(x, U116)
    xd = x.double()
    mu = xd.mean(-1, keepdim=True)
    sigma = torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-8)
    z = (xd - mu) / sigma
    t = 0.9810652732849121
    ref = (z >= -t).to(torch.uint8) + (z >= 0).to(torch.uint8) + (z >= t).to(torch.uint8)
    near = ((z.abs() - t).abs() < 1e-5) | (z.abs() < 1e-5)  # fp32 vs fp64 stats may differ
    assert torch.equal(codes[~near], ref[~near])
    assert near.float().mean() < 1e-3


@pytest.mark.parametrize("quantizer", ["lloyd_max", "lloyd_max_uniform116"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_lloyd_constant_and_zero_rows_are_finite(quantizer, dtype):
    spec = QuantSpec(quantizer=quantizer, scale_dtype=dtype)
    for value in (0.0, 3.0, -7.5):
        x = torch.full((2, 128), value)
        xh = fake_quant(x, spec)
        assert torch.isfinite(xh).all()
        # sigma = sqrt(0 + 1e-8) = 1e-4: reconstruction within a couple of sigma + mu rounding
        unit = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}[dtype]
        # uniform116 floors sigma at |mu| * 2**-10 (fp16 overflow guard); a constant row then
        # lands on the level mu + 0.5837 sigma.
        floor = 0.6 * 2.0**-10 * abs(value) if quantizer == "lloyd_max_uniform116" else 0.0
        assert ((xh - x).abs() <= 4e-4 + 4 * unit * abs(value) + floor).all()


@pytest.mark.parametrize("row", ["const10", "offset100"])
def test_uniform116_fp16_metadata_large_mean_small_sigma_is_finite(row):
    spec = QuantSpec(quantizer="lloyd_max_uniform116", scale_dtype="float16")
    if row == "const10":
        x = torch.full((2, 128), 10.0)
    else:
        x = 100 + _gauss((2, 128), seed=7) * 1e-3
    codes, scale, zero = quantize_int2(x, spec)
    xh = dequantize_int2(codes, scale, zero, spec)
    assert torch.isfinite(zero.float()).all()
    assert torch.isfinite(xh).all()
    assert ((xh - x).abs() <= 4 * 2.0**-11 * x.abs()).all()
