"""Per-token metrics against a BF16 reference, accumulated over sequences.

nll: mean next-token negative log-likelihood; ppl = exp(nll); kl: mean KL(P_bf16 || P_method)
over next-token distributions; top1_agree: fraction of positions where the argmax equals the
BF16 argmax; copy_acc: teacher-forced greedy accuracy on the copy probes' recalled tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class MethodTally:
    """Running sums for one method (all fp64 on CPU)."""

    nll_sum: float = 0.0
    kl_sum: float = 0.0
    agree: int = 0
    tokens: int = 0
    copy_hits: int = 0
    copy_total: int = 0
    extra: dict = field(default_factory=dict)

    def add_lm(self, logits: torch.Tensor, targets: torch.Tensor,
               ref_logp: torch.Tensor | None) -> None:
        """logits [T, V] predicting targets [T]; ref_logp [T, V] BF16 log-probs (or None)."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        self.nll_sum += -logp.gather(-1, targets[:, None]).sum().item()
        self.tokens += targets.numel()
        if ref_logp is not None:
            self.kl_sum += (ref_logp.exp() * (ref_logp - logp)).sum().item()
            self.agree += (logp.argmax(-1) == ref_logp.argmax(-1)).sum().item()
        else:
            self.agree += targets.numel()

    def add_copy(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> None:
        """logits [T, V], targets [T] (next tokens), mask [T] bool: positions to score."""
        pred = logits.argmax(-1)
        self.copy_hits += (pred[mask] == targets[mask]).sum().item()
        self.copy_total += int(mask.sum().item())

    def summary(self) -> dict:
        nll = self.nll_sum / max(self.tokens, 1)
        return {
            "nll": nll,
            "ppl": math.exp(nll),
            "kl": self.kl_sum / max(self.tokens, 1),
            "top1_agree": self.agree / max(self.tokens, 1),
            "copy_acc": self.copy_hits / self.copy_total if self.copy_total else None,
        }
