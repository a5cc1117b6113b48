"""Split-K decode kernel vs `ref.decode_attention_ref` (Triton interpreter on CPU).

Tolerance: a small multiple of the reference's own error at bf16 compute precision
(measured per case against the fp64 reference), never a fixed atol.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import make_decode_case, max_err, reference_outputs

from oscar_kv.config import QuantSpec, WindowSpec
from oscar_kv.errors import OscarError
from oscar_kv.kernels import decode_attention, plan_decode
from oscar_kv.kernels.decode import choose_kv_group, default_kv_group

WIN = WindowSpec(sink_tokens=16, recent_tokens=32, flush_block=8)
P, R = WIN.sink_tokens, WIN.recent_tokens
# the interpreter converts 1-element arrays to ints for `range(start, end, BLOCK_N)`
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")


def _plan(case, out_dtype=torch.float32, **kw):
    b, hq, d = case.q.shape
    kw = {"block_n": 16, "hp_block_n": 16, "int2_splits": 2, "hp_splits": 1} | kw
    return plan_decode(b, hq, case.k_bf16.shape[1], d, device=case.q.device,
                       max_body_len=case.tables.int2_slots.shape[1],
                       max_hp_len=case.tables.bf16_slots.shape[1], out_dtype=out_dtype, **kw)


def _check(case, out, q_rotation=None, factor=2.0):
    refs = reference_outputs(case, q_rotation)
    assert not torch.isnan(out).any()
    own_bf16 = max_err(refs["bf16"], refs["fp64"])
    err = max_err(out.cpu(), refs["fp64"])
    assert err <= factor * own_bf16, f"kernel error {err:.3g} vs bf16 reference {own_bf16:.3g}"
    if out.dtype == torch.float32 and not out.is_cuda:  # interpreter: fp32 all the way
        own_fp32 = max_err(refs["fp32"], refs["fp64"])
        assert err <= 20 * own_fp32 + 1e-6, f"fp32 error {err:.3g} vs {own_fp32:.3g}"
    return err


@pytest.mark.parametrize("prefetch", [True, False])
def test_awkward_lengths_in_one_batch(triton_device, prefetch):
    """1, P-1, P, P+R-1, P+R, P+R+1, P+R+F+3 and a long non-multiple of the block; with the
    hand-pipelined INT2 loop and with the plain one."""
    lens = [1, P - 1, P, P + R - 1, P + R, P + R + 1, P + R + 11, 117]
    case = make_decode_case(lens, num_kv_heads=1, gqa=4, head_dim=64, window=WIN,
                            device=triton_device)
    out = decode_attention(case.q, case.k_int2, case.v_int2, case.k_bf16, case.v_bf16,
                           case.tables, plan=_plan(case, int2_splits=3, prefetch=prefetch),
                           backend="triton")
    _check(case, out)


@pytest.mark.parametrize(("gqa", "d"), [(1, 64), (2, 128), (4, 64), (6, 64), (8, 128),
                                        (12, 64), (16, 64)])
def test_gqa_ratios_and_head_dims(triton_device, gqa, d):
    """Two KV heads so that a wrong query-head -> KV-head mapping shows up."""
    case = make_decode_case([P + R + 21, 9], num_kv_heads=2, gqa=gqa, head_dim=d, window=WIN,
                            seed=gqa, device=triton_device)
    out = decode_attention(case.q, case.k_int2, case.v_int2, case.k_bf16, case.v_bf16,
                           case.tables, plan=_plan(case, block_n=32, hp_block_n=32),
                           backend="triton")
    _check(case, out)


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("kv_group", [1, 2, 4])
def test_kv_groups_block_diagonal(triton_device, kv_group, prefetch):
    """Several KV heads per program (block-diagonal q): every row must read its own head's
    codes and metadata; 4 KV heads x GQA 3 leaves padded rows at kv_group 4 (12 of 16)."""
    case = make_decode_case([P + R + 37, 5, P + R], num_kv_heads=4, gqa=3, head_dim=64,
                            window=WIN, seed=7 + kv_group, device=triton_device)
    plan = _plan(case, block_n=32, hp_block_n=32, kv_group=kv_group, prefetch=prefetch)
    assert plan.kv_group == kv_group
    out = decode_attention(case.q, case.k_int2, case.v_int2, case.k_bf16, case.v_bf16,
                           case.tables, plan=plan, backend="triton")
    _check(case, out)


@pytest.mark.parametrize("kv_group", [1, 4])
def test_centered_codes_match_reference(triton_device, monkeypatch, kv_group):
    """OSCAR_KV_INT2_CODES=centered (c - 1.5, zeros z - 1.5) is the same attention as
    plain: within the bf16 reference's error, and within bf16 noise of the plain codes'
    output; an unknown variant is an error."""
    from oscar_kv.kernels.decode import CODES_ENV, EMULATE_ENV, _dot_config

    monkeypatch.setenv(EMULATE_ENV, "1")  # interpreter: bf16 operands as on the GPU
    case = make_decode_case([P + R + 300, 70, P + R + 1], num_kv_heads=4, gqa=4, head_dim=128,
                            window=WIN, seed=11, device=triton_device)
    plan = lambda: _plan(case, out_dtype=torch.bfloat16, block_n=32, hp_block_n=32,
                         kv_group=kv_group)
    run = lambda: decode_attention(case.q, case.k_int2, case.v_int2, case.k_bf16, case.v_bf16,
                                   case.tables, plan=plan(), backend="triton")
    monkeypatch.setenv(CODES_ENV, "plain")
    assert _dot_config(case.q, case.k_bf16)["CENTER"] is False
    plain = run()
    monkeypatch.setenv(CODES_ENV, "centered")
    assert _dot_config(case.q, case.k_bf16)["CENTER"] is True
    centered = run()
    _check(case, centered)  # bf16 output: against 2x the bf16 reference's error
    noise = max_err(plain.float().cpu(), reference_outputs(case)["fp64"])
    assert max_err(centered.float().cpu(), plain.float().cpu()) <= 2 * noise
    monkeypatch.setenv(CODES_ENV, "shifted")
    with pytest.raises(OscarError, match="centered"):
        run()


def test_centered_codes_reach_the_kernel(triton_device, monkeypatch):
    """The centered variant is the same attention, so matching the reference does not show
    that CENTER reached the tiles (the constexpr defaults to False below the stage-1 kernel):
    the launch must get CENTER=True and the fp32 output must differ in its last bits."""
    import oscar_kv.kernels.triton.decode as tk
    from oscar_kv.kernels.decode import CODES_ENV, EMULATE_ENV

    monkeypatch.setenv(EMULATE_ENV, "0")
    monkeypatch.delenv(CODES_ENV, raising=False)
    case = make_decode_case([P + R + 300, P + R + 1], num_kv_heads=4, gqa=4, head_dim=128,
                            window=WIN, seed=3, device=triton_device)
    seen, kernel = [], tk._decode_stage1_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*a, **kw):
                seen.append(kw["CENTER"])
                return kernel[grid](*a, **kw)
            return launch

    monkeypatch.setattr(tk, "_decode_stage1_kernel", Spy())
    outs = []
    for codes in ("plain", "centered"):
        monkeypatch.setenv(CODES_ENV, codes)
        for kvg in (1, 4):
            plan = _plan(case, block_n=32, hp_block_n=32, kv_group=kvg)
            outs.append(decode_attention(case.q, case.k_int2, case.v_int2, case.k_bf16,
                                         case.v_bf16, case.tables, plan=plan,
                                         backend="triton").clone())
    assert seen == [False, False, True, True]
    for plain, centered in zip(outs[:2], outs[2:], strict=True):
        assert not torch.equal(plain, centered)
        assert max_err(centered.cpu(), plain.cpu()) < 1e-5


@pytest.mark.gpu
def test_gpu_centered_codes_hold_one_split_over_128k():
    """The worst case for the accumulators: one split over a 128K body. The centered codes
    keep the output within 2x the bf16 reference's error; the plain bf16 and the default sub
    codes accumulate sum(w c), which grows with the split (the plan caps splits at
    SPLIT_MAX_TOKENS): their errors are printed for comparison."""
    import os

    from oscar_kv.kernels.decode import CODES_ENV

    case = make_decode_case([131072], num_kv_heads=2, gqa=4, head_dim=128, window=WIN,
                            device="cuda")
    plan = _plan(case, out_dtype=torch.bfloat16, block_n=128, hp_block_n=64, int2_splits=1,
                 hp_splits=1, kv_group=2)
    run = lambda: decode_attention(case.q, case.k_int2, case.v_int2, case.k_bf16, case.v_bf16,
                                   case.tables, plan=plan).float()
    refs = reference_outputs(case)
    sub = max_err(run().cpu(), refs["fp64"])
    try:
        os.environ[CODES_ENV] = "plain"
        plain = max_err(run().cpu(), refs["fp64"])
        os.environ[CODES_ENV] = "centered"
        err = _check(case, run())
    finally:
        del os.environ[CODES_ENV]
    print(f"one split over 128K: plain {plain:.3g}, centered {err:.3g}, sub (default) {sub:.3g}, "
          f"bf16 reference {max_err(refs['bf16'], refs['fp64']):.3g}")


@pytest.mark.parametrize(("group", "meta"), [(32, "bfloat16"), (128, "float16"),
                                             (64, "float32")])
def test_group_sizes_and_metadata_dtypes(triton_device, group, meta):
    case = make_decode_case([P + R + 40], num_kv_heads=1, gqa=2, head_dim=128, window=WIN,
                            spec=QuantSpec(group_size=group, scale_dtype=meta),
                            device=triton_device)
    out = decode_attention(case.q, case.k_int2, case.v_int2, case.k_bf16, case.v_bf16,
                           case.tables, plan=_plan(case, block_n=32, hp_block_n=32),
                           backend="triton")
    _check(case, out)


def test_bf16_output_rotation_and_plan_reuse(triton_device):
    """q rotated inside the call; one plan serves two 'layers' without reallocating."""
    case = make_decode_case([P + R + 5, 3], num_kv_heads=1, gqa=2, head_dim=64, window=WIN,
                            device=triton_device)
    rot, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(1)))
    rot = rot.float().to(triton_device)
    plan = _plan(case, out_dtype=torch.bfloat16, block_n=32, hp_block_n=32)
    ptrs = (plan.out.data_ptr(), plan.mid_o.data_ptr(), plan.q_rot.data_ptr())
    for layer in range(2):
        c = case if layer == 0 else make_decode_case(
            [P + R + 5, 3], num_kv_heads=1, gqa=2, head_dim=64, window=WIN, seed=9,
            device=triton_device)
        out = decode_attention(c.q, c.k_int2, c.v_int2, c.k_bf16, c.v_bf16, c.tables,
                               plan=plan, q_rotation=rot, backend="triton")
        assert out.dtype == torch.bfloat16 and out.data_ptr() == ptrs[0]
        _check(c, out, q_rotation=rot)
    assert (plan.out.data_ptr(), plan.mid_o.data_ptr(), plan.q_rot.data_ptr()) == ptrs


@pytest.mark.parametrize("group", [128, 32])
def test_bf16_operand_numerics_emulated(triton_device, monkeypatch, group):
    """The GPU path's numerics, reproduced in the interpreter: q and the softmax weights
    rounded to bf16 (round to nearest even), codes exact, fp32 accumulation. Its error must
    stay within 2x the reference's own error at bf16 compute precision (which also rounds K,
    V and every product); measured 0.07-0.36x of it, so the bound is 1x."""
    if triton_device == "cuda":
        pytest.skip("the GPU runs bf16 operands natively (test_gpu_sweep)")
    monkeypatch.setenv("OSCAR_KV_EMULATE_BF16_DOT", "1")
    monkeypatch.setenv("OSCAR_KV_INT2_CODES", "plain")  # the bf16 codes (sub: its own tests)
    lens = [1, P + R + 3, 150, 260]
    for gqa, d, q_dtype in ((4, 128, torch.bfloat16), (2, 64, torch.float32)):
        case = make_decode_case(lens, num_kv_heads=2, gqa=gqa, head_dim=d, window=WIN,
                                spec=QuantSpec(group_size=group), q_dtype=q_dtype,
                                seed=gqa + group, device=triton_device)
        out = decode_attention(case.q, case.k_int2, case.v_int2, case.k_bf16, case.v_bf16,
                               case.tables, plan=_plan(case, block_n=32, hp_block_n=32,
                                                       int2_splits=3),
                               backend="triton")
        err = _check(case, out.to(torch.float64), factor=1.0)
        assert err > 0.0


def test_empty_sequence_and_bf16_only(triton_device):
    """A sequence with no keys gives zeros; a cache shorter than P has no INT2 at all."""
    case = make_decode_case([0, P - 3], num_kv_heads=1, gqa=2, head_dim=64, window=WIN,
                            max_len=P, device=triton_device)
    assert case.tables.int2_slots.shape[1] == 0
    out = decode_attention(case.q, case.k_int2, case.v_int2, case.k_bf16, case.v_bf16,
                           case.tables, plan=_plan(case), backend="triton")
    assert torch.equal(out[0].cpu(), torch.zeros_like(out[0].cpu()))
    _check(case, out)


def test_plan_mismatch_is_clear(triton_device):
    case = make_decode_case([5], num_kv_heads=1, gqa=2, head_dim=64, window=WIN,
                            device=triton_device)
    plan = plan_decode(2, 2, 1, 64, max_body_len=1, max_hp_len=8, device=triton_device)
    with pytest.raises(OscarError, match="make a new plan"):
        decode_attention(case.q, case.k_int2, case.v_int2, case.k_bf16, case.v_bf16,
                         case.tables, plan=plan, backend="triton")


def test_plan_rejects_bad_tiles_and_unpack_names(monkeypatch):
    for kw in ({"block_n": 48}, {"hp_block_n": 8}):
        with pytest.raises(OscarError, match="power of two >= 16"):
            plan_decode(1, 8, 2, 64, max_body_len=100, max_hp_len=10, device="cpu", **kw)
    from oscar_kv.kernels.decode import _dot_config

    monkeypatch.setenv("OSCAR_KV_INT2_UNPACK", "fast")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU branch reads the variable
    x = torch.zeros(1, 1, 8, dtype=torch.bfloat16)
    with pytest.raises(OscarError, match="use 'asm'"):
        _dot_config(x, x)


@pytest.fixture
def bf16_codes(monkeypatch):
    """The bf16 code variants' plan (BLOCK_N 128, 2 stages, PROGRAMS_PER_SM); the default sub
    codes re-tile 4-head programs (test_plan_tiles_sub_codes_at_four_heads)."""
    monkeypatch.setenv("OSCAR_KV_INT2_CODES", "centered")


def test_plan_split_heuristic(bf16_codes):
    # GQA 4, 8 KV heads, 4 heads per program (block-diagonal q): 2 programs per sequence
    p = plan_decode(1, 32, 8, 128, max_body_len=131072, max_hp_len=327, device="cpu",
                    num_sms=132, kv_group=4)
    assert p.kv_group == 4 and p.block_h == 16 and 1 <= p.hp_splits <= 3
    # one partial wave of 528 (4 per SM) at most: the fewest splits within 5 % of the best fill
    assert p.int2_splits == 122
    p = plan_decode(32, 32, 8, 128, max_body_len=4096, max_hp_len=327, device="cpu",
                    num_sms=132, kv_group=4)
    assert p.int2_splits == 8  # 512 of 528 slots; 7 would fill 448
    # each split keeps >= 2 tiles of 128
    p = plan_decode(1, 32, 8, 128, max_body_len=3776, max_hp_len=327, device="cpu",
                    num_sms=132, block_n=128)
    assert p.int2_splits == 15
    # the ncu case: one head per program, 3 resident per SM -> 6 splits (384 of 396), not 7
    # (448 programs = 1.13 waves)
    p = plan_decode(8, 32, 8, 128, max_body_len=32448, max_hp_len=320, device="cpu",
                    num_sms=132, programs_per_sm=3, kv_group=1)
    assert p.int2_splits == 6
    assert plan_decode(1, 8, 8, 64, max_body_len=0, max_hp_len=10, device="cpu").int2_splits == 0


@pytest.mark.parametrize("batch,body", [(64, 130752), (128, 130752), (256, 65216), (8, 10**6)])
def test_plan_caps_tokens_per_int2_split(bf16_codes, batch, body):
    """Large batches fill the GPU with few splits, but one split accumulating more than
    SPLIT_MAX_TOKENS INT2 tokens loses accuracy (fp32 tensor-core accumulation of sum(w c)):
    the plan takes at least body / SPLIT_MAX_TOKENS splits. The BF16 tier has no such floor."""
    from oscar_kv.kernels.decode import SPLIT_MAX_TOKENS, _splits

    p = plan_decode(batch, 32, 8, 128, max_body_len=body, max_hp_len=body, device="cpu",
                    num_sms=132)
    assert p.int2_splits >= 2 and -(-body // p.int2_splits) <= SPLIT_MAX_TOKENS
    without = _splits(body, batch * 2, 4 * 132, 256)
    assert without < p.int2_splits  # the floor is what raised it
    assert p.hp_splits == _splits(body, batch * (8 // p.kv_group), 4 * 132, 128)


@pytest.mark.parametrize("hq,hkv,d,want", [
    (32, 8, 128, 4), (64, 8, 128, 2), (32, 32, 128, 4), (32, 32, 64, 8), (32, 32, 256, 2),
    (48, 8, 128, 2), (96, 8, 128, 1), (128, 8, 128, 1), (32, 2, 128, 1), (16, 4, 128, 4),
    (12, 3, 128, 1)])
def test_default_kv_group(hq, hkv, d, want):
    assert default_kv_group(hq, hkv, d) == want


@pytest.mark.parametrize("batch,body,want", [
    (1, 3776, 1), (1, 16064, 1), (8, 3776, 2), (1, 32448, 2), (1, 65216, 2), (32, 3776, 2),
    (64, 3776, 2), (32, 16064, 4),
    (1, 130752, 4), (8, 32448, 4), (32, 130752, 4), (64, 0, 1)])
def test_choose_kv_group_by_work(batch, body, want):
    """Qwen3-8B geometry (bodies = context - sink 64 - recent 256): one head per program for
    batch 1 up to 16K, two up to ~96K tokens of work or below 8K per sequence, then the
    default 4."""
    assert choose_kv_group(batch, 32, 8, 128, 16, body) == want
    p = plan_decode(batch, 32, 8, 128, max_body_len=body, max_hp_len=320, device="cpu",
                    num_sms=132)
    assert p.kv_group == want
    # never more than the geometry allows (GQA 8 -> at most 2 heads per program)
    assert choose_kv_group(batch, 64, 8, 128, 16, body) == min(want, 2)


def test_plan_split_target_follows_kv_group_occupancy(bf16_codes):
    """The split target per SM is the sm_90 occupancy of the chosen program shape (1 head: 3,
    2 heads: 2; 4 heads: 4, measured best), BF16-only plans keep 4; an explicit value wins."""
    from oscar_kv.kernels.decode import _splits

    kw = dict(max_hp_len=320, device="cpu", num_sms=132)
    for kvg, pps in ((1, 3), (2, 2), (4, 4)):
        p = plan_decode(8, 32, 8, 128, max_body_len=32448, kv_group=kvg, **kw)
        assert p.int2_splits == _splits(32448, 8 * (8 // kvg), pps * 132, 256, 16384)
    p = plan_decode(8, 32, 8, 128, max_body_len=32448, kv_group=1, programs_per_sm=4, **kw)
    assert p.int2_splits == _splits(32448, 64, 4 * 132, 256, 16384) != 6
    p = plan_decode(8, 32, 8, 128, max_body_len=0, max_hp_len=32768, device="cpu", num_sms=132)
    assert p.hp_splits == _splits(32768, 64, 4 * 132, 128)


def test_plan_tiles_sub_codes_at_four_heads(monkeypatch):
    """Default (sub) codes at 4 KV heads per program: BLOCK_N 64, 3 stages, 2 programs per SM
    (SUB_KVG4_TILE, from the H200 sweep); 1 and 2 heads and the bf16 variants keep 128 / 2 /
    PROGRAMS_PER_SM; explicit arguments win."""
    from oscar_kv.kernels.decode import SPLIT_MAX_TOKENS, SUB_KVG4_TILE, _splits

    monkeypatch.delenv("OSCAR_KV_INT2_CODES", raising=False)
    kw = dict(max_body_len=32448, max_hp_len=320, device="cpu", num_sms=132)
    p = plan_decode(8, 32, 8, 128, **kw)
    assert (p.kv_group, p.block_n, p.num_stages) == (4, 64, 3) == (
        4, SUB_KVG4_TILE["block_n"], SUB_KVG4_TILE["num_stages"])
    assert p.int2_splits == _splits(32448, 16, 2 * 132, 128, SPLIT_MAX_TOKENS) == 16
    p = plan_decode(8, 32, 8, 128, kv_group=2, **kw)
    assert (p.block_n, p.num_stages) == (128, 2)
    p = plan_decode(8, 32, 8, 128, block_n=128, num_stages=2, programs_per_sm=4, **kw)
    assert (p.block_n, p.num_stages, p.int2_splits) == (128, 2, 32)
    monkeypatch.setenv("OSCAR_KV_INT2_CODES", "plain")
    assert plan_decode(8, 32, 8, 128, **kw).block_n == 128


def test_plan_with_grouped_rows_counts_one_head_per_program():
    """Stores with several (scale, zero) groups per row run one KV head per program, so the
    plan must be made (splits, split target) for that; an explicit larger kv_group is refused."""
    kw = dict(max_body_len=131072, max_hp_len=320, device="cpu", num_sms=132)
    p = plan_decode(8, 32, 8, 256, int2_group_size=128, **kw)
    assert p.kv_group == 1
    assert p.int2_splits == plan_decode(8, 32, 8, 256, kv_group=1, **kw).int2_splits
    assert plan_decode(8, 32, 8, 256, int2_group_size=256, **kw).kv_group == 2
    with pytest.raises(OscarError, match="one\nKV head|one KV head"):
        plan_decode(8, 32, 8, 256, int2_group_size=64, kv_group=2, **kw)


def test_plan_rejects_bad_kv_group():
    with pytest.raises(OscarError, match="kv_group"):
        plan_decode(1, 32, 8, 128, max_body_len=10, max_hp_len=10, device="cpu", kv_group=3)
    with pytest.raises(OscarError, match="kv_group"):
        plan_decode(1, 64, 8, 128, max_body_len=10, max_hp_len=10, device="cpu", kv_group=4)


@pytest.mark.gpu
@pytest.mark.parametrize("gqa", [1, 2, 4, 6, 8, 12, 16])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_sweep(gqa, d):
    win = WindowSpec()
    lens = [1, 63, 64, 319, 320, 321, 1000, 4099, 8192]
    case = make_decode_case(lens, num_kv_heads=2, gqa=gqa, head_dim=d, window=win,
                            device="cuda")
    out = decode_attention(case.q, case.k_int2, case.v_int2, case.k_bf16, case.v_bf16,
                           case.tables)
    _check(case, out.float())


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_follows_new_inputs():
    """Captured once; new q values and shorter lengths in the same buffers are honoured."""
    win = WindowSpec()
    case = make_decode_case([5000, 700, 64], num_kv_heads=2, gqa=4, head_dim=128, window=win,
                            device="cuda")
    plan = _plan(case, out_dtype=torch.bfloat16, block_n=64, hp_block_n=64,
                 int2_splits=8, hp_splits=2)
    run = lambda: decode_attention(case.q, case.k_int2, case.v_int2, case.k_bf16,
                                   case.v_bf16, case.tables, plan=plan)
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    case.q.copy_(torch.randn_like(case.q))
    case.tables.body_len[0] -= 1000  # drop body tokens: same table buffers, new lengths
    graph.replay()
    torch.cuda.synchronize()
    _check(case, plan.out)


@pytest.mark.gpu
@pytest.mark.parametrize(("lens", "hkv", "gqa"), [
    ([32768, 131072, 4097], 2, 4),                       # long: offset cancellation shows here
    ([1, 63, 64, 65, 319, 320, 321, 1000, 4097] * 2, 8, 4),   # batch 18
    ([(37 * i) % 5000 + 1 for i in range(64)], 8, 4),    # batch 64, assorted lengths
    ([3000], 1, 12),
])
def test_gpu_long_and_wide_batches(lens, hkv, gqa):
    """Batch {1, 3, 16+, 64} and contexts up to 128K with the default plan: float output within
    2x the reference's own bf16 error (vs fp64)."""
    win = WindowSpec()
    case = make_decode_case(lens, num_kv_heads=hkv, gqa=gqa, head_dim=128, window=win,
                            device="cuda")
    out = decode_attention(case.q, case.k_int2, case.v_int2, case.k_bf16, case.v_bf16,
                           case.tables)
    _check(case, out.float())


