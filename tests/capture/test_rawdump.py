"""Raw dump layout: write -> read round trip and statistics equal to streaming ones."""

from __future__ import annotations

import pytest
import torch

from oscar_kv.capture.rawdump import (
    RawDumpWriter,
    dump_chunks,
    geometry_from_dump,
    read_layer,
    stats_from_raw_dump,
)
from oscar_kv.capture.stats import StatsAccumulator
from oscar_kv.config import ModelGeometry
from oscar_kv.errors import OscarError

GEO = ModelGeometry(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=16)


def make_chunks(seed: int = 0) -> list[list[tuple]]:
    """chunks[c] = list of sequences (per layer q/k/v), bf16-representable values."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(torch.bfloat16)
    chunks = []
    for lens in ([6], [9, 4, 11], [5, 13]):
        chunk = []
        for t in lens:
            chunk.append({layer: (rnd(t, 4, 16), rnd(t, 2, 16) + 0.5, rnd(t, 2, 16))
                          for layer in range(GEO.num_layers)})
        chunks.append(chunk)
    return chunks


def write_dump(path, chunks) -> None:
    w = RawDumpWriter(path)
    for c, chunk in enumerate(chunks):
        for layer in range(GEO.num_layers):
            cat = lambda i, ch=chunk, ly=layer: torch.cat([s[ly][i] for s in ch])
            w.write(layer, c, cat(0), cat(1), cat(2), [s[layer][0].shape[0] for s in chunk])


def streaming(seqs: list[dict]) -> dict:
    acc = StatsAccumulator(GEO)
    for layer in range(GEO.num_layers):
        for s in seqs:
            acc.add_pass1(layer, *s[layer])
        for s in seqs:
            acc.add_pass2(layer, *s[layer][1:])
    return acc.finalize()


def test_write_read_round_trip(tmp_path) -> None:
    chunks = make_chunks()
    write_dump(tmp_path, chunks)
    assert dump_chunks(tmp_path, 1) == [0, 1, 2]
    assert dump_chunks(tmp_path, 1, skip_chunk0=True) == [1, 2]
    q, k, v, lens = read_layer(tmp_path, 1)
    assert q.dtype == torch.bfloat16 and q.shape == (48, 4, 16)
    assert lens.tolist() == [6, 9, 4, 11, 5, 13]
    want_q = torch.cat([s[1][0] for ch in chunks for s in ch])
    assert torch.equal(q, want_q)
    stored = torch.load(tmp_path / "layer_0" / "seq_lens" / "1.pt", weights_only=True)
    assert stored.dtype == torch.int32
    q2, *_ = read_layer(tmp_path, 0, skip_chunk0=True)
    assert q2.shape[0] == 42
    geo = geometry_from_dump(tmp_path)
    assert (geo.num_layers, geo.num_q_heads, geo.num_kv_heads, geo.head_dim) == (2, 4, 2, 16)


@pytest.mark.parametrize("skip_chunk0", [False, True])
def test_dump_stats_equal_streaming_stats(tmp_path, skip_chunk0: bool) -> None:
    chunks = make_chunks()
    write_dump(tmp_path, chunks)
    acc, hold = stats_from_raw_dump(tmp_path, GEO, skip_chunk0=skip_chunk0)
    got = acc.finalize()
    seqs = [s for ch in (chunks[1:] if skip_chunk0 else chunks) for s in ch]
    want = streaming(seqs)
    assert got["num_sequences"] == want["num_sequences"] == len(seqs)
    assert len(hold) == 0
    for layer in range(GEO.num_layers):
        for name, x in want["layers"][layer].items():
            y = got["layers"][layer][name]
            if isinstance(x, torch.Tensor):
                assert float((x - y).abs().max() / x.abs().max()) < 1e-12, name
            else:
                assert x == y


def test_dump_holdout_pieces_are_excluded(tmp_path) -> None:
    chunks = make_chunks()
    write_dump(tmp_path, chunks)
    acc, hold = stats_from_raw_dump(tmp_path, GEO, holdout_seqs=2)
    seqs = [s for ch in chunks for s in ch]
    want = streaming(seqs[:-2])
    assert torch.allclose(acc.finalize()["layers"][0]["svv"], want["layers"][0]["svv"],
                          rtol=1e-12, atol=0)
    held = hold.to_dict()
    assert held["k"][1].shape == (2, 5, 2, 16)  # truncated to the shorter piece
    assert torch.equal(held["q"][0][1], seqs[-1][0][0][:5])


def test_bad_dumps_raise(tmp_path) -> None:
    with pytest.raises(OscarError, match="does not exist"):
        stats_from_raw_dump(tmp_path / "nope", GEO)
    write_dump(tmp_path, make_chunks())
    with pytest.raises(OscarError, match="layers"):
        stats_from_raw_dump(tmp_path, ModelGeometry(3, 4, 2, 16))
    with pytest.raises(OscarError, match="too few"):
        stats_from_raw_dump(tmp_path, GEO, holdout_seqs=6)
    with pytest.raises(OscarError, match="seq_lens"):
        RawDumpWriter(tmp_path).write(0, 9, torch.zeros(3, 4, 16), torch.zeros(3, 2, 16),
                                      torch.zeros(3, 2, 16), [2])
