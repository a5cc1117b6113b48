"""Pure-torch mixed-cache attention: the semantic oracle for the HF cache, the kernels and the
teacher-forced evaluator.

Every query at position p attends to keys 0..p exactly as a decode step at p would see them:
keys that `bf16_key_mask` marks BF16 (sink, recent window) are exact (BF16-rounded) rows, all
other keys and values are the INT2 body's dequantized rows (`formats.fake_quant`). All inputs
are already in the rotated domain (k·R_K, q·R_K, v·R_V).
"""

from __future__ import annotations

import torch

from oscar_kv.cache.windows import bf16_key_mask
from oscar_kv.config import QuantSpec, WindowSpec
from oscar_kv.formats import fake_quant


def _expand_kv(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, Hq, T, D]; query head j reads kv head j // g."""
    g = num_q_heads // x.shape[1]
    return x if g == 1 else x.repeat_interleave(g, dim=1)


def mixed_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: WindowSpec | None,
    spec: QuantSpec = QuantSpec(),
    clip_k: float = 1.0,
    clip_v: float = 1.0,
    scaling: float | None = None,
    block_q: int = 512,
    k_body: torch.Tensor | None = None,
    v_body: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention over a mixed BF16/INT2 cache.

    q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D]; q_pos [Tq], k_pos [Tk] absolute positions.
    window=None means no quantization (plain BF16 attention). k_body/v_body optionally give
    the dequantized body rows (same shape as k/v) instead of fake-quantizing k/v here.
    Returns [B, Hq, Tq, D] in q's dtype; math in fp32 (fp64 for fp64 input), BF16 rows
    rounded to bf16 first.
    """
    b, hq, tq, d = q.shape
    scaling = d**-0.5 if scaling is None else scaling
    cdt = torch.promote_types(q.dtype, torch.float32)  # fp64 in, fp64 math (tight tests)
    kb = k.to(torch.bfloat16).to(cdt)
    vb = v.to(torch.bfloat16).to(cdt)
    if window is not None:
        kq = (k_body if k_body is not None else fake_quant(kb, spec, clip_k)).to(cdt)
        vq = (v_body if v_body is not None else fake_quant(vb, spec, clip_v)).to(cdt)
        kq, vq = _expand_kv(kq, hq), _expand_kv(vq, hq)
    kb, vb = _expand_kv(kb, hq), _expand_kv(vb, hq)
    qf = q.to(cdt)
    out = torch.empty(b, hq, tq, d, dtype=cdt, device=q.device)
    for s in range(0, tq, block_q):
        e = min(s + block_q, tq)
        qs, qp = qf[:, :, s:e], q_pos[s:e]
        causal = k_pos[None, :] > qp[:, None]  # [tq, tk]
        logits = torch.matmul(qs, kb.transpose(-1, -2)) * scaling
        if window is not None:
            hp = bf16_key_mask(qp, k_pos, window)
            logits = torch.where(hp, logits, torch.matmul(qs, kq.transpose(-1, -2)) * scaling)
        probs = torch.softmax(logits.masked_fill(causal, float("-inf")), dim=-1)
        if window is None:
            out[:, :, s:e] = torch.matmul(probs, vb)
        else:
            hpf = hp.to(probs.dtype)
            out[:, :, s:e] = torch.matmul(probs * hpf, vb) + torch.matmul(probs * (1 - hpf), vq)
    return out.to(q.dtype)
