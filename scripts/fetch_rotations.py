#!/usr/bin/env python
"""Download published OSCAR RotationZoo rotations into rotation/<model>/<dataset>/<tag>/rotations.

    python scripts/fetch_rotations.py --dry-run              # list what would be fetched
    python scripts/fetch_rotations.py --model qwen3-8B       # one model
    python scripts/fetch_rotations.py --repo OWNER/NAME --revision REV

Files are the reference checkpoints (`{k,v}_rotation_qqt_r_h_pbr.pt`, group 128), which
`oscar_kv.fit.checkpoint` loads as-is. The repo layout is assumed to be
`<model>/<DATASET>/<tag>/rotations/<file>`; when a path is missing the script lists the
repo's matching files instead of guessing. Uses `huggingface_hub` (imported lazily) and the
usual HF_HOME / HF_TOKEN from the environment.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = "Zhongzhu/OSCAR-RotationZoo"
FILES = ("k_rotation_qqt_r_h_pbr.pt", "v_rotation_sst_r_h_pbr.pt")
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ZooEntry:
    """One published calibration: our folder name, the zoo's folder name and tag (spec §8)."""

    model: str
    zoo_model: str
    tag: str
    dataset: str = "GPQA"


ZOO = (
    ZooEntry("qwen3-4B-thinking-2507", "qwen3-4B-thinking-2507", "seq20000_prompt83_group128"),
    ZooEntry("qwen3-8B", "qwen3-8B", "seq20000_prompt83_group128"),
    ZooEntry("qwen3-32B", "qwen3-32B", "seq16000_prompt69_group128"),
    ZooEntry("GLM-4.7", "GLM-4.7", "seq10000_prompt43_group128"),
)


def targets(entries: tuple[ZooEntry, ...], dest_root: Path) -> list[tuple[str, Path]]:
    """(path in the hub repo, local destination) for every file of `entries`."""
    out = []
    for e in entries:
        local = dest_root / e.model / e.dataset / e.tag / "rotations"
        for f in FILES:
            out.append((f"{e.zoo_model}/{e.dataset}/{e.tag}/rotations/{f}", local / f))
    return out


def fetch(pairs: list[tuple[str, Path]], repo: str, revision: str | None) -> int:
    try:
        from huggingface_hub import hf_hub_download, list_repo_files
    except ImportError:
        print("fetch_rotations: error: pip install huggingface_hub", file=sys.stderr)
        return 2
    available = set(list_repo_files(repo, revision=revision))
    missing = [src for src, _ in pairs if src not in available]
    if missing:
        print("fetch_rotations: error: not in the repo: " + ", ".join(missing), file=sys.stderr)
        print("files matching *_rotation_*.pt there:", file=sys.stderr)
        for f in sorted(available):
            if "_rotation_" in f:
                print(f"  {f}", file=sys.stderr)
        return 2
    for src, dst in pairs:
        cached = hf_hub_download(repo, src, revision=revision)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cached, dst)
        print(f"{src} -> {dst}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=None,
                    help=f"our model folder name (repeatable); default all: "
                         f"{', '.join(e.model for e in ZOO)}")
    ap.add_argument("--repo", default=REPO)
    ap.add_argument("--revision", default=None)
    ap.add_argument("--dest", default=str(ROOT / "rotation"), help="rotation/ root")
    ap.add_argument("--dry-run", action="store_true", help="list targets, download nothing")
    args = ap.parse_args(argv)
    known = {e.model: e for e in ZOO}
    names = args.model or list(known)
    bad = [n for n in names if n not in known]
    if bad:
        print(f"fetch_rotations: error: no published rotations for {bad}; choose from "
              f"{', '.join(known)}", file=sys.stderr)
        return 2
    pairs = targets(tuple(known[n] for n in names), Path(args.dest))
    if args.dry_run:
        for src, dst in pairs:
            print(f"{args.repo}:{src} -> {dst}")
        return 0
    return fetch(pairs, args.repo, args.revision)


if __name__ == "__main__":
    sys.exit(main())
