"""Calibration capture inside a running SGLang server, and the merge of every rank's share into
the `stats.pt` that `python -m oscar_kv fit --stats DIR` reads. Framework-free.

Server side (`RankCapture`, one per tensor-parallel rank, driven by hooks.py): every extend
forward hands each layer's post-q/k-norm, post-RoPE q [N, Hq_r*D], k [N, Hkv_r*D] and raw
v [N, Hkv_r*D]; each sequence prefilled from position 0 in that forward (prefix 0) feeds the
pass-1 accumulators of `capture.stats.StatsAccumulator` (fp64, on the device) for the heads
this rank holds, and its K/V are spilled to disk as served (lossless) because pass 2 needs
the *final* query covariance. Sequences continued from a cached prefix (chunked prefill,
radix hits) are skipped and counted. `finish()` writes DIR/rank<r>/pass1.pt. Layout:

    DIR/rank<r>/pass1.pt                  partial LayerStats per layer + the rank's head map
    DIR/rank<r>/kv/layer_<l>/<chunk>.pt   {"k", "v": [N, Hkv_r, D], "seq_lens": int32}

Merge (`merge_capture(DIR)`, or `python -m oscar_kv.sglang_plugin.capture DIR`): for each
layer and global KV head h, with G_h the ranks holding a share of h's query group (one rank
unless TP > num_kv_heads replicates h) and g_r the query heads rank r holds per KV head:

    qq[h] = sum_{r in G_h} qq_r          n_q = n * g
    kk, vv, k_sum, n   from any r in G_h (identical: the same k, v)
    svv[h], s_sum[h] = sum_{r in G_h} (g_r / g) * svv_r, s_sum_r   (softmax weights are means
                                                                    over the group's heads)

then pass 2 (wvv, w_sum) over the spilled K/V with the merged C_h = qq[h] / n_q, and
`StatsAccumulator.save` writes DIR/stats.pt. No holdout.pt is produced: fit with fixed clips
(`--clip-k/--clip-v`), `--clip-search off`, or the model-level search.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from oscar_kv.atomic_io import write_files_atomic
from oscar_kv.capture.stats import LayerStats, StatsAccumulator
from oscar_kv.config import ModelGeometry
from oscar_kv.errors import OscarError

FORMAT = "oscar-kv-sglang-capture"
VERSION = 1
PASS1_FILE = "pass1.pt"


class RankCapture:
    """Pass-1 statistics + K/V spill of one rank (see the module docstring)."""

    def __init__(self, out_dir: str | os.PathLike, rank: int, geometry: ModelGeometry,
                 q_heads: list[int], kv_heads: list[int], max_tokens: int = 0,
                 softmax_stats: bool = True) -> None:
        self.dir = Path(out_dir) / f"rank{rank}"
        if (self.dir / PASS1_FILE).exists():
            raise OscarError(f"{self.dir} already holds a finished capture; point "
                             "SGLANG_OSCAR_CAPTURE_DIR at an empty directory")
        self.rank, self.geometry = rank, geometry
        self.q_heads, self.kv_heads = list(q_heads), list(kv_heads)
        local = ModelGeometry(geometry.num_layers, len(q_heads), len(kv_heads),
                              geometry.head_dim, geometry.model_type, geometry.name_or_path)
        self.acc = StatsAccumulator(local, token_source=f"sglang-capture:{out_dir}",
                                    softmax_stats=softmax_stats)
        self.max_tokens = max_tokens
        self.chunk = 0
        self.tokens = 0
        self.skipped = 0
        self.finished = False
        self.active = False
        self._fw_tokens: dict[int, int] = {}
        self._fw_skipped = 0

    def begin_forward(self) -> None:
        self.active = not self.finished
        self._fw_tokens, self._fw_skipped = {}, 0

    def record(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               seq_lens: list[int], prefix_lens: list[int]) -> None:
        """One layer of one extend forward: q [N, Hq_r*D] (or [N, Hq_r, D]), k/v likewise with
        Hkv_r heads; seq_lens / prefix_lens: host ints per request (sum seq_lens = N)."""
        if not self.active:
            return
        geo, d = self.acc.geometry, self.geometry.head_dim
        if sum(seq_lens) != q.shape[0]:
            raise OscarError(f"layer {layer}: {q.shape[0]} captured rows but the extend lengths "
                             f"sum to {sum(seq_lens)}")
        q = q.reshape(-1, geo.num_q_heads, d)
        k = k.reshape(-1, geo.num_kv_heads, d)
        v = v.reshape(-1, geo.num_kv_heads, d)
        keep, lens, start = [], [], 0
        for n, p in zip(seq_lens, prefix_lens, strict=True):
            if p == 0 and n > 0:
                self.acc.add_pass1(layer, q[start:start + n], k[start:start + n],
                                   v[start:start + n])
                keep.append(torch.arange(start, start + n))
                lens.append(n)
            start += n
        self._fw_skipped = sum(1 for p in prefix_lens if p > 0)
        if not keep:
            return
        idx = torch.cat(keep).to(k.device)
        spill = {"k": k.index_select(0, idx).to("cpu"), "v": v.index_select(0, idx).to("cpu"),
                 "seq_lens": torch.tensor(lens, dtype=torch.int32)}
        path = self.dir / "kv" / f"layer_{layer}"
        path.mkdir(parents=True, exist_ok=True)
        torch.save(spill, path / f"{self.chunk}.pt")
        self._fw_tokens[layer] = sum(lens)

    def end_forward(self) -> None:
        """After the model's forward: count the chunk, stop at the token budget."""
        if self.active and self._fw_tokens:
            self.tokens += max(self._fw_tokens.values())
            self.chunk += 1
        self.skipped += self._fw_skipped
        self.active = False
        if self.max_tokens and self.tokens >= self.max_tokens and not self.finished:
            self.finish()

    def finish(self) -> Path:
        """Write rank<r>/pass1.pt (atomic) and stop capturing; returns the rank directory.
        Idempotent: a second call (budget reached, then the RPC) writes nothing."""
        if self.finished:
            return self.dir
        layers = {}
        for layer, st in self.acc.layers.items():
            d = st.to_dict()
            d.update(num_sequences=int(st.num_sequences), max_seq_len=int(st.max_seq_len),
                     softmax_stats=bool(st.softmax_stats))
            layers[layer] = d
        obj = {"format": FORMAT, "version": VERSION, "rank": self.rank,
               "model": self.geometry.to_dict(), "q_heads": self.q_heads,
               "kv_heads": self.kv_heads, "layers": layers, "chunks": self.chunk,
               "tokens": self.tokens, "skipped_sequences": self.skipped}
        self.dir.mkdir(parents=True, exist_ok=True)
        write_files_atomic(self.dir, {PASS1_FILE: obj})
        self.finished, self.active = True, False
        return self.dir


