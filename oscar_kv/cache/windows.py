"""Which cached positions are BF16 and which are INT2: pure functions of lengths.

For a cache holding L tokens (positions 0..L-1, the token being decoded included), with
sink P, recent R and flush block F (all from `WindowSpec`):

    sink   = [0, min(P, L))                         BF16, forever (by position)
    body   = [P, body_end(L))                       INT2
    recent = [max(P, body_end(L)), L)               BF16
    body_end(L) = P + F * floor(max(L - P - R, 0) / F)

so once L >= P + R the recent window holds R .. R + F - 1 tokens and tokens move to the body
F at a time. Being a function of L alone (no counters), the same rule serves the HF cache,
the teacher-forced evaluator and a paged server, and is trivially CUDA-graph safe.
"""

from __future__ import annotations

import torch

from oscar_kv.config import WindowSpec


def body_end(length: int, window: WindowSpec) -> int:
    """First position after the INT2 body for a cache of `length` tokens (>= sink_tokens)."""
    p, r, f = window.sink_tokens, window.recent_tokens, window.flush_block
    return p + f * (max(length - p - r, 0) // f)


def body_end_tensor(length: torch.Tensor, window: WindowSpec) -> torch.Tensor:
    """Vectorised `body_end` for an integer tensor of lengths (any shape)."""
    p, r, f = window.sink_tokens, window.recent_tokens, window.flush_block
    return p + f * torch.div((length - p - r).clamp(min=0), f, rounding_mode="floor")


def window_counts(length: int, window: WindowSpec) -> tuple[int, int, int]:
    """(sink, body, recent) token counts for a cache of `length` tokens."""
    sink = min(window.sink_tokens, length)
    end = min(body_end(length, window), length)
    body = max(end - window.sink_tokens, 0)
    return sink, body, length - sink - body


def bf16_key_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: WindowSpec) -> torch.Tensor:
    """q_pos [Tq], k_pos [Tk] int -> bool [Tq, Tk]: True where key k_pos is held in BF16 when
    the query at q_pos decodes (cache length q_pos + 1). Says nothing about causality."""
    end = body_end_tensor(q_pos.to(torch.long) + 1, window)[:, None]
    k = k_pos.to(torch.long)[None, :]
    return (k < window.sink_tokens) | (k >= end)
