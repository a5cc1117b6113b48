"""The default INT2 codes ("sub"): fp16 subnormals c 4^k 2^-24 (one AND per two codes), fp16
dots, per-row power-of-2 query scaling. On CPU the interpreter runs its fp32 twin with
OSCAR_KV_EMULATE_BF16_DOT=1 (MAGIC 4: the same operand values, fp16-rounded q and softmax
weights); the asm itself is checked in test_unpack_asm.py, the tensor cores' handling of
subnormal inputs and the asm-free build for small tiles (MAGIC 5) by the GPU tests.

Tolerance: fp16 operands carry 3 more mantissa bits than bf16, so the interpreter's error
(the BF16 window tier emulated with bf16 operands, as on the GPU) must stay below half the bf16
reference's own error (vs fp64; measured 0.15-0.26x); on the GPU within 2x of it, like every
other variant.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from kernel_cases import make_decode_case, max_err, reference_outputs

from oscar_kv.config import WindowSpec
from oscar_kv.errors import OscarError
from oscar_kv.kernels import decode_attention, plan_decode
from oscar_kv.kernels.decode import CODES_ENV, EMULATE_ENV, UNPACK_ENV, _dot_config

WIN = WindowSpec(sink_tokens=16, recent_tokens=32, flush_block=8)
P, R = WIN.sink_tokens, WIN.recent_tokens
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")


@pytest.fixture
def sub(monkeypatch):
    """The default codes, with the interpreter emulating the GPU's operand rounding."""
    monkeypatch.delenv(CODES_ENV, raising=False)
    monkeypatch.delenv(UNPACK_ENV, raising=False)
    monkeypatch.setenv(EMULATE_ENV, "1")


def _run(case, **kw):
    b, hq, d = case.q.shape
    kw = {"block_n": 32, "hp_block_n": 32, "int2_splits": 2, "hp_splits": 1} | kw
    plan = plan_decode(b, hq, case.k_bf16.shape[1], d, device=case.q.device,
                       max_body_len=case.tables.int2_slots.shape[1],
                       max_hp_len=case.tables.bf16_slots.shape[1], out_dtype=torch.float32,
                       **kw)
    return decode_attention(case.q, case.k_int2, case.v_int2, case.k_bf16, case.v_bf16,
                            case.tables, plan=plan, backend="triton")


def _errors(case, out):
    refs = reference_outputs(case)
    assert not torch.isnan(out).any()
    return max_err(out.float().cpu(), refs["fp64"]), max_err(refs["bf16"], refs["fp64"])


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("kv_group", [1, 2, 4])
def test_sub_codes_match_reference(triton_device, sub, kv_group, prefetch):
    if triton_device == "cuda":
        pytest.skip("interpreter test (GPU: test_gpu_sub_codes)")
    case = make_decode_case([P + R + 300, 70, P + R + 1], num_kv_heads=4, gqa=3, head_dim=128,
                            window=WIN, seed=5 + kv_group, device=triton_device)
    assert _dot_config(case.q, case.k_bf16)["MAGIC"] == 4
    err, own_bf16 = _errors(case, _run(case, kv_group=kv_group, prefetch=prefetch))
    assert err <= own_bf16 / 2, f"{err:.3g} vs bf16 reference {own_bf16:.3g}"


@pytest.mark.parametrize(("gqa", "d"), [(1, 64), (8, 256), (16, 64)])
def test_sub_codes_head_dims_and_gqa(triton_device, sub, gqa, d):
    if triton_device == "cuda":
        pytest.skip("interpreter test (GPU: test_gpu_sub_codes)")
    case = make_decode_case([P + R + 45, 9], num_kv_heads=2, gqa=gqa, head_dim=d, window=WIN,
                            seed=gqa, device=triton_device)
    err, own_bf16 = _errors(case, _run(case, block_n=16, hp_block_n=16))
    assert err <= own_bf16 / 2, f"{err:.3g} vs bf16 reference {own_bf16:.3g}"


