"""What one attention layer needs at run time: its K rotation, clips, format and windows.

A `LayerPlan` is built once per layer by `prepare_model` from a method and a rotation set, and
read by both the cache (rotates K on write) and the attention functions (rotate Q). R_V never
appears at run time: it is absorbed into v_proj / o_proj (`absorb.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oscar_kv.config import QuantSpec, WindowSpec


@dataclass(frozen=True, eq=False)
class LayerPlan:
    """One layer's runtime numerics.

    r_k: fp32 [D, D] (x_rot = x @ r_k) or None for the identity; window None = no INT2 at all
    (the `bf16` method); clip ratios >= 1 disable clipping.
    """

    r_k: torch.Tensor | None
    clip_k: float
    clip_v: float
    quant: QuantSpec
    window: WindowSpec | None

    def to(self, device: torch.device) -> "LayerPlan":
        """The same plan with r_k on `device` (a no-op when already there)."""
        if self.r_k is None or self.r_k.device == device:
            return self
        return LayerPlan(self.r_k.to(device), self.clip_k, self.clip_v, self.quant, self.window)


def rotate(x: torch.Tensor, r: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """x [..., D] -> (x @ r) in out_dtype, accumulated in fp32 (fp64 for fp64 inputs);
    r None = identity (only a cast).

    Used identically by the cache (K), the decode path (Q) and the simulation (Q and K) so the
    generated and the teacher-forced paths round the same way."""
    if r is None:
        return x.to(out_dtype)
    acc = torch.promote_types(x.dtype, torch.float32)
    return torch.matmul(x.to(acc), r.to(device=x.device, dtype=acc)).to(out_dtype)
