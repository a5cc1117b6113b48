"""Wrapper for the fused INT2 write kernel: check layouts, then launch.

`write_int2_triton` has the signature of `ref.write_int2_ref`. Codes, packed bytes, scale
and zero are bit-exact with the reference for the same rotated input (rotation=None, or rows
already rotated). With the rotation fused, the kernel's fp32 dot sums in a different order
than torch's matmul, so a code can differ where x/scale + zero lands within an ulp of a
rounding boundary (a fraction ~1e-5 of codes; the metadata within one ulp of its dtype).
Only the `minmax` quantizer has a kernel; others fall back to the reference with a warning.
"""

from __future__ import annotations

import os
import warnings

import torch

from oscar_kv.config import QuantSpec
from oscar_kv.errors import OscarError
from oscar_kv.formats.clip import clip_index
from oscar_kv.formats.quant import RANGE_FLOOR, eps_for
from oscar_kv.kernels import ref

_META = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
MAX_FUSED_ROTATION_DIM = 128  # R [D, D] fp32 must fit on chip next to the token tile
_warned: set[str] = set()


def warn_once(key: str, msg: str) -> None:
    """Emit `msg` once per process for `key` (fallbacks must be visible but not noisy)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, stacklevel=3)


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_write(x: torch.Tensor, spec: QuantSpec, slots: torch.Tensor, packed: torch.Tensor,
                 scale: torch.Tensor, zero: torch.Tensor) -> None:
    if x.dim() != 3 or x.dtype not in _META or x.stride(-1) != 1:
        raise OscarError(f"write_int2 needs x [N, H, D] bf16/fp16/fp32 with a contiguous last "
                         f"dim, got {x.dtype} {tuple(x.shape)} strides {x.stride()}")
    n, h, d = x.shape
    groups = spec.groups(d)
    if packed.dtype != torch.uint8 or packed.dim() != 3 or tuple(packed.shape[1:]) != (h, d // 4):
        raise OscarError(f"packed store must be uint8 [S, {h}, {d // 4}], got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    for name, t in (("scale", scale), ("zero", zero)):
        if (t.dtype != spec.torch_scale_dtype or tuple(t.shape) != (packed.shape[0], h, groups)):
            raise OscarError(f"{name} store must be {spec.scale_dtype} [{packed.shape[0]}, {h}, "
                             f"{groups}], got {t.dtype} {tuple(t.shape)}")
    if scale.stride() != zero.stride() or scale.stride(-1) != 1 or packed.stride(-1) != 1:
        raise OscarError("scale and zero stores must share strides and have a contiguous last "
                         "dim, and packed must have a contiguous last dim")
    if slots.dim() != 1 or slots.shape[0] != n or slots.dtype not in (torch.int32, torch.int64):
        raise OscarError(f"slots must be int32/int64 [{n}], got {slots.dtype} "
                         f"{tuple(slots.shape)}")
    devs = {t.device for t in (x, slots, packed, scale, zero)}
    if len(devs) != 1:
        raise OscarError(f"write_int2 tensors are on different devices: {sorted(map(str, devs))}")


def write_int2_triton(x: torch.Tensor, rotation: torch.Tensor | None, clip_ratio: float,
                      spec: QuantSpec, slots: torch.Tensor, packed: torch.Tensor,
                      scale: torch.Tensor, zero: torch.Tensor, *, block_t: int = 16,
                      precision: str = "ieee", num_warps: int = 4) -> None:
    """Fused rotate + clip + quantize + pack + scatter (see `ref.write_int2_ref`).

    x [N, H, D]; rotation fp32 [D, D] or None; slots int [N]; packed uint8 [S, H, D/4];
    scale, zero [S, H, D/G]. `precision` is the fp32 dot mode of the fused rotation
    ("ieee", "tf32x3" or "tf32").
    """
    _check_write(x, spec, slots, packed, scale, zero)
    n, h, d = x.shape
    if spec.quantizer != "minmax":
        warn_once(f"quantizer-{spec.quantizer}", f"quantizer {spec.quantizer!r} has no Triton "
                  "write kernel; using the torch reference")
        ref.write_int2_ref(x, rotation, clip_ratio, spec, slots, packed, scale, zero)
        return
    ng = d // spec.group_size
    if not (_pow2(d) and d >= 16 and _pow2(ng)):
        warn_once(f"shape-{d}-{spec.group_size}", f"head_dim {d} with group size "
                  f"{spec.group_size} has no Triton write kernel (needs powers of two); using "
                  "the torch reference")
        ref.write_int2_ref(x, rotation, clip_ratio, spec, slots, packed, scale, zero)
        return
    if n == 0:
        return
    if rotation is not None and d > MAX_FUSED_ROTATION_DIM:
        x = ref.rotate_rows(x, rotation)  # too large to fuse; rotate with torch (fp32)
        rotation = None
    if rotation is not None:
        if tuple(rotation.shape) != (d, d):
            raise OscarError(f"rotation must be [{d}, {d}], got {tuple(rotation.shape)}")
        rotation = rotation.to(device=x.device, dtype=torch.float32).contiguous()

    from oscar_kv.kernels.triton.write import _write_int2_kernel

    idx = clip_index(clip_ratio, d)
    grid = (triton_cdiv(n, block_t), h)
    _write_int2_kernel[grid](
        x, rotation if rotation is not None else x, slots, packed, scale, zero,
        n, x.stride(0), x.stride(1), packed.stride(0), packed.stride(1),
        scale.stride(0), scale.stride(1),
        D=d, GROUP=spec.group_size, BLOCK_T=block_t,
        ROTATE=rotation is not None, PRECISION=precision,
        CLIP_INDEX=-1 if idx is None else idx, EPS=eps_for(spec), RANGE_FLOOR=RANGE_FLOOR,
        META=_META[spec.torch_scale_dtype], SELECT=_select_mode(idx, d), num_warps=num_warps,
    )


PEEL_MAX_STEPS = 16  # peel (<= 17 max+count steps) instead of the 31-step radix select


def _select_mode(idx: int | None, d: int) -> int:
    """1: peel the clip order statistic from the nearer end of the row; 0: radix select."""
    return int(idx is not None and min(idx, d - 1 - idx) < PEEL_MAX_STEPS)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
