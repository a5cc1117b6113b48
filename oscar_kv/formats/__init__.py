"""INT2 KV format: clipping, quantize/dequantize, packing, storage cost."""

from oscar_kv.formats.bpe import (
                                  bits_per_element,
                                  body_bits_per_element,
                                  kv_bf16_bytes_per_token,
                                  kv_body_bytes_per_token,
)
from oscar_kv.formats.clip import clip_index, clip_rows, clip_threshold
from oscar_kv.formats.packing import pack_int2, unpack_int2
from oscar_kv.formats.quant import dequantize_int2, fake_quant, quantize_int2

__all__ = ["bits_per_element", "body_bits_per_element", "kv_bf16_bytes_per_token",
           "kv_body_bytes_per_token", "clip_index", "clip_rows", "clip_threshold", "pack_int2",
           "unpack_int2", "dequantize_int2", "fake_quant", "quantize_int2"]