@pytest.mark.gpu
@pytest.mark.parametrize("kv_group", [1, 4])
def test_gpu_fewest_splits_the_plan_allows_stay_accurate(kv_group):
    """The fewest INT2 splits the plan may choose (body / SPLIT_MAX_TOKENS: what a large
    batch gets) on a 128K body: each split accumulates SPLIT_MAX_TOKENS tokens of sum(w c) in
    fp32 tensor-core accumulators, and the output must stay within 2x the bf16 reference's
    error."""
    from oscar_kv.kernels.decode import SPLIT_MAX_TOKENS

    win = WindowSpec()
    case = make_decode_case([131072], num_kv_heads=4, gqa=4, head_dim=128, window=win,
                            device="cuda")
    body = case.tables.int2_slots.shape[1]
    plan = _plan(case, out_dtype=torch.bfloat16, block_n=128, hp_block_n=64,
                 int2_splits=-(-body // SPLIT_MAX_TOKENS), hp_splits=1, kv_group=kv_group)
    out = decode_attention(case.q, case.k_int2, case.v_int2, case.k_bf16, case.v_bf16,
                           case.tables, plan=plan)
    _check(case, out.float())


@pytest.mark.gpu
def test_gpu_fp32_stores_keep_fp32_dots():
    """fp32 q and fp32 window stores with groups < head_dim (the dequantizing INT2 path) ask
    for IEEE fp32 dots: the kernel must stay near the fp32 reference. TF32 (10-bit mantissa)
    would be ~100x further off."""
    import dataclasses

    win = WindowSpec()
    case = make_decode_case([3000, 700], num_kv_heads=2, gqa=4, head_dim=128, window=win,
                            spec=QuantSpec(group_size=32), q_dtype=torch.float32,
                            device="cuda")
    case = dataclasses.replace(case, k_bf16=case.k_bf16.float(), v_bf16=case.v_bf16.float())
    out = decode_attention(case.q, case.k_int2, case.v_int2, case.k_bf16, case.v_bf16,
                           case.tables, plan=_plan(case, block_n=64, hp_block_n=64,
                                                   int2_splits=4))
    refs = reference_outputs(case)
    err = max_err(out, refs["fp64"])
    own_fp32 = max_err(refs["fp32"], refs["fp64"])
    assert err <= 20 * own_fp32 + 1e-6, f"fp32 error {err:.3g} vs {own_fp32:.3g}"
