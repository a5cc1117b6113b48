"""Frozen configuration nouns. Everything that changes numerics lives here, defined once.

`QuantSpec` is the INT2 body format, `WindowSpec` the BF16 sink/recent windows, and
`ModelGeometry` the attention shape a checkpoint must match.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from oscar_kv.errors import OscarError

SCALE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_SCALE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                  "float": "float32"}
QUANTIZERS = ("minmax", "lloyd_max", "lloyd_max_uniform116")


def canonical_scale_dtype(name: str) -> str:
    """Map user spellings (bf16, fp16, float32, ...) to the canonical dtype name."""
    name = _SCALE_ALIASES.get(name, name)
    if name not in SCALE_DTYPES:
        raise OscarError(f"scale dtype {name!r} is not supported; use one of: "
                         f"{', '.join(SCALE_DTYPES)}")
    return name


@dataclass(frozen=True)
class QuantSpec:
    """INT2 body format: per (token, kv head, group of `group_size` dims) asymmetric INT2.

    scale/zero are stored in `scale_dtype` (16-bit by default: the body then costs
    2 + 2*16/group_size bits per element).
    """

    group_size: int = 128
    scale_dtype: str = "bfloat16"
    quantizer: str = "minmax"
    eps: float = 1e-8

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale_dtype", canonical_scale_dtype(self.scale_dtype))
        if self.quantizer not in QUANTIZERS:
            raise OscarError(f"unknown quantizer {self.quantizer!r}; choose one of: "
                             f"{', '.join(QUANTIZERS)}")
        if self.group_size <= 0:
            raise OscarError(f"group size must be positive, got {self.group_size}")

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    @property
    def scale_bits(self) -> int:
        return torch.finfo(self.torch_scale_dtype).bits

    def groups(self, head_dim: int) -> int:
        """Number of groups per head row; fails clearly if head_dim is not a multiple."""
        if head_dim % self.group_size != 0:
            raise OscarError(f"head_dim {head_dim} is not divisible by group size "
                             f"{self.group_size}; pick a group size that divides head_dim")
        if head_dim % 4 != 0:
            raise OscarError(f"head_dim {head_dim} must be a multiple of 4 for INT2 packing")
        return head_dim // self.group_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class WindowSpec:
    """BF16 windows around the INT2 body.

    Positions [0, sink_tokens) stay BF16 forever (sink by position). The most recent tokens
    stay BF16; they move to INT2 `flush_block` tokens at a time, so the recent window holds
    between recent_tokens and recent_tokens + flush_block - 1 tokens once it is full.
    """

    sink_tokens: int = 64
    recent_tokens: int = 256
    flush_block: int = 8

    def __post_init__(self) -> None:
        if self.sink_tokens < 0 or self.recent_tokens < 0:
            raise OscarError("sink and recent window sizes must be >= 0")
        if self.flush_block < 1:
            raise OscarError(f"flush block must be >= 1, got {self.flush_block}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelGeometry:
    """The attention shape a rotation checkpoint is fitted for."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    model_type: str = ""
    name_or_path: str = ""

    def __post_init__(self) -> None:
        if self.num_kv_heads <= 0 or self.num_q_heads % self.num_kv_heads != 0:
            raise OscarError(f"num_q_heads {self.num_q_heads} must be a positive multiple of "
                             f"num_kv_heads {self.num_kv_heads}")

    @property
    def gqa_ratio(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelGeometry":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def check_matches(self, other: "ModelGeometry", what: str) -> None:
        """Raise OscarError naming both sides if the attention shapes differ."""
        keys = ("num_layers", "num_q_heads", "num_kv_heads", "head_dim")
        bad = [k for k in keys if getattr(self, k) != getattr(other, k)]
        if bad:
            mine = ", ".join(f"{k}={getattr(self, k)}" for k in bad)
            theirs = ", ".join(f"{k}={getattr(other, k)}" for k in bad)
            raise OscarError(f"{what} was made for a model with {theirs} but this model has "
                             f"{mine}; refit it for this model")
