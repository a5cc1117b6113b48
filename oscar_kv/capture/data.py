"""Deterministic calibration token sources.

- token files (``.npy``, 1-D int ids): the first ``max_tokens`` tokens cut into ``seq_len``
  windows; the holdout windows are the tokens right after them.
- text files (``.txt`` etc., one document each) and ``.jsonl`` (one document per line, field
  ``text``): tokenized with the model's tokenizer, documents joined by the EOS id, then windowed
  like a token file.
- GPQA prompts (spec §1.4): the simple-evals multiple-choice template, answers permuted with
  ``random.Random(0)``, rendered with the tokenizer's chat template when it has one. Each prompt
  is one sequence; the budget truncates the last one. The CSV path or URL comes from the user.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oscar_kv.errors import OscarError

GPQA_TEMPLATE = (
    "Answer the following multiple choice question. The last line of your response should be "
    "of the following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. "
    "Think step by step before answering.\n\n{Question}\n\nA) {A}\nB) {B}\nC) {C}\nD) {D}"
)
SOURCE_KINDS = ("auto", "tokens", "text", "gpqa")


@dataclass(frozen=True)
class CalibrationData:
    """sequences: int64 [T_i] each (calibration); holdout: int64 [S_h, T_h] (may be 0 rows)."""

    sequences: list[torch.Tensor]
    holdout: torch.Tensor
    source: str

    @property
    def num_tokens(self) -> int:
        return sum(int(s.numel()) for s in self.sequences)

    def batches(self, batch_size: int = 1) -> list[torch.Tensor]:
        """Consecutive equal-length sequences stacked into int64 [B <= batch_size, T] batches."""
        if batch_size < 1:
            raise OscarError(f"batch size must be >= 1, got {batch_size}")
        out: list[torch.Tensor] = []
        group: list[torch.Tensor] = []
        for s in self.sequences:
            if group and (len(group) == batch_size or group[0].numel() != s.numel()):
                out.append(torch.stack(group))
                group = []
            group.append(s)
        if group:
            out.append(torch.stack(group))
        return out


def windows_from_ids(ids: Sequence[int] | np.ndarray | torch.Tensor, seq_len: int,
                     max_tokens: int, holdout_seqs: int = 0, source: str = "tokens"
                     ) -> CalibrationData:
    """Cut the first max_tokens ids (rounded down to whole windows) into seq_len windows."""
    if seq_len < 1 or max_tokens < seq_len:
        raise OscarError(f"need seq_len >= 1 and max_tokens >= seq_len, got seq_len={seq_len}, "
                         f"max_tokens={max_tokens}")
    flat = torch.as_tensor(np.asarray(ids).astype(np.int64)).reshape(-1)
    n_cal = max_tokens // seq_len
    need = (n_cal + holdout_seqs) * seq_len
    if flat.numel() < need:
        raise OscarError(f"{source} has {flat.numel()} tokens but {n_cal} calibration + "
                         f"{holdout_seqs} holdout windows of {seq_len} need {need}; lower "
                         f"--max-tokens or --seq-len or add data")
    wins = flat[:need].reshape(n_cal + holdout_seqs, seq_len)
    return CalibrationData(sequences=list(wins[:n_cal]), holdout=wins[n_cal:].clone(),
                           source=source)


def read_token_array(path: str | os.PathLike) -> np.ndarray:
    """A validated 1-D integer token array from a ``.npy`` file (memory-mapped)."""
    p = Path(path)
    if not p.is_file():
        raise OscarError(f"token file {p} does not exist")
    arr = np.load(p, mmap_mode="r", allow_pickle=False)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise OscarError(f"{p} must hold a 1-D integer array of token ids, got {arr.dtype} "
                         f"{arr.shape}")
    return arr


def load_token_file(path: str | os.PathLike, seq_len: int, max_tokens: int,
                    holdout_seqs: int = 0) -> CalibrationData:
    """Windows from a 1-D integer ``.npy`` token file."""
    p = Path(path)
    arr = read_token_array(p)
    limit = (max_tokens // max(seq_len, 1) + holdout_seqs) * max(seq_len, 1)
    return windows_from_ids(np.asarray(arr[:limit]), seq_len, max_tokens, holdout_seqs,
                            source=f"tokens:{p}")


def read_documents(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Documents in path order: a ``.jsonl`` gives one per line (field ``text``), else one file."""
    docs: list[str] = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise OscarError(f"text file {p} does not exist")
        if p.suffix == ".jsonl":
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                rec = json.loads(line)
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise OscarError(f"{p} line {n} has no string field 'text'")
                docs.append(rec["text"])
        else:
            docs.append(p.read_text(encoding="utf-8"))
    docs = [d for d in docs if d]
    if not docs:
        raise OscarError(f"no text found in {', '.join(map(str, paths))}")
    return docs


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def load_text_files(paths: Sequence[str | os.PathLike], tokenizer: Any, seq_len: int,
                    max_tokens: int, holdout_seqs: int = 0) -> CalibrationData:
    """Tokenize documents (EOS between them, if the tokenizer has one) and window them."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    limit = (max_tokens // max(seq_len, 1) + holdout_seqs) * max(seq_len, 1)
    for doc in read_documents(paths):
        if ids and eos is not None:
            ids.append(int(eos))
        ids.extend(_encode(tokenizer, doc))
        if len(ids) >= limit:
            break
    return windows_from_ids(ids, seq_len, max_tokens, holdout_seqs,
                            source="text:" + ",".join(str(p) for p in paths))


def read_gpqa_rows(csv_path_or_url: str) -> list[dict]:
    """Rows of a GPQA CSV (local path or http(s) URL given by the user)."""
    if csv_path_or_url.startswith(("http://", "https://")):
        with urllib.request.urlopen(csv_path_or_url, timeout=60) as resp:
            text = resp.read().decode("utf-8")
    else:
        p = Path(csv_path_or_url)
        if not p.is_file():
            raise OscarError(f"GPQA CSV {p} does not exist; pass a local path or a URL")
        text = p.read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    need = {"Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
            "Incorrect Answer 3"}
    if not rows or not need <= set(rows[0]):
        raise OscarError(f"{csv_path_or_url} is not a GPQA CSV (needs columns {sorted(need)})")
    return rows


def gpqa_prompts(rows: Sequence[dict], num_prompts: int | None = None, seed: int = 0
                 ) -> list[str]:
    """simple-evals prompts; one RNG subsamples (only if num_prompts < len) then permutes."""
    rng = random.Random(seed)
    rows = list(rows)
    if num_prompts is not None and num_prompts < len(rows):
        rows = rng.sample(rows, num_prompts)
    prompts = []
    for row in rows:
        perm = rng.sample(range(4), 4)
        choices = [row["Correct Answer"], row["Incorrect Answer 1"], row["Incorrect Answer 2"],
                   row["Incorrect Answer 3"]]
        choices = [choices[i] for i in perm]
        prompts.append(GPQA_TEMPLATE.format(Question=row["Question"], A=choices[0],
                                            B=choices[1], C=choices[2], D=choices[3]))
    return prompts


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """One user message through the chat template (no system message), else plain text."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
        return _encode(tokenizer, text)
    return list(tokenizer(prompt)["input_ids"])


