"""Split-K decode attention over an INT2 body + BF16 windows: plan once, run per layer.

`plan_decode` (host ints only, once per decode step) fixes the split counts and allocates the
static scratch; `decode_attention_triton(..., plan=plan)` then launches
    stage 1 INT2  grid (B, Hkv, int2_splits)   partial (o, lse) -> scratch splits [0, s1)
    stage 1 BF16  grid (B, Hkv, hp_splits)     partial (o, lse) -> scratch splits [s1, s1+s2)
    stage 2 merge grid (B, Hq)                 log-sum-exp merge -> plan.out
with no host synchronisation and no allocation, so a CUDA graph can capture it. Each
sequence cuts its own slot lists into `splits` equal pieces on the device, so one plan serves
every step whose lengths fit the slot tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from oscar_kv.errors import OscarError
from oscar_kv.kernels import ref
from oscar_kv.kernels.layout import Int2Store, KVTables
from oscar_kv.kernels.write import interpreting, warn_once

LOG2E = 1.4426950408889634
MAX_SPLITS = 64


@dataclass
class DecodePlan:
    """Split counts, tile sizes and static buffers for one decode step (all layers).

    mid_o fp32 [B, Hq, int2_splits + hp_splits, D]; mid_lse fp32 [B, Hq, splits];
    out [B, Hq, D] (out_dtype); q_in, q_rot fp32 [B, Hq, D] for the query rotation.
    """

    batch_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    int2_splits: int
    hp_splits: int
    block_n: int
    hp_block_n: int
    block_h: int
    num_warps: int
    mid_o: torch.Tensor
    mid_lse: torch.Tensor
    out: torch.Tensor
    q_in: torch.Tensor
    q_rot: torch.Tensor

    @property
    def gqa(self) -> int:
        return self.num_q_heads // self.num_kv_heads


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H200; only shapes the CPU/interpreter plan


def _splits(work_tokens: int, base_programs: int, target: int, min_tokens: int) -> int:
    if work_tokens <= 0:
        return 0
    by_occupancy = -(-target // max(base_programs, 1))
    by_length = -(-work_tokens // min_tokens)
    return max(1, min(by_occupancy, by_length, MAX_SPLITS))


def plan_decode(batch_size: int, num_q_heads: int, num_kv_heads: int, head_dim: int, *,
                max_body_len: int, max_hp_len: int, device: torch.device | str = "cuda",
                out_dtype: torch.dtype = torch.bfloat16, int2_splits: int | None = None,
                hp_splits: int | None = None, block_n: int = 64, hp_block_n: int = 64,
                num_warps: int = 4, num_sms: int | None = None) -> DecodePlan:
    """Choose split counts for (B, Hkv) programs to fill ~2 waves of the GPU and allocate
    the scratch. max_body_len / max_hp_len: the slot tables' widths (upper bounds)."""
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        raise OscarError(f"num_q_heads {num_q_heads} must be a multiple of num_kv_heads "
                         f"{num_kv_heads}")
    device = torch.device(device)
    target = 2 * (num_sms or _num_sms(device))
    base = batch_size * num_kv_heads
    if int2_splits is None:
        int2_splits = _splits(max_body_len, base, target, 4 * block_n)
    if hp_splits is None:
        hp_splits = _splits(max_hp_len, base, target, 2 * hp_block_n)
    g = num_q_heads // num_kv_heads
    total = max(int2_splits + hp_splits, 1)
    f32 = dict(device=device, dtype=torch.float32)
    shape = (batch_size, num_q_heads, head_dim)
    return DecodePlan(
        batch_size, num_q_heads, num_kv_heads, head_dim, int2_splits, hp_splits, block_n,
        hp_block_n, max(16, triton_next_pow2(g)), num_warps,
        torch.empty(batch_size, num_q_heads, total, head_dim, **f32),
        torch.full((batch_size, num_q_heads, total), float("-inf"), **f32),
        torch.empty(shape, device=device, dtype=out_dtype),
        torch.empty(shape, **f32), torch.empty(shape, **f32))


