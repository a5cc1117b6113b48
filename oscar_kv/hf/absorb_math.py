"""V-rotation absorption on raw weight tensors: the math of `absorb.py`, framework-free.

For kv head h with rotation R (fp32 [D, D]), v rows W_h [D, in] ([out, in] layout) and bias
b_h [D]; query head j reads kv head j // g and o_proj's input columns W_o,j [out, D]:

    W_h <- R^T W_h,   b_h <- b_h R,   W_o,j <- W_o,j R_(j // g)

Every function takes the weights as they are (any float dtype, any device), computes in fp32
and returns the new fp32 tensor; callers cast and copy it back. Used by the HF adapter
(`absorb.py`, separate v_proj) and by the SGLang plugin (the V slice of a fused qkv_proj,
this rank's heads). Imports neither transformers nor sglang (but note that importing it as
`oscar_kv.hf.absorb_math` runs `oscar_kv/hf/__init__.py`).
"""

from __future__ import annotations

import torch

from oscar_kv.errors import OscarError


def per_head(r: torch.Tensor, heads: int) -> torch.Tensor:
    """[D, D] or [heads, D, D] -> fp32 [heads, D, D]."""
    r = r.float()
    if r.dim() == 2:
        return r.expand(heads, -1, -1)
    if r.dim() != 3 or r.shape[0] != heads:
        raise OscarError(f"R_V must be [D, D] or [{heads}, D, D], got {tuple(r.shape)}")
    return r


def rotate_v_rows(w_v: torch.Tensor, r: torch.Tensor, num_kv_heads: int,
                  head_dim: int) -> torch.Tensor:
    """w_v [Hkv * D, in] -> fp32 R^T W_h per head (v_proj then emits v @ R)."""
    rh = per_head(r.to(w_v.device), num_kv_heads)
    wv = w_v.float().reshape(num_kv_heads, head_dim, -1)  # [Hkv, D, in]
    return torch.matmul(rh.transpose(-1, -2), wv).reshape(num_kv_heads * head_dim, -1)


def rotate_v_bias(b_v: torch.Tensor, r: torch.Tensor, num_kv_heads: int,
                  head_dim: int) -> torch.Tensor:
    """b_v [Hkv * D] -> fp32 b_h R per head."""
    rh = per_head(r.to(b_v.device), num_kv_heads)
    bv = b_v.float().reshape(num_kv_heads, 1, head_dim)
    return torch.matmul(bv, rh).reshape(-1)


def rotate_o_columns(w_o: torch.Tensor, r: torch.Tensor, num_kv_heads: int, num_q_heads: int,
                     head_dim: int) -> torch.Tensor:
    """w_o [out, Hq * D] -> fp32 W_o,j R_(j // g) for each query head j (o_proj then undoes
    the rotation of the attention output)."""
    rh = per_head(r.to(w_o.device), num_kv_heads)
    g = num_q_heads // num_kv_heads
    rq = rh.repeat_interleave(g, dim=0)  # [Hq, D, D]: query head j -> kv head j // g
    wo = w_o.float().reshape(-1, num_q_heads, head_dim).transpose(0, 1)  # [Hq, out, D]
    return torch.matmul(wo, rq).transpose(0, 1).reshape(-1, num_q_heads * head_dim)
