"""Fold the V rotation into the attention weights, so no runtime GEMM touches V or the output.

For kv head h with rotation R = R_V (fp32 [D, D]), v_proj's rows W_h [D, hidden] ([out, in]
layout) and bias b_h [D]:

    v_rot_h = v_h R = x (R^T W_h)^T + b_h R      =>  W_h <- R^T W_h,  b_h <- b_h R

The attention output of query head j is then o_rot_j = o_j R_(j // g), and o_proj's input
columns W_o[:, j] [hidden, D] absorb the inverse:

    o_j W_o,j^T = o_rot_j R^T W_o,j^T = o_rot_j (W_o,j R)^T   =>  W_o,j <- W_o,j R

Math in fp32, cast back to the weight dtype. `absorb_v_rotation` returns the original weights
so `restore_weights` can undo it exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from oscar_kv.errors import OscarError
from oscar_kv.hf.absorb_math import rotate_o_columns, rotate_v_bias, rotate_v_rows


@torch.no_grad()
def absorb_v_rotation(attn: nn.Module, r_v: torch.Tensor, num_kv_heads: int,
                      num_q_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """Fold R_V into `attn.v_proj` (rows per kv head) and R_V^T into `attn.o_proj` (input
    columns per query head j, using kv head j // g's matrix), in place.

    r_v: [D, D] shared by the layer's kv heads, or [Hkv, D, D]. Returns a copy of the original
    parameters {name: tensor} for `restore_weights`.
    """
    v_proj, o_proj = attn.v_proj, attn.o_proj
    d, hkv, hq = head_dim, num_kv_heads, num_q_heads
    if v_proj.weight.shape[0] != hkv * d or o_proj.weight.shape[1] != hq * d:
        raise OscarError(f"v_proj/o_proj shapes {tuple(v_proj.weight.shape)}/"
                         f"{tuple(o_proj.weight.shape)} do not match {hkv} kv heads, {hq} query "
                         f"heads of head_dim {d}")
    saved = {"v_proj.weight": v_proj.weight.detach().clone(),
             "o_proj.weight": o_proj.weight.detach().clone()}
    v_proj.weight.copy_(rotate_v_rows(v_proj.weight, r_v, hkv, d))
    if v_proj.bias is not None:
        saved["v_proj.bias"] = v_proj.bias.detach().clone()
        v_proj.bias.copy_(rotate_v_bias(v_proj.bias, r_v, hkv, d))
    o_proj.weight.copy_(rotate_o_columns(o_proj.weight, r_v, hkv, hq, d))
    return saved


@torch.no_grad()
def restore_weights(attn: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put back the parameters returned by `absorb_v_rotation` (bit-exact)."""
    for name, value in saved.items():
        mod_name, param = name.split(".")
        getattr(getattr(attn, mod_name), param).copy_(value)
