"""Dataset loading: a local file when given, else the HF hub (imported lazily).

Every task accepts `--data FILE` (`.jsonl`, `.json` list, or `.csv`) with the same field
names as its hub dataset, so offline runs and tests use the very code path of a real run.
Nothing here holds machine-specific paths: the hub cache follows `HF_HOME` / `HF_DATASETS_CACHE`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from oscar_kv.errors import OscarError


@dataclass(frozen=True)
class HubSource:
    """Where a task's data lives on the hub: a `datasets` id or raw files of a dataset repo."""

    repo: str
    split: str = "test"
    config: str | None = None
    files: tuple[str, ...] = ()  # when set: download these jsonl files with huggingface_hub
    note: str = ""


def read_local(path: str | Path) -> list[dict]:
    """Rows of a .jsonl / .json / .csv file as dicts (csv values stay strings)."""
    p = Path(path)
    if not p.is_file():
        raise OscarError(f"data file {p} does not exist; pass an existing .jsonl/.json/.csv")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        with p.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if suffix == ".json":
        obj = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(obj, dict):
            obj = next((v for v in obj.values() if isinstance(v, list)), None)
        if not isinstance(obj, list):
            raise OscarError(f"{p} holds no list of rows; use a JSON list or .jsonl")
        return obj
    if suffix == ".csv":
        with p.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    raise OscarError(f"unsupported data file {p}; use .jsonl, .json or .csv")


def _load_hub_files(src: HubSource) -> list[dict]:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise OscarError("loading from the hub needs `pip install huggingface_hub`, or pass "
                         "--data FILE") from e
    rows: list[dict] = []
    for name in src.files:
        local = hf_hub_download(repo_id=src.repo, filename=name, repo_type="dataset")
        rows.extend(read_local(local))
    return rows


def _load_hub_dataset(src: HubSource) -> list[dict]:
    try:
        import datasets
    except ImportError as e:
        raise OscarError(f"loading {src.repo} needs `pip install datasets`, or pass --data FILE"
                         f" with the same fields{(' (' + src.note + ')') if src.note else ''}"
                         ) from e
    ds = datasets.load_dataset(src.repo, src.config, split=src.split)
    return [dict(r) for r in ds]


def load_rows(data: str | None, src: HubSource) -> list[dict]:
    """Rows from `data` if given, else from the hub source."""
    if data:
        return read_local(data)
    return _load_hub_files(src) if src.files else _load_hub_dataset(src)


def field(row: dict, *names: str, default: object = None) -> object:
    """First present, non-empty field among `names` (datasets differ in capitalisation)."""
    for n in names:
        if n in row and row[n] not in (None, ""):
            return row[n]
    if default is not None:
        return default
    raise OscarError(f"data row has none of the fields {names}; got {sorted(row)[:12]}")
