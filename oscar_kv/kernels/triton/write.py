"""Triton body of the fused INT2 write: rotate -> exact clip -> min/max -> pack -> scatter.

One program handles BLOCK_T tokens of one KV head. Numerics follow `formats.quantize_int2`
step by step (same fp32 operations in the same order, IEEE division via div_rn, metadata
rounded to nearest-even before the codes are computed), so codes and bytes are bit-exact
with the reference for the same rotated input.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round_bf16(x):
    """fp32 -> fp32 holding bf16(x) rounded to nearest-even (the interpreter's cast truncates,
    so the rounding is done on the bits; on a GPU this equals cvt.rn.bf16.f32)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_meta(x, META: tl.constexpr):
    """Round fp32 to the metadata dtype (0: bf16, 1: fp16, 2: fp32); returned as fp32."""
    if META == 0:
        return _round_bf16(x)
    elif META == 1:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _kth_smallest_abs(x, K: tl.constexpr, BLOCK_T: tl.constexpr):
    """x [BLOCK_T, D] fp32 -> [BLOCK_T]: the K-th smallest |x| per row (0-based), exactly.

    Radix select on the fp32 bit pattern (monotone in |x| for non-negative floats): fix the
    bits of the answer from bit 30 down; at each bit count the candidates (elements matching
    the bits fixed so far) with a 0 there. The result is the bit pattern of an element v with
    #(|x| < v) <= K < #(|x| <= v): an order statistic, no tolerance, ties included.
    """
    bits = tl.abs(x).to(tl.int32, bitcast=True)
    prefix = tl.zeros([BLOCK_T], dtype=tl.int32)
    k = tl.full([BLOCK_T], K, dtype=tl.int32)
    for i in tl.static_range(31):
        bit = 30 - i  # constexpr: static_range unrolls
        cand = (bits >> (bit + 1)) == (prefix >> (bit + 1))[:, None]
        zero_here = ((bits >> bit) & 1) == 0
        cnt0 = tl.sum((cand & zero_here).to(tl.int32), axis=1)
        go_high = k >= cnt0
        k = tl.where(go_high, k - cnt0, k)
        prefix = tl.where(go_high, prefix | (1 << bit), prefix)
    return prefix.to(tl.float32, bitcast=True)


@triton.jit
def _kth_smallest_abs_topk(x, K: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr):
    """Same result as `_kth_smallest_abs` for K near either end of the row, exactly.

    With J = D-1-K (the answer is the J-th largest |x|, 0-based) small, peel off the largest
    remaining magnitude together with all its ties, J+1 times at most: the answer is the first
    peeled value whose tie count reaches past the J larger elements still to skip
    (#(|x| > v) <= J < #(|x| >= v)). K small is the mirror image (smallest first). Each step
    is one max and one count per row instead of the radix select's 31 counts.
    """
    bits = tl.abs(x).to(tl.int32, bitcast=True)  # monotone in |x| for non-negative floats
    FROM_TOP: tl.constexpr = D - 1 - K <= K
    J: tl.constexpr = D - 1 - K if FROM_TOP else K
    if not FROM_TOP:
        bits = 0x7FFFFFFF - bits  # order reversed: the K-th smallest is the K-th "largest"
    rem = tl.full([BLOCK_T], J, dtype=tl.int32)
    ans = tl.zeros([BLOCK_T], dtype=tl.int32)
    done = tl.zeros([BLOCK_T], dtype=tl.int1)
    for _ in tl.static_range(J + 1):
        m = tl.max(bits, axis=1)
        hit = bits == m[:, None]
        cnt = tl.sum(hit.to(tl.int32), axis=1)
        found = (rem < cnt) & (done == 0)
        ans = tl.where(found, m, ans)
        done = done | found
        rem = rem - cnt
        bits = tl.where(hit, -1, bits)  # peeled: below every remaining pattern (>= 0)
    if not FROM_TOP:
        ans = 0x7FFFFFFF - ans
    return ans.to(tl.float32, bitcast=True)


