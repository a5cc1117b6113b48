"""INT2 packing: the quartered bit layout, byte by byte, against a slow Python oracle."""

from __future__ import annotations

import pytest
import torch

from oscar_kv.errors import OscarError
from oscar_kv.formats import pack_int2, unpack_int2

HEAD_DIMS = [4, 64, 128, 256]


def pack_slow(row: list[int]) -> list[int]:
    """Independent oracle: byte j = dims j, j+D/4, j+D/2, j+3D/4 in bits 1:0, 3:2, 5:4, 7:6."""
    d = len(row)
    q = d // 4
    out = []
    for j in range(q):
        b = 0
        for k in range(4):  # k-th quarter goes to bits 2k+1:2k
            b += row[j + k * q] * (4**k)
        out.append(b)
    return out


def unpack_slow(packed: list[int]) -> list[int]:
    q = len(packed)
    row = [0] * (4 * q)
    for j, b in enumerate(packed):
        for k in range(4):
            row[j + k * q] = (b >> (2 * k)) & 3
    return row


def _random_codes(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, shape, generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_pack_matches_slow_oracle_byte_by_byte(d):
    codes = _random_codes((5, d), seed=d)
    packed = pack_int2(codes)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, d // 4)
    for r in range(codes.shape[0]):
        assert packed[r].tolist() == pack_slow(codes[r].tolist())


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_unpack_matches_slow_oracle(d):
    g = torch.Generator().manual_seed(100 + d)
    packed = torch.randint(0, 256, (5, d // 4), generator=g, dtype=torch.uint8)
    codes = unpack_int2(packed)
    assert codes.dtype == torch.uint8
    assert codes.shape == (5, d)
    for r in range(packed.shape[0]):
        assert codes[r].tolist() == unpack_slow(packed[r].tolist())


def test_single_code_lands_in_the_documented_bits():
    """One nonzero code at a time: exactly one byte, exactly the documented bit pair."""
    d = 128
    q = d // 4
    for dim in range(d):
        for val in (1, 2, 3):
            codes = torch.zeros(d, dtype=torch.uint8)
            codes[dim] = val
            packed = pack_int2(codes)
            j, k = dim % q, dim // q
            expected = torch.zeros(q, dtype=torch.uint8)
            expected[j] = val << (2 * k)
            assert torch.equal(packed, expected), (dim, val)


def test_known_bytes_d4():
    # D = 4: a single byte; dims 0..3 in bits 1:0, 3:2, 5:4, 7:6.
    assert pack_int2(torch.tensor([1, 2, 3, 0], dtype=torch.uint8)).tolist() == [
        1 | (2 << 2) | (3 << 4)
    ]
    assert pack_int2(torch.tensor([0, 0, 0, 3], dtype=torch.uint8)).tolist() == [0b11000000]
    assert pack_int2(torch.tensor([3, 0, 0, 0], dtype=torch.uint8)).tolist() == [0b00000011]
    # D = 8: byte 0 = dims 0, 2, 4, 6; byte 1 = dims 1, 3, 5, 7 (quartered, not adjacent).
    codes = torch.tensor([1, 0, 2, 0, 3, 0, 1, 0], dtype=torch.uint8)
    assert pack_int2(codes).tolist() == [1 | (2 << 2) | (3 << 4) | (1 << 6), 0]


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_round_trip_random_bit_exact(d):
    codes = _random_codes((3, 7, d), seed=7 * d)
    packed = pack_int2(codes)
    assert packed.shape == (3, 7, d // 4)
    assert torch.equal(unpack_int2(packed), codes)
    # and the other direction: every byte pattern survives unpack -> pack
    all_bytes = torch.arange(256, dtype=torch.uint8).repeat(d // 4, 1).T.contiguous()
    assert torch.equal(pack_int2(unpack_int2(all_bytes)), all_bytes)


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_all_zero_and_all_three(d):
    zeros = torch.zeros(2, d, dtype=torch.uint8)
    threes = torch.full((2, d), 3, dtype=torch.uint8)
    assert torch.equal(pack_int2(zeros), torch.zeros(2, d // 4, dtype=torch.uint8))
    assert torch.equal(pack_int2(threes), torch.full((2, d // 4), 255, dtype=torch.uint8))
    assert torch.equal(unpack_int2(pack_int2(zeros)), zeros)
    assert torch.equal(unpack_int2(pack_int2(threes)), threes)


def test_pack_accepts_wider_integer_codes_and_noncontiguous_rows():
    codes = _random_codes((4, 128), seed=3)
    assert torch.equal(pack_int2(codes.long()), pack_int2(codes))
    wide = _random_codes((128, 4), seed=4).T  # non-contiguous [4, 128] view
    assert not wide.is_contiguous()
    assert torch.equal(pack_int2(wide), pack_int2(wide.contiguous()))
    assert torch.equal(unpack_int2(pack_int2(wide)), wide)


@pytest.mark.parametrize("d", [1, 2, 3, 5, 6, 7, 126, 130])
def test_head_dim_not_multiple_of_4_raises(d):
    with pytest.raises(OscarError, match="multiple of 4"):
        pack_int2(torch.zeros(2, d, dtype=torch.uint8))
