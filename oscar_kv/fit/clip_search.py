"""Fitted per-layer clip ratios for K and V (goes beyond the reference's global 0.96/0.92).

For each layer independently, on held-out post-RoPE q [S, T, Hq, D], k, v [S, T, Hkv, D]:
rotate k~ = k R_K, q~ = q R_K, v~ = v R_V (fp32); for every candidate ratio r fake-quantize
the keys/values with `formats.fake_quant(., quant, r)` and let only the causal keys that the
window rule (`cache.windows.bf16_key_mask`) puts in the INT2 body see the error. The K and V
objectives (clip_objectives.py) score what attention sees; the chosen ratio is the argmin of
each curve, ties going to the larger ratio (less clipping; 1.0 = off). Memory stays bounded:
one sequence, one KV head and a chunk of query rows at a time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from oscar_kv.cache.windows import bf16_key_mask
from oscar_kv.config import QuantSpec, WindowSpec
from oscar_kv.errors import OscarError
from oscar_kv.fit.clip_objectives import K_CLIP_OBJECTIVES, V_CLIP_OBJECTIVES, KBlock, VBlock
from oscar_kv.formats import fake_quant

DEFAULT_GRID: tuple[float, ...] = tuple(round(0.80 + 0.01 * i, 2) for i in range(21))
BLOCK_ELEMS = 1 << 24  # logits elements per block (g * Tc * T): 64 MB in fp32


@dataclass(frozen=True)
class LayerClip:
    """One layer's result: chosen ratios and the objective value at every grid point."""

    layer: int
    k_ratio: float
    v_ratio: float
    k_curve: list[float]
    v_curve: list[float]
    int2_rows: int  # query rows (per head) that saw at least one INT2 key