@pytest.mark.parametrize("row_scale", [3e4, 1e-4, 0.0])
def test_sub_codes_scale_each_query_row(triton_device, sub, row_scale):
    """Rows of very different magnitudes in one program: each row gets its own power-of-2
    scale (a shared scale would overflow fp16 at 3e4 * 2^6 or flush 1e-4 rows); a zero row
    must give the plain average of V, not NaN."""
    case = make_decode_case([P + R + 200, P + R + 7], num_kv_heads=2, gqa=4, head_dim=128,
                            window=WIN, seed=3, device=triton_device)
    q = case.q.float().clone()
    q[:, 1] *= row_scale  # one query row of every KV-head group of the first program
    q[:, 6] *= row_scale
    case = dataclasses.replace(case, q=q.to(case.q.dtype))
    out = _run(case, kv_group=2)
    err, own_bf16 = _errors(case, out)
    bound = own_bf16 / 2 if triton_device == "cpu" else 2 * own_bf16
    assert err <= bound, f"{err:.3g} vs bf16 reference {own_bf16:.3g}"


def test_code_variant_settings(monkeypatch):
    """sub is the default; OSCAR_KV_INT2_UNPACK only applies to the bf16 variants (setting it
    with sub is an error, not silently ignored); unknown values are errors."""
    q = torch.zeros(1, 4, 128, dtype=torch.bfloat16)
    monkeypatch.delenv(CODES_ENV, raising=False)
    monkeypatch.delenv(UNPACK_ENV, raising=False)
    monkeypatch.setenv(EMULATE_ENV, "1")
    cfg = _dot_config(q, q)
    assert (cfg["CENTER"], cfg["MAGIC"]) == (False, 4)
    monkeypatch.setenv(EMULATE_ENV, "0")  # the interpreter's exact fp32 operands
    assert _dot_config(q, q)["MAGIC"] == 0
    monkeypatch.setenv(UNPACK_ENV, "triton")
    with pytest.raises(OscarError, match="centered or plain"):
        _dot_config(q, q)
    monkeypatch.setenv(CODES_ENV, "centered")
    assert _dot_config(q, q)["CENTER"] is True
    monkeypatch.setenv(UNPACK_ENV, "fast")
    with pytest.raises(OscarError, match="asm"):
        _dot_config(q, q)
    monkeypatch.delenv(UNPACK_ENV)
    monkeypatch.setenv(CODES_ENV, "shifted")
    with pytest.raises(OscarError, match="sub"):
        _dot_config(q, q)


@pytest.mark.gpu
@pytest.mark.parametrize(("lens", "hkv", "gqa", "d"), [
    ([1, 63, 64, 319, 320, 321, 1000, 4099, 8192], 2, 1, 64),
    ([1, 63, 64, 319, 320, 321, 1000, 4099, 8192], 2, 4, 128),
    ([1, 63, 64, 319, 320, 321, 1000, 4099, 8192], 2, 12, 256),
    ([32768, 131072, 4097], 2, 4, 128),
    ([(37 * i) % 5000 + 1 for i in range(64)], 8, 4, 128),
    ([1, 100, 700], 2, 4, 64),  # run with BLOCK_N 16: the asm-free build (MAGIC 5)
])
def test_gpu_sub_codes(sub, lens, hkv, gqa, d):
    """The default plan with the subnormal codes on tensor cores: within 2x the bf16
    reference's error, and printed beside the centered bf16 codes' error on the same case."""
    case = make_decode_case(lens, num_kv_heads=hkv, gqa=gqa, head_dim=d, window=WindowSpec(),
                            device="cuda")
    kw = {}
    if d == 64 and len(lens) == 3:
        b, hq, _ = case.q.shape
        kw["plan"] = plan_decode(b, hq, hkv, d, max_body_len=case.tables.int2_slots.shape[1],
                                 max_hp_len=case.tables.bf16_slots.shape[1], block_n=16,
                                 int2_splits=4)
    run = lambda: decode_attention(case.q, case.k_int2, case.v_int2, case.k_bf16, case.v_bf16,
                                   case.tables, **kw).float()
    err, own_bf16 = _errors(case, run())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CODES_ENV, "centered")
        bf16_err, _ = _errors(case, run())
    print(f"sub codes B={len(lens)} GQA {gqa} D {d}: err {err:.3g} (centered bf16 codes "
          f"{bf16_err:.3g}, bf16 reference {own_bf16:.3g})")
    assert err <= 2 * own_bf16, f"{err:.3g} vs bf16 reference {own_bf16:.3g}"
