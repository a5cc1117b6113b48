"""Storage cost: bits per element and bytes per token, against the published numbers (spec §3.8)."""

from __future__ import annotations

import pytest

from oscar_kv.config import QuantSpec, WindowSpec
from oscar_kv.errors import OscarError
from oscar_kv.formats import (
    bits_per_element,
    body_bits_per_element,
    kv_bf16_bytes_per_token,
    kv_body_bytes_per_token,
)

BF16 = QuantSpec(scale_dtype="bfloat16")
FP16 = QuantSpec(scale_dtype="float16")
FP32 = QuantSpec(scale_dtype="float32")
W = WindowSpec()  # P = 64, R = 256


def test_defaults_are_the_published_window():
    assert (W.sink_tokens, W.recent_tokens) == (64, 256)
    assert QuantSpec().group_size == 128 and QuantSpec().scale_dtype == "bfloat16"


@pytest.mark.parametrize(
    ("length", "spec", "published", "decimals"),
    [
        (131072, BF16, 2.2836, 4),
        (131072, FP16, 2.2836, 4),
        (32768, BF16, 2.3843, 4),
        (131072, FP32, 2.5330, 4),  # the spec prints 2.533; it is 2.53296... -> 2.5330
        (32768, FP32, 2.632, 3),  # the spec prints 3 decimals (2.63184...)
    ],
)
def test_published_bpe(length, spec, published, decimals):
    assert round(bits_per_element(length, W, spec), decimals) == published
    assert round(bits_per_element(length, spec=spec), decimals) == published  # defaults = W


def test_bpe_exact_rationals():
    # (320 * 16 + 130752 * 2.25) / 131072 = 299312 / 131072, exact in binary floating point
    assert bits_per_element(131072, W, BF16) == 299312 / 131072
    assert bits_per_element(32768, W, BF16) == (5120 + 32448 * 2.25) / 32768


def test_body_bits():
    assert body_bits_per_element(BF16) == 2.25
    assert body_bits_per_element(FP32) == 2.5
    assert body_bits_per_element(QuantSpec(group_size=32)) == 3.0
    assert body_bits_per_element(QuantSpec(group_size=64, scale_dtype="float32")) == 3.0


@pytest.mark.parametrize("length", [1, 2, 63, 64, 65, 255, 319, 320])
def test_short_lengths_are_all_bf16(length):
    assert bits_per_element(length, W, BF16) == 16.0
    assert bits_per_element(length, W, FP32) == 16.0


def test_bpe_just_past_the_windows_and_monotone():
    # L = P + R + 1: one body token
    assert bits_per_element(321, W, BF16) == (320 * 16 + 2.25) / 321
    vals = [bits_per_element(n, W, BF16) for n in (320, 321, 1000, 4096, 32768, 131072, 10**7)]
    assert all(a > b for a, b in zip(vals[:-1], vals[1:], strict=True))
    assert vals[-1] == pytest.approx(2.25, abs=1e-3)  # tends to the body cost
    # no windows at all: the body cost everywhere
    assert bits_per_element(1000, WindowSpec(sink_tokens=0, recent_tokens=0), BF16) == 2.25


def test_nonpositive_length_is_rejected():
    for n in (0, -5):
        with pytest.raises(ValueError):
            bits_per_element(n, W, BF16)


def test_nonpositive_length_raises_oscar_error():
    with pytest.raises(OscarError):
        bits_per_element(0, W, BF16)


@pytest.mark.parametrize(
    ("layers", "bf16", "fp32_meta", "bf16_meta"),
    [
        (36, 147456, 23040, 20736),  # Qwen3-4B / 8B
        (64, 262144, 40960, 36864),  # Qwen3-32B
        (92, 376832, 58880, 52992),  # GLM-4.7
    ],
)
def test_bytes_per_token_table(layers, bf16, fp32_meta, bf16_meta):
    assert kv_bf16_bytes_per_token(layers, 8, 128) == bf16
    assert kv_body_bytes_per_token(layers, 8, 128, FP32) == fp32_meta
    assert kv_body_bytes_per_token(layers, 8, 128, BF16) == bf16_meta
    assert kv_body_bytes_per_token(layers, 8, 128) == bf16_meta  # default metadata is bf16
    assert kv_body_bytes_per_token(layers, 8, 128, FP16) == bf16_meta
    for v in (bf16, fp32_meta, bf16_meta):
        assert isinstance(v, int)


def test_body_bytes_per_token_matches_bits():
    # bytes per token == bits per element * elements / 8, for grouped metadata too
    for spec in (
        BF16,
        FP32,
        QuantSpec(group_size=32),
        QuantSpec(group_size=64, scale_dtype="float32"),
    ):
        elems = 2 * 36 * 8 * 128
        assert kv_body_bytes_per_token(36, 8, 128, spec) * 8 == body_bits_per_element(spec) * elems


def test_body_bytes_rejects_bad_geometry():
    with pytest.raises(OscarError):
        kv_body_bytes_per_token(36, 8, 128, QuantSpec(group_size=96))
