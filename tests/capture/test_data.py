"""Calibration data sources are deterministic and fail clearly on too little data."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from oscar_kv.capture.data import (
    GPQA_TEMPLATE,
    CalibrationData,
    gpqa_prompts,
    load_calibration_data,
    load_gpqa,
    read_documents,
)
from oscar_kv.errors import OscarError


class CharTokenizer:
    """Stand-in tokenizer: one id per character, EOS 0, optional chat template."""

    eos_token_id = 0

    def __init__(self, chat: bool = False) -> None:
        self.chat_template = "{user}" if chat else None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [ord(c) % 250 + 1 for c in text]
        return {"input_ids": ([0] if add_special_tokens else []) + ids}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:
        assert len(messages) == 1 and messages[0]["role"] == "user" and not tokenize
        return "<user>" + messages[0]["content"] + "<assistant>"


def test_token_windows_and_holdout(tmp_path) -> None:
    ids = np.arange(1, 1001, dtype=np.uint16)
    np.save(tmp_path / "t.npy", ids)
    data = load_calibration_data(tmp_path / "t.npy", seq_len=64, max_tokens=300, holdout_seqs=2)
    assert len(data.sequences) == 4 and data.num_tokens == 256
    assert torch.equal(data.sequences[1], torch.arange(65, 129))
    assert data.holdout.shape == (2, 64) and int(data.holdout[0, 0]) == 257
    again = load_calibration_data(tmp_path / "t.npy", seq_len=64, max_tokens=300, holdout_seqs=2)
    assert all(torch.equal(a, b) for a, b in zip(data.sequences, again.sequences, strict=True))
    assert [b.shape for b in data.batches(3)] == [(3, 64), (1, 64)]
    with pytest.raises(OscarError, match="tokens"):
        load_calibration_data(tmp_path / "t.npy", seq_len=64, max_tokens=1000, holdout_seqs=1)
    np.save(tmp_path / "e.npy", np.zeros(0, dtype=np.int64))
    with pytest.raises(OscarError):
        load_calibration_data(tmp_path / "e.npy", seq_len=8, max_tokens=16)
    np.save(tmp_path / "f.npy", np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(OscarError, match="1-D integer"):
        load_calibration_data(tmp_path / "f.npy", seq_len=2, max_tokens=4)


def test_text_and_jsonl(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("abcdefghij")
    with open(tmp_path / "b.jsonl", "w") as f:
        for text in ("klm", "", "nopqrstuvwxyz"):
            f.write(json.dumps({"text": text}) + "\n")
    assert read_documents([tmp_path / "a.txt", tmp_path / "b.jsonl"]) == [
        "abcdefghij", "klm", "nopqrstuvwxyz"]
    tok = CharTokenizer()
    data = load_calibration_data([tmp_path / "a.txt", tmp_path / "b.jsonl"], tokenizer=tok,
                                 seq_len=5, max_tokens=20, holdout_seqs=1)
    assert len(data.sequences) == 4 and data.holdout.shape == (1, 5)
    joined = torch.cat(data.sequences + [data.holdout[0]])
    assert int(joined[10]) == 0  # EOS between documents
    assert int(joined[0]) == ord("a") % 250 + 1
    (tmp_path / "bad.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(OscarError, match="text"):
        load_calibration_data(tmp_path / "bad.jsonl", tokenizer=tok, seq_len=1, max_tokens=1)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(OscarError, match="no text"):
        load_calibration_data(tmp_path / "empty.txt", tokenizer=tok, seq_len=1, max_tokens=1)
    with pytest.raises(OscarError, match="tokenizer"):
        load_calibration_data(tmp_path / "a.txt", seq_len=1, max_tokens=1)


def write_gpqa(path, n: int) -> None:
    cols = ["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
            "Incorrect Answer 3"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols + ["Extra"])
        w.writeheader()
        for i in range(n):
            w.writerow({"Question": f"Q{i}?" + "x" * i, "Correct Answer": f"right{i}",
                        "Incorrect Answer 1": f"w1_{i}", "Incorrect Answer 2": f"w2_{i}",
                        "Incorrect Answer 3": f"w3_{i}", "Extra": ""})


def test_gpqa_prompts_template_and_seeded_permutation(tmp_path) -> None:
    write_gpqa(tmp_path / "g.csv", 6)
    rows = list(csv.DictReader(open(tmp_path / "g.csv")))
    prompts = gpqa_prompts(rows)
    assert prompts == gpqa_prompts(rows)
    assert prompts[0].startswith("Answer the following multiple choice question.")
    assert "\n\nQ0?\n\nA) " in prompts[0] and prompts[0].count("\n") == 7
    assert all(f"right{i}" in p for i, p in enumerate(prompts))  # CSV order kept
    import random

    rng = random.Random(0)
    perm = rng.sample(range(4), 4)
    choices = ["right0", "w1_0", "w2_0", "w3_0"]
    want = GPQA_TEMPLATE.format(Question="Q0?", **dict(zip("ABCD", [choices[i] for i in perm],
                                                           strict=True)))
    assert prompts[0] == want
    assert len(gpqa_prompts(rows, num_prompts=3)) == 3


def test_gpqa_budget_holdout_and_chat_template(tmp_path) -> None:
    write_gpqa(tmp_path / "g.csv", 6)
    tok = CharTokenizer(chat=True)
    first = len("<user><assistant>") + len(gpqa_prompts(
        list(csv.DictReader(open(tmp_path / "g.csv"))))[0])
    data = load_gpqa(str(tmp_path / "g.csv"), tok, max_tokens=first + 10, holdout_seqs=2)
    assert [s.numel() for s in data.sequences] == [first, 10]
    assert int(data.sequences[0][0]) == ord("<") % 250 + 1  # chat template applied, no BOS
    assert data.holdout.shape[0] == 2 and isinstance(data, CalibrationData)
    plain = load_calibration_data(tmp_path / "g.csv", tokenizer=CharTokenizer(),
                                  max_tokens=10**6)
    assert len(plain.sequences) == 6 and int(plain.sequences[0][0]) == 0
    with pytest.raises(OscarError, match="too few"):
        load_gpqa(str(tmp_path / "g.csv"), tok, max_tokens=10**6, holdout_seqs=1)
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(OscarError, match="GPQA"):
        load_gpqa(str(tmp_path / "x.csv"), tok, max_tokens=10)
