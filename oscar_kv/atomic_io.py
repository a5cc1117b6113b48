"""All-or-nothing writes of output folders: nothing half-written is ever left behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch


def write_files_atomic(out_dir: str | Path, files: dict[str, dict | str]) -> list[Path]:
    """Write {name: checkpoint dict (torch.save) | text} into out_dir; all or nothing.

    Everything is written into a temp dir beside out_dir first; a new out_dir is renamed into
    place whole, an existing one receives each finished file by os.replace."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, obj in files.items():
            if isinstance(obj, str):
                (tmp / name).write_text(obj)
            else:
                torch.save(obj, tmp / name)
        if not out.exists():
            os.replace(tmp, out)
        else:
            for name in files:
                os.replace(tmp / name, out / name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return [out / name for name in files]
