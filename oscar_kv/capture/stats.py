"""Streaming fp64 calibration statistics (framework-free: no transformers import).

Per layer and KV head h (query head j belongs to group h = j // g) this accumulates, over all
calibration tokens t of all sequences:

- ``qq[h] = sum_t sum_{j in h} q_{t,j}^T q_{t,j}``, ``kk[h] = sum_t k^T k``,
  ``vv[h] = sum_t v^T v``, ``k_sum[h] = sum_t k_t`` (the key mean for K centering);
- pass 1, true causal softmax weighting: ``s_t = mean_{j in h} sum_{i>=t} S_j[i,t]^2`` with
  ``S_j = softmax(q_j k_h^T / sqrt(D))`` causal within the sequence; ``svv[h] = sum_t s_t v^T v``;
- pass 2, the reference ``sst`` surrogate: ``w_t = k_t C_h k_t^T`` with the *final*
  ``C_h = qq[h] / (N g)``; ``wvv[h] = sum_t w_t v^T v``. It needs C_h from the whole of pass 1,
  hence a second pass over the same tokens.

Everything is accumulated in float64 so that the result does not depend on how tokens are
batched. The on-disk schema is the "Statistics" section of docs/design.md.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from oscar_kv.atomic_io import write_files_atomic
from oscar_kv.config import ModelGeometry
from oscar_kv.errors import OscarError

STATS_FORMAT = "oscar-kv-stats"
STATS_VERSION = 1
STATS_FILE = "stats.pt"
HOLDOUT_FILE = "holdout.pt"
# fp64 score block [Hq, B, T] materialized at once (elements); ~256 query rows at T=2048
# keeps the wasted causal upper triangle small and the block in cache.
_SCORE_BLOCK_ELEMS = 1 << 22
_SCORE_BLOCK_ELEMS_GPU = 1 << 26  # fewer, larger launches on accelerators (512 MB fp64)


@dataclass
class LayerStats:
    """fp64 accumulators of one layer; all matrices [Hkv, D, D], k_sum [Hkv, D], sums [Hkv]."""

    num_kv_heads: int
    head_dim: int
    device: torch.device | str = "cpu"
    n: int = 0
    n_q: int = 0
    n_pass2: int = 0
    num_sequences: int = 0
    max_seq_len: int = 0
    softmax_stats: bool = True
    qq: torch.Tensor = field(init=False)
    kk: torch.Tensor = field(init=False)
    vv: torch.Tensor = field(init=False)
    wvv: torch.Tensor = field(init=False)
    svv: torch.Tensor = field(init=False)
    w_sum: torch.Tensor = field(init=False)
    s_sum: torch.Tensor = field(init=False)
    k_sum: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        mat = lambda: torch.zeros(self.num_kv_heads, self.head_dim, self.head_dim,
                                  dtype=torch.float64, device=self.device)
        self.qq, self.kk, self.vv, self.wvv, self.svv = mat(), mat(), mat(), mat(), mat()
        self.w_sum = torch.zeros(self.num_kv_heads, dtype=torch.float64, device=self.device)
        self.s_sum = torch.zeros_like(self.w_sum)
        self.k_sum = torch.zeros(self.num_kv_heads, self.head_dim, dtype=torch.float64,
                                 device=self.device)

    def group_query_cov(self) -> torch.Tensor:
        """C_h = qq[h] / (N g): fp64 [Hkv, D, D] (the final one once pass 1 is complete)."""
        if self.n_q == 0:
            raise OscarError("pass 2 needs pass-1 statistics; run add_pass1 over the data first")
        return self.qq / self.n_q

    def to_dict(self) -> dict:
        """The per-layer entry of the design.md schema (CPU fp64 tensors)."""
        cpu = lambda x: x.detach().to("cpu", torch.float64).clone()
        out = {"qq": cpu(self.qq), "kk": cpu(self.kk), "vv": cpu(self.vv),
               "wvv": cpu(self.wvv), "w_sum": cpu(self.w_sum), "k_sum": cpu(self.k_sum),
               "n": int(self.n), "n_q": int(self.n_q)}
        if self.softmax_stats:  # absent keys make the `svv` estimator fail with a clear message
            out.update(svv=cpu(self.svv), s_sum=cpu(self.s_sum))
        return out


def softmax_key_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal softmax column energy per key, averaged over each group's query heads.

    q: [T, Hq, D], k: [T, Hkv, D] (one sequence, any float dtype; computed in fp64).
    Returns s: fp64 [Hkv, T], s[h, t] = mean_{j in h} sum_{i >= t} S_j[i, t]^2 with
    S_j = softmax_t(q_{i,j} . k_{t,h} / sqrt(D)) over keys t <= i.
    """
    t_len, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qh = q.to(torch.float64).permute(1, 0, 2).reshape(hkv, g, t_len, d)
    kh = k.to(torch.float64).permute(1, 0, 2)  # [Hkv, T, D]
    col = torch.zeros(hkv, g, t_len, dtype=torch.float64, device=q.device)
    cap = _SCORE_BLOCK_ELEMS if q.device.type == "cpu" else _SCORE_BLOCK_ELEMS_GPU
    block = max(1, min(t_len, cap // max(1, hq * t_len)))
    scale = 1.0 / math.sqrt(d)
    for i0 in range(0, t_len, block):
        i1 = min(t_len, i0 + block)
        # logits [Hkv, g, B, i1]: query rows i0..i1-1 only see keys 0..i1-1 (causal).
        logits = torch.einsum("hgid,htd->hgit", qh[:, :, i0:i1], kh[:, :i1]) * scale
        rows = torch.arange(i0, i1, device=q.device)[:, None]
        cols = torch.arange(i1, device=q.device)[None, :]
        logits.masked_fill_(cols > rows, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        col[:, :, :i1] += probs.square().sum(dim=2)
    return col.mean(dim=1)


def _weighted_vv(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """v: fp64 [Hkv, T, D], w: fp64 [Hkv, T] -> sum_t w_t v_t^T v_t : [Hkv, D, D]."""
    return (v * w[..., None]).transpose(1, 2) @ v


class StatsAccumulator:
    """Streaming per-layer statistics for one model (see the module docstring).

    Usage: ``add_pass1`` over every calibration sequence of a layer, then ``add_pass2`` over the
    same sequences (per layer: pass 2 of layer l may start before pass 1 of layer l+1), then
    ``finalize()`` or ``save(dir)``. Inputs may live on any device; the
    accumulators live on ``device`` (default: that of the first input).
    """

    def __init__(self, geometry: ModelGeometry, token_source: str = "",
                 device: torch.device | str | None = None, softmax_stats: bool = True) -> None:
        # softmax_stats=False skips the causal-softmax weights (svv/s_sum): they dominate
        # pass 1 on CPU and only the `svv` estimator needs them.
        self.softmax_stats = softmax_stats
        self.geometry = geometry
        self.token_source = token_source
        self.device = device
        self.layers: dict[int, LayerStats] = {}
        self._cov: dict[int, torch.Tensor] = {}

    def _layer(self, layer: int, like: torch.Tensor) -> LayerStats:
        if not 0 <= layer < self.geometry.num_layers:
            raise OscarError(f"layer {layer} is out of range for a model with "
                             f"{self.geometry.num_layers} layers")
        if layer not in self.layers:
            dev = self.device if self.device is not None else like.device
            self.layers[layer] = LayerStats(self.geometry.num_kv_heads, self.geometry.head_dim, dev,
                                            softmax_stats=self.softmax_stats)
        return self.layers[layer]

    def _check_shape(self, layer: int, name: str, x: torch.Tensor, heads: int) -> None:
        d = self.geometry.head_dim
        if x.ndim != 3 or x.shape[1] != heads or x.shape[2] != d:
            raise OscarError(f"layer {layer}: {name} has shape {tuple(x.shape)}, expected "
                             f"[tokens, {heads}, {d}]; check the model geometry")

    @staticmethod
    def _check_finite(layer: int, what: str, parts: list[torch.Tensor]) -> None:
        """Every NaN/Inf input reaches a sum of squares, so checking the batch's increments
        (one reduction each) catches them without scanning the raw activations."""
        if not bool(torch.isfinite(torch.stack([p.sum() for p in parts])).all()):
            raise OscarError(f"layer {layer}: captured {what} contain NaN or Inf; check the "
                             f"model weights or run the calibration in float32")

    def add_pass1(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Accumulate one sequence: q [T, Hq, D], k/v [T, Hkv, D] (post-RoPE q/k, raw v)."""
        if layer in self._cov:
            raise OscarError(f"layer {layer}: pass-1 data arrived after pass 2 started; run all "
                             f"of pass 1 first")
        geo = self.geometry
        self._check_shape(layer, "q", q, geo.num_q_heads)
        self._check_shape(layer, "k", k, geo.num_kv_heads)
        self._check_shape(layer, "v", v, geo.num_kv_heads)
        t_len = q.shape[0]
        if k.shape[0] != t_len or v.shape[0] != t_len:
            raise OscarError(f"layer {layer}: q, k, v token counts differ "
                             f"({t_len}, {k.shape[0]}, {v.shape[0]})")
        if t_len == 0:
            return
        st = self._layer(layer, q)
        dev, g, hkv, d = st.device, geo.gqa_ratio, geo.num_kv_heads, geo.head_dim
        q64 = q.to(dev, torch.float64)
        k64 = k.to(dev, torch.float64).permute(1, 0, 2)  # [Hkv, T, D]
        v64 = v.to(dev, torch.float64).permute(1, 0, 2)
        qg = q64.reshape(t_len, hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, t_len * g, d)
        inc = [qg.transpose(1, 2) @ qg, k64.transpose(1, 2) @ k64, v64.transpose(1, 2) @ v64,
               k64.sum(dim=1)]
        accs = [st.qq, st.kk, st.vv, st.k_sum]
        if self.softmax_stats:
            s = softmax_key_weights(q64, k64.permute(1, 0, 2))
            inc += [_weighted_vv(v64, s), s.sum(dim=1)]
            accs += [st.svv, st.s_sum]
        self._check_finite(layer, "q/k/v", inc)
        for acc, x in zip(accs, inc, strict=True):
            acc += x
        st.n += t_len
        st.n_q += t_len * g
        st.num_sequences += 1
        st.max_seq_len = max(st.max_seq_len, t_len)

    def add_pass2(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Accumulate the sst surrogate for one sequence: k/v [T, Hkv, D].

        Uses the final C_h of pass 1, so all pass-1 data of this layer must come first.
        """
        geo = self.geometry
        self._check_shape(layer, "k", k, geo.num_kv_heads)
        self._check_shape(layer, "v", v, geo.num_kv_heads)
        if layer not in self.layers:
            raise OscarError(f"layer {layer} got pass-2 data but no pass-1 data; run pass 1 first")
        st = self.layers[layer]
        if layer not in self._cov:
            self._cov[layer] = st.group_query_cov()
        k64 = k.to(st.device, torch.float64).permute(1, 0, 2)  # [Hkv, T, D]
        v64 = v.to(st.device, torch.float64).permute(1, 0, 2)
        w = ((k64 @ self._cov[layer]) * k64).sum(dim=-1)  # [Hkv, T]
        inc = [_weighted_vv(v64, w), w.sum(dim=1), (v64 * v64).sum(dim=1)]
        self._check_finite(layer, "k/v", inc)
        st.wvv += inc[0]
        st.w_sum += inc[1]
        st.n_pass2 += k.shape[0]

    def finalize(self) -> dict:
        """Return the design.md statistics dict (CPU fp64). Both passes must be complete."""
        geo = self.geometry
        missing = [i for i in range(geo.num_layers) if i not in self.layers]
        if missing:
            raise OscarError(f"no calibration data for layers {missing}; capture every layer")
        for i, st in self.layers.items():
            if st.n_pass2 != st.n:
                raise OscarError(f"layer {i}: pass 2 saw {st.n_pass2} tokens but pass 1 saw "
                                 f"{st.n}; run pass 2 over exactly the pass-1 sequences")
        first = self.layers[0]
        return {"format": STATS_FORMAT, "version": STATS_VERSION, "model": geo.to_dict(),
                "num_tokens": int(first.n), "num_sequences": int(first.num_sequences),
                "seq_len": int(first.max_seq_len), "token_source": str(self.token_source),
                "layers": {i: self.layers[i].to_dict() for i in range(geo.num_layers)}}

    def save(self, out_dir: str | os.PathLike, holdout: dict | None = None) -> Path:
        """finalize() and write stats.pt (+ holdout.pt) atomically; returns the directory."""
        return save_stats(out_dir, self.finalize(), holdout)


def save_stats(out_dir: str | os.PathLike, stats: dict, holdout: dict | None = None) -> Path:
    """Write ``stats.pt`` (and ``holdout.pt`` if given) into out_dir atomically (a new out_dir
    appears whole; an existing one gets each file by ``os.replace``, other files kept)."""
    files = {STATS_FILE: stats} | ({HOLDOUT_FILE: holdout} if holdout is not None else {})
    write_files_atomic(out_dir, files)
    return Path(out_dir)


CALIBRATE_HINT = "run `python -m oscar_kv calibrate --model MODEL --out STATS_DIR` first"


def _read(path: Path, what: str) -> dict:
    """torch.load(weights_only) of one calibration file, with one-sentence errors."""
    if not path.is_file():
        raise OscarError(f"{what} {path} does not exist; {CALIBRATE_HINT}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file: say which one
        raise OscarError(f"{what} {path} cannot be read ({type(e).__name__}: {e}); "
                         f"{CALIBRATE_HINT}") from None
    if not isinstance(obj, dict):
        raise OscarError(f"{what} {path} is not a dict; {CALIBRATE_HINT}")
    return obj


def load_stats(stats_dir: str | os.PathLike) -> dict:
    """Load ``STATS_DIR/stats.pt`` (weights_only) and check its format tag and version."""
    path = Path(stats_dir) / STATS_FILE
    stats = _read(path, "statistics file")
    if stats.get("format") != STATS_FORMAT:
        raise OscarError(f"{path} is not an oscar-kv statistics file; {CALIBRATE_HINT}")
    if stats.get("version") != STATS_VERSION:
        raise OscarError(f"{path} has statistics version {stats.get('version')}, expected "
                         f"{STATS_VERSION}; {CALIBRATE_HINT}")
    return stats


def load_holdout(stats_dir: str | os.PathLike) -> dict:
    """Load ``STATS_DIR/holdout.pt``: {"q"|"k"|"v": {layer: bf16 [S_h, T, heads, D]},
    "ids": int64 [S_h, T]} (calibrate with at least one holdout sequence)."""
    return _read(Path(stats_dir) / HOLDOUT_FILE, "holdout file")


class HoldoutCollector:
    """Raw held-out q/k/v per layer, stored bf16 on CPU for the clip search.

    ``add`` takes one sequence (q [T, Hq, D], k/v [T, Hkv, D]); ``to_dict`` stacks them to
    {"q": {l: bf16 [S_h, T, Hq, D]}, "k": {l: bf16 [S_h, T, Hkv, D]}, "v": {...}}.
    """

    def __init__(self) -> None:
        self.parts: dict[str, dict[int, list[torch.Tensor]]] = {"q": {}, "k": {}, "v": {}}

    def add(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not bool(torch.isfinite(x).all()):
                raise OscarError(f"layer {layer}: held-out {name} contains NaN or Inf; check "
                                 f"the model weights or run in float32")
            self.parts[name].setdefault(layer, []).append(x.detach().to("cpu", torch.bfloat16))

    def __len__(self) -> int:
        return len(self.parts["q"].get(0, []))

    def to_dict(self) -> dict:
        out: dict[str, dict[int, torch.Tensor]] = {}
        for name, per_layer in self.parts.items():
            out[name] = {}
            for layer, xs in sorted(per_layer.items()):
                if len({x.shape for x in xs}) != 1:
                    raise OscarError(f"held-out sequences of layer {layer} differ in length; "
                                     f"use equal-length holdout sequences")
                out[name][layer] = torch.stack(xs).contiguous()
        return out
