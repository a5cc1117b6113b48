"""The per-layer numbers a serving rank needs: rotations on the device, clip ratios, formats.

`load_numerics` reads the K/V rotation checkpoints named by the env flags (validated against
the model's global geometry), keeps this rank's layers [start_layer, end_layer) and moves the
fp32 matrices to the device once; the result is cached per process, so the pool, the backend
and the weight absorption share one copy. Rotations are per layer and identical on every
tensor-parallel rank (each rank rotates the KV heads it holds). Framework-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oscar_kv.config import ModelGeometry, QuantSpec, WindowSpec
from oscar_kv.errors import OscarError
from oscar_kv.kernels import rotate_query
from oscar_kv.sglang_plugin.env import PluginConfig


@dataclass(frozen=True, eq=False)
class PoolNumerics:
    """r_k, r_v fp32 [L_local, D, D] on the device (x_rot = x @ r); clip ratios per local
    layer (<= 0 or >= 1: off); local layer i is global layer start_layer + i."""

    window: WindowSpec
    spec: QuantSpec
    r_k: torch.Tensor
    r_v: torch.Tensor
    clip_k: list[float]
    clip_v: list[float]
    start_layer: int = 0

    @property
    def num_layers(self) -> int:
        return self.r_k.shape[0]

    def local(self, layer_id: int) -> int:
        """Global layer id -> index into r_k / clip_k (OscarError if not on this rank)."""
        i = layer_id - self.start_layer
        if not 0 <= i < self.num_layers:
            raise OscarError(f"layer {layer_id} is not one of this rank's layers "
                             f"[{self.start_layer}, {self.start_layer + self.num_layers})")
        return i


def rotate(x: torch.Tensor, r: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [..., D] -> (x @ r) accumulated in fp32, cast to dtype (the HF path's rounding)."""
    return rotate_query(x, r).to(dtype)


def unrotate(o: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """o_rot [..., D] -> o_rot @ r^T in o's dtype: undoes a V rotation that was not absorbed."""
    return rotate_query(o, r.transpose(0, 1)).to(o.dtype)


_CACHE: dict[tuple, PoolNumerics] = {}


def load_numerics(cfg: PluginConfig, geometry: ModelGeometry, start_layer: int,
                  end_layer: int, device: torch.device | str) -> PoolNumerics:
    """Rotations + clips for global layers [start_layer, end_layer) on `device` (cached)."""
    device = torch.device(device)
    key = (cfg, geometry.num_layers, geometry.num_q_heads, geometry.num_kv_heads,
           geometry.head_dim, start_layer, end_layer, str(device))
    if key not in _CACHE:
        if not 0 <= start_layer < end_layer <= geometry.num_layers:
            raise OscarError(f"layer range [{start_layer}, {end_layer}) is outside the model's "
                             f"{geometry.num_layers} layers")
        rs = cfg.load_rotations(expect=geometry)
        sl = slice(start_layer, end_layer)
        _CACHE[key] = PoolNumerics(
            window=cfg.window, spec=cfg.quant_spec(geometry.head_dim),
            r_k=rs.k[sl].to(device=device, dtype=torch.float32).contiguous(),
            r_v=rs.v[sl].to(device=device, dtype=torch.float32).contiguous(),
            clip_k=[float(c) for c in rs.clip_k[sl]], clip_v=[float(c) for c in rs.clip_v[sl]],
            start_layer=start_layer)
    return _CACHE[key]
