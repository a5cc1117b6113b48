"""INT2 bit packing in the reference's "quartered" layout.

For a row of D codes (D % 4 == 0), byte j (0 <= j < D/4) holds

    bits 1:0 = code[j]          bits 3:2 = code[j + D/4]
    bits 5:4 = code[j + D/2]    bits 7:6 = code[j + 3D/4]

so a decode kernel unpacks four contiguous quarter-vectors of length D/4 with one shift and
mask each. Codes must already be in [0, 3].
"""

from __future__ import annotations

import torch

from oscar_kv.errors import OscarError


def pack_int2(codes: torch.Tensor) -> torch.Tensor:
    """codes: uint8 [..., D] in [0, 3] -> packed uint8 [..., D // 4]."""
    d = codes.shape[-1]
    if d % 4 != 0:
        raise OscarError(f"head_dim {d} must be a multiple of 4 to pack INT2 codes")
    c = codes.to(torch.uint8)
    q0, q1, q2, q3 = c.split(d // 4, dim=-1)
    return q0 | (q1 << 2) | (q2 << 4) | (q3 << 6)


def unpack_int2(packed: torch.Tensor) -> torch.Tensor:
    """packed: uint8 [..., D // 4] -> codes uint8 [..., D]."""
    p = packed.to(torch.uint8)
    return torch.cat([p & 3, (p >> 2) & 3, (p >> 4) & 3, (p >> 6) & 3], dim=-1)
