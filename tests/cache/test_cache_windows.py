"""Window bookkeeping: exact integer boundaries of sink / INT2 body / recent."""

from __future__ import annotations

import pytest
import torch

from oscar_kv.cache import bf16_key_mask, body_end, body_end_tensor, window_counts
from oscar_kv.config import WindowSpec

P, R, F = 16, 32, 8
W = WindowSpec(P, R, F)
# length < P, = P, < P+R, = P+R, P+R+F-1, P+R+F, large (and a few awkward ones)
LENGTHS = [1, P - 1, P, P + 1, P + R - 1, P + R, P + R + 1, P + R + F - 1, P + R + F,
           P + R + F + 1, 239, 1023]


def brute_body_end(length: int, w: WindowSpec) -> int:
    """Simulate decoding one token at a time: flush F oldest recent tokens whenever the recent
    window (positions >= end) reaches R + F tokens."""
    end = w.sink_tokens
    for cur in range(1, length + 1):
        while cur - max(end, w.sink_tokens) >= w.recent_tokens + w.flush_block:
            end += w.flush_block
    return end


@pytest.mark.parametrize("length", LENGTHS)
def test_body_end_matches_flush_simulation(length):
    assert body_end(length, W) == brute_body_end(length, W)
    t = body_end_tensor(torch.tensor([length]), W)
    assert int(t[0]) == body_end(length, W)


def test_named_boundaries():
    assert body_end(P - 1, W) == P
    assert body_end(P + R - 1, W) == P
    assert body_end(P + R, W) == P
    assert body_end(P + R + F - 1, W) == P
    assert body_end(P + R + F, W) == P + F
    assert body_end(1023, W) == P + F * ((1023 - P - R) // F)


@pytest.mark.parametrize("length", LENGTHS)
def test_window_counts_partition(length):
    sink, body, recent = window_counts(length, W)
    assert sink + body + recent == length
    assert sink == min(P, length)
    if length >= P + R:
        assert R <= recent <= R + F - 1
    else:
        assert body == 0


def test_bf16_key_mask_per_query():
    q = torch.arange(300)
    k = torch.arange(300)
    m = bf16_key_mask(q, k, W)
    for qp in (0, P - 1, P + R - 1, P + R, P + R + F - 1, P + R + F, 299):
        end = body_end(qp + 1, W)
        want = (k < P) | (k >= end)
        assert torch.equal(m[qp], want)
