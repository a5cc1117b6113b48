"""Kernel tests: Triton runs in its CPU interpreter (TRITON_INTERPRET=1) when no GPU is present.

The variable must be set before any `@triton.jit` body is imported; the wrappers import
their bodies lazily, so setting it here, at collection, is early enough.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP oversubscription stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def triton_device() -> str:
    """'cuda' on a GPU, else 'cpu' (interpreted); skips when Triton is not installed."""
    pytest.importorskip("triton")
    return "cuda" if torch.cuda.is_available() else "cpu"
