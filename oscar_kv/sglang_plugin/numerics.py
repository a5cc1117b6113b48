"""The per-layer numbers a serving rank needs: rotations on the device, clip ratios, formats.

`load_numerics` reads the K/V rotation checkpoints named by the env flags (validated against
the model's global geometry), keeps this rank's layers [start_layer, end_layer) and KV heads,
and moves the fp32 tensors to the device once; the result is cached per process, so the pool,
the backend and the weight absorption share one copy. Rotations are per layer and identical on
every tensor-parallel rank; the checkpoint's key means (K centering, `k_mean` [L, Hkv, D]) are
per KV head, so each rank keeps the rows of the heads it holds (`rank_heads`). Keys enter the
rotated domain as (k - k_mean) R_K (`rotate_keys`), exactly as the HF path does. Framework-free.
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
    layer (<= 0 or >= 1: off); k_mean fp32 [L_local, Hkv_local, D] or None (keys not
    centered); local layer i is global layer start_layer + i."""

    window: WindowSpec
    spec: QuantSpec
    r_k: torch.Tensor
    r_v: torch.Tensor
    clip_k: list[float]
    clip_v: list[float]
    start_layer: int = 0
    k_mean: torch.Tensor | None = None

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


def rank_heads(geometry: ModelGeometry, tp_rank: int, tp_size: int
               ) -> tuple[list[int], list[int]]:
    """(global query heads, global KV heads) held by attention-TP rank tp_rank, as SGLang's
    QKVParallelLinear shards them (KV heads replicated when tp_size > num_kv_heads)."""
    hq, hkv = geometry.num_q_heads, geometry.num_kv_heads
    if hq % tp_size or (tp_size <= hkv and hkv % tp_size) or (tp_size > hkv and tp_size % hkv):
        raise OscarError(f"{hq} query / {hkv} KV heads do not split over {tp_size} TP ranks")
    q_per = hq // tp_size
    kv_per = max(1, hkv // tp_size)
    shard = tp_rank // max(1, tp_size // hkv)
    return (list(range(tp_rank * q_per, (tp_rank + 1) * q_per)),
            list(range(shard * kv_per, (shard + 1) * kv_per)))


def rotate(x: torch.Tensor, r: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [..., D] -> (x @ r) accumulated in fp32, cast to dtype (the HF path's rounding)."""
    return rotate_query(x, r).to(dtype)


def rotate_keys(k: torch.Tensor, numerics: PoolNumerics, i: int,
                dtype: torch.dtype) -> torch.Tensor:
    """Keys k [N, Hkv_local, D] (post-RoPE) of local layer i -> ((k - k_mean) @ R_K) in dtype,
    fp32 math (`oscar_kv.hf.plan.rotate_keys` on SGLang's token-major layout)."""
    if numerics.k_mean is not None:
        k = k.float() - numerics.k_mean[i]
    return rotate(k, numerics.r_k[i], dtype)


def unrotate(o: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """o_rot [..., D] -> o_rot @ r^T in o's dtype: undoes a V rotation that was not absorbed."""
    return rotate_query(o, r.transpose(0, 1)).to(o.dtype)


_CACHE: dict[tuple, PoolNumerics] = {}


def load_numerics(cfg: PluginConfig, geometry: ModelGeometry, start_layer: int,
                  end_layer: int, device: torch.device | str,
                  kv_heads: tuple[int, ...] | None = None) -> PoolNumerics:
    """Rotations + clips (+ key means of KV heads `kv_heads`, default all) for global layers
    [start_layer, end_layer) on `device` (cached)."""
    device = torch.device(device)
    kv_heads = tuple(range(geometry.num_kv_heads)) if kv_heads is None else tuple(kv_heads)
    key = (cfg, geometry.num_layers, geometry.num_q_heads, geometry.num_kv_heads,
           geometry.head_dim, start_layer, end_layer, str(device), kv_heads)
    if key not in _CACHE:
        if not 0 <= start_layer < end_layer <= geometry.num_layers:
            raise OscarError(f"layer range [{start_layer}, {end_layer}) is outside the model's "
                             f"{geometry.num_layers} layers")
        rs = cfg.load_rotations(expect=geometry)
        sl = slice(start_layer, end_layer)
        f32 = dict(device=device, dtype=torch.float32)
        mean = getattr(rs, "k_mean", None)
        if mean is not None:
            want = (geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
            if tuple(mean.shape) != want:
                raise OscarError(f"the K rotation's key means are {list(mean.shape)} but the "
                                 f"model needs {list(want)} (layers, KV heads, head_dim); use "
                                 "rotations fitted for this model")
            mean = mean[sl][:, list(kv_heads)].to(**f32).contiguous()
        _CACHE[key] = PoolNumerics(
            window=cfg.window, spec=cfg.quant_spec(geometry.head_dim),
            r_k=rs.k[sl].to(**f32).contiguous(), r_v=rs.v[sl].to(**f32).contiguous(),
            clip_k=[float(c) for c in rs.clip_k[sl]], clip_v=[float(c) for c in rs.clip_v[sl]],
            start_layer=start_layer, k_mean=mean)
    return _CACHE[key]
