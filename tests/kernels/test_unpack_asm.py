"""The INT2 unpack inline asm (GPU only: the interpreter runs the plain-Triton branch) checked on
CPU by executing its PTX text with a small interpreter for the six opcodes it uses. The plain
variant is the one the H200 GPU tests validated, which pins the PRMT/FMA semantics modelled
here; the centered variant must give c - 1.5 in the same output order, exactly, and the
subnormal variant (fp16 output, OSCAR_KV_INT2_UNPACK=sub) c 4^k 2^-24 for field k."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from oscar_kv.kernels.triton.decode import _UNPACK_ASM, _UNPACK_ASM_CENTERED, _UNPACK_SUB_ASM


def _bf16_bits_to_float(h: int) -> float:
    return float(np.array([h << 16], dtype=np.uint32).view(np.float32)[0])


def _float_to_bf16_bits(x: float) -> int:
    b = torch.tensor([x], dtype=torch.float64).to(torch.bfloat16)
    return int(b.view(torch.int16)[0]) & 0xFFFF


def _prmt(a: int, b: int, sel: int) -> int:
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        n = (sel >> (4 * i)) & 0xF
        assert n < 8, "sign-replicate selectors are not modelled"
        out |= src[n] << (8 * i)
    return out


def run_ptx(text: str, word: int) -> list[int]:
    """Execute the asm block for input $8 = word; returns the registers $0..$7 (uint32)."""
    regs: dict[str, int] = {"$8": word}
    val = lambda tok: int(tok, 16) if tok.startswith("0x") else regs[tok]
    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in ("{", "}") or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        a = [t.strip() for t in args.split(",")]
        exact = True
        if op == "mov.b32":
            r = val(a[1])
        elif op == "and.b32":
            r = val(a[1]) & val(a[2])
        elif op == "shr.u32":
            r = val(a[1]) >> int(a[2])
        elif op == "shl.b32":
            r = (val(a[1]) << int(a[2])) & 0xFFFFFFFF
        elif op == "prmt.b32":
            r = _prmt(val(a[1]), val(a[2]), val(a[3]))
        elif op == "fma.rn.bf16x2":
            x, y, z = val(a[1]), val(a[2]), val(a[3])
            r = 0
            for half in range(2):
                f = [_bf16_bits_to_float((v >> (16 * half)) & 0xFFFF) for v in (x, y, z)]
                exact_val = f[0] * f[1] + f[2]
                bits = _float_to_bf16_bits(exact_val)
                exact &= _bf16_bits_to_float(bits) == exact_val
                r |= bits << (16 * half)
        else:
            raise AssertionError(f"opcode {op} not modelled")
        assert exact, f"{line}: the FMA result is not exact in bf16"
        regs[a[0]] = r
    return [regs[f"${i}"] for i in range(8)]


def _words() -> list[int]:
    rng = np.random.default_rng(0)
    words = [int(w) for w in rng.integers(0, 2**32, 2000, dtype=np.uint64)]
    for pos in range(4):  # every byte value in every byte position
        words += [(v << (8 * pos)) | (0xA5 << (8 * ((pos + 1) % 4))) for v in range(256)]
    return words


@pytest.mark.parametrize("text,offset", [(_UNPACK_ASM.value, 0.0),
                                         (_UNPACK_ASM_CENTERED.value, 1.5)])
def test_unpack_asm_gives_each_field_in_order(text, offset):
    """Output k (registers $2k, $2k+1) holds 2-bit field k of bytes 0, 1 | 2, 3 of the word."""
    assert len(re.findall(r"prmt\.b32", text)) == 8
    for w in _words():
        out = run_ptx(text, w)
        for k in range(4):
            for j in range(4):  # byte j -> register 2k + j // 2, half j % 2
                h = (out[2 * k + j // 2] >> (16 * (j % 2))) & 0xFFFF
                code = (w >> (8 * j + 2 * k)) & 3
                assert _bf16_bits_to_float(h) == code - offset, (hex(w), k, j)


def test_unpack_sub_asm_gives_scaled_fp16_fields_in_order():
    """The fp16 variant: output k holds field k of bytes 0, 1 | 2, 3 as the fp16 value
    c 4^k 2^-24 (subnormal for 4^k c < 1024: all of them), two PRMTs and one AND per output."""
    text = _UNPACK_SUB_ASM.value
    assert len(re.findall(r"prmt\.b32", text)) == 2 and len(re.findall(r"and\.b32", text)) == 8
    for w in _words():
        out = run_ptx(text, w)
        for k in range(4):
            for j in range(4):
                h = (out[2 * k + j // 2] >> (16 * (j % 2))) & 0xFFFF
                value = float(np.array([h], dtype=np.uint16).view(np.float16)[0])
                code = (w >> (8 * j + 2 * k)) & 3
                assert value == code * 4.0**k * 2.0**-24, (hex(w), k, j)
