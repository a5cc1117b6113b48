"""The INT2 body format: the numerical definition every kernel is tested against.

Per (token, kv head, group of G dims along head_dim), after clipping the whole row:

minmax (default, asymmetric):
    range = max(max - min, amax * 2**-10, eps_eff)          amax = max(|min|, |max|)
    scale = range / 3,  zero = -min / scale                 (zero is real-valued)
    scale, zero are rounded to the metadata dtype (bf16 by default) *first*; then
    code  = clamp(floor(x / scale + zero + 0.5), 0, 3)       (fp32, IEEE division)
    x_hat = (code - zero) * scale
  The `amax * 2**-10` floor only acts on near-constant rows (range < amax / 1024): it keeps
  |zero| <= 3072 so 16-bit metadata never overflows, and costs nothing, since such a row's
  step would be below bf16 resolution anyway. eps_eff = max(eps, 3 * tiny(dtype)) keeps the
  stored scale a normal number (fp16 underflows at 6e-5).

lloyd_max (exact Gaussian centroids): mu, sigma = mean, sqrt(population var + 1e-8) of the
    group; code from thresholds {-0.9816, 0, +0.9816} on z = (x - mu) / sigma; x_hat =
    mu + sigma * {-1.5104, -0.4528, 0.4528, 1.5104}[code]. Stored as scale := sigma,
    zero := mu (so its dequant differs from the affine formula).

lloyd_max_uniform116 (the reference's "production-stable" grid): the same mu/sigma (sigma
    floored at |mu| * 2**-10) and
    thresholds {-0.98107, 0, 0.98107}, stored as affine scale = (2 * 1.50956 / 3) * 1.16 *
    sigma, zero = 1.5 - mu / scale, dequantized with the affine formula.

Codes are always computed from the *stored* (rounded) metadata, so quantize -> store ->
dequantize is exactly what every write path produces.
"""

from __future__ import annotations

import torch

from oscar_kv.config import QuantSpec
from oscar_kv.errors import OscarError
from oscar_kv.formats.clip import clip_rows

LM_LEVELS = (-1.5104, -0.4528, 0.4528, 1.5104)
LM_THRESHOLD = 0.9816
U116_THRESHOLD = 0.9810652732849121
U116_C0 = 1.5095585584640503
U116_RATIO = 1.16
RANGE_FLOOR = 2.0**-10


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    d = x.shape[-1]
    if d % group_size != 0:
        raise OscarError(f"head_dim {d} is not divisible by group size {group_size}; "
                         "pick a group size that divides head_dim")
    return x.reshape(*x.shape[:-1], d // group_size, group_size)


def _check_input(x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise OscarError(f"quantize_int2 needs a floating-point tensor, got {x.dtype}")
    if x.shape[-1] % 4 != 0:
        raise OscarError(f"head_dim {x.shape[-1]} must be a multiple of 4 for INT2")


def eps_for(spec: QuantSpec) -> float:
    """The smallest range allowed for `spec` (keeps the stored scale a normal number)."""
    return max(spec.eps, 3.0 * torch.finfo(spec.torch_scale_dtype).tiny)


def _minmax_params(xg: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    mn = xg.amin(dim=-1)
    mx = xg.amax(dim=-1)
    amax = torch.maximum(mn.abs(), mx.abs())
    rng = torch.maximum(torch.maximum(mx - mn, amax * RANGE_FLOOR),
                        torch.full_like(mx, eps_for(spec)))
    scale = (rng / 3.0).to(spec.torch_scale_dtype)
    zero = (-mn / scale.float()).to(spec.torch_scale_dtype)
    return scale, zero


def _affine_codes(xg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    t = xg / scale.float()[..., None] + zero.float()[..., None] + 0.5
    return t.floor().clamp_(0, 3).to(torch.uint8)


def _row_stats(xg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu = xg.mean(dim=-1)
    var = (xg - mu[..., None]).square().mean(dim=-1)
    return mu, torch.sqrt(var + 1e-8)


def _threshold_codes(xg, mu, sigma, t):
    z = (xg - mu[..., None]) / sigma[..., None]
    return ((z >= -t).to(torch.uint8) + (z >= 0).to(torch.uint8) + (z >= t).to(torch.uint8))


def quantize_int2(x: torch.Tensor, spec: QuantSpec = QuantSpec(), clip_ratio: float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize rows of x [..., D] (any float dtype; math in fp32).

    Returns codes uint8 [..., D] in [0, 3], scale [..., D // G] and zero [..., D // G], both in
    `spec.scale_dtype`.
    """
    _check_input(x)
    xf = clip_rows(x.float(), clip_ratio)
    xg = _grouped(xf, spec.group_size)
    if spec.quantizer == "minmax":
        scale, zero = _minmax_params(xg, spec)
        codes = _affine_codes(xg, scale, zero)
    elif spec.quantizer == "lloyd_max":
        mu, sigma = _row_stats(xg)
        scale = sigma.to(spec.torch_scale_dtype)
        zero = mu.to(spec.torch_scale_dtype)
        codes = _threshold_codes(xg, zero.float(), scale.float(), LM_THRESHOLD)
    elif spec.quantizer == "lloyd_max_uniform116":
        mu, sigma = _row_stats(xg)
        # same role as minmax's range floor: keeps |zero| <= ~880 so fp16 metadata never
        # overflows on near-constant rows far from zero.
        sigma = torch.maximum(sigma, mu.abs() * RANGE_FLOOR)
        codes = _threshold_codes(xg, mu, sigma, U116_THRESHOLD)
        scale = ((2 * U116_C0 / 3) * U116_RATIO * sigma).to(spec.torch_scale_dtype)
        zero = (1.5 - mu / scale.float()).to(spec.torch_scale_dtype)
    else:  # QuantSpec validates names; this guards future additions.
        raise OscarError(f"quantizer {spec.quantizer!r} has no implementation")
    return codes.reshape(x.shape), scale, zero


def dequantize_int2(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    spec: QuantSpec = QuantSpec(), out_dtype: torch.dtype = torch.float32
                    ) -> torch.Tensor:
    """codes uint8 [..., D], scale/zero [..., D // G] -> x_hat [..., D] in out_dtype (fp32 math)."""
    cg = _grouped(codes, spec.group_size).float()
    s = scale.float()[..., None]
    z = zero.float()[..., None]
    if spec.quantizer == "lloyd_max":
        levels = torch.tensor(LM_LEVELS, dtype=torch.float32, device=codes.device)
        xg = z + s * levels[_grouped(codes, spec.group_size).long()]
    else:
        xg = (cg - z) * s
    return xg.reshape(codes.shape).to(out_dtype)


def fake_quant(x: torch.Tensor, spec: QuantSpec = QuantSpec(), clip_ratio: float = 1.0
               ) -> torch.Tensor:
    """dequantize(quantize(x)) in x's dtype: what the INT2 body returns for rows x [..., D]."""
    codes, scale, zero = quantize_int2(x, spec, clip_ratio)
    return dequantize_int2(codes, scale, zero, spec, out_dtype=x.dtype)