def _load_rank(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise OscarError(f"capture file {path} cannot be read ({type(e).__name__}: {e}); "
                         "capture again") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or obj.get("version") != VERSION:
        raise OscarError(f"{path} is not an oscar-kv SGLang capture file; capture again")
    return obj


def _merged_layer(layer: int, ranks: list[dict], geo: ModelGeometry) -> LayerStats:
    hkv, d, g = geo.num_kv_heads, geo.head_dim, geo.gqa_ratio
    parts = [(r, r["layers"][layer]) for r in ranks if layer in r["layers"]]
    if not parts:
        raise OscarError(f"no rank captured layer {layer}; send at least one prompt to the "
                         "server before finishing the capture")
    softmax = all(p["softmax_stats"] for _, p in parts)
    st = LayerStats(hkv, d, softmax_stats=softmax)
    ns = {p["n"] for _, p in parts}
    if len(ns) != 1:
        raise OscarError(f"layer {layer}: ranks captured different token counts {sorted(ns)}; "
                         "capture again with every rank serving the same requests")
    st.n = ns.pop()
    st.n_q = st.n * g
    st.num_sequences = max(p["num_sequences"] for _, p in parts)
    st.max_seq_len = max(p["max_seq_len"] for _, p in parts)
    share = torch.zeros(hkv)
    for r, p in parts:
        g_r = len(r["q_heads"]) // len(r["kv_heads"])
        for li, h in enumerate(r["kv_heads"]):
            first = share[h] == 0
            share[h] += g_r
            st.qq[h] += p["qq"][li]
            if first:
                st.kk[h], st.vv[h], st.k_sum[h] = p["kk"][li], p["vv"][li], p["k_sum"][li]
            if softmax:
                st.svv[h] += (g_r / g) * p["svv"][li]
                st.s_sum[h] += (g_r / g) * p["s_sum"][li]
    if not bool((share == g).all()):
        raise OscarError(f"layer {layer}: the captured ranks cover KV heads with "
                         f"{share.tolist()} of their {g} query heads each; merge the "
                         "rank<r> folders of all tensor-parallel ranks of one capture")
    return st


def _spilled_kv(capture_dir: Path, ranks: list[dict], layer: int, geo: ModelGeometry):
    """Yield (k, v) [T, Hkv, D] per captured sequence of `layer`, all heads assembled."""
    owner = {}
    for r in ranks:
        for li, h in enumerate(r["kv_heads"]):
            owner.setdefault(h, (r["rank"], li))
    chunks = sorted({c for r in ranks for c in range(r["chunks"])})
    for c in chunks:
        files = {}
        for rank in sorted({o[0] for o in owner.values()}):
            p = capture_dir / f"rank{rank}" / "kv" / f"layer_{layer}" / f"{c}.pt"
            if p.is_file():
                files[rank] = torch.load(p, map_location="cpu", weights_only=True)
        if not files:
            continue
        if len(files) != len({o[0] for o in owner.values()}):
            raise OscarError(f"layer {layer} chunk {c} was spilled by ranks {sorted(files)} "
                             "only; the capture is incomplete")
        lens = next(iter(files.values()))["seq_lens"]
        k = torch.stack([files[owner[h][0]]["k"][:, owner[h][1]]
                         for h in range(geo.num_kv_heads)], dim=1)
        v = torch.stack([files[owner[h][0]]["v"][:, owner[h][1]]
                         for h in range(geo.num_kv_heads)], dim=1)
        start = 0
        for n in lens.tolist():
            yield k[start:start + n], v[start:start + n]
            start += n


def merge_capture(capture_dir: str | os.PathLike) -> Path:
    """Merge DIR/rank*/pass1.pt + spilled K/V into DIR/stats.pt; returns DIR."""
    root = Path(capture_dir)
    paths = sorted(root.glob(f"rank*/{PASS1_FILE}"))
    if not paths:
        raise OscarError(f"{root} holds no rank*/{PASS1_FILE}; run the server with "
                         "SGLANG_OSCAR_CAPTURE_DIR and finish the capture first")
    ranks = [_load_rank(p) for p in paths]
    geo = ModelGeometry.from_dict(ranks[0]["model"])
    for r in ranks[1:]:
        geo.check_matches(ModelGeometry.from_dict(r["model"]), f"capture rank {r['rank']}")
    acc = StatsAccumulator(geo, token_source=f"sglang-capture:{root}")
    for layer in range(geo.num_layers):
        acc.layers[layer] = _merged_layer(layer, ranks, geo)
    for layer in range(geo.num_layers):
        for k, v in _spilled_kv(root, ranks, layer, geo):
            acc.add_pass2(layer, k, v)
    return acc.save(root)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m oscar_kv.sglang_plugin.capture",
                                 description="merge an SGLang capture into DIR/stats.pt")
    ap.add_argument("capture_dir")
    args = ap.parse_args(argv)
    try:
        out = merge_capture(args.capture_dir)
    except OscarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'stats.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