def load_gpqa(csv_path_or_url: str, tokenizer: Any, max_tokens: int, holdout_seqs: int = 0,
              num_prompts: int | None = None) -> CalibrationData:
    """Prompts in order until max_tokens (last one truncated); the next ones are the holdout.

    Holdout prompts are truncated to the shortest of them so they stack to [S_h, T_h].
    """
    encoded = [torch.tensor(encode_prompt(tokenizer, p), dtype=torch.long)
               for p in gpqa_prompts(read_gpqa_rows(csv_path_or_url), num_prompts)]
    seqs: list[torch.Tensor] = []
    used = 0
    for ids in encoded:
        if used >= max_tokens:
            break
        seqs.append(ids[:max_tokens - used])
        used += seqs[-1].numel()
    held = encoded[len(seqs):len(seqs) + holdout_seqs]
    if not seqs or len(held) < holdout_seqs:
        raise OscarError(f"GPQA gave {len(encoded)} prompts, too few for the token budget plus "
                         f"{holdout_seqs} holdout prompts; lower --max-tokens or --holdout-seqs")
    t_min = min((h.numel() for h in held), default=0)
    holdout = (torch.stack([h[:t_min] for h in held]) if held
               else torch.zeros(0, 0, dtype=torch.long))
    return CalibrationData(sequences=seqs, holdout=holdout, source=f"gpqa:{csv_path_or_url}")


def load_calibration_data(source: str | os.PathLike | Sequence[str | os.PathLike], *,
                          kind: str = "auto", tokenizer: Any = None, seq_len: int = 2048,
                          max_tokens: int = 200_000, holdout_seqs: int = 0,
                          num_prompts: int | None = None) -> CalibrationData:
    """Dispatch on ``kind`` (auto: ``.npy`` -> tokens, ``.csv``/URL -> gpqa, else text)."""
    paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not paths:
        raise OscarError("no calibration data source given")
    if kind not in SOURCE_KINDS:
        raise OscarError(f"unknown data kind {kind!r}; choose one of: {', '.join(SOURCE_KINDS)}")
    first = str(paths[0])
    if kind == "auto":
        kind = ("tokens" if first.endswith(".npy") else
                "gpqa" if first.endswith(".csv") or first.startswith(("http://", "https://"))
                else "text")
    if kind != "tokens" and tokenizer is None:
        raise OscarError(f"{kind} data needs the model's tokenizer")
    if kind == "tokens":
        if len(paths) != 1:
            raise OscarError("give exactly one .npy token file")
        return load_token_file(paths[0], seq_len, max_tokens, holdout_seqs)
    if kind == "gpqa":
        return load_gpqa(first, tokenizer, max_tokens, holdout_seqs, num_prompts)
    return load_text_files(paths, tokenizer, seq_len, max_tokens, holdout_seqs)


def load_hf_tokenizer(path: str | os.PathLike) -> Any:
    """The model's tokenizer from a local directory (no network)."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise OscarError(f"no tokenizer directory at {path}; pass the local model directory")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
