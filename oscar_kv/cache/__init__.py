"""Framework-free mixed-cache semantics: BF16 sink + INT2 body + BF16 recent window."""

from oscar_kv.cache.windows import bf16_key_mask, body_end, body_end_tensor, window_counts

__all__ = ["bf16_key_mask", "body_end", "body_end_tensor", "window_counts"]