@triton.jit
def _write_int2_kernel(
    x_ptr, r_ptr, slot_ptr, packed_ptr, scale_ptr, zero_ptr,
    num_tokens,
    stride_xn, stride_xh,
    stride_pn, stride_ph,
    stride_sn, stride_sh,
    D: tl.constexpr, GROUP: tl.constexpr, BLOCK_T: tl.constexpr,
    ROTATE: tl.constexpr, PRECISION: tl.constexpr,
    CLIP_INDEX: tl.constexpr, EPS: tl.constexpr, RANGE_FLOOR: tl.constexpr,
    META: tl.constexpr, SELECT: tl.constexpr,
):
    """grid (cdiv(N, BLOCK_T), H). x [N, H, D]; r fp32 [D, D] contiguous; slots [N];
    packed uint8 [S, H, D/4]; scale/zero [S, H, D/GROUP] (same strides, last dim contiguous)."""
    pid_t = tl.program_id(0)
    head = tl.program_id(1)
    NG: tl.constexpr = D // GROUP
    D4: tl.constexpr = D // 4

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < num_tokens
    offs_d = tl.arange(0, D)
    x = tl.load(x_ptr + offs_t[:, None].to(tl.int64) * stride_xn + head * stride_xh
                + offs_d[None, :], mask=mask_t[:, None], other=0.0).to(tl.float32)
    if ROTATE:
        r = tl.load(r_ptr + offs_d[:, None] * D + offs_d[None, :])
        x = tl.dot(x, r, input_precision=PRECISION)

    if CLIP_INDEX >= 0:
        if SELECT == 1:  # the clip index is near an end of the row: peel
            tau = _kth_smallest_abs_topk(x, CLIP_INDEX, D, BLOCK_T)[:, None]
        else:
            tau = _kth_smallest_abs(x, CLIP_INDEX, BLOCK_T)[:, None]
        # IEEE negation (Triton's -t is 0 - t, which maps +0 to +0, not -0 as torch does)
        x = tl.maximum(tl.minimum(x, tau), tau * -1.0)

    xg = tl.reshape(x, [BLOCK_T, NG, GROUP])
    mn = tl.min(xg, axis=2)
    mx = tl.max(xg, axis=2)
    amax = tl.maximum(tl.abs(mn), tl.abs(mx))
    rng = tl.maximum(tl.maximum(mx - mn, amax * RANGE_FLOOR), EPS)
    scale = _round_meta(tl.math.div_rn(rng, tl.full(rng.shape, 3.0, tl.float32)), META)
    zero = _round_meta(tl.math.div_rn(mn * -1.0, scale), META)  # -0.0 when mn is +0.0

    t = tl.math.div_rn(xg, tl.broadcast_to(scale[:, :, None], xg.shape)) + zero[:, :, None]
    t = t + 0.5
    codes = tl.minimum(tl.maximum(tl.floor(t), 0.0), 3.0).to(tl.int32)
    # quartered packing: byte j = c[j] | c[j + D/4] << 2 | c[j + D/2] << 4 | c[j + 3D/4] << 6
    cq = tl.reshape(codes, [BLOCK_T, 4, D4])
    shift = (tl.arange(0, 4) * 2)[None, :, None]
    packed = tl.sum(cq << shift, axis=1).to(tl.uint8)

    slot = tl.load(slot_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
    offs_q = tl.arange(0, D4)
    tl.store(packed_ptr + slot[:, None] * stride_pn + head * stride_ph + offs_q[None, :],
             packed, mask=mask_t[:, None])
    offs_g = tl.arange(0, NG)
    meta_off = slot[:, None] * stride_sn + head * stride_sh + offs_g[None, :]
    tl.store(scale_ptr + meta_off, scale.to(scale_ptr.dtype.element_ty), mask=mask_t[:, None])
    tl.store(zero_ptr + meta_off, zero.to(zero_ptr.dtype.element_ty), mask=mask_t[:, None])

