"""What one attention layer needs at run time: its K rotation, clips, format and windows.

A `LayerPlan` is built once per layer by `prepare_model` from a method and a rotation set, and
read by both the cache (rotates K on write) and the attention functions (rotate Q). R_V never
appears at run time: it is absorbed into v_proj / o_proj (`absorb.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oscar_kv.config import QuantSpec, WindowSpec
from oscar_kv.errors import OscarError


@dataclass(frozen=True, eq=False)
class LayerPlan:
    """One layer's runtime numerics.

    r_k: fp32 [D, D] (x_rot = x @ r_k) or None for the identity; window None = no INT2 at all
    (the `bf16` method); clip ratios >= 1 disable clipping; k_mean fp32 [Hkv, D] subtracted
    from every key before r_k (attention is invariant to it), or None.
    """

    r_k: torch.Tensor | None
    clip_k: float
    clip_v: float
    quant: QuantSpec
    window: WindowSpec | None
    k_mean: torch.Tensor | None = None

    def to(self, device: torch.device) -> "LayerPlan":
        """The same plan with its tensors on `device` (a no-op when already there)."""
        moved = [t if t is None or t.device == device else t.to(device)
                 for t in (self.r_k, self.k_mean)]
        if all(a is b for a, b in zip(moved, (self.r_k, self.k_mean), strict=True)):
            return self
        return LayerPlan(moved[0], self.clip_k, self.clip_v, self.quant, self.window, moved[1])


def rotate_keys(k: torch.Tensor, plan: LayerPlan, out_dtype: torch.dtype) -> torch.Tensor:
    """Keys k [B, Hkv, T, D] (post-RoPE) -> ((k - k_mean) @ r_k) in out_dtype, fp32 math.

    The one place keys enter the rotated domain: cache writes and the simulation both use it,
    so the stored rows, the chunk attention and the teacher-forced path agree."""
    if plan.k_mean is not None:
        if plan.k_mean.shape != (k.shape[1], k.shape[-1]):
            raise OscarError(f"the rotation set's key means are {list(plan.k_mean.shape)} but "
                             f"the keys have {k.shape[1]} heads of {k.shape[-1]}; use "
                             f"rotations fitted for this model")
        acc = torch.promote_types(k.dtype, torch.float32)
        k = k.to(acc) - plan.k_mean.to(device=k.device, dtype=acc)[None, :, None, :]
    return rotate(k, plan.r_k, out_dtype)


def rotate(x: torch.Tensor, r: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """x [..., D] -> (x @ r) in out_dtype, accumulated in fp32 (fp64 for fp64 inputs);
    r None = identity (only a cast).

    Used identically by the cache (K), the decode path (Q) and the simulation (Q and K) so the
    generated and the teacher-forced paths round the same way."""
    if r is None:
        return x.to(out_dtype)
    acc = torch.promote_types(x.dtype, torch.float32)
    return torch.matmul(x.to(acc), r.to(device=x.device, dtype=acc)).to(out_dtype)
