"""Fixtures for the HF tests: the reference model (fp32 / a 2-layer fp64 cut), held-out tokens,
random rotation sets; one CPU thread (much faster than 2 contended threads for tiny matmuls)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from hf_helpers import load_lm  # noqa: E402

if not torch.cuda.is_available():  # the "triton" backend's kernels run interpreted on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lm_fp32(tiny_lm_dir):
    return load_lm(tiny_lm_dir, torch.float32)


@pytest.fixture(scope="module")
def lm_fp64_cut(tiny_lm_dir):
    """The reference model's first 2 layers in fp64: generation vs simulation then differ only
    by the fp32 attention arithmetic, so semantic errors stand out by ~1000x."""
    return load_lm(tiny_lm_dir, torch.float64, layers=2)


@pytest.fixture(scope="session")
def heldout(tiny_lm_dir) -> torch.Tensor:
    toks = np.load(tiny_lm_dir / "heldout_tokens.npy").astype(np.int64)
    return torch.from_numpy(toks.reshape(-1))
