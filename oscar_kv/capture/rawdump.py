"""The reference's raw Q/K/V dump layout, read and written, and statistics built from it.

Layout (spec §1.2), one chunk index ``c`` per forward call and layer ``l``:
``layer_<l>/{q,k,v}/<c>.pt``: bf16 [tokens, heads, D] (sequences of the chunk concatenated) and
``layer_<l>/seq_lens/<c>.pt``: int32 [num_sequences] rows per sequence. Framework-free.

Existing OSCAR dumps hold a ~6-token server warm-up in chunk 0; pass ``skip_chunk0=True`` to
drop it as the reference fitter does. Sequences split across chunks by chunked prefill appear as
separate pieces; the causal softmax weights of a later piece then ignore the earlier piece.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from oscar_kv.capture.stats import HoldoutCollector, StatsAccumulator
from oscar_kv.config import ModelGeometry
from oscar_kv.errors import OscarError

_LAYER_RE = re.compile(r"^layer_(\d+)$")


class RawDumpWriter:
    """Writes chunks in the reference layout; ``write`` one chunk of one layer at a time."""

    def __init__(self, dump_dir: str | os.PathLike) -> None:
        self.dir = Path(dump_dir)

    def write(self, layer: int, chunk: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              seq_lens: torch.Tensor | list[int]) -> None:
        """q [N, Hq, D], k/v [N, Hkv, D] (stored bf16 on CPU), seq_lens summing to N (int32)."""
        lens = torch.as_tensor(seq_lens, dtype=torch.int32).reshape(-1).cpu()
        if int(lens.sum()) != q.shape[0]:
            raise OscarError(f"seq_lens sum to {int(lens.sum())} but the chunk has "
                             f"{q.shape[0]} rows")
        base = self.dir / f"layer_{layer}"
        for name, x in (("q", q), ("k", k), ("v", v), ("seq_lens", lens)):
            (base / name).mkdir(parents=True, exist_ok=True)
            x = x if name == "seq_lens" else x.detach().to("cpu", torch.bfloat16).contiguous()
            torch.save(x, base / name / f"{chunk}.pt")


def dump_layers(dump_dir: str | os.PathLike) -> list[int]:
    """Sorted layer ids present under dump_dir (``layer_<l>`` directories)."""
    d = Path(dump_dir)
    if not d.is_dir():
        raise OscarError(f"raw dump directory {d} does not exist; pass the directory that "
                         f"holds layer_<l>/ folders")
    layers = sorted(int(m.group(1)) for p in d.iterdir() if (m := _LAYER_RE.match(p.name)))
    if not layers:
        raise OscarError(f"{d} holds no layer_<l>/ folders; is it a raw Q/K/V dump?")
    return layers


def dump_chunks(dump_dir: str | os.PathLike, layer: int, skip_chunk0: bool = False) -> list[int]:
    """Sorted chunk ids of one layer (from its q/ folder), chunk 0 dropped if asked."""
    qdir = Path(dump_dir) / f"layer_{layer}" / "q"
    if not qdir.is_dir():
        raise OscarError(f"raw dump has no {qdir}; the dump is incomplete")
    chunks = sorted(int(p.stem) for p in qdir.glob("*.pt") if p.stem.isdigit())
    return [c for c in chunks if not (skip_chunk0 and c == 0)]


def _load(path: Path) -> torch.Tensor:
    if not path.is_file():
        raise OscarError(f"raw dump file {path} is missing; the dump is incomplete")
    return torch.load(path, map_location="cpu", weights_only=True)


def read_chunk(dump_dir: str | os.PathLike, layer: int, chunk: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk: q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, D] (as stored), seq_lens int32.

    A chunk without a seq_lens file is taken as one sequence.
    """
    base = Path(dump_dir) / f"layer_{layer}"
    q, k, v = (_load(base / n / f"{chunk}.pt") for n in ("q", "k", "v"))
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise OscarError(f"layer {layer} chunk {chunk}: expected 3-D [tokens, heads, D] tensors, "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
    lens_path = base / "seq_lens" / f"{chunk}.pt"
    lens = (_load(lens_path).to(torch.int64).reshape(-1) if lens_path.is_file()
            else torch.tensor([q.shape[0]]))
    if int(lens.sum()) != q.shape[0] or k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise OscarError(f"layer {layer} chunk {chunk}: seq_lens sum {int(lens.sum())} and rows "
                         f"q {q.shape[0]} / k {k.shape[0]} / v {v.shape[0]} disagree")
    return q, k, v, lens


def read_layer(dump_dir: str | os.PathLike, layer: int, skip_chunk0: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All chunks of a layer concatenated along tokens (chunk order): q, k, v, seq_lens."""
    parts = [read_chunk(dump_dir, layer, c) for c in dump_chunks(dump_dir, layer, skip_chunk0)]
    if not parts:
        raise OscarError(f"layer {layer} of the raw dump has no chunks to read")
    return tuple(torch.cat(xs) for xs in zip(*parts, strict=True))  # type: ignore[return-value]


def iter_sequences(dump_dir: str | os.PathLike, layer: int, skip_chunk0: bool = False
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) per sequence piece, in dump order."""
    for c in dump_chunks(dump_dir, layer, skip_chunk0):
        q, k, v, lens = read_chunk(dump_dir, layer, c)
        start = 0
        for n in lens.tolist():
            if n > 0:
                yield q[start:start + n], k[start:start + n], v[start:start + n]
            start += n


def geometry_from_dump(dump_dir: str | os.PathLike, model_type: str = "",
                       name_or_path: str = "") -> ModelGeometry:
    """Infer layers, heads and head_dim from the first chunk of each layer's q/k."""
    layers = dump_layers(dump_dir)
    if layers != list(range(len(layers))):
        raise OscarError(f"raw dump layers {layers} are not 0..L-1; the dump is incomplete")
    chunks = dump_chunks(dump_dir, 0)
    if not chunks:
        raise OscarError("layer 0 of the raw dump has no chunks")
    q, k, _, _ = read_chunk(dump_dir, 0, chunks[0])
    return ModelGeometry(num_layers=len(layers), num_q_heads=q.shape[1], num_kv_heads=k.shape[1],
                         head_dim=q.shape[2], model_type=model_type, name_or_path=name_or_path)


def stats_from_raw_dump(dump_dir: str | os.PathLike, geometry: ModelGeometry | None = None,
                        skip_chunk0: bool = False, holdout_seqs: int = 0,
                        device: torch.device | str = "cpu"
                        ) -> tuple[StatsAccumulator, HoldoutCollector]:
    """Build the same statistics as a live calibration from a raw dump.

    Each layer is read twice (pass 1: moments and softmax weights; pass 2: sst surrogate with
    the final C_h). The last ``holdout_seqs`` sequence pieces are kept out of the moments and
    returned raw (truncated to the shortest of them so they stack). Returns the finished
    accumulator (call ``finalize()``/``save()``) and the holdout collector.
    """
    geo = geometry if geometry is not None else geometry_from_dump(dump_dir)
    layers = dump_layers(dump_dir)
    if layers != list(range(geo.num_layers)):
        raise OscarError(f"raw dump has layers {layers} but the model has {geo.num_layers}; "
                         f"dump every layer of this model")
    acc = StatsAccumulator(geo, token_source=f"raw-dump:{Path(dump_dir)}", device=device)
    hold = HoldoutCollector()
    for layer in layers:
        count = sum(1 for _ in iter_sequences(dump_dir, layer, skip_chunk0))
        n_fit = count - holdout_seqs
        if n_fit < 1:
            raise OscarError(f"layer {layer}: the dump has {count} sequences, too few for "
                             f"{holdout_seqs} holdout sequences plus calibration data")
        held = []
        for i, (q, k, v) in enumerate(iter_sequences(dump_dir, layer, skip_chunk0)):
            if i < n_fit:
                acc.add_pass1(layer, q, k, v)
            else:
                held.append((q, k, v))
        if held:
            t_min = min(x[0].shape[0] for x in held)
            for q, k, v in held:
                hold.add(layer, q[:t_min], k[:t_min], v[:t_min])
        for i, (_, k, v) in enumerate(iter_sequences(dump_dir, layer, skip_chunk0)):
            if i < n_fit:
                acc.add_pass2(layer, k, v)
    return acc, hold
