"""compare_stats: identical captures agree exactly, bf16-perturbed ones by ~bf16 rounding, and
captures of different tokens or geometry are refused rather than compared."""

from __future__ import annotations

import json

import pytest
import torch

from oscar_kv.capture.compare import compare_stats, main
from oscar_kv.capture.stats import save_stats
from oscar_kv.config import ModelGeometry
from oscar_kv.errors import OscarError
from tests.capture.test_stats import random_sequences, run_accumulator

GEO = ModelGeometry(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=8)


def _bf16(seqs: list[dict]) -> list[dict]:
    """The same sequences as another forward implementation would produce them: q/k/v
    rounded through bf16."""
    r = lambda x: x.to(torch.bfloat16).to(torch.float32)
    return [{layer: tuple(r(x) for x in qkv) for layer, qkv in s.items()} for s in seqs]


def test_same_tokens_same_kernels_agree_exactly():
    seqs = random_sequences(GEO, [7, 12])
    res = compare_stats(run_accumulator(GEO, seqs), run_accumulator(GEO, seqs))
    assert res["worst"][2] == 0.0 and res["num_tokens"] == 19
    assert set(res["max"]) == {"qq", "kk", "vv", "wvv", "svv", "k_sum", "w_sum", "s_sum"}


def test_bf16_rounding_shows_as_small_differences():
    seqs = random_sequences(GEO, [7, 12])
    res = compare_stats(run_accumulator(GEO, seqs), run_accumulator(GEO, _bf16(seqs)))
    assert 1e-5 < res["worst"][2] < 1e-2  # nonzero, of bf16's order (2^-9 per element)


def test_different_tokens_or_geometry_are_refused():
    a = run_accumulator(GEO, random_sequences(GEO, [7, 12]))
    with pytest.raises(OscarError, match="different tokens"):
        compare_stats(a, run_accumulator(GEO, random_sequences(GEO, [7, 13])))
    geo2 = ModelGeometry(num_layers=2, num_q_heads=4, num_kv_heads=1, head_dim=8)
    with pytest.raises(OscarError, match="different models"):
        compare_stats(a, run_accumulator(geo2, random_sequences(geo2, [7, 12])))
    b = run_accumulator(GEO, random_sequences(GEO, [7, 12]))
    for layer in b["layers"].values():
        del layer["svv"], layer["s_sum"]
    with pytest.raises(OscarError, match="one file only"):
        compare_stats(a, b)
    b = run_accumulator(GEO, random_sequences(GEO, [7, 12]))
    b["layers"][1]["kk"][0, 0, 0] = float("nan")
    with pytest.raises(OscarError, match="not finite"):
        compare_stats(a, b)


def test_cli_exit_status_and_json(tmp_path, capsys):
    seqs = random_sequences(GEO, [9])
    save_stats(tmp_path / "a", run_accumulator(GEO, seqs))
    save_stats(tmp_path / "b", run_accumulator(GEO, _bf16(seqs)))
    save_stats(tmp_path / "c", run_accumulator(GEO, random_sequences(GEO, [10])))
    out = tmp_path / "cmp.json"
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["ok"] is True
    assert "largest relative difference" in capsys.readouterr().out
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--tol", "1e-9"]) == 1
    assert main([str(tmp_path / "a"), str(tmp_path / "c")]) == 2
    assert "different tokens" in capsys.readouterr().err
    assert main([str(tmp_path / "a"), str(tmp_path / "missing")]) == 2


def test_where_the_model_was_loaded_from_is_not_a_difference():
    """HF calibration records the model's path (config._name_or_path), the SGLang capture
    leaves it empty: the same model, so scripts/sglang_capture_check.py must compare them.
    A different model type (both named) is still refused."""
    seqs = random_sequences(GEO, [7, 12])
    a, b = run_accumulator(GEO, seqs), run_accumulator(GEO, seqs)
    a["model"] |= {"name_or_path": "/models/tiny", "model_type": "qwen3"}
    b["model"] |= {"name_or_path": "", "model_type": "qwen3"}
    assert compare_stats(a, b)["worst"][2] == 0.0
    b["model"]["model_type"] = ""  # unknown on one side: not a difference
    assert compare_stats(a, b)["worst"][2] == 0.0
    b["model"]["model_type"] = "llama"
    with pytest.raises(OscarError, match="different models"):
        compare_stats(a, b)


def test_nan_against_an_all_zero_moment_is_refused():
    """max(0.0, nan) is 0.0 in Python: a NaN moment compared with an all-zero one must not
    read as 'no difference'."""
    seqs = random_sequences(GEO, [7, 12])
    a, b = run_accumulator(GEO, seqs), run_accumulator(GEO, seqs)
    a["layers"][0]["w_sum"].zero_()
    b["layers"][0]["w_sum"].zero_()
    b["layers"][0]["w_sum"][0] = float("nan")
    with pytest.raises(OscarError, match="not finite"):
        compare_stats(a, b)
    with pytest.raises(OscarError, match="not finite"):
        compare_stats(b, a)
