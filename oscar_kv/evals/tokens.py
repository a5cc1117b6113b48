"""Evaluation sequences from token files: held-out LM windows and long-range copy probes.

`load_token_file` reads a 1-D `.npy` of token ids, or a text / `.jsonl` file tokenized with
the model's tokenizer. Evaluation windows come from the *second half* of the tokens by default,
so a calibration run on the first tokens never overlaps them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from oscar_kv.capture.data import read_token_array
from oscar_kv.errors import OscarError


def load_token_file(path: str | Path, tokenizer=None) -> np.ndarray:
    """Token ids as int64 [N] from a .npy, or from text/.jsonl via `tokenizer`."""
    p = Path(path)
    if not p.exists():
        raise OscarError(f"data file {p} does not exist; pass a token .npy, .txt or .jsonl path")
    if p.suffix == ".npy":
        toks = np.asarray(read_token_array(p)).astype(np.int64)
    else:
        if tokenizer is None:
            raise OscarError(f"{p} is text; a tokenizer is needed (pass --model with one)")
        if p.suffix == ".jsonl":
            texts = [json.loads(line).get("text", "") for line in p.read_text().splitlines()
                     if line.strip()]
        else:
            texts = [p.read_text()]
        ids: list[int] = []
        for t in texts:
            ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        toks = np.asarray(ids, dtype=np.int64)
    if toks.size == 0:
        raise OscarError(f"{p} holds no tokens")
    return toks


def lm_windows(tokens: np.ndarray, seq_len: int, num_seqs: int, start: int | None = None
               ) -> torch.Tensor:
    """[num_seqs, seq_len] int64 non-overlapping windows from tokens[start:] (default: the
    second half). Fails clearly when there are too few tokens."""
    start = len(tokens) // 2 if start is None else start
    avail = (len(tokens) - start) // seq_len
    if avail < num_seqs:
        raise OscarError(f"need {num_seqs} windows of {seq_len} tokens after position {start} "
                         f"but the data has only {avail}; lower --num-seqs or --seq-len")
    arr = tokens[start:start + num_seqs * seq_len].reshape(num_seqs, seq_len)
    return torch.from_numpy(np.ascontiguousarray(arr))


def copy_probes(tokens: np.ndarray, seq_len: int, num_seqs: int, span: int = 64,
                span_pos: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Long-range copy (induction) probes: [filler | span | filler | span], seq_len tokens.

    The first copy of the span starts at `span_pos` (after the sink, so it lands in the INT2
    body); the second copy ends the sequence. Returns (ids [num_seqs, seq_len] int64,
    score_mask [num_seqs, seq_len] bool) where the mask marks the positions whose *next*
    token is a span token to be recalled: all of the second copy except its first 8 tokens
    (those identify the span).
    """
    if seq_len < span_pos + 2 * span + 16:
        raise OscarError(f"seq_len {seq_len} is too short for copy probes of span {span}")
    rng = np.random.default_rng(seed)
    half = len(tokens) // 2
    ids = np.empty((num_seqs, seq_len), dtype=np.int64)
    filler_len = seq_len - 2 * span
    for i in range(num_seqs):
        s0 = int(rng.integers(half, len(tokens) - span))
        f0 = int(rng.integers(half, len(tokens) - filler_len))
        sp, fill = tokens[s0:s0 + span], tokens[f0:f0 + filler_len]
        ids[i] = np.concatenate([fill[:span_pos], sp, fill[span_pos:], sp])
    mask = torch.zeros(num_seqs, seq_len, dtype=torch.bool)
    cue = 8
    # logits at position t predict token t+1: score predictions of span[cue:] in the 2nd copy.
    mask[:, seq_len - span + cue - 1: seq_len - 1] = True
    return torch.from_numpy(ids), mask
