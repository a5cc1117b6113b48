"""Aggregate `metrics.json` files into the README-style tables.

Per (method, model, task) cell: per-seed scores from every matching metrics file are pooled;
the cell is their mean and sample standard deviation (ddof 1, as in the paper's μ ± σ; a
single run shows no σ). A model's score for a method is the mean of its task means over the
five tasks (per-seed scores averaged first, then across tasks), shown only when all tasks are
present; partial rows show the mean over the tasks present, marked with `(k/5)`.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

TASK_ORDER = ("gpqa", "humaneval", "lcb", "aime25", "math500")
TASK_LABELS = {"gpqa": "GPQA", "humaneval": "HumanEval", "lcb": "LCB v6", "aime25": "AIME25",
               "math500": "MATH500"}
METHOD_ORDER = ("bf16", "naive", "hadamard", "oscar")
METHOD_LABELS = {"bf16": "BF16", "naive": "Naive INT2", "hadamard": "Hadamard INT2",
                 "oscar": "OSCAR"}


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """(mean, sample std with ddof 1) of `values`; std is None for fewer than two values."""
    if not values:
        return float("nan"), None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def collect(root: str | Path) -> list[dict]:
    """Every metrics.json under `root` (recursively), each with its `path` added."""
    out = []
    for p in sorted(Path(root).rglob("metrics.json")):
        try:
            m = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(m, dict) and "task" in m and "scores" in m:
            out.append({**m, "path": str(p)})
    return out


def cells(records: list[dict]) -> dict[tuple[str, str, str], list[float]]:
    """(method, model_label, task) -> pooled per-seed scores."""
    acc: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in records:
        key = (r.get("method") or "?", r.get("model_label") or r.get("model") or "?", r["task"])
        acc[key].extend(float(s) for s in r["scores"])
    return dict(acc)


def _ordered(names: set[str], order: tuple[str, ...]) -> list[str]:
    return [n for n in order if n in names] + sorted(names - set(order))


def fmt_cell(values: list[float] | None) -> str:
    """'67.27±1.80', '41.41' (one run) or '–' (missing)."""
    if not values:
        return "–"
    m, s = mean_std(values)
    return f"{m:.2f}" if s is None else f"{m:.2f}±{s:.2f}"


def model_mean(c: dict, method: str, model: str, tasks: tuple[str, ...]) -> tuple[float, int]:
    """(mean over present tasks of the task means, number of tasks present)."""
    means = [mean_std(c[(method, model, t)])[0] for t in tasks if (method, model, t) in c]
    return (sum(means) / len(means) if means else float("nan")), len(means)


def _fmt_mean(v: float, k: int, total: int) -> str:
    if k == 0:
        return "–"
    return f"{v:.2f}" if k == total else f"{v:.2f} ({k}/{total})"


def main_table(records: list[dict], tasks: tuple[str, ...] = TASK_ORDER) -> str:
    """Methods × models, each cell the task mean (markdown)."""
    c = cells(records)
    methods = _ordered({k[0] for k in c}, METHOD_ORDER)
    models = _ordered({k[1] for k in c}, ())
    lines = ["| Method | " + " | ".join(models) + " |",
             "|:---|" + "---:|" * len(models)]
    for meth in methods:
        row = [_fmt_mean(*model_mean(c, meth, mod, tasks), len(tasks)) for mod in models]
        lines.append(f"| {METHOD_LABELS.get(meth, meth)} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def detail_table(records: list[dict], model: str, tasks: tuple[str, ...] = TASK_ORDER,
                 baseline: str = "bf16") -> str:
    """One model: methods × tasks (μ ± σ), the mean and the drop vs `baseline` (markdown)."""
    c = cells(records)
    methods = _ordered({k[0] for k in c if k[1] == model}, METHOD_ORDER)
    head = [TASK_LABELS.get(t, t) for t in tasks]
    lines = ["| Method | " + " | ".join(head) + " | Mean | Drop |",
             "|:---|" + "---:|" * (len(tasks) + 2)]
    base, kb = model_mean(c, baseline, model, tasks)
    for meth in methods:
        v, k = model_mean(c, meth, model, tasks)
        full = kb == len(tasks) and k == len(tasks)
        drop = f"{v - base:+.2f}" if full and meth != baseline else "–"
        row = [fmt_cell(c.get((meth, model, t))) for t in tasks]
        lines.append(f"| {METHOD_LABELS.get(meth, meth)} | " + " | ".join(row)
                     + f" | {_fmt_mean(v, k, len(tasks))} | {drop} |")
    return "\n".join(lines)


def report(records: list[dict], tasks: tuple[str, ...] = TASK_ORDER) -> str:
    """The main table followed by one detail table per model (markdown)."""
    if not records:
        return "no metrics.json found"
    models = _ordered({k[1] for k in cells(records)}, ())
    parts = ["## Mean over " + ", ".join(TASK_LABELS.get(t, t) for t in tasks),
             "", main_table(records, tasks)]
    for mod in models:
        parts += ["", f"### {mod}", "", detail_table(records, mod, tasks)]
    return "\n".join(parts) + "\n"
