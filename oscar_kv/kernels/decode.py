"""Split-K decode attention over an INT2 body + BF16 windows: plan once, run per layer.

`plan_decode` (host ints only, once per decode step) fixes the split counts and allocates the
static scratch; `decode_attention_triton(..., plan=plan)` then launches
    stage 1       grid (B, Hkv, s1 + s2)       programs [0, s1): pieces of the INT2 body,
                                               [s1, s1+s2): pieces of the BF16 windows;
                                               partial (o, lse) -> scratch split = program
    stage 2 merge grid (B, Hq)                 log-sum-exp merge -> plan.out
with no host synchronisation and no allocation, so a CUDA graph can capture it. Each
sequence cuts its own slot lists into `splits` equal pieces on the device, so one plan serves
every step whose lengths fit the slot tables.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from oscar_kv.errors import OscarError
from oscar_kv.kernels import ref
from oscar_kv.kernels.layout import Int2Store, KVTables
from oscar_kv.kernels.write import interpreting, warn_once

LOG2E = 1.4426950408889634
MAX_SPLITS = 128
# INT2 tokens one split accumulates at most. The V accumulator holds sum(w * c) for codes c in
# 0..3, which grows with the tokens while the output sum(w * (c - z)) does not, and the tensor
# cores' fp32 accumulation error grows with it: on the H200 (session-4 sweep, batch 32 at 128K)
# configs with 64K / 43K / 32K tokens per split differed from the 16K-per-split default by
# 1.6 % / 0.8 % / 0.5 % (relative L2), against 0.2-0.3 % bf16 noise at short splits. The
# default "sub" codes accumulate sum(w c) too, so the cap applies to them; only the "centered"
# codes remove that growth (see CODES_ENV).
SPLIT_MAX_TOKENS = 16384
# stage-1 programs per SM that the split heuristic aims for, by KV heads per program: the
# sm_90 builds' occupancy for 1 (168 registers: 3) and 2 heads (242: 2); 4 heads (255 + stack:
# 2 resident) measured best aiming at 4, i.e. two waves (H200 sweep, session 4: 1 head at batch
# 8 / 32K 0.213 ms aiming at 3 vs 0.284 at 4; 2 heads at batch 1 / 32K 0.0385 vs 0.0446)
PROGRAMS_PER_SM = {1: 3, 2: 2}
PROGRAMS_PER_SM_DEFAULT = 4
# the "sub" codes at 4 KV heads per program: BLOCK_N 64 with 3 pipeline stages, aiming at 2
# programs per SM (H200 sweep 2026-12-02 at 32K: batch 8 0.1432 ms vs 0.1555 with the
# BLOCK_N 128 / 2 stages / 4 per SM plan; batch 32 0.5179 vs 0.5315)
SUB_KVG4_TILE = {"block_n": 64, "num_stages": 3, "programs_per_sm": 2}
# interpreter only: round the dot operands as the GPU does (bf16; fp16 for the "sub" codes)
EMULATE_ENV = "OSCAR_KV_EMULATE_BF16_DOT"
MAXNREG = None  # stage-1 register cap (GPU only); None = the compiler's choice
# The INT2 code operands of the dots (read at every launch and by plan_decode; a captured CUDA
# graph keeps the variant it was captured with, so set it for the whole process):
#   "sub" (default): fp16 subnormals c 4^k 2^-24 built by one AND per two codes, fp16 q (a
#       power-of-2 scale per row) and softmax weights. sm_90 main loop 20-25 % fewer SASS
#       instructions than "centered"; H200 (2026-12-02): 1.08-1.19x its speed at >= 32K, rel
#       err 0.0017-0.0020 vs 0.0022 (fp16 carries 3 more bits than bf16).
#   "centered": bf16 codes c - 1.5, whose accumulators do not grow with the split (one split
#       over a 128K body: rel err 9.6e-5 vs 7.2e-4 for "plain", bf16 reference 7.0e-4).
#   "plain": bf16 codes 0..3.
# "sub" and "plain" accumulate sum(w c), hence SPLIT_MAX_TOKENS.
CODES_ENV = "OSCAR_KV_INT2_CODES"
CODE_VARIANTS = ("sub", "centered", "plain")
# how the bf16 variants build their codes: "asm" (default: PRMT + one bf16x2 FMA per two
# codes) or "triton" (plain conversions)
UNPACK_ENV = "OSCAR_KV_INT2_UNPACK"


def int2_codes() -> str:
    """The INT2 code variant from OSCAR_KV_INT2_CODES (default "sub"); unknown values raise."""
    codes = os.environ.get(CODES_ENV, "sub")
    if codes not in CODE_VARIANTS:
        raise OscarError(f"{CODES_ENV}={codes!r}; use 'sub' (default), 'centered' or 'plain'")
    return codes


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
    num_stages: int
    maxnreg: int | None
    prefetch: bool
    kv_group: int  # KV heads per INT2 program (block-diagonal q; 1 = one head per program)
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


def _splits(work_tokens: int, base_programs: int, target: int, min_tokens: int,
            max_tokens: int | None = None) -> int:
    """Splits per (sequence, head group): as many as the length allows (>= min_tokens each)
    up to the count whose programs fill whole waves of `target` resident programs best. A
    partial last wave leaves SMs idle for a whole program's duration (ncu on the H200: 768
    programs at 3 per SM ran as 1.94 waves), so 6 splits of 64 programs (one wave of 396)
    beat 7 (1.13 waves). max_tokens: at least ceil(work_tokens / max_tokens) splits (the INT2
    tier's accuracy, see SPLIT_MAX_TOKENS)."""
    if work_tokens <= 0:
        return 0
    base = max(base_programs, 1)
    limit = max(1, min(-(-work_tokens // min_tokens), MAX_SPLITS))
    floor = 1 if max_tokens is None else min(-(-work_tokens // max_tokens), limit)

    def fill(s: int) -> float:  # fraction of the launched waves' slots doing work
        n = base * s
        return n / (-(-n // target) * target)

    cap = max(floor, min(limit, -(-2 * target // base)))  # splits for up to two waves
    # the fewest splits within 5 % of the best fill among floor .. two waves' worth
    best = max(fill(s) for s in range(floor, cap + 1))
    return next(s for s in range(floor, cap + 1) if fill(s) >= 0.95 * best)


def default_kv_group(num_q_heads: int, num_kv_heads: int, head_dim: int = 128,
                     block_h: int = 16) -> int:
    """KV heads per INT2 program: the largest power of two k dividing num_kv_heads with
    k * GQA <= block_h query rows and k * head_dim / 4 <= 128 code columns (registers: four
    [block_h, k * head_dim / 4] fp32 accumulators). D 128: GQA 4 -> 4, GQA 8 -> 2, GQA >= 9
    -> 1, MHA -> 4."""
    g = num_q_heads // num_kv_heads
    k = 1
    while (2 * k * g <= block_h and num_kv_heads % (2 * k) == 0
           and 2 * k * head_dim <= 4 * 128):
        k *= 2
    return k


# head-tokens (batch x KV heads x INT2 body length) below which fewer KV heads per program win
# (H200 sweep, `bench_decode.py --sweep`, Qwen3-8B geometry, BLOCK_N 128, 4 programs/SM):
# batch 1 @ 4K: 1 head 0.0185 ms, 2 heads 0.0228, 4 heads 0.0372; batch 1 @ 32K and batch 8
# @ 4K: 2 heads 0.0446 / 0.0471 ms, 4 heads 0.0484 / 0.0576; batch 1 @ 128K: 4 heads 0.1014
# ms, 2 heads 0.1118; batch 32 @ 4K: 2 heads 0.1153 ms, 4 heads 0.1219; batch >= 8 @ >= 32K:
# 4 heads best by 10-20 %.
KV_GROUP_ONE_BELOW = 8 * 16384
KV_GROUP_TWO_BELOW = 8 * 98304
KV_GROUP_FULL_MIN_BODY = 8192  # shorter bodies: at most 2 heads per program


def choose_kv_group(batch_size: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                    block_h: int, body_len: int) -> int:
    """KV heads per INT2 program for this much work: 1 below KV_GROUP_ONE_BELOW head-tokens,
    at most 2 below KV_GROUP_TWO_BELOW or for bodies shorter than KV_GROUP_FULL_MIN_BODY, else
    `default_kv_group`. Grouping heads makes programs longer and fewer, which pays only when
    each sequence has enough tokens to split among them."""
    k = default_kv_group(num_q_heads, num_kv_heads, head_dim, block_h)
    work = batch_size * num_kv_heads * max(body_len, 0)
    if work < KV_GROUP_ONE_BELOW:
        return 1
    if work < KV_GROUP_TWO_BELOW or body_len < KV_GROUP_FULL_MIN_BODY:
        return min(k, 2)
    return k


def plan_decode(batch_size: int, num_q_heads: int, num_kv_heads: int, head_dim: int, *,
                max_body_len: int, max_hp_len: int, device: torch.device | str = "cuda",
                out_dtype: torch.dtype = torch.bfloat16, int2_splits: int | None = None,
                hp_splits: int | None = None, block_n: int | None = None, hp_block_n: int = 64,
                num_warps: int = 4, num_stages: int | None = None, num_sms: int | None = None,
                programs_per_sm: int | None = None,
                maxnreg: int | None = MAXNREG, prefetch: bool = False,
                kv_group: int | None = None,
                int2_group_size: int | None = None) -> DecodePlan:
    """Choose split counts so that the (B, Hkv, splits) stage-1 programs fill the GPU with
    ~programs_per_sm resident programs per SM (None: PROGRAMS_PER_SM for the plan's kv_group;
    the INT2 stage is latency bound: it needs many
    tiles in flight), each taking at least two tiles; allocate the scratch.
    max_body_len / max_hp_len: the slot tables' widths (upper bounds). maxnreg caps the
    stage-1 registers per thread (128 x 4 warps -> 4 programs per SM on Hopper; None: the
    compiler's choice, ~168 -> 3 per SM). prefetch: the INT2 loop's hand-made register
    double buffer (True) or a plain loop left to Triton's pipeliner (num_stages). kv_group:
    KV heads per INT2 program (None: `choose_kv_group`; stores with several (scale, zero)
    groups per row always run one head per program). block_n / num_stages / programs_per_sm
    None: SUB_KVG4_TILE for the default "sub" codes at 4 KV heads per program, else 128 / 2 /
    PROGRAMS_PER_SM. int2_group_size: the stores'
    QuantSpec.group_size when known; below head_dim the plan is made for one head per program
    (the kernel runs so anyway, and the split target must count its programs)."""
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        raise OscarError(f"num_q_heads {num_q_heads} must be a multiple of num_kv_heads "
                         f"{num_kv_heads}")
    device = torch.device(device)
    g = num_q_heads // num_kv_heads
    block_h = max(16, triton_next_pow2(g))
    grouped_rows = int2_group_size is not None and int2_group_size < head_dim
    if grouped_rows and kv_group not in (None, 1):
        raise OscarError(f"kv_group {kv_group}: INT2 stores with several (scale, zero) groups "
                         f"per row (group size {int2_group_size} < head_dim {head_dim}) run one "
                         "KV head per program")
    if kv_group is None:
        kv_group = 1 if grouped_rows else choose_kv_group(
            batch_size, num_q_heads, num_kv_heads, head_dim, block_h, max_body_len)
    if kv_group < 1 or num_kv_heads % kv_group or kv_group * g > block_h:
        raise OscarError(f"kv_group {kv_group} must divide num_kv_heads {num_kv_heads} and "
                         f"fit kv_group * GQA ({g}) query rows in {block_h}")
    tuned = SUB_KVG4_TILE if kv_group == 4 and int2_codes() == "sub" else None
    if block_n is None:
        block_n = tuned["block_n"] if tuned else 128
    if num_stages is None:
        num_stages = tuned["num_stages"] if tuned else 2
    if programs_per_sm is None and tuned and max_body_len > 0:
        programs_per_sm = tuned["programs_per_sm"]
    for name, n in (("block_n", block_n), ("hp_block_n", hp_block_n)):
        if n < 16 or n & (n - 1):
            raise OscarError(f"{name} must be a power of two >= 16 (a tl.dot tile), got {n}")
    if programs_per_sm is None:  # a BF16-only plan (no INT2 body) keeps the default
        programs_per_sm = (PROGRAMS_PER_SM.get(kv_group, PROGRAMS_PER_SM_DEFAULT)
                           if max_body_len > 0 else PROGRAMS_PER_SM_DEFAULT)
    target = programs_per_sm * (num_sms or _num_sms(device))
    base = batch_size * (num_kv_heads // kv_group)
    if int2_splits is None:
        int2_splits = _splits(max_body_len, base, target, 2 * block_n, SPLIT_MAX_TOKENS)
    if hp_splits is None:
        hp_splits = _splits(max_hp_len, base, target, 2 * hp_block_n)
    total = max(int2_splits + hp_splits, 1)
    f32 = dict(device=device, dtype=torch.float32)
    shape = (batch_size, num_q_heads, head_dim)
    return DecodePlan(
        batch_size, num_q_heads, num_kv_heads, head_dim, int2_splits, hp_splits, block_n,
        hp_block_n, block_h, num_warps, num_stages, maxnreg, prefetch, kv_group,
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


def _dot_config(q: torch.Tensor, k_bf16: torch.Tensor) -> dict:
    """Constexprs for the dot operands.

    GPU: the INT2 tier multiplies exact codes (built from their bits, MAGIC: fp16 subnormals
    for "sub", else bf16) by q and softmax weights of the same dtype on tensor cores with fp32
    accumulation; the BF16 tier uses the store's dtype. Interpreter (whose bf16 dot is wrong):
    fp32 operands; with OSCAR_KV_EMULATE_BF16_DOT=1 they are first rounded as on the GPU (EMU:
    bf16; MAGIC 4 for "sub": fp16 q and weights, the same code values), which reproduces the
    GPU's operand numerics.
    """
    import triton.language as tl

    codes = int2_codes()
    unpack = os.environ.get(UNPACK_ENV)
    if unpack not in (None, "asm", "triton"):
        raise OscarError(f"{UNPACK_ENV}={unpack!r}; use 'asm' (default) or 'triton'")
    if codes == "sub" and unpack is not None:
        raise OscarError(f"{UNPACK_ENV} chooses how the bf16 codes are built; the default "
                         f"{CODES_ENV}=sub has one build. Set {CODES_ENV}=centered or plain "
                         f"with it, or unset {UNPACK_ENV}")
    sub, center = codes == "sub", codes == "centered"
    if interpreting():
        # fp32 operands; EMU: round them as the GPU does (bf16, or the sub codes' fp16 twin)
        emu = os.environ.get(EMULATE_ENV, "0") not in ("", "0")
        return dict(DOT=tl.float32, I2DOT=tl.float32, EMU=emu, MAGIC=4 if sub and emu else 0,
                    PRECISION="ieee", CENTER=center)
    if k_bf16.dtype == torch.float32 and q.dtype == torch.float32:
        dot, prec = tl.float32, "ieee"
    else:
        dot, prec = (tl.float16 if k_bf16.dtype == torch.float16 else tl.bfloat16), None
    magic = 3 if sub else 1 if unpack == "triton" else 2
    return dict(DOT=dot, I2DOT=tl.float16 if sub else tl.bfloat16, EMU=False, MAGIC=magic,
                PRECISION=prec, CENTER=center)


def _needs_int64(*tensors: torch.Tensor) -> bool:
    """True when an element offset into one of the gathered stores may not fit in int32."""
    return any(sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True)) >= 2**31 - 1
               for t in tensors if t.numel())


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
                           out_dtype=q.dtype, int2_group_size=k_int2.spec.group_size)
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

    from oscar_kv.kernels.triton.decode import _decode_merge_kernel, _decode_stage1_kernel

    cfg = _dot_config(q, k_bf16)
    if cfg["MAGIC"] in (2, 3) and (d // 4) * plan.block_n < 4 * 32 * plan.num_warps:
        # the asm takes 4 code bytes per thread and register: the same codes without it
        cfg["MAGIC"] = {2: 1, 3: 5}[cfg["MAGIC"]]
    g = hq // hkv
    mo, ml = plan.mid_o, plan.mid_lse
    s1, s2 = plan.int2_splits, plan.hp_splits
    has_int2 = s1 > 0 and tables.int2_slots.shape[1] > 0
    has_hp = s2 > 0 and tables.bf16_slots.shape[1] > 0
    if s1 > 0 and not has_int2:
        ml[:, :, :s1].fill_(float("-inf"))
    if s2 > 0 and not has_hp:
        ml[:, :, s1:s1 + s2].fill_(float("-inf"))
    mid_strides = (mo.stride(0), mo.stride(1), mo.stride(2), ml.stride(0), ml.stride(1))
    kp, vp = k_int2, v_int2
    # the cap was sized on D = 128 (sm_90 build: 168 -> 128 registers, 16 bytes of stack); at
    # D = 64 or 256 it would spill hundreds of bytes, so other head sizes keep the default
    cap = plan.maxnreg is not None and d == 128 and plan.block_n <= 128 and not interpreting()
    launch = {"maxnreg": plan.maxnreg} if cap else {}
    if has_int2 or has_hp:
        # programs of a tier that has no table are not launched: the grid starts at the first
        # tier present and the kernel is told which tiers exist
        lo = 0 if has_int2 else s1
        hi = s1 + s2 if has_hp else s1
        if lo > 0:  # INT2 absent: shift the scratch so that BF16 program 0 writes split s1
            mo_k, ml_k = mo[:, :, lo:], ml[:, :, lo:]
        else:
            mo_k, ml_k = mo, ml
        kvg = plan.kv_group if k_int2.spec.group_size >= d else 1
        _decode_stage1_kernel[(b, hkv // kvg, hi - lo)](
            q, kp.packed, kp.scale, kp.zero, vp.packed, vp.scale, vp.zero,
            tables.int2_slots, tables.body_len, k_bf16, v_bf16, tables.bf16_slots,
            tables.hp_len, mo_k, ml_k, qk_scale, s1 if has_int2 else 0, s2,
            q.stride(0), q.stride(1),
            kp.packed.stride(0), kp.packed.stride(1), kp.scale.stride(0), kp.scale.stride(1),
            vp.packed.stride(0), vp.packed.stride(1), vp.scale.stride(0), vp.scale.stride(1),
            tables.int2_slots.stride(0),
            k_bf16.stride(0), k_bf16.stride(1), v_bf16.stride(0), v_bf16.stride(1),
            tables.bf16_slots.stride(0), *mid_strides,
            GQA=g, KVG=kvg, BLOCK_H=plan.block_h, BLOCK_N=plan.block_n,
            HP_BLOCK_N=plan.hp_block_n, D=d,
            GROUP=k_int2.spec.group_size,
            IDX64=_needs_int64(kp.packed, kp.scale, vp.packed, vp.scale),
            HAS_INT2=has_int2, HAS_HP=has_hp, PREFETCH=plan.prefetch, num_warps=plan.num_warps,
            num_stages=plan.num_stages, **cfg, **launch)
    out = plan.out
    _decode_merge_kernel[(b, hq)](
        mo, ml, out, s1 + s2, *mid_strides, out.stride(0), out.stride(1),
        D=d, SPLITS_PAD=max(triton_next_pow2(s1 + s2), 2), num_warps=plan.num_warps)
    return out
