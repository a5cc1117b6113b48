"""Attention functions registered with `transformers.AttentionInterface`.

`"oscar"`  (generation, needs an `OscarCache`): q is rotated by R_K; each query attends to the
           earlier tokens as the layer's store holds them (BF16 sink/recent exact, INT2 body
           dequantized) and to the tokens of its own forward chunk in BF16, with one softmax.
           Single-token decode steps go through `DECODE_BACKENDS[kv.decode_backend]`:
           "torch" (dense fp32 math over the dequantized store) or "triton" (plan once per
           step, split-K kernel over the packed store, query rotation fused). A chunk at
           position 0 (a first prefill) sees only its own BF16 rows: it is plain causal SDPA.
`"oscar_sim"` (teacher-forced evaluation, no cache): a full-sequence forward in which every
           position attends exactly as a decode step at that position would
           (`cache.reference.mixed_attention_reference`, q_pos = k_pos = the position ids).

Both return the output in the rotated V domain [B, T, Hq, D]: R_V^T is absorbed into o_proj.
The module must carry `oscar_plan` (a `LayerPlan`, set by `prepare_model`) for the simulation.
Mask functions are registered too, so padding masks arrive as bool [B, 1, Tq, Tk] (True =
attend) or None for a purely causal batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from oscar_kv.cache.reference import mixed_attention_reference
from oscar_kv.config import QuantSpec
from oscar_kv.errors import OscarError
from oscar_kv.hf.cache import DECODE_BACKENDS, DecodeStep, OscarKV
from oscar_kv.hf.plan import LayerPlan, rotate, rotate_keys
from oscar_kv.kernels import Int2Store, decode_attention
from oscar_kv.kernels.write import warn_once

GENERATE_IMPL = "oscar"
SIMULATE_IMPL = "oscar_sim"


def _expand_kv(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, Hq, T, D]; query head j reads kv head j // g."""
    g = num_q_heads // x.shape[1]
    return x if g == 1 else x.repeat_interleave(g, dim=1)


def _bool_mask(mask: torch.Tensor | None, tq: int, tk: int) -> torch.Tensor | None:
    """HF mask (bool True=attend, or additive float) -> bool [B, 1, tq, tk] or None."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        mask = mask == 0
    return mask[..., -tq:, -tk:]


def chunk_attention_torch(q_rot: torch.Tensor, kv: OscarKV, scaling: float,
                          mask: torch.Tensor | None) -> torch.Tensor:
    """Reference mixed attention for a chunk of T queries at positions start..start+T-1.

    q_rot [B, Hq, T, D]; keys/values: store rows [0, start) (INT2 body dequantized, fp32) then
    the chunk's own BF16 rows, causal inside the chunk; mask bool [B, 1, T, L] or None.
    Returns fp32 [B, Hq, T, D] in the rotated V domain.
    """
    b, hq, t, _ = q_rot.shape
    k_prev, v_prev = kv.store.dense(torch.float32, upto=kv.start)
    k = _expand_kv(torch.cat([k_prev, kv.chunk_k.float()], dim=2), hq)
    v = _expand_kv(torch.cat([v_prev, kv.chunk_v.float()], dim=2), hq)
    logits = torch.matmul(q_rot.float(), k.transpose(-1, -2)) * scaling  # [B, Hq, T, L]
    length = k.shape[2]
    if t > 1:
        qi = torch.arange(kv.start, kv.start + t, device=q_rot.device)
        causal = torch.arange(length, device=q_rot.device)[None, :] <= qi[:, None]
        logits = logits.masked_fill(~causal, float("-inf"))
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # fully masked pad rows -> 0
    return torch.matmul(probs, v)


def first_chunk_attention(q_rot: torch.Tensor, kv: OscarKV, scaling: float,
                          mask: torch.Tensor | None) -> torch.Tensor:
    """`chunk_attention_torch` for a chunk at position 0 (nothing cached before it): causal
    SDPA over the chunk's BF16 rows, without materialising [T, T] logits in fp32.

    q_rot [B, Hq, T, D]; mask bool [B, 1, T, T] (causality included) or None.
    Returns [B, Hq, T, D] in q_rot's dtype (fully masked pad rows give 0)."""
    hq = q_rot.shape[1]
    k, v = kv.chunk_k.to(q_rot.dtype), kv.chunk_v.to(q_rot.dtype)
    if mask is None:  # GQA inside SDPA (flash on CUDA) only without a mask
        return F.scaled_dot_product_attention(q_rot, k, v, is_causal=True, scale=scaling,
                                              enable_gqa=hq != k.shape[1])
    out = F.scaled_dot_product_attention(q_rot, _expand_kv(k, hq), _expand_kv(v, hq),
                                         attn_mask=mask, scale=scaling)
    return out.nan_to_num_(0.0)


@DECODE_BACKENDS.register("torch")
def decode_attention_torch(query: torch.Tensor, kv: OscarKV, scaling: float,
                           mask: torch.Tensor | None) -> torch.Tensor:
    """Single-token decode: query [B, Hq, 1, D] (unrotated) -> fp32 [B, Hq, 1, D] (the pure-torch
    twin of the "triton" backend)."""
    return chunk_attention_torch(rotate(query, kv.plan.r_k, query.dtype), kv, scaling, mask)


