"""Fused INT2 write kernel vs `ref.write_int2_ref`: codes, bytes and metadata bit-exact.

Runs the Triton kernel in the CPU interpreter when no GPU is present.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from oscar_kv.config import QuantSpec
from oscar_kv.errors import OscarError
from oscar_kv.formats import unpack_int2
from oscar_kv.kernels import Int2Store, write_int2, write_int2_ref
from oscar_kv.kernels.ref import rotate_rows

POISON = 0xA5


def _store(num_slots: int, heads: int, d: int, spec: QuantSpec, device: str) -> Int2Store:
    st = Int2Store.empty(num_slots, heads, d, spec, device=device)
    st.packed.fill_(POISON)
    st.scale.view(torch.uint8).fill_(POISON)
    st.zero.view(torch.uint8).fill_(POISON)
    return st


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so -0.0 != +0.0 and NaN == NaN of the same payload."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _run_both(x, rotation, ratio, spec, device, num_slots=None, kernel_x=None):
    n, h, d = x.shape
    num_slots = num_slots or 2 * n + 3
    slots = torch.randperm(num_slots, generator=torch.Generator().manual_seed(n))[:n]
    a = _store(num_slots, h, d, spec, "cpu")
    write_int2_ref(x, rotation, ratio, spec, slots, a.packed, a.scale, a.zero)
    b = _store(num_slots, h, d, spec, device)
    kx = x if kernel_x is None else kernel_x
    rot = None if kernel_x is not None else rotation
    write_int2(kx.to(device), None if rot is None else rot.to(device), ratio, spec,
               slots.to(device), b.packed, b.scale, b.zero, backend="triton")
    return a, Int2Store(b.packed.cpu(), b.scale.cpu(), b.zero.cpu(), spec)


def _assert_identical(a: Int2Store, b: Int2Store) -> None:
    assert torch.equal(a.packed, b.packed), "packed bytes differ"
    assert torch.equal(_bits(a.scale), _bits(b.scale)), "scale bits differ"
    assert torch.equal(_bits(a.zero), _bits(b.zero)), "zero bits differ"


@pytest.mark.parametrize("meta", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize(("d", "group"), [(128, 128), (128, 32), (64, 64)])
@pytest.mark.parametrize("ratio", [0.92, 1.0, 0.3, 0.99, 0.05])
def test_random_rows_bit_exact(triton_device, meta, d, group, ratio):
    spec = QuantSpec(group_size=group, scale_dtype=meta)
    x = (torch.randn(21, 2, d, generator=torch.Generator().manual_seed(d + group))
         * torch.logspace(-3, 3, 21)[:, None, None]).to(torch.bfloat16)
    a, b = _run_both(x, None, ratio, spec, triton_device)
    _assert_identical(a, b)


@pytest.mark.parametrize("meta", ["bfloat16", "float16"])
def test_special_rows_bit_exact(triton_device, meta):
    """Constant rows, zeros, signed zeros, extremes, near-constant rows, fp32 input."""
    d = 64
    rows = [torch.zeros(d), torch.full((d,), 1.5), torch.full((d,), -3.0),
            torch.where(torch.arange(d) % 2 == 0, 0.0, -0.0),
            torch.full((d,), 7.0) + torch.arange(d) * 1e-6,     # range << amax: floor acts
            torch.cat([torch.full((4,), 1e30), torch.randn(d - 4)]),
            torch.cat([torch.full((4,), -6e4), torch.randn(d - 4) * 1e-3]),
            torch.randn(d) * 1e-30, torch.randn(d) * 1e-40,     # subnormal inputs
            torch.where(torch.arange(d) < d // 2, 1e-8, 2e-8)]
    x = torch.stack(rows)[:, None, :].float()
    for ratio in (0.9, 1.0, 0.0):
        a, b = _run_both(x, None, ratio, QuantSpec(group_size=d, scale_dtype=meta),
                         triton_device)
        _assert_identical(a, b)


def test_tied_magnitudes_at_clip_index(triton_device):
    """Many equal |x| (of both signs) straddling index floor(r*D): tau is still exact."""
    d = 64
    g = torch.Generator().manual_seed(3)
    base = torch.full((d,), 2.0) * torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0)
    base[:8] = torch.linspace(3.0, 9.0, 8)          # 8 larger, distinct magnitudes
    base[8:20] = torch.linspace(0.1, 1.0, 12)       # 12 smaller
    rows = torch.stack([base[torch.randperm(d, generator=g)] for _ in range(6)])
    x = rows[:, None, :].to(torch.bfloat16)
    # indices inside / at the edges of the tie; 0.875.. and 0.0625 take the peel select
    for ratio in (0.5, 0.875, 0.88, 0.9, 0.3125, 0.0625, 0.2):
        a, b = _run_both(x, None, ratio, QuantSpec(group_size=d), triton_device)
        _assert_identical(a, b)


def test_pre_rotated_input_bit_exact(triton_device):
    """The kernel fed ref's rotated rows (rotation=None) equals the ref with the rotation."""
    d = 128
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(5)))
    x = torch.randn(19, 2, d, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    a, b = _run_both(x, q.float(), 0.96, QuantSpec(), triton_device,
                     kernel_x=rotate_rows(x, q.float()))
    _assert_identical(a, b)


def test_fused_rotation_within_documented_tolerance(triton_device):
    """Fused x @ R sums in another order: metadata within 1 ulp, codes rarely off by one."""
    d = 128
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(7)))
    x = torch.randn(48, 2, d, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    a, b = _run_both(x, q.float(), 0.96, QuantSpec(), triton_device)
    for name in ("scale", "zero"):
        ulps = (_bits(getattr(a, name)).int() - _bits(getattr(b, name)).int()).abs()
        assert ulps.max().item() <= 1, f"{name} differs by more than one ulp"
    ca, cb = unpack_int2(a.packed).int(), unpack_int2(b.packed).int()
    assert (ca - cb).abs().max().item() <= 1
    assert (ca != cb).float().mean().item() <= 1e-3


def test_untouched_slots_and_int32_slots(triton_device):
    spec = QuantSpec(group_size=64)
    x = torch.randn(5, 1, 64).to(torch.bfloat16)
    slots = torch.tensor([7, 0, 3, 9, 4], dtype=torch.int32)
    st = _store(12, 1, 64, spec, triton_device)
    write_int2(x.to(triton_device), None, 0.9, spec, slots.to(triton_device), st.packed,
               st.scale, st.zero, backend="triton")
    untouched = [i for i in range(12) if i not in slots.tolist()]
    assert (st.packed[untouched] == POISON).all()
    ref = _store(12, 1, 64, spec, "cpu")
    write_int2_ref(x, None, 0.9, spec, slots, ref.packed, ref.scale, ref.zero)
    assert torch.equal(st.packed.cpu(), ref.packed)


def test_other_quantizers_fall_back_with_one_warning(triton_device):
    spec = QuantSpec(group_size=64, quantizer="lloyd_max_uniform116")
    x = torch.randn(4, 1, 64).to(torch.bfloat16)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        a, b = _run_both(x, None, 0.9, spec, triton_device)
        _run_both(x, None, 0.9, spec, triton_device)
    _assert_identical(a, b)
    assert sum("no Triton write kernel" in str(w.message) for w in rec) <= 1


def test_layout_errors_are_clear(triton_device):
    spec = QuantSpec(group_size=64)
    st = _store(4, 1, 64, spec, triton_device)
    x = torch.randn(2, 1, 64, device=triton_device)
    with pytest.raises(OscarError, match="slots"):
        write_int2(x, None, 1.0, spec, torch.zeros(3, dtype=torch.long, device=triton_device),
                   st.packed, st.scale, st.zero, backend="triton")
    with pytest.raises(OscarError, match="packed"):
        write_int2(x, None, 1.0, spec, torch.zeros(2, dtype=torch.long, device=triton_device),
                   st.packed[..., :8], st.scale, st.zero, backend="triton")
    with pytest.raises(OscarError, match="contiguous last"):
        write_int2(torch.randn(2, 1, 128, device=triton_device)[..., ::2], None, 1.0, spec,
                   torch.zeros(2, dtype=torch.long, device=triton_device), st.packed,
                   st.scale, st.zero, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_sweep_bit_exact(d):
    spec = QuantSpec(group_size=min(128, d))
    x = torch.randn(4096, 8, d).to(torch.bfloat16)
    a, b = _run_both(x, None, 0.96, spec, "cuda")
    _assert_identical(a, b)
    q, _ = torch.linalg.qr(torch.randn(d, d))
    a, b = _run_both(x, q.float(), 0.96, spec, "cuda", kernel_x=rotate_rows(x, q.float()))
    _assert_identical(a, b)
