"""Helpers shared by the HF tests (imported as a plain module; conftest holds fixtures)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, eq=False)
class LocalRotationSet:
    """Duck-typed stand-in for fit.checkpoint.RotationSet."""

    k: torch.Tensor
    v: torch.Tensor
    clip_k: list[float]
    clip_v: list[float]
    meta: dict = field(default_factory=dict)
    k_mean: torch.Tensor | None = None


def random_rotation_set(layers: int, d: int, clip_k: float = 0.95, clip_v: float = 0.9,
                        seed: int = 0, kv_heads: int | None = None) -> LocalRotationSet:
    """Random orthogonal R_K, R_V; with kv_heads, also random key means [L, kv_heads, D]."""
    g = torch.Generator().manual_seed(seed)
    qr = lambda: torch.linalg.qr(torch.randn(layers, d, d, generator=g, dtype=torch.float64))[0]
    mean = None if kv_heads is None else torch.randn(layers, kv_heads, d, generator=g) * 2.0
    return LocalRotationSet(qr().float(), qr().float(), [clip_k] * layers, [clip_v] * layers,
                            k_mean=mean)



def load_lm(path, dtype, layers=None):
    """The reference model in `dtype`, optionally cut to its first `layers` layers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if layers is not None:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
        model.config.layer_types = model.config.layer_types[:layers]
    return model
