"""Shared fixtures: the reference model location and GPU/model skips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Triton must see TRITON_INTERPRET before anything imports it (transformers does), so set it
# here, first, on machines without a GPU: kernels then run on CPU tensors in the interpreter.
if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch as _torch

        if not _torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass

REPO = Path(__file__).resolve().parents[1]


def reference_model_dir() -> Path | None:
    """OSCAR_TINY_LM env var, else ../shared/models/oscar-tiny-code-lm beside the repo."""
    env = os.environ.get("OSCAR_TINY_LM")
    for cand in ([Path(env)] if env else []) + [
        REPO.parent / "shared" / "models" / "oscar-tiny-code-lm",
        REPO / "shared" / "models" / "oscar-tiny-code-lm",
    ]:
        if (cand / "config.json").exists() and (cand / "model.safetensors").exists():
            return cand
    return None


def _load_script(relpath: str):
    """A repo script (benchmarks/..., scripts/...) imported as a module, not run."""
    import importlib.util

    path = REPO / relpath
    spec = importlib.util.spec_from_file_location("_script_" + path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def load_script():
    """load_script("benchmarks/bench_decode.py") -> the module (for smoke and helper tests)."""
    return _load_script


@pytest.fixture(scope="session")
def tiny_lm_dir() -> Path:
    d = reference_model_dir()
    if d is None:
        pytest.skip("reference model not found: set OSCAR_TINY_LM or place it at "
                    "../shared/models/oscar-tiny-code-lm")
    return d


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
