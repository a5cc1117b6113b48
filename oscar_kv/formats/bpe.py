"""Storage cost: bits per KV element and bytes per token.

BPE(L) = [min(L, P + R) * 16 + max(L - P - R, 0) * (2 + 2 s / G)] / L for s-bit scale/zero,
the published accounting (steady-state recent window of exactly R tokens). With P = 64,
R = 256, G = 128 and 16-bit metadata: 2.2836 at 128K, 2.3843 at 32K; fp32 metadata: 2.533.
"""

from __future__ import annotations

from oscar_kv.config import QuantSpec, WindowSpec
from oscar_kv.errors import OscarError

BF16_BITS = 16


def body_bits_per_element(spec: QuantSpec) -> float:
    """Bits per element of the INT2 body: 2 code bits + scale and zero per group."""
    return 2.0 + 2.0 * spec.scale_bits / spec.group_size


def bits_per_element(total_len: int, window: WindowSpec = WindowSpec(),
                     spec: QuantSpec = QuantSpec()) -> float:
    """Average bits per K (or V) element over a cache of `total_len` tokens."""
    if total_len <= 0:
        raise OscarError(f"total_len must be a positive token count, got {total_len}")
    hp = min(total_len, window.sink_tokens + window.recent_tokens)
    body = total_len - hp
    return (hp * BF16_BITS + body * body_bits_per_element(spec)) / total_len


def kv_body_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int,
                            spec: QuantSpec = QuantSpec()) -> int:
    """Bytes of K+V for one INT2 body token over all layers (packed codes + metadata)."""
    per_head = head_dim // 4 + 2 * spec.groups(head_dim) * spec.scale_bits // 8
    return 2 * num_layers * num_kv_heads * per_head


def kv_bf16_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes of K+V for one BF16 token over all layers."""
    return 2 * num_layers * num_kv_heads * head_dim * 2
