"""Triton bodies of split-K decode attention over an INT2 body + BF16 windows.

Stage 1 (one launch for both tiers): grid (B, Hkv, int2_splits + hp_splits). A program owns
one KV head and all g query heads that read it (rows kv*g .. kv*g+g-1, padded to BLOCK_H and
masked), so the head mapping is right for every GQA ratio. It takes a contiguous piece of the
sequence's INT2 or BF16 slot list, runs an online softmax in base 2 and writes its normalised
partial output and log2-sum-exp to the split's row of the scratch (lse = -inf for an empty
piece, so no fill is needed). Stage 2 merges all splits of both tiers by log-sum-exp: one
softmax over all keys.

INT2, one (scale, zero) per row (group_size == head_dim, the default): the code domain. A
packed byte holds dims j, j+D/4, j+D/2, j+3D/4, so each 2-bit field is a contiguous quarter
vector; the codes become exact bf16 tensor-core operands (built from their bits) and
    logit_t = s_t (q . c_t - z_t sum(q)),   o = sum_t w_t c_t - sum_t w_t z_t,  w_t = p_t s_t
so nothing is dequantized per element. Loads are software-pipelined by hand (slot ids two
tiles ahead, codes and metadata one tile ahead). Smaller groups dequantize in registers.
Dot operands are bf16 on a GPU (fp32 accumulation); the interpreter (whose bf16 dot is wrong)
uses fp32, optionally rounded to bf16 first (EMU) to reproduce the GPU's numerics.
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
def _round_bf16(x):
    """fp32 -> fp32 holding bf16(x), round to nearest even (the interpreter's cast truncates)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _operand(x, DOT: tl.constexpr, EMU: tl.constexpr):
    """A tl.dot operand: bf16 on a GPU; under the interpreter fp32, rounded to bf16 first when
    EMU (so the interpreter reproduces the GPU's bf16-operand numerics exactly)."""
    if EMU:
        return _round_bf16(x.to(tl.float32))
    else:
        return x.to(DOT)


def _unpack_asm(bit: int, mul: int, add: int) -> tl.constexpr:
    """PTX for 4 packed bytes ($8) -> the 4 fields' codes as 8 bf16x2 registers ($2k, $2k+1:
    field k of bytes 0, 1 | 2, 3). Shift/and leave field k of every byte at bits bit, bit+1;
    PRMT makes each byte the low byte of a bf16 with high byte 0x43 (128 + c * 2^bit); one
    bf16x2 FMA per register then computes x * mul + add (mul, add: bf16 bit patterns)."""
    mask = f"0x{0x03030303 << bit:08X}"
    lines = ["{", ".reg .b32 t0, t1, t2, t3, mul, add;", f"mov.b32 mul, 0x{mul:04X}{mul:04X};",
             f"mov.b32 add, 0x{add:04X}{add:04X};"]
    for k in range(4):
        shift = 2 * k - bit
        if shift == 0:
            lines.append(f"and.b32 t{k}, $8, {mask};")
        else:
            op = f"shr.u32 t{k}, $8, {shift}" if shift > 0 else f"shl.b32 t{k}, $8, {-shift}"
            lines += [f"{op};", f"and.b32 t{k}, t{k}, {mask};"]
    for k in range(4):
        lines += [f"prmt.b32 ${2 * k}, t{k}, 0x43434343, 0x5140;",
                  f"prmt.b32 ${2 * k + 1}, t{k}, 0x43434343, 0x7362;"]
    lines += [f"fma.rn.bf16x2 ${r}, ${r}, mul, add;" for r in range(8)]
    return tl.constexpr("\n    ".join(lines) + "\n    }")


# Codes 0..3: bf16 128 + c, then (128 + c) * 1 - 128 (bf16 1.0 = 0x3F80, -128 = 0xC300).
_UNPACK_ASM = _unpack_asm(bit=0, mul=0x3F80, add=0xC300)
# CENTER: codes c - 1.5 (+-0.5, +-1.5, exact bf16) so that the dots' accumulators hold
# sum(w (c - 1.5)), which does not grow with the split like sum(w c) does. Each code goes to
# mantissa bit 1 (bf16 128 + 2c), then (128 + 2c) * 0.5 - 65.5 = c - 1.5, every constant and
# result exact in bf16 (0.5 = 0x3F00, -65.5 = 0xC283 = -1.0000011b x 2^6). sm_90 SASS of the
# main loop (scripts/sass_stats.py --set CENTER=1): +4.6 % instructions at 1 KV head per
# program, -0.3 % at 4.
_UNPACK_ASM_CENTERED = _unpack_asm(bit=1, mul=0x3F00, add=0xC283)


def _unpack_sub_asm() -> tl.constexpr:
    """PTX for 4 packed bytes ($8) -> field k of bytes 0, 1 | 2, 3 as fp16x2 ($2k, $2k+1) holding
    c * 4^k * 2^-24 exactly (fp16 subnormals / small normals built from the bits in place): two
    PRMTs spread bytes 0, 1 and 2, 3 into the low bytes of the halves, then one AND per field
    and register (0.625 instructions per code, no FMA). The dots undo 4^k * 2^-24 exactly."""
    lines = ["{", ".reg .b32 lo, hi;", "prmt.b32 lo, $8, 0x00000000, 0x4140;",
             "prmt.b32 hi, $8, 0x00000000, 0x4342;"]
    for k in range(4):
        mask = f"0x{0x00030003 << (2 * k):08X}"
        lines += [f"and.b32 ${2 * k}, lo, {mask};", f"and.b32 ${2 * k + 1}, hi, {mask};"]
    return tl.constexpr("\n    ".join(lines) + "\n    }")


_UNPACK_SUB_ASM = _unpack_sub_asm()
# 2^24 * 4^-k: the exact factor that turns field k's subnormal codes back into c
SUB_SCALE0 = tl.constexpr(16777216.0)
SUB_SCALE1 = tl.constexpr(4194304.0)
SUB_SCALE2 = tl.constexpr(1048576.0)
SUB_SCALE3 = tl.constexpr(262144.0)


@triton.jit
def _unpack4(word, MAGIC: tl.constexpr, CENTER: tl.constexpr):
    """Packed bytes -> the four quarter tensors of exact codes 0..3, one per 2-bit field.

    MAGIC 2 (GPU default): one inline asm over 4 packed bytes per register: shift/and, PRMT
    builds bf16(128 + c) from its bits (0x43 high byte), one bf16x2 FMA subtracts the 128
    exactly (~1.5 instructions per code). The offset must not survive into the dots: with
    128 + c the V accumulator would carry 128 * sum(w) and cancel it at the end, which loses
    the result to fp32 rounding when sum(w (c - z)) is small (long contexts).
    MAGIC 1: int -> bf16 conversions in plain Triton. MAGIC 0 (interpreter): fp32.
    CENTER: c - 1.5 instead of c (exact in every variant; `_UNPACK_ASM_CENTERED`).
    MAGIC 3 (the "sub" codes): fp16 c 4^k 2^-24 for field k, from the bits in place (one AND
    per two codes, `_UNPACK_SUB_ASM`); 5: the same without asm (small tiles); 4: 5's values
    in fp32 (interpreter). Never centered."""
    off: tl.constexpr = 1.5 if CENTER else 0.0
    if MAGIC == 1:
        if CENTER:  # c - 1.5 is exact in fp32 and in bf16
            c0 = ((word & 3).to(tl.float32) - off).to(tl.bfloat16)
            c1 = (((word >> 2) & 3).to(tl.float32) - off).to(tl.bfloat16)
            c2 = (((word >> 4) & 3).to(tl.float32) - off).to(tl.bfloat16)
            c3 = (((word >> 6) & 3).to(tl.float32) - off).to(tl.bfloat16)
        else:
            c0 = (word & 3).to(tl.bfloat16)
            c1 = ((word >> 2) & 3).to(tl.bfloat16)
            c2 = ((word >> 4) & 3).to(tl.bfloat16)
            c3 = ((word >> 6) & 3).to(tl.bfloat16)
        return c0, c1, c2, c3
    elif MAGIC == 4 or MAGIC == 5:  # 3 without the asm: field k's bits in place, as fp16
        c0 = (word & 3).to(tl.uint16).to(tl.float16, bitcast=True)
        c1 = (word & 12).to(tl.uint16).to(tl.float16, bitcast=True)
        c2 = (word & 48).to(tl.uint16).to(tl.float16, bitcast=True)
        c3 = (word & 192).to(tl.uint16).to(tl.float16, bitcast=True)
        if MAGIC == 4:  # the interpreter's fp32 dots: the same values, exact in fp32
            c0, c1, c2, c3 = c0.to(tl.float32), c1.to(tl.float32), c2.to(tl.float32), c3.to(
                tl.float32)
        return c0, c1, c2, c3
    elif MAGIC == 3:
        return tl.inline_asm_elementwise(
            _UNPACK_SUB_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [word],
            dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=4)
    elif MAGIC == 2:
        asm: tl.constexpr = _UNPACK_ASM_CENTERED if CENTER else _UNPACK_ASM
        return tl.inline_asm_elementwise(
            asm, "=r,=r,=r,=r,=r,=r,=r,=r,r", [word],
            dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        c0 = (word & 3).to(tl.float32) - off
        c1 = ((word >> 2) & 3).to(tl.float32) - off
        c2 = ((word >> 4) & 3).to(tl.float32) - off
        c3 = ((word >> 6) & 3).to(tl.float32) - off
        return c0, c1, c2, c3


@triton.jit
def _softmax_step(qk, m, lsum):
    """Online softmax in base 2 over one tile of logits qk [BLOCK_H, BLOCK_N] (masked = -inf):
    returns (p, alpha, m_new, lsum_new) with p = 2^(qk - m_new), alpha = 2^(m - m_new)."""
    m_new = tl.maximum(m, tl.max(qk, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(qk - m_new[:, None])
    return p, alpha, m_new, lsum * alpha + tl.sum(p, axis=1)


@triton.jit
def _int2_tile(q0, q1, q2, q3, qsum, qscale, kb, vb, ks, kz, vs, vz, mask_n, qk_scale,
               m, lsum, wz, acc0, acc1, acc2, acc3,
               DOT: tl.constexpr, EMU: tl.constexpr, MAGIC: tl.constexpr,
               CENTER: tl.constexpr):
    """One tile of the code-domain loop: kb [C, BLOCK_N] and vb [BLOCK_N, C] packed bytes
    (C = KVG * D/4 columns: KVG heads' quarter vectors side by side), ks/kz/vs/vz metadata
    broadcastable to [BLOCK_H, BLOCK_N] (each row sees its own KV head's). Returns the updated
    (m, lsum, wz, acc0..acc3). CENTER: codes c - 1.5, so the zeros become z - 1.5."""
    off: tl.constexpr = 1.5 if CENTER else 0.0
    kc0, kc1, kc2, kc3 = _unpack4(kb, MAGIC, CENTER)
    raw = tl.dot(q0, kc0)
    raw = tl.dot(q1, kc1, raw)
    raw = tl.dot(q2, kc2, raw)
    raw = tl.dot(q3, kc3, raw)
    ksf = ks.to(tl.float32) * qk_scale
    # MAGIC >= 3 (sub): q quarter k was scaled by A 4^-k and field k holds c 4^k 2^-24, so raw is
    # A 2^-24 q.c and qscale = 2^24 / A per row (exact powers of 2); else qscale = 1
    qk = (raw * qscale[:, None] - qsum[:, None] * (kz.to(tl.float32) - off)) * ksf
    qk = tl.where(mask_n[None, :], qk, float("-inf"))
    p, alpha, m, lsum = _softmax_step(qk, m, lsum)
    if MAGIC == 4:  # fp16 operands as MAGIC 3 has them, held in fp32
        w = (p * vs.to(tl.float32)).to(tl.float16).to(tl.float32)
    else:
        w = _operand(p * vs.to(tl.float32), DOT, EMU)
    # sum of the operand w (as rounded for the dot), so the zero term matches the dots
    wz = wz * alpha + tl.sum(w.to(tl.float32) * (vz.to(tl.float32) - off), axis=1)
    vc0, vc1, vc2, vc3 = _unpack4(vb, MAGIC, CENTER)
    acc0 = tl.dot(w, vc0, acc0 * alpha[:, None])
    acc1 = tl.dot(w, vc1, acc1 * alpha[:, None])
    acc2 = tl.dot(w, vc2, acc2 * alpha[:, None])
    acc3 = tl.dot(w, vc3, acc3 * alpha[:, None])
    return m, lsum, wz, acc0, acc1, acc2, acc3


@triton.jit
def _load_int2_tile(kp_head, ks_head, kz_head, vp_head, vs_head, vz_head, slot, mask_n,
                    col_off_k, col_off_v, meta_k, meta_v, mask_h,
                    stride_kpn, stride_ksn, stride_vpn, stride_vsn, KVG: tl.constexpr):
    """Gather one tile: K codes transposed [C, BLOCK_N], V codes [BLOCK_N, C] (C columns at
    byte offsets col_off_*), and the four metadata tensors: [1, BLOCK_N] when one KV head
    (KVG 1), else [BLOCK_H, BLOCK_N] with each row reading its own head (offsets meta_*)."""
    kb = tl.load(kp_head + slot[None, :] * stride_kpn + col_off_k[:, None], mask=mask_n[None, :],
                 other=0)
    vb = tl.load(vp_head + slot[:, None] * stride_vpn + col_off_v[None, :], mask=mask_n[:, None],
                 other=0)
    if KVG == 1:
        ks = tl.load(ks_head + slot * stride_ksn, mask=mask_n, other=0.0)[None, :]
        kz = tl.load(kz_head + slot * stride_ksn, mask=mask_n, other=0.0)[None, :]
        vs = tl.load(vs_head + slot * stride_vsn, mask=mask_n, other=0.0)[None, :]
        vz = tl.load(vz_head + slot * stride_vsn, mask=mask_n, other=0.0)[None, :]
    else:
        mk = mask_h[:, None] & mask_n[None, :]
        ko = slot[None, :] * stride_ksn + meta_k[:, None]
        vo = slot[None, :] * stride_vsn + meta_v[:, None]
        ks = tl.load(ks_head + ko, mask=mk, other=0.0)
        kz = tl.load(kz_head + ko, mask=mk, other=0.0)
        vs = tl.load(vs_head + vo, mask=mk, other=0.0)
        vz = tl.load(vz_head + vo, mask=mk, other=0.0)
    return kb, vb, ks, kz, vs, vz


@triton.jit
def _load_slots(slot_row, n0, offs, end, IDX64: tl.constexpr):
    mask = n0 + offs < end
    slot = tl.load(slot_row + n0 + offs, mask=mask, other=0)
    if IDX64:
        slot = slot.to(tl.int64)
    else:
        slot = slot.to(tl.int32)
    return slot, mask


@triton.jit
def _load_q_quarters(q_ptr, b, heads, qmask, col_q, stride_qb, stride_qh,
                     D4: tl.constexpr, DOT: tl.constexpr, EMU: tl.constexpr):
    """The query rows as four [BLOCK_H, C] dot operands, one per quarter of head_dim (the
    quartered packing's fields): column c holds dim quarter*D/4 + col_q[c] where qmask (padded
    rows, and with KVG > 1 the other heads' column blocks: a block-diagonal q) is 1, else 0."""
    q_row = q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + col_q[None, :]
    q0 = _operand(tl.load(q_row, mask=qmask, other=0.0), DOT, EMU)
    q1 = _operand(tl.load(q_row + D4, mask=qmask, other=0.0), DOT, EMU)
    q2 = _operand(tl.load(q_row + 2 * D4, mask=qmask, other=0.0), DOT, EMU)
    q3 = _operand(tl.load(q_row + 3 * D4, mask=qmask, other=0.0), DOT, EMU)
    return q0, q1, q2, q3


@triton.jit
def _load_q_sub(q_ptr, b, heads, qmask, col_q, stride_qb, stride_qh, D4: tl.constexpr,
                AS_FP32: tl.constexpr):
    """The query quarters as fp16 operands for the subnormal codes (MAGIC 3): quarter k is
    scaled by A 4^-k with A = 2^(15 - e) per row, max|q_row| < 2^e, so every operand is below
    2^15 in magnitude (no overflow; 11-bit precision down to 2^-21 of the row's max)
    and field k's codes c 4^k 2^-24 make every product A 2^-24 q c. Returns the operands,
    qsum = sum of the rounded operands in q units, and qscale = 2^24 / A (both fp32 [BLOCK_H]).
    """
    q0, q1, q2, q3 = _load_q_quarters(q_ptr, b, heads, qmask, col_q, stride_qb, stride_qh,
                                      D4, tl.float32, False)
    qmax = tl.maximum(tl.maximum(tl.max(tl.abs(q0), axis=1), tl.max(tl.abs(q1), axis=1)),
                      tl.maximum(tl.max(tl.abs(q2), axis=1), tl.max(tl.abs(q3), axis=1)))
    # exact powers of 2 from the biased exponent be of max|q| (max|q| < 2^(be - 126)):
    # A = 2^(141 - be), 2^24 / A = 2^(be - 117); be clamped so both stay normal fp32
    be = tl.minimum(tl.maximum((qmax.to(tl.int32, bitcast=True) >> 23) & 0xFF, 14), 244)
    a = ((268 - be) << 23).to(tl.float32, bitcast=True)
    qscale = ((be + 10) << 23).to(tl.float32, bitcast=True)
    h0 = (q0 * a[:, None]).to(tl.float16)
    h1 = (q1 * (a * 0.25)[:, None]).to(tl.float16)
    h2 = (q2 * (a * 0.0625)[:, None]).to(tl.float16)
    h3 = (q3 * (a * 0.015625)[:, None]).to(tl.float16)
    qsum = (tl.sum(h0.to(tl.float32), axis=1) + 4.0 * tl.sum(h1.to(tl.float32), axis=1)
            + 16.0 * tl.sum(h2.to(tl.float32), axis=1)
            + 64.0 * tl.sum(h3.to(tl.float32), axis=1)) / a
    if AS_FP32:
        h0, h1, h2, h3 = h0.to(tl.float32), h1.to(tl.float32), h2.to(tl.float32), h3.to(tl.float32)
    return h0, h1, h2, h3, qsum, qscale


@triton.jit
def _store_quarters(mid_o_ptr, mid_lse_ptr, b, heads, mask_h, omask, col_q, split, m, lsum, wz,
                    acc0, acc1, acc2, acc3, stride_ob, stride_oh, stride_os, stride_lb,
                    stride_lh, D4: tl.constexpr):
    """Write a split's normalised partial output (acc_i - wz) / lsum per quarter (the columns
    where omask is 1: each row's own head block) and its log2-sum-exp (-inf and zeros for an
    empty piece)."""
    has = lsum > 0.0
    inv = tl.where(has, 1.0 / tl.where(has, lsum, 1.0), 0.0)[:, None]
    lse = tl.where(has, m + tl.log2(tl.where(has, lsum, 1.0)), float("-inf"))
    o_row = (mid_o_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh
             + split * stride_os + col_q[None, :])
    wzc = wz[:, None]
    tl.store(o_row, (acc0 - wzc) * inv, mask=omask)
    tl.store(o_row + D4, (acc1 - wzc) * inv, mask=omask)
    tl.store(o_row + 2 * D4, (acc2 - wzc) * inv, mask=omask)
    tl.store(o_row + 3 * D4, (acc3 - wzc) * inv, mask=omask)
    tl.store(mid_lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=mask_h)


@triton.jit
def _int2_part(
    q_ptr, kp_ptr, ks_ptr, kz_ptr, vp_ptr, vs_ptr, vz_ptr, slots_ptr, len_ptr,
    mid_o_ptr, mid_lse_ptr,
    qk_scale, num_splits, b, kvg, split,
    stride_qb, stride_qh,
    stride_kpn, stride_kph, stride_ksn, stride_ksh,
    stride_vpn, stride_vph, stride_vsn, stride_vsh,
    stride_tb,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    GQA: tl.constexpr, KVG: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, DOT: tl.constexpr, EMU: tl.constexpr, MAGIC: tl.constexpr,
    IDX64: tl.constexpr, PREFETCH: tl.constexpr, CENTER: tl.constexpr,
):
    """One (scale, zero) per row (group_size == head_dim), in the code domain:
        logit_t = s_t * (q . c_t - z_t * sum(q)),   o = sum_t w_t c_t - sum_t w_t z_t,
    w_t = p_t * s_t, with the codes c_t exact bf16 operands of tensor-core dots (fp32
    accumulation), so there is no per-element dequantisation.

    The program owns KVG consecutive KV heads (group kvg) and their KVG * GQA query rows: the
    codes of the KVG heads sit side by side in the dot's reduction (K) and output (V) columns
    and q is block-diagonal, so the BLOCK_H = 16 rows a tensor-core dot needs are all real
    queries (GQA 4: 4 heads x 4 rows) instead of GQA real and 16 - GQA padding, which divides
    the softmax work per key by BLOCK_H / GQA. Row r reads KV head kvg * KVG + r // GQA; the
    output keeps each row's own head block. PREFETCH: loads are software-pipelined by hand
    (slot ids two tiles ahead, codes and metadata one tile ahead, a register double buffer);
    otherwise a plain loop left to Triton's pipeliner."""
    D4: tl.constexpr = D // 4
    C: tl.constexpr = KVG * D4
    start, end = _split_range(len_ptr, b, split, num_splits, BLOCK_N)

    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < GQA * KVG
    heads = kvg * (KVG * GQA) + offs_h
    row_head = offs_h // GQA  # KV head of row r within the group
    offs_c = tl.arange(0, C)
    col_head = offs_c // D4  # KV head of column c within the group
    col_q = offs_c % D4
    diag = mask_h[:, None] & (row_head[:, None] == col_head[None, :])
    if MAGIC >= 3:
        q0, q1, q2, q3, qsum, qscale = _load_q_sub(q_ptr, b, heads, diag, col_q, stride_qb,
                                                   stride_qh, D4, MAGIC == 4)
    else:
        q0, q1, q2, q3 = _load_q_quarters(q_ptr, b, heads, diag, col_q, stride_qb, stride_qh,
                                          D4, DOT, EMU)
        # sum of the operand q (as rounded for the dot), so the zero term matches the dots
        qsum = (tl.sum(q0.to(tl.float32), axis=1) + tl.sum(q1.to(tl.float32), axis=1)
                + tl.sum(q2.to(tl.float32), axis=1) + tl.sum(q3.to(tl.float32), axis=1))
        qscale = tl.full([BLOCK_H], 1.0, tl.float32)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    lsum = tl.zeros([BLOCK_H], tl.float32)
    wz = tl.zeros([BLOCK_H], tl.float32)
    acc0 = tl.zeros([BLOCK_H, C], tl.float32)
    acc1 = tl.zeros([BLOCK_H, C], tl.float32)
    acc2 = tl.zeros([BLOCK_H, C], tl.float32)
    acc3 = tl.zeros([BLOCK_H, C], tl.float32)
    h0 = kvg * KVG
    kp_head = kp_ptr + h0 * stride_kph
    ks_head = ks_ptr + h0 * stride_ksh
    kz_head = kz_ptr + h0 * stride_ksh
    vp_head = vp_ptr + h0 * stride_vph
    vs_head = vs_ptr + h0 * stride_vsh
    vz_head = vz_ptr + h0 * stride_vsh
    col_k = col_head * stride_kph + col_q
    col_v = col_head * stride_vph + col_q
    meta_k = row_head * stride_ksh
    meta_v = row_head * stride_vsh
    slot_row = slots_ptr + b.to(tl.int64) * stride_tb
    offs = tl.arange(0, BLOCK_N)

    if not PREFETCH:
        for n0 in range(start, end, BLOCK_N):
            slot, mask_n = _load_slots(slot_row, n0, offs, end, IDX64)
            kb, vb, ks, kz, vs, vz = _load_int2_tile(
                kp_head, ks_head, kz_head, vp_head, vs_head, vz_head, slot, mask_n,
                col_k, col_v, meta_k, meta_v, mask_h,
                stride_kpn, stride_ksn, stride_vpn, stride_vsn, KVG)
            m, lsum, wz, acc0, acc1, acc2, acc3 = _int2_tile(
                q0, q1, q2, q3, qsum, qscale, kb, vb, ks, kz, vs, vz, mask_n, qk_scale,
                m, lsum, wz, acc0, acc1, acc2, acc3, DOT, EMU, MAGIC, CENTER)
    else:
        slot, mask_n = _load_slots(slot_row, start, offs, end, IDX64)
        slot_n, mask_p = _load_slots(slot_row, start + BLOCK_N, offs, end, IDX64)
        kb, vb, ks, kz, vs, vz = _load_int2_tile(
            kp_head, ks_head, kz_head, vp_head, vs_head, vz_head, slot, mask_n,
            col_k, col_v, meta_k, meta_v, mask_h,
            stride_kpn, stride_ksn, stride_vpn, stride_vsn, KVG)
        for n0 in range(start, end, BLOCK_N):
            # issue the next tile's data and the slot ids two tiles ahead before any math
            mask_n = n0 + offs < end
            slot_nn, _ = _load_slots(slot_row, n0 + 2 * BLOCK_N, offs, end, IDX64)
            mask_p = n0 + BLOCK_N + offs < end
            kb_n, vb_n, ks_n, kz_n, vs_n, vz_n = _load_int2_tile(
                kp_head, ks_head, kz_head, vp_head, vs_head, vz_head, slot_n, mask_p,
                col_k, col_v, meta_k, meta_v, mask_h,
                stride_kpn, stride_ksn, stride_vpn, stride_vsn, KVG)
            m, lsum, wz, acc0, acc1, acc2, acc3 = _int2_tile(
                q0, q1, q2, q3, qsum, qscale, kb, vb, ks, kz, vs, vz, mask_n, qk_scale,
                m, lsum, wz, acc0, acc1, acc2, acc3, DOT, EMU, MAGIC, CENTER)
            kb, vb, ks, kz, vs, vz = kb_n, vb_n, ks_n, kz_n, vs_n, vz_n
            slot_n = slot_nn

    if MAGIC >= 3:  # the V fields' codes c 4^k 2^-24 back to c (exact power-of-2 scaling)
        acc0 = acc0 * SUB_SCALE0
        acc1 = acc1 * SUB_SCALE1
        acc2 = acc2 * SUB_SCALE2
        acc3 = acc3 * SUB_SCALE3
    _store_quarters(mid_o_ptr, mid_lse_ptr, b, heads, mask_h, diag, col_q, split, m, lsum, wz,
                    acc0, acc1, acc2, acc3, stride_ob, stride_oh, stride_os, stride_lb,
                    stride_lh, D4)


@triton.jit
def _int2_group_part(
    q_ptr, kp_ptr, ks_ptr, kz_ptr, vp_ptr, vs_ptr, vz_ptr, slots_ptr, len_ptr,
    mid_o_ptr, mid_lse_ptr,
    qk_scale, num_splits, b, kvh, split,
    stride_qb, stride_qh,
    stride_kpn, stride_kph, stride_ksn, stride_ksh,
    stride_vpn, stride_vph, stride_vsn, stride_vsh,
    stride_tb,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    GQA: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    GROUP: tl.constexpr, DOT: tl.constexpr, EMU: tl.constexpr, PRECISION: tl.constexpr,
):
    """Several (scale, zero) groups per row: tiles are dequantized in registers (a packed byte
    holds dims j, j+D/4, j+D/2, j+3D/4, so each 2-bit field is a contiguous quarter-vector
    dotted with the matching quarter of q (K) or accumulated into its quarter of o (V))."""
    D4: tl.constexpr = D // 4
    start, end = _split_range(len_ptr, b, split, num_splits, BLOCK_N)

    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < GQA
    heads = kvh * GQA + offs_h
    offs_q = tl.arange(0, D4)
    q0, q1, q2, q3 = _load_q_quarters(q_ptr, b, heads, mask_h[:, None], offs_q, stride_qb,
                                      stride_qh, D4, DOT, EMU)

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
        slot = tl.load(slots_ptr + b.to(tl.int64) * stride_tb + offs_n, mask=mask_n,
                       other=0).to(tl.int64)
        kb = tl.load(kp_ptr + slot[None, :] * stride_kpn + k_head + offs_q[:, None],
                     mask=mask_n[None, :], other=0)
        vb = tl.load(vp_ptr + slot[:, None] * stride_vpn + v_head + offs_q[None, :],
                     mask=mask_n[:, None], other=0)
        qk = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
        for i in tl.static_range(4):
            moff = slot[None, :] * stride_ksn + ks_head + ((i * D4 + offs_q) // GROUP)[:, None]
            ks = tl.load(ks_ptr + moff, mask=mask_n[None, :], other=0.0).to(tl.float32)
            kz = tl.load(kz_ptr + moff, mask=mask_n[None, :], other=0.0).to(tl.float32)
            k_i = _operand(((((kb >> (2 * i)) & 3).to(tl.float32) - kz) * ks), DOT, EMU)
            if i == 0:
                qk = tl.dot(q0, k_i, qk, input_precision=PRECISION)
            elif i == 1:
                qk = tl.dot(q1, k_i, qk, input_precision=PRECISION)
            elif i == 2:
                qk = tl.dot(q2, k_i, qk, input_precision=PRECISION)
            else:
                qk = tl.dot(q3, k_i, qk, input_precision=PRECISION)
        qk = tl.where(mask_n[None, :], qk * qk_scale, float("-inf"))
        p, alpha, m, lsum = _softmax_step(qk, m, lsum)
        pd = _operand(p, DOT, EMU)
        for i in tl.static_range(4):
            moff = slot[:, None] * stride_vsn + vs_head + ((i * D4 + offs_q) // GROUP)[None, :]
            vs = tl.load(vs_ptr + moff, mask=mask_n[:, None], other=0.0).to(tl.float32)
            vz = tl.load(vz_ptr + moff, mask=mask_n[:, None], other=0.0).to(tl.float32)
            v_i = _operand(((((vb >> (2 * i)) & 3).to(tl.float32) - vz) * vs), DOT, EMU)
            if i == 0:
                acc0 = tl.dot(pd, v_i, acc0 * alpha[:, None],
                              input_precision=PRECISION)
            elif i == 1:
                acc1 = tl.dot(pd, v_i, acc1 * alpha[:, None],
                              input_precision=PRECISION)
            elif i == 2:
                acc2 = tl.dot(pd, v_i, acc2 * alpha[:, None],
                              input_precision=PRECISION)
            else:
                acc3 = tl.dot(pd, v_i, acc3 * alpha[:, None],
                              input_precision=PRECISION)

    no_zero = tl.zeros([BLOCK_H], tl.float32)  # dequantized in registers: no zero term
    _store_quarters(mid_o_ptr, mid_lse_ptr, b, heads, mask_h, mask_h[:, None], offs_q, split, m,
                    lsum, no_zero,
                    acc0, acc1, acc2, acc3, stride_ob, stride_oh, stride_os, stride_lb,
                    stride_lh, D4)


@triton.jit
def _bf16_part(
    q_ptr, k_ptr, v_ptr, slots_ptr, len_ptr, mid_o_ptr, mid_lse_ptr,
    qk_scale, num_splits, b, kvh, split, sidx,
    stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_tb,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    GQA: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    DOT: tl.constexpr, EMU: tl.constexpr, PRECISION: tl.constexpr,
):
    """Split `split` of `num_splits` of a BF16 store k, v [S2, Hkv, D] (sink + recent, or a
    whole BF16 cache for the baseline), written to scratch split `sidx`."""
    start, end = _split_range(len_ptr, b, split, num_splits, BLOCK_N)

    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < GQA
    heads = kvh * GQA + offs_h
    offs_d = tl.arange(0, D)
    q = _operand(tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
                         + offs_d[None, :], mask=mask_h[:, None], other=0.0), DOT, EMU)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    lsum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        slot = tl.load(slots_ptr + b.to(tl.int64) * stride_tb + offs_n, mask=mask_n,
                       other=0).to(tl.int64)
        k = _operand(tl.load(k_ptr + slot[None, :] * stride_kn + kvh * stride_kh
                             + offs_d[:, None], mask=mask_n[None, :], other=0.0), DOT, EMU)
        v = _operand(tl.load(v_ptr + slot[:, None] * stride_vn + kvh * stride_vh
                             + offs_d[None, :], mask=mask_n[:, None], other=0.0), DOT, EMU)
        qk = tl.dot(q, k, input_precision=PRECISION)
        qk = tl.where(mask_n[None, :], qk * qk_scale, float("-inf"))
        p, alpha, m, lsum = _softmax_step(qk, m, lsum)
        acc = tl.dot(_operand(p, DOT, EMU), v, acc * alpha[:, None], input_precision=PRECISION)

    has = lsum > 0.0
    inv = tl.where(has, 1.0 / tl.where(has, lsum, 1.0), 0.0)[:, None]
    lse = tl.where(has, m + tl.log2(tl.where(has, lsum, 1.0)), float("-inf"))
    tl.store(mid_o_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh
             + sidx * stride_os + offs_d[None, :], acc * inv, mask=mask_h[:, None])
    tl.store(mid_lse_ptr + b * stride_lb + heads * stride_lh + sidx, lse, mask=mask_h)


@triton.jit
def _decode_stage1_kernel(
    q_ptr, kp_ptr, ks_ptr, kz_ptr, vp_ptr, vs_ptr, vz_ptr, slots_ptr, len_ptr,
    k_ptr, v_ptr, hslots_ptr, hlen_ptr,
    mid_o_ptr, mid_lse_ptr,
    qk_scale, int2_splits, hp_splits,
    stride_qb, stride_qh,
    stride_kpn, stride_kph, stride_ksn, stride_ksh,
    stride_vpn, stride_vph, stride_vsn, stride_vsh,
    stride_tb,
    stride_kn, stride_kh, stride_vn, stride_vh, stride_hb,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    GQA: tl.constexpr, KVG: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    HP_BLOCK_N: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr,
    DOT: tl.constexpr, I2DOT: tl.constexpr, EMU: tl.constexpr, MAGIC: tl.constexpr,
    IDX64: tl.constexpr, PRECISION: tl.constexpr, HAS_INT2: tl.constexpr,
    HAS_HP: tl.constexpr, PREFETCH: tl.constexpr, CENTER: tl.constexpr,
):
    """grid (B, Hkv / KVG, int2_splits + hp_splits): programs [0, int2_splits) take pieces of
    the INT2 body, the rest pieces of the BF16 windows (one launch for both tiers); a program
    owns KVG consecutive KV heads (KVG > 1 only with one (scale, zero) per row).
    q [B, Hq, D]; packed [S, Hkv, D/4]; scale/zero [S, Hkv, D/GROUP] (the K pair and the V
    pair each share strides); slots [B, max_body]; len [B]; k, v [S2, Hkv, D];
    hslots [B, max_hp]; hlen [B]; mid_o fp32 [B, Hq, splits, D]; mid_lse fp32 [B, Hq, splits].
    qk_scale = sm_scale * log2(e)."""
    b = tl.program_id(0)
    kvg = tl.program_id(1)
    split = tl.program_id(2)
    if HAS_INT2:  # int2_splits is 0 when the INT2 tier is absent
        if split < int2_splits:
            if GROUP >= D:
                _int2_part(q_ptr, kp_ptr, ks_ptr, kz_ptr, vp_ptr, vs_ptr, vz_ptr, slots_ptr,
                           len_ptr, mid_o_ptr, mid_lse_ptr, qk_scale, int2_splits, b, kvg, split,
                           stride_qb, stride_qh, stride_kpn, stride_kph, stride_ksn, stride_ksh,
                           stride_vpn, stride_vph, stride_vsn, stride_vsh, stride_tb,
                           stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                           GQA, KVG, BLOCK_H, BLOCK_N, D, I2DOT, EMU, MAGIC, IDX64, PREFETCH,
                           CENTER)
            else:
                _int2_group_part(q_ptr, kp_ptr, ks_ptr, kz_ptr, vp_ptr, vs_ptr, vz_ptr, slots_ptr,
                                 len_ptr, mid_o_ptr, mid_lse_ptr, qk_scale, int2_splits, b, kvg,
                                 split, stride_qb, stride_qh, stride_kpn, stride_kph, stride_ksn,
                                 stride_ksh, stride_vpn, stride_vph, stride_vsn, stride_vsh,
                                 stride_tb, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                                 GQA, BLOCK_H, BLOCK_N, D, GROUP, DOT, EMU,
                                 PRECISION)
    if HAS_HP:
        if split >= int2_splits:
            for h in tl.static_range(KVG):
                _bf16_part(q_ptr, k_ptr, v_ptr, hslots_ptr, hlen_ptr, mid_o_ptr, mid_lse_ptr,
                       qk_scale, hp_splits, b, kvg * KVG + h, split - int2_splits, split,
                       stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
                       stride_hb, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                       GQA, BLOCK_H, HP_BLOCK_N, D, DOT, EMU, PRECISION)


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

