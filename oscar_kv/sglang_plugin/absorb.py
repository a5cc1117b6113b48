"""Fold R_V into a loaded SGLang model (SGLANG_OSCAR_ABSORB_V_ROTATION=1; Qwen3/Qwen2/Llama).

SGLang's attention modules carry a fused `qkv_proj` (this rank's rows [q | k | v]: Hq_r*D,
Hkv_r*D, Hkv_r*D) and a row-parallel `o_proj` (this rank's input columns [out, Hq_r*D]) next
to their `RadixAttention` (`attn`, global `layer_id`). For each, with the layer's R_V:

    v rows (and bias) <- R_V^T W_v,h  (b_h R_V)    o_proj columns <- W_o,j R_V

(`oscar_kv.hf.absorb_math`, the same math as the HF path), so v_proj emits v R_V and o_proj
undoes it: the backend stores V without a runtime rotation and applies no output GEMM. The
`attn` gets `ABSORBED_ATTR = True`; layers without it are rotated at run time instead, so a
partial absorption stays correct. R_V is shared by the layer's heads, so TP shards and
replicated KV heads need nothing special. Only unquantized float weights are rewritten;
anything else raises (set the flag to 0 for such models). Weight updates after loading
(update_weights_*) would undo this and are not supported with the flag.
"""

from __future__ import annotations

import torch

from oscar_kv.errors import OscarError
from oscar_kv.sglang_plugin.numerics import PoolNumerics
from oscar_kv.sglang_plugin.pool import ABSORBED_ATTR

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
HINT = "set SGLANG_OSCAR_ABSORB_V_ROTATION=0 to rotate V at run time instead"


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules holding qkv_proj, o_proj and a RadixAttention-like `attn` with a layer_id."""
    return [m for m in model.modules()
            if hasattr(m, "qkv_proj") and hasattr(m, "o_proj")
            and hasattr(getattr(m, "attn", None), "layer_id")]


def _weight(linear: torch.nn.Module, name: str, layer: int) -> torch.Tensor:
    w = getattr(linear, "weight", None)
    qm = type(getattr(linear, "quant_method", None)).__name__
    if not isinstance(w, torch.Tensor) or w.dtype not in _FLOATS or w.dim() != 2 or \
            qm not in ("NoneType", "UnquantizedLinearMethod"):
        raise OscarError(f"layer {layer}: {name} is not an unquantized float weight "
                         f"({qm}, {getattr(w, 'dtype', None)}); {HINT}")
    return w


@torch.no_grad()
def absorb_v_rotation(module: torch.nn.Module, r_v: torch.Tensor) -> None:
    """Rewrite one attention module's V rows of qkv_proj (+ bias) and o_proj in place."""
    from oscar_kv.hf.absorb_math import rotate_o_columns, rotate_v_bias, rotate_v_rows

    attn = module.attn
    layer, hq, hkv, d = attn.layer_id, attn.tp_q_head_num, attn.tp_k_head_num, attn.head_dim
    if getattr(attn, ABSORBED_ATTR, False):
        raise OscarError(f"layer {layer}: the V rotation is already absorbed; load the model "
                         "once per process")
    w = _weight(module.qkv_proj, "qkv_proj", layer)
    wo = _weight(module.o_proj, "o_proj", layer)
    if w.shape[0] != (hq + 2 * hkv) * d or wo.shape[1] != hq * d:
        raise OscarError(f"layer {layer}: qkv_proj {tuple(w.shape)} / o_proj "
                         f"{tuple(wo.shape)} do not match {hq} query and {hkv} KV heads of "
                         f"dim {d} on this rank; {HINT}")
    rows = slice((hq + hkv) * d, (hq + 2 * hkv) * d)
    w[rows].copy_(rotate_v_rows(w[rows], r_v, hkv, d))
    bias = getattr(module.qkv_proj, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias[rows].copy_(rotate_v_bias(bias[rows], r_v, hkv, d))
    wo.copy_(rotate_o_columns(wo, r_v, hkv, hq, d))
    setattr(attn, ABSORBED_ATTR, True)


def absorb_model(model: torch.nn.Module, numerics: PoolNumerics) -> int:
    """Absorb R_V into every attention module of this rank; returns how many."""
    mods = attention_modules(model)
    if not mods:
        raise OscarError(f"{type(model).__name__} has no attention module with qkv_proj and "
                         f"o_proj (Qwen3/Qwen2/Llama style); {HINT}")
    for m in mods:
        absorb_v_rotation(m, numerics.r_v[numerics.local(m.attn.layer_id)])
    return len(mods)