@dataclass(frozen=True)
class ClipSearchReport:
    grid: list[float]
    k_objective: str
    v_objective: str
    layers: list[LayerClip]

    @property
    def clip_k(self) -> list[float]:
        return [lc.k_ratio for lc in self.layers]

    @property
    def clip_v(self) -> list[float]:
        return [lc.v_ratio for lc in self.layers]

    def to_dict(self) -> dict:
        return {"grid": self.grid, "k_objective": self.k_objective,
                "v_objective": self.v_objective, "layers": [asdict(lc) for lc in self.layers]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def format(self) -> str:
        """A printable table: per layer the chosen ratios and the gain over r = 1.0 (off)."""
        off = self.grid.index(1.0) if 1.0 in self.grid else len(self.grid) - 1
        lines = [f"clip search: K by {self.k_objective}, V by {self.v_objective}, "
                 f"{len(self.grid)} ratios {self.grid[0]:.2f}..{self.grid[-1]:.2f}",
                 "layer  k_ratio  k_obj/off   v_ratio  v_obj/off   int2_rows"]
        for lc in self.layers:
            kr = _rel(lc.k_curve[self.grid.index(lc.k_ratio)], lc.k_curve[off])
            vr = _rel(lc.v_curve[self.grid.index(lc.v_ratio)], lc.v_curve[off])
            lines.append(f"{lc.layer:5d}  {lc.k_ratio:7.2f}  {kr:9.4f}   {lc.v_ratio:7.2f}  "
                         f"{vr:9.4f}   {lc.int2_rows:9d}")
        return "\n".join(lines)


def _rel(x: float, ref: float) -> float:
    return x / ref if ref > 0 else 1.0


def check_grid(grid: Sequence[float] | None) -> list[float]:
    """None -> DEFAULT_GRID; otherwise sorted unique finite ratios (>= 1 means off)."""
    vals = sorted({float(r) for r in (DEFAULT_GRID if grid is None else grid)})
    if not vals or not all(math.isfinite(r) and r > 0 for r in vals):
        raise OscarError(f"clip grid {grid} must be a non-empty list of positive ratios, "
                         "e.g. 0.80..1.00")
    return vals


def pick_ratio(grid: Sequence[float], curve: Sequence[float]) -> float:
    """argmin of the curve; ties go to the larger ratio (less clipping)."""
    best = min(curve)
    return max(r for r, c in zip(grid, curve, strict=True) if c == best)


def _int2_start(t: int, window: WindowSpec) -> int:
    """First query position that sees an INT2 key (T if none)."""
    pos = torch.arange(t)
    has = ~bf16_key_mask(pos, pos, window) & (pos[None, :] <= pos[:, None])
    rows = has.any(dim=1).nonzero()
    return int(rows[0]) if rows.numel() else t


def search_layer_clip(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r_k: torch.Tensor,
                      r_v: torch.Tensor, quant: QuantSpec = QuantSpec(),
                      window: WindowSpec = WindowSpec(), grid: Sequence[float] | None = None,
                      k_objective: str = "attn_kl", v_objective: str = "out_mse",
                      layer: int = 0, device: str | torch.device | None = None) -> LayerClip:
    """q [S, T, Hq, D], k, v [S, T, Hkv, D] (any float dtype), r_k, r_v [D, D] -> LayerClip."""
    grid = check_grid(grid)
    kobj, vobj = K_CLIP_OBJECTIVES.get(k_objective), V_CLIP_OBJECTIVES.get(v_objective)
    s_n, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    dev = torch.device(device) if device is not None else q.device
    rk, rv = r_k.to(dev, torch.float32), r_v.to(dev, torch.float32)
    acc = torch.zeros(4, len(grid), dtype=torch.float64, device=dev)  # k num/den, v num/den
    scale = 1.0 / math.sqrt(d)
    pos = torch.arange(t, device=dev)
    start = _int2_start(t, window)
    tc = max(1, BLOCK_ELEMS // max(g * t, 1))
    for s in range(s_n):
        qs = q[s].to(dev, torch.float32) @ rk  # [T, Hq, D]
        ks = k[s].to(dev, torch.float32) @ rk  # [T, Hkv, D]
        vs = v[s].to(dev, torch.float32) @ rv
        for h in range(hkv):
            kh, vh = ks[:, h].contiguous(), vs[:, h].contiguous()  # [T, D]
            dk = torch.stack([fake_quant(kh, quant, r) - kh for r in grid])  # [n_r, T, D]
            dv = torch.stack([fake_quant(vh, quant, r) - vh for r in grid])
            qh = qs[:, h * g:(h + 1) * g].transpose(0, 1)  # [g, T, D]
            for c0 in range(start, t, tc):
                qc, qpos = qh[:, c0:c0 + tc], pos[c0:c0 + tc]
                causal = pos[None, :] <= qpos[:, None]  # [Tc, T]
                int2 = causal & ~bf16_key_mask(qpos, pos, window)
                rows = int2.any(dim=1)
                logits = (qc @ kh.T * scale).masked_fill(~causal, float("-inf"))
                logp = torch.log_softmax(logits, dim=-1)
                probs = logp.exp()
                kb = KBlock(logits=logits, logp=logp, int2=int2, rows=rows)
                vb = VBlock(probs=probs, out=probs @ vh, rows=rows, int2=int2)
                p_int2 = probs * int2
                for j in range(len(grid)):
                    delta = (qc @ dk[j].T * scale) * int2  # [g, Tc, T]
                    kn, kd = kobj(kb, delta)
                    vn, vd = vobj(vb, p_int2 @ dv[j])  # err [g, Tc, D]
                    acc[:, j] += torch.stack([kn, kd, vn, vd]).to(acc)
    acc = acc.cpu()
    curves = [[float(n / dd) if dd > 0 else 0.0 for n, dd in zip(acc[i], acc[i + 1], strict=True)]
              for i in (0, 2)]
    int2_rows = s_n * max(t - start, 0)
    return LayerClip(layer=layer, k_ratio=pick_ratio(grid, curves[0]),
                     v_ratio=pick_ratio(grid, curves[1]), k_curve=curves[0], v_curve=curves[1],
                     int2_rows=int2_rows)


def _layer_tensor(holdout: dict, name: str, layer: int) -> torch.Tensor:
    part = holdout.get(name)
    if not isinstance(part, dict):
        raise OscarError(f"holdout has no {name!r} dict; re-run `python -m oscar_kv calibrate`")
    x = part.get(layer, part.get(str(layer)))
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise OscarError(f"holdout {name!r} of layer {layer} is missing or not [S, T, H, D]; "
                         "re-run `python -m oscar_kv calibrate`")
    return x


def check_holdout_layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int,
                        layer: int) -> None:
    """Raise OscarError unless q [S, T, Hq, D], k, v [S, T, Hkv, D] agree with each other."""
    s, t, hq, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (s, t) or k.shape[3] != d or d != head_dim \
            or hq % k.shape[2] != 0:
        raise OscarError(f"holdout layer {layer} has q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} but the rotations have head_dim {head_dim}; "
                         "re-run calibration for this model")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not torch.isfinite(x.float()).all():
            raise OscarError(f"holdout {name} of layer {layer} holds NaN or Inf; re-run "
                             "calibration with a stable dtype")


def search_clip_ratios(holdout: dict, r_k: torch.Tensor, r_v: torch.Tensor,
                       quant: QuantSpec = QuantSpec(), window: WindowSpec = WindowSpec(),
                       grid: Sequence[float] | None = None, k_objective: str = "attn_kl",
                       v_objective: str = "out_mse", device: str | torch.device | None = None,
                       progress: Callable[[str], None] | None = None) -> ClipSearchReport:
    """holdout {"q"|"k"|"v": {layer: [S, T, H, D]}}, r_k, r_v [L, D, D] -> ClipSearchReport."""
    grid = check_grid(grid)
    K_CLIP_OBJECTIVES.get(k_objective)  # fail on a bad name before any work
    V_CLIP_OBJECTIVES.get(v_objective)
    quant.groups(r_k.shape[-1])
    if r_k.shape != r_v.shape or r_k.ndim != 3:
        raise OscarError(f"R_K {tuple(r_k.shape)} and R_V {tuple(r_v.shape)} must both be "
                         "[L, D, D]; pass rotations of one fit")
    tensors = []
    for layer in range(r_k.shape[0]):  # validate everything before the first search
        q, k, v = (_layer_tensor(holdout, n, layer) for n in ("q", "k", "v"))
        check_holdout_layer(q, k, v, r_k.shape[-1], layer)
        tensors.append((q, k, v))
    layers = []
    for layer, (q, k, v) in enumerate(tensors):
        lc = search_layer_clip(q, k, v, r_k[layer], r_v[layer], quant, window, grid,
                               k_objective, v_objective, layer=layer, device=device)
        layers.append(lc)
        if progress is not None:
            progress(f"layer {layer}: clip k={lc.k_ratio:.2f} v={lc.v_ratio:.2f}")
    return ClipSearchReport(grid=grid, k_objective=k_objective, v_objective=v_objective,
                            layers=layers)