@DECODE_BACKENDS.register("triton")
def decode_attention_kernels(query: torch.Tensor, kv: OscarKV, scaling: float,
                             mask: torch.Tensor | None) -> torch.Tensor:
    """Single-token decode through `kernels.decode_attention` (Triton, forced: CPU tensors need
    TRITON_INTERPRET=1) over the store's slot views, with the step's shared tables and plan
    and R_K applied to the query once per layer inside the wrapper.

    query [B, Hq, 1, D] -> [B, Hq, 1, D] in query's dtype (fp32 for fp64 queries). A padding
    mask is not expressible in the slot tables: such steps use the "torch" backend."""
    if mask is not None and not bool(mask.all()):
        warn_once("hf-triton-mask", "the triton decode backend takes no attention mask; padded "
                  "batches decode with the torch backend")
        return decode_attention_torch(query, kv, scaling, mask)
    q = query[:, :, 0]
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        q = q.float()
    store = kv.store
    step = kv.step if kv.step is not None else DecodeStep()
    tables, plan = step.prepare(store, q)
    body, _ = store.slot_view()
    k_bf16, v_bf16, _ = store.hp_slot_view()
    d = q.shape[-1]
    spec = store.spec if store.window is not None else QuantSpec(group_size=d)  # empty body
    out = decode_attention(q, Int2Store(*body[:3], spec), Int2Store(*body[3:], spec), k_bf16,
                           v_bf16, tables, scaling, plan, q_rotation=kv.plan.r_k,
                           backend="triton")
    return out[:, :, None].clone()  # plan.out is the step's buffer, reused by the next layer


def oscar_attention(module: torch.nn.Module, query: torch.Tensor, key: OscarKV, value: OscarKV,
                    attention_mask: torch.Tensor | None, scaling: float | None = None,
                    dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """HF attention function "oscar". query [B, Hq, T, D] post-RoPE; key/value: the `OscarKV`
    returned by `OscarCache.update`. Returns ([B, T, Hq, D] in query's dtype, None)."""
    if not isinstance(key, OscarKV):
        raise OscarError("the 'oscar' attention needs an OscarCache; pass "
                         "past_key_values=handle.new_cache(), or use the 'oscar_sim' "
                         "implementation (handle.simulate) for cache-free forwards")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    t = query.shape[2]
    mask = _bool_mask(attention_mask, t, key.store.length)
    if t == 1:
        out = DECODE_BACKENDS.get(key.decode_backend)(query, key, scaling, mask)
    elif key.start == 0:
        out = first_chunk_attention(rotate(query, key.plan.r_k, query.dtype), key, scaling, mask)
    else:
        out = chunk_attention_torch(rotate(query, key.plan.r_k, query.dtype), key, scaling, mask)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _positions(kwargs: dict, t: int, device: torch.device) -> torch.Tensor:
    pos = kwargs.get("position_ids")
    if pos is None:
        return torch.arange(t, device=device)
    pos = pos.reshape(-1, pos.shape[-1])
    if pos.shape[0] > 1 and not bool((pos == pos[:1]).all()):
        raise OscarError("oscar_sim needs the same position ids for every sequence of the "
                         "batch; evaluate unpadded sequences of equal length")
    return pos[0].to(device=device, dtype=torch.long)


def oscar_sim_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, attention_mask: torch.Tensor | None,
                        scaling: float | None = None, dropout: float = 0.0, **kwargs
                        ) -> tuple[torch.Tensor, None]:
    """HF attention function "oscar_sim": query [B, Hq, T, D], key/value [B, Hkv, T, D] (V
    already rotated by absorbed weights), no cache. Every position p attends to 0..p as a
    decode step at p would. Returns ([B, T, Hq, D] in query's dtype, None)."""
    plan: LayerPlan | None = getattr(module, "oscar_plan", None)
    if plan is None:
        raise OscarError("this attention module has no oscar_plan; call "
                         "oscar_kv.hf.prepare_model(model, method) before using 'oscar_sim'")
    t = query.shape[2]
    if key.shape[2] != t:
        raise OscarError("oscar_sim is a cache-free full-sequence forward; call the model "
                         "with use_cache=False (handle.simulate does)")
    if attention_mask is not None:
        causal = torch.ones(t, t, dtype=torch.bool, device=query.device).tril()
        if not bool((_bool_mask(attention_mask, t, t) == causal).all()):
            raise OscarError("oscar_sim does not support padded batches; evaluate unpadded "
                             "sequences of equal length")
    pos = _positions(kwargs, t, query.device)
    q_rot = rotate(query, plan.r_k, query.dtype)
    k_rot = rotate_keys(key, plan, torch.bfloat16)
    out = mixed_attention_reference(q_rot, k_rot, value, pos, pos, plan.window, plan.quant,
                                    plan.clip_k, plan.clip_v, scaling=scaling)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def register_attention_functions() -> None:
    """Register "oscar" and "oscar_sim" (idempotent) with their mask functions."""
    AttentionInterface.register(GENERATE_IMPL, oscar_attention)
    AttentionInterface.register(SIMULATE_IMPL, oscar_sim_attention)
    AttentionMaskInterface.register(GENERATE_IMPL, sdpa_mask)
    AttentionMaskInterface.register(SIMULATE_IMPL, sdpa_mask)


register_attention_functions()
