"""Objectives the per-layer clip search minimizes (selected by name; see clip_search.py).

They see one block: the g query heads of one KV head, a chunk of Tc query positions and all
T key positions of one holdout sequence, in the rotated domain. Each returns (num, den) sums so
that blocks and sequences combine exactly; the objective value is sum(num) / sum(den).

K objectives get `KBlock` and delta [g, Tc, T] = q~ (k^_r - k~)^T / sqrt(D) on causal INT2
body keys (0 elsewhere: sink/recent keys stay BF16-exact):
    attn_kl   mean over query rows that see >= 1 INT2 key of KL(softmax(l) || softmax(l + delta))
    logit_mse mean over (query, INT2 key) pairs of delta^2, i.e. Δk C_q Δk^T / D with the
              empirical query covariance (the reference-style logit error; for ablation)
    attn_kl_peak  like attn_kl, but each row weighted by the largest probability it puts on
              one INT2 key: rows that *retrieve* a far token (copying, lookups) dominate,
              diffuse rows barely count. Clipping lowers exactly the large logits such rows
              depend on, which a plain mean over rows hides.
V objectives get `VBlock` and err [g, Tc, D] = (P * int2) @ (v^_r - v~), the attention-output
change with the exact probabilities P:
    out_mse   sum ||err||^2 / sum ||o||^2 over rows that see >= 1 INT2 value
    out_mse_peak  the same with the attn_kl_peak row weights
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from oscar_kv.registry import Registry


@dataclass(frozen=True)
class KBlock:
    """logits [g, Tc, T] exact scaled logits (-inf where not causal), logp = log_softmax(logits),
    int2 [Tc, T] bool (causal keys held in INT2), rows [Tc] bool (rows with >= 1 INT2 key)."""

    logits: torch.Tensor
    logp: torch.Tensor
    int2: torch.Tensor
    rows: torch.Tensor


@dataclass(frozen=True)
class VBlock:
    """probs [g, Tc, T] exact attention probabilities, out [g, Tc, D] = probs @ v~,
    rows [Tc] bool (rows with >= 1 INT2 key)."""

    probs: torch.Tensor
    out: torch.Tensor
    rows: torch.Tensor
    int2: torch.Tensor | None = None


Pair = tuple[torch.Tensor, torch.Tensor]
K_CLIP_OBJECTIVES: Registry[Callable[[KBlock, torch.Tensor], Pair]] = Registry(
    "K clip objective")
V_CLIP_OBJECTIVES: Registry[Callable[[VBlock, torch.Tensor], Pair]] = Registry(
    "V clip objective")


@K_CLIP_OBJECTIVES.register("attn_kl")
def attn_kl(block: KBlock, delta: torch.Tensor) -> Pair:
    logq = torch.log_softmax(block.logits + delta, dim=-1)
    p = block.logp.exp()
    # p == 0 exactly on masked keys, where logp - logq is -inf - -inf = nan.
    kl = torch.where(p > 0, p * (block.logp - logq), 0.0).sum(dim=-1)  # [g, Tc]
    kl = kl[:, block.rows]
    return kl.double().sum(), kl.new_full((), kl.numel(), dtype=torch.float64)


@K_CLIP_OBJECTIVES.register("logit_mse")
def logit_mse(block: KBlock, delta: torch.Tensor) -> Pair:
    n = block.int2.sum() * delta.shape[0]
    return delta.double().square().sum(), n.double()


@V_CLIP_OBJECTIVES.register("out_mse")
def out_mse(block: VBlock, err: torch.Tensor) -> Pair:
    return (err[:, block.rows].double().square().sum(),
            block.out[:, block.rows].double().square().sum())


def _peak_weight(probs: torch.Tensor, int2: torch.Tensor) -> torch.Tensor:
    """probs [g, Tc, T], int2 [Tc, T] -> [g, Tc]: max probability on one INT2 key per row."""
    return torch.where(int2, probs, 0.0).amax(dim=-1)


@K_CLIP_OBJECTIVES.register("attn_kl_peak")
def attn_kl_peak(block: KBlock, delta: torch.Tensor) -> Pair:
    logq = torch.log_softmax(block.logits + delta, dim=-1)
    p = block.logp.exp()
    kl = torch.where(p > 0, p * (block.logp - logq), 0.0).sum(dim=-1)  # [g, Tc]
    w = _peak_weight(p, block.int2)
    return (w * kl).double().sum(), w.double().sum()


@V_CLIP_OBJECTIVES.register("out_mse_peak")
def out_mse_peak(block: VBlock, err: torch.Tensor) -> Pair:
    if block.int2 is None:
        raise ValueError("out_mse_peak needs VBlock.int2")
    w = _peak_weight(block.probs, block.int2)[..., None]
    return ((w * err.double().square()).sum(),
            (w * block.out.double().square()).sum())
