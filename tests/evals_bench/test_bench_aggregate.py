"""Aggregation math and the markdown tables."""

from __future__ import annotations

import json

import pytest

from oscar_kv.evals.bench.aggregate import collect, detail_table, fmt_cell, main_table, mean_std

TASKS = ("gpqa", "humaneval", "lcb", "aime25", "math500")


def _write(root, method, model, task, scores):
    d = root / model / f"_eval_{method}" / task
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(
        {"task": task, "method": method, "model_label": model, "scores": scores}))


def test_mean_std_is_sample_std_like_the_paper():
    m, s = mean_std([76.6667, 80.0, 80.0])  # GLM AIME25 OSCAR: 78.89 ± 1.92 (3 seeds)
    assert round(m, 2) == 78.89 and round(s, 2) == 1.92
    assert mean_std([41.41]) == (41.41, None)
    assert fmt_cell([41.41]) == "41.41" and fmt_cell([]) == "–"
    assert fmt_cell([1.0, 3.0]) == "2.00±1.41"


def test_tables(tmp_path):
    for t, v in zip(TASKS, (60, 80, 40, 70, 90), strict=True):
        _write(tmp_path, "bf16", "qwen3-8B", t, [v - 1, v + 1])
        _write(tmp_path, "oscar", "qwen3-8B", t, [v - 2, v - 2])
    _write(tmp_path, "naive", "qwen3-8B", "gpqa", [0.0])
    recs = collect(tmp_path)
    assert len(recs) == 11
    table = main_table(recs)
    assert "| BF16 | 68.00 |" in table and "| OSCAR | 66.00 |" in table
    assert "| Naive INT2 | 0.00 (1/5) |" in table
    det = detail_table(recs, "qwen3-8B")
    assert "| BF16 | 60.00±1.41 | 80.00±1.41 | 40.00±1.41 | 70.00±1.41 | 90.00±1.41 | 68.00 | – |" \
        in det
    assert "| 66.00 | -2.00 |" in det


def test_seed_files_are_pooled(tmp_path):
    _write(tmp_path / "a", "oscar", "m", "gpqa", [50.0])
    _write(tmp_path / "b", "oscar", "m", "gpqa", [60.0])
    assert "55.00±7.07" in detail_table(collect(tmp_path), "m")


@pytest.mark.parametrize("bad", ["{not json", json.dumps({"x": 1})])
def test_collect_skips_unrelated_files(tmp_path, bad):
    (tmp_path / "metrics.json").write_text(bad)
    assert collect(tmp_path) == []
