"""Without a GPU the Triton write kernel runs in its CPU interpreter; the variable must be set
before a `@triton.jit` body is imported (the kernel wrappers import them lazily)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
