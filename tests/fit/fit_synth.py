"""Test helper: build oscar-kv statistics sums from raw q/k/v (independent of capture/)."""

from __future__ import annotations

from pathlib import Path

import torch


def raw_qkv(s: int, t: int, hq: int, hkv: int, d: int, seed: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random fp64 q [S, T, Hq, D], k, v [S, T, Hkv, D] with anisotropic per-dim scales."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.2, 3.0, d, dtype=torch.float64)

    def draw(h: int) -> torch.Tensor:
        mix = torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5
        return torch.randn(s, t, h, d, generator=gen, dtype=torch.float64) @ (mix * scale)

    return draw(hq), draw(hkv), draw(hkv)


def causal_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q [T, D], k [T, D] -> causal softmax(q k^T / sqrt(D)) [T, T]."""
    t, d = q.shape
    logits = q @ k.T / d**0.5
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)


def stats_from_raw(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
    """One layer's sums (design.md "Statistics") from raw fp64 q/k/v by explicit loops."""
    s_n, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    n = s_n * t
    out = {key: torch.zeros(hkv, d, d, dtype=torch.float64)
           for key in ("qq", "kk", "vv", "wvv", "svv")}
    out["w_sum"] = torch.zeros(hkv, dtype=torch.float64)
    out["s_sum"] = torch.zeros(hkv, dtype=torch.float64)
    out["k_sum"] = torch.zeros(hkv, d, dtype=torch.float64)
    for h in range(hkv):
        for j in range(h * g, (h + 1) * g):
            qj = q[:, :, j].reshape(-1, d)
            out["qq"][h] += qj.T @ qj
        kh, vh = k[:, :, h].reshape(-1, d), v[:, :, h].reshape(-1, d)
        out["kk"][h] = kh.T @ kh
        out["k_sum"][h] = kh.sum(dim=0)
        out["vv"][h] = vh.T @ vh
        c_h = out["qq"][h] / (n * g)
        for row in range(n):
            w = kh[row] @ c_h @ kh[row]
            out["wvv"][h] += w * torch.outer(vh[row], vh[row])
            out["w_sum"][h] += w
        for si in range(s_n):
            s_t = sum((causal_probs(q[si, :, j], k[si, :, h]) ** 2).sum(dim=0)
                      for j in range(h * g, (h + 1) * g)) / g
            for ti in range(t):
                out["svv"][h] += s_t[ti] * torch.outer(v[si, ti, h], v[si, ti, h])
                out["s_sum"][h] += s_t[ti]
    out["n"] = n
    out["n_q"] = n * g
    return out


def write_stats_dir(path: Path, num_layers: int = 2, s: int = 2, t: int = 16, hq: int = 4,
                    hkv: int = 2, d: int = 16, holdout_t: int | None = 48,
                    seed: int = 0) -> dict:
    """Write stats.pt (+ holdout.pt unless holdout_t is None); returns the raw tensors."""
    path.mkdir(parents=True, exist_ok=True)
    layers, raw, hold = {}, {}, {"q": {}, "k": {}, "v": {}}
    for layer in range(num_layers):
        q, k, v = raw_qkv(s, t, hq, hkv, d, seed=seed + layer)
        layers[layer] = stats_from_raw(q, k, v)
        raw[layer] = (q, k, v)
        if holdout_t is not None:
            hq_, hk_, hv_ = raw_qkv(1, holdout_t, hq, hkv, d, seed=seed + 100 + layer)
            hold["q"][layer] = hq_.to(torch.bfloat16)
            hold["k"][layer] = hk_.to(torch.bfloat16)
            hold["v"][layer] = hv_.to(torch.bfloat16)
    model = {"num_layers": num_layers, "num_q_heads": hq, "num_kv_heads": hkv, "head_dim": d,
             "model_type": "synthetic", "name_or_path": "synthetic"}
    torch.save({"format": "oscar-kv-stats", "version": 1, "model": model, "num_tokens": s * t,
                "num_sequences": s, "seq_len": t, "token_source": "random", "layers": layers},
               path / "stats.pt")
    if holdout_t is not None:
        torch.save(hold, path / "holdout.pt")
    return {"raw": raw, "layers": layers, "model": model}