def triton_next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _check(q: torch.Tensor, k_int2: Int2Store, v_int2: Int2Store, k_bf16: torch.Tensor,
           v_bf16: torch.Tensor, tables: KVTables, plan: DecodePlan) -> None:
    b, hq, d = q.shape
    hkv = k_bf16.shape[1]
    if (b, hq, hkv, d) != (plan.batch_size, plan.num_q_heads, plan.num_kv_heads,
                           plan.head_dim):
        raise OscarError(f"decode plan is for B={plan.batch_size} Hq={plan.num_q_heads} "
                         f"Hkv={plan.num_kv_heads} D={plan.head_dim} but got B={b} Hq={hq} "
                         f"Hkv={hkv} D={d}; make a new plan")
    for name, st in (("k_int2", k_int2), ("v_int2", v_int2)):
        st.check()
        if st.packed.shape[1:] != (hkv, d // 4) or st.packed.stride(-1) != 1:
            raise OscarError(f"{name} packed must be [S, {hkv}, {d // 4}] with a contiguous "
                             f"last dim, got {tuple(st.packed.shape)}")
        if st.scale.stride() != st.zero.stride() or st.scale.stride(-1) != 1:
            raise OscarError(f"{name} scale and zero must share strides (last dim contiguous)")
    for name, t in (("q", q), ("k_bf16", k_bf16), ("v_bf16", v_bf16)):
        if t.dim() != 3 or t.shape[1:] != (hq if name == "q" else hkv, d) or t.stride(-1) != 1:
            raise OscarError(f"{name} must be [*, heads, {d}] with a contiguous last dim, got "
                             f"{tuple(t.shape)} strides {t.stride()}")
    tables.check()
    if tables.batch_size != b:
        raise OscarError(f"slot tables have batch {tables.batch_size}, q has {b}")
    for splits, t, what in ((plan.int2_splits, tables.int2_slots, "INT2"),
                            (plan.hp_splits, tables.bf16_slots, "BF16")):
        if splits == 0 and t.shape[1] > 0:
            raise OscarError(f"the plan has no {what} splits but the {what} slot table has "
                             f"{t.shape[1]} columns; plan with max lengths > 0")


def _dot_config(q: torch.Tensor, k_bf16: torch.Tensor):
    import triton.language as tl

    if interpreting():  # the interpreter's bf16 dot is wrong: upcast
        return tl.float32, "ieee"
    if k_bf16.dtype == torch.float32 and q.dtype == torch.float32:
        return tl.float32, "ieee"
    return (tl.float16 if k_bf16.dtype == torch.float16 else tl.bfloat16), None


def decode_attention_triton(q: torch.Tensor, k_int2: Int2Store, v_int2: Int2Store,
                            k_bf16: torch.Tensor, v_bf16: torch.Tensor, tables: KVTables,
                            sm_scale: float | None = None, plan: DecodePlan | None = None,
                            q_rotation: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of `ref.decode_attention_ref`; returns plan.out [B, Hq, D].

    q [B, Hq, D] bf16/fp16/fp32; q_rotation fp32 [D, D] (applied here into plan buffers).
    Without a plan one is made from the table widths (allocates: not for graph capture).
    """
    b, hq, d = q.shape
    hkv = k_bf16.shape[1]
    if k_int2.spec.quantizer == "lloyd_max" or d < 64 or d & (d - 1):
        warn_once(f"decode-{k_int2.spec.quantizer}-{d}", "no Triton decode kernel for "
                  f"quantizer {k_int2.spec.quantizer!r} / head_dim {d}; using the reference")
        return ref.decode_attention_ref(q, k_int2, v_int2, k_bf16, v_bf16, tables, sm_scale,
                                        q_rotation)
    if plan is None:
        plan = plan_decode(b, hq, hkv, d, max_body_len=tables.int2_slots.shape[1],
                           max_hp_len=tables.bf16_slots.shape[1], device=q.device,
                           out_dtype=q.dtype)
    _check(q, k_int2, v_int2, k_bf16, v_bf16, tables, plan)
    if q_rotation is not None:
        if q_rotation.dtype != torch.float32 or tuple(q_rotation.shape) != (d, d):
            raise OscarError(f"q_rotation must be fp32 [{d}, {d}], got {q_rotation.dtype} "
                             f"{tuple(q_rotation.shape)}")
        plan.q_in.copy_(q)
        torch.matmul(plan.q_in.view(b * hq, d), q_rotation,
                     out=plan.q_rot.view(b * hq, d))
        q = plan.q_rot
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    qk_scale = sm_scale * LOG2E

    from oscar_kv.kernels.triton.decode import (
        _decode_bf16_stage1_kernel,
        _decode_int2_stage1_kernel,
        _decode_merge_kernel,
    )

    dot, prec = _dot_config(q, k_bf16)
    g = hq // hkv
    mo, ml = plan.mid_o, plan.mid_lse
    s1, s2 = plan.int2_splits, plan.hp_splits
    mid_strides = (mo.stride(0), mo.stride(1), mo.stride(2), ml.stride(0), ml.stride(1))
    if s1 > 0:
        if tables.int2_slots.shape[1] == 0:
            ml[:, :, :s1].fill_(float("-inf"))
        else:
            kp, vp = k_int2, v_int2
            _decode_int2_stage1_kernel[(b, hkv, s1)](
                q, kp.packed, kp.scale, kp.zero, vp.packed, vp.scale, vp.zero,
                tables.int2_slots, tables.body_len, mo, ml, qk_scale, s1, 0,
                q.stride(0), q.stride(1),
                kp.packed.stride(0), kp.packed.stride(1), kp.scale.stride(0), kp.scale.stride(1),
                vp.packed.stride(0), vp.packed.stride(1), vp.scale.stride(0), vp.scale.stride(1),
                tables.int2_slots.stride(0), *mid_strides,
                GQA=g, BLOCK_H=plan.block_h, BLOCK_N=plan.block_n, D=d,
                GROUP=k_int2.spec.group_size, DOT=dot, PRECISION=prec,
                num_warps=plan.num_warps)
    if s2 > 0:
        if tables.bf16_slots.shape[1] == 0:
            ml[:, :, s1:s1 + s2].fill_(float("-inf"))
        else:
            _decode_bf16_stage1_kernel[(b, hkv, s2)](
                q, k_bf16, v_bf16, tables.bf16_slots, tables.hp_len, mo, ml, qk_scale, s2, s1,
                q.stride(0), q.stride(1), k_bf16.stride(0), k_bf16.stride(1),
                v_bf16.stride(0), v_bf16.stride(1), tables.bf16_slots.stride(0), *mid_strides,
                GQA=g, BLOCK_H=plan.block_h, BLOCK_N=plan.hp_block_n, D=d, DOT=dot,
                PRECISION=prec, num_warps=plan.num_warps)
    out = plan.out
    _decode_merge_kernel[(b, hq)](
        mo, ml, out, s1 + s2, *mid_strides, out.stride(0), out.stride(1),
        D=d, SPLITS_PAD=max(triton_next_pow2(s1 + s2), 2), num_warps=plan.num_warps)
    return out
