#!/usr/bin/env python
"""Print the README-style results table of every metrics.json under a folder.

    python scripts/results_table.py rotation/qwen3-8B/GPQA/<tag>      # one model
    python scripts/results_table.py rotation/                          # all models
    python scripts/results_table.py runs/ --tasks gpqa,lcb --out table.md

Cells are μ ± σ over seeds (sample std); a model's score is the mean of its five task means.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oscar_kv.evals.bench.aggregate import TASK_ORDER, collect, report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", help="folder searched recursively for metrics.json")
    ap.add_argument("--tasks", default=",".join(TASK_ORDER),
                    help="tasks (columns) averaged into the mean, in order")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args(argv)
    if not Path(args.root).is_dir():
        print(f"results_table: error: {args.root} is not a folder", file=sys.stderr)
        return 2
    text = report(collect(args.root), tuple(t for t in args.tasks.split(",") if t))
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
