"""Clipping before min/max: one exact definition used on every write path.

tau = the floor(ratio * D)-th smallest |x| of the row (0-based, index clamped to [0, D-1]),
computed over the whole head row even when the group size is smaller than D. A ratio >= 1
gives tau = max|x| (nothing changes); ratio <= 0 disables clipping. Ties are harmless: the
order statistic is a value, so tied magnitudes at the clip index give the same tau.
"""

from __future__ import annotations

import math

import torch


def clip_index(ratio: float, head_dim: int) -> int | None:
    """0-based order-statistic index for `ratio`, or None when clipping is disabled."""
    if ratio is None or ratio <= 0 or ratio >= 1:
        return None
    return min(max(int(math.floor(ratio * head_dim)), 0), head_dim - 1)


def clip_threshold(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """x: [..., D] float -> tau: [..., 1] (same dtype); +inf where clipping is disabled."""
    idx = clip_index(ratio, x.shape[-1])
    if idx is None:
        return torch.full_like(x[..., :1], float("inf"))
    # kthvalue is 1-based and exact (a selection, not an approximation).
    return x.abs().kthvalue(idx + 1, dim=-1, keepdim=True).values


def clip_rows(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Clamp each row of x [..., D] to [-tau, tau]; returns x unchanged when disabled."""
    if clip_index(ratio, x.shape[-1]) is None:
        return x
    tau = clip_threshold(x, ratio)
    return torch.maximum(torch.minimum(x, tau), -tau)
