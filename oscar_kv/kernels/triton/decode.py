"""Triton bodies of split-K decode attention over an INT2 body + BF16 windows.

Stage 1 (one launch per tier): grid (B, Hkv, splits). A program owns one KV head and all g
query heads that read it (rows kv*g .. kv*g+g-1, padded to BLOCK_H and masked), so the head
mapping is right for every GQA ratio. It takes a contiguous piece of the sequence's slot
list, runs an online softmax in base 2 and writes its normalised partial output and
log2-sum-exp to the split's row of the scratch (lse = -inf for an empty piece, so no fill is
needed). Stage 2 merges all splits of both tiers by log-sum-exp: one softmax over all keys.

INT2 tiles are dequantized in registers: a packed byte holds dims j, j+D/4, j+D/2, j+3D/4,
so each of the four 2-bit fields is a contiguous quarter-vector that is dotted with the
matching quarter of q (K) or accumulated into its own quarter of the output (V).
DOT is the dtype fed to tl.dot (bf16 on a GPU, fp32 under the interpreter, whose bf16 dot is
wrong); accumulation is always fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _split_range(len_ptr, b, split, num_splits, BLOCK_N: tl.constexpr):
    length = tl.load(len_ptr + b)
    per = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_N) * BLOCK_N
    start = split * per
    end = tl.minimum(start + per, length)
    return start, end


@triton.jit
def _decode_int2_stage1_kernel(
    q_ptr, kp_ptr, ks_ptr, kz_ptr, vp_ptr, vs_ptr, vz_ptr, slots_ptr, len_ptr,
    mid_o_ptr, mid_lse_ptr,
    qk_scale, num_splits, split_offset,
    stride_qb, stride_qh,
    stride_kpn, stride_kph, stride_ksn, stride_ksh,
    stride_vpn, stride_vph, stride_vsn, stride_vsh,
    stride_tb,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    GQA: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    GROUP: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    """q [B, Hq, D]; packed [S, Hkv, D/4]; scale/zero [S, Hkv, D/GROUP] (K pair and V pair
    each share strides); slots [B, max_body]; len [B]; mid_o fp32 [B, Hq, splits, D];
    mid_lse fp32 [B, Hq, splits]. qk_scale = sm_scale * log2(e)."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    D4: tl.constexpr = D // 4
    ONE_GROUP: tl.constexpr = GROUP >= D
    start, end = _split_range(len_ptr, b, split, num_splits, BLOCK_N)

    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < GQA
    heads = kvh * GQA + offs_h
    offs_q = tl.arange(0, D4)
    q_row = q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_q[None, :]
    q0 = tl.load(q_row, mask=mask_h[:, None], other=0.0).to(DOT)
    q1 = tl.load(q_row + D4, mask=mask_h[:, None], other=0.0).to(DOT)
    q2 = tl.load(q_row + 2 * D4, mask=mask_h[:, None], other=0.0).to(DOT)
    q3 = tl.load(q_row + 3 * D4, mask=mask_h[:, None], other=0.0).to(DOT)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    lsum = tl.zeros([BLOCK_H], tl.float32)
    acc0 = tl.zeros([BLOCK_H, D4], tl.float32)
    acc1 = tl.zeros([BLOCK_H, D4], tl.float32)
    acc2 = tl.zeros([BLOCK_H, D4], tl.float32)
    acc3 = tl.zeros([BLOCK_H, D4], tl.float32)
    k_head = kvh * stride_kph
    ks_head = kvh * stride_ksh
    v_head = kvh * stride_vph
    vs_head = kvh * stride_vsh
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        slot = tl.load(slots_ptr + b * stride_tb + offs_n, mask=mask_n, other=0).to(tl.int64)
        # K^T tile [D4, BLOCK_N], four quarters from one byte load
        kb = tl.load(kp_ptr + slot[None, :] * stride_kpn + k_head + offs_q[:, None],
                     mask=mask_n[None, :], other=0)
        if ONE_GROUP:  # one (scale, zero) per row: load once per tile
            ks = tl.load(ks_ptr + slot * stride_ksn + ks_head, mask=mask_n, other=0.0)
            kz = tl.load(kz_ptr + slot * stride_ksn + ks_head, mask=mask_n, other=0.0)
            ks = ks.to(tl.float32)[None, :]
            kz = kz.to(tl.float32)[None, :]
        qk = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
        for i in tl.static_range(4):
            if not ONE_GROUP:
                moff = slot[None, :] * stride_ksn + ks_head + ((i * D4 + offs_q) // GROUP)[:, None]
                ks = tl.load(ks_ptr + moff, mask=mask_n[None, :], other=0.0).to(tl.float32)
                kz = tl.load(kz_ptr + moff, mask=mask_n[None, :], other=0.0).to(tl.float32)
            k_i = ((((kb >> (2 * i)) & 3).to(tl.float32) - kz) * ks).to(DOT)
            if i == 0:
                qk = tl.dot(q0, k_i, qk, input_precision=PRECISION)
            elif i == 1:
                qk = tl.dot(q1, k_i, qk, input_precision=PRECISION)
            elif i == 2:
                qk = tl.dot(q2, k_i, qk, input_precision=PRECISION)
            else:
                qk = tl.dot(q3, k_i, qk, input_precision=PRECISION)
        qk = tl.where(mask_n[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(qk - m_new[:, None])
        lsum = lsum * alpha + tl.sum(p, axis=1)
        m = m_new
        pd = p.to(DOT)
        vb = tl.load(vp_ptr + slot[:, None] * stride_vpn + v_head + offs_q[None, :],
                     mask=mask_n[:, None], other=0)
        if ONE_GROUP:
            vs = tl.load(vs_ptr + slot * stride_vsn + vs_head, mask=mask_n, other=0.0)
            vz = tl.load(vz_ptr + slot * stride_vsn + vs_head, mask=mask_n, other=0.0)
            vs = vs.to(tl.float32)[:, None]
            vz = vz.to(tl.float32)[:, None]
        for i in tl.static_range(4):
            if not ONE_GROUP:
                moff = slot[:, None] * stride_vsn + vs_head + ((i * D4 + offs_q) // GROUP)[None, :]
                vs = tl.load(vs_ptr + moff, mask=mask_n[:, None], other=0.0).to(tl.float32)
                vz = tl.load(vz_ptr + moff, mask=mask_n[:, None], other=0.0).to(tl.float32)
            v_i = ((((vb >> (2 * i)) & 3).to(tl.float32) - vz) * vs).to(DOT)
            if i == 0:
                acc0 = tl.dot(pd, v_i, acc0 * alpha[:, None], input_precision=PRECISION)
            elif i == 1:
                acc1 = tl.dot(pd, v_i, acc1 * alpha[:, None], input_precision=PRECISION)
            elif i == 2:
                acc2 = tl.dot(pd, v_i, acc2 * alpha[:, None], input_precision=PRECISION)
            else:
                acc3 = tl.dot(pd, v_i, acc3 * alpha[:, None], input_precision=PRECISION)

    has = lsum > 0.0
    inv = tl.where(has, 1.0 / tl.where(has, lsum, 1.0), 0.0)[:, None]
    lse = tl.where(has, m + tl.log2(tl.where(has, lsum, 1.0)), float("-inf"))
    sidx = split_offset + split
    o_row = (mid_o_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh
             + sidx * stride_os + offs_q[None, :])
    mask_o = mask_h[:, None]
    tl.store(o_row, acc0 * inv, mask=mask_o)
    tl.store(o_row + D4, acc1 * inv, mask=mask_o)
    tl.store(o_row + 2 * D4, acc2 * inv, mask=mask_o)
    tl.store(o_row + 3 * D4, acc3 * inv, mask=mask_o)
    tl.store(mid_lse_ptr + b * stride_lb + heads * stride_lh + sidx, lse, mask=mask_h)


@triton.jit
def _decode_bf16_stage1_kernel(
    q_ptr, k_ptr, v_ptr, slots_ptr, len_ptr, mid_o_ptr, mid_lse_ptr,
    qk_scale, num_splits, split_offset,
    stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_tb,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    GQA: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    """Same contract as the INT2 stage over a BF16 store k, v [S2, Hkv, D] (sink + recent,
    or a whole BF16 cache for the baseline)."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    start, end = _split_range(len_ptr, b, split, num_splits, BLOCK_N)

    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < GQA
    heads = kvh * GQA + offs_h
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
                + offs_d[None, :], mask=mask_h[:, None], other=0.0).to(DOT)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    lsum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        slot = tl.load(slots_ptr + b * stride_tb + offs_n, mask=mask_n, other=0).to(tl.int64)
        k = tl.load(k_ptr + slot[None, :] * stride_kn + kvh * stride_kh + offs_d[:, None],
                    mask=mask_n[None, :], other=0.0).to(DOT)
        qk = tl.dot(q, k, input_precision=PRECISION)
        qk = tl.where(mask_n[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(qk - m_new[:, None])
        lsum = lsum * alpha + tl.sum(p, axis=1)
        m = m_new
        v = tl.load(v_ptr + slot[:, None] * stride_vn + kvh * stride_vh + offs_d[None, :],
                    mask=mask_n[:, None], other=0.0).to(DOT)
        acc = tl.dot(p.to(DOT), v, acc * alpha[:, None], input_precision=PRECISION)

    has = lsum > 0.0
    inv = tl.where(has, 1.0 / tl.where(has, lsum, 1.0), 0.0)[:, None]
    lse = tl.where(has, m + tl.log2(tl.where(has, lsum, 1.0)), float("-inf"))
    sidx = split_offset + split
    tl.store(mid_o_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh
             + sidx * stride_os + offs_d[None, :], acc * inv, mask=mask_h[:, None])
    tl.store(mid_lse_ptr + b * stride_lb + heads * stride_lh + sidx, lse, mask=mask_h)


@triton.jit
def _decode_merge_kernel(
    mid_o_ptr, mid_lse_ptr, out_ptr, num_splits,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
    D: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    """grid (B, Hq): out[b, h] = sum_s 2^lse_s o_s / sum_s 2^lse_s over non-empty splits;
    zeros when every split is empty."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    mask_s = offs_s < num_splits
    lse = tl.load(mid_lse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=mask_s,
                  other=float("-inf"))
    live = lse > float("-inf")
    m = tl.max(lse, axis=0)
    m = tl.where(m > float("-inf"), m, 0.0)  # all empty: keep exp2 away from -inf - -inf
    w = tl.where(live, tl.exp2(lse - m), 0.0)
    offs_d = tl.arange(0, D)
    o = tl.load(mid_o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh
                + offs_s[:, None] * stride_os + offs_d[None, :],
                mask=live[:, None], other=0.0)
    den = tl.sum(w, axis=0)
    res = tl.sum(w[:, None] * o, axis=0) / tl.where(den > 0.0, den, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * stride_outb + h * stride_outh + offs_d,
             res.to(out_ptr.dtype.element_ty))

