"""The `int2_triton` attention backend and the INT2 pool class for sglang==0.5.17.

`Int2TritonAttnBackend` subclasses SGLang's `TritonAttnBackend` so CUDA-graph state and
forward metadata stay upstream's; only `forward_decode` / `forward_extend` change. Their
device wiring to `oscar_kv.kernels` (write_int2 / write_bf16 / plan_decode /
decode_attention / prefill_attention over the pool described by `pool_index.PoolLayout`) is
the remaining GPU work; until it lands they raise a clear error instead of silently serving
an unquantized cache. Imported only from `hooks.install()` (it imports sglang).
"""

from __future__ import annotations

from oscar_kv.errors import OscarError
from oscar_kv.sglang_plugin.server_args import BACKEND_NAME

PENDING = ("the oscar-kv int2 {what} is not wired to the device kernels yet (CPU-only "
           "release); serve without --kv-cache-dtype int2 until the GPU backend lands")


def _add_backend_choice() -> None:
    try:  # sglang >= 0.5.21 moved the adder
        from sglang.srt.arg_groups.choices import add_attention_backend_choices
    except ImportError:
        from sglang.srt.server_args import add_attention_backend_choices
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])


def create_int2_backend(runner):
    """Factory for SGLang's attention registry: runner is the ModelRunner."""
    if getattr(runner.model_config, "is_encoder_decoder", False):
        raise OscarError(f"--attention-backend {BACKEND_NAME} does not support "
                         "encoder-decoder models; use another backend without int2")
    return int2_backend_class()(runner)


def register_backend() -> None:
    """H2: `--attention-backend int2_triton` -> Int2TritonAttnBackend."""
    from sglang.srt.layers.attention.attention_registry import (
        ATTENTION_BACKENDS,
        register_attention_backend,
    )

    _add_backend_choice()
    if BACKEND_NAME not in ATTENTION_BACKENDS:
        register_attention_backend(BACKEND_NAME)(create_int2_backend)


_CLASSES: dict[str, type] = {}


def int2_backend_class() -> type:
    """Int2TritonAttnBackend(TritonAttnBackend), built on first use (imports sglang)."""
    if "backend" not in _CLASSES:
        from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

        class Int2TritonAttnBackend(TritonAttnBackend):
            """TritonAttnBackend whose decode/extend read the mixed INT2/BF16 pool.

            forward_decode(q [T, Hq*D], k, v [T, Hkv, D], layer, forward_batch) -> [T, Hq*D]
            forward_extend(same shapes)                                        -> [T, Hq*D]
            """

            oscar_kv_int2 = True

            def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True,
                               **kwargs):
                raise NotImplementedError(PENDING.format(what="decode attention"))

            def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True,
                               **kwargs):
                raise NotImplementedError(PENDING.format(what="extend attention"))

        _CLASSES["backend"] = Int2TritonAttnBackend
    return _CLASSES["backend"]


def int2_pool_class() -> type:
    """The KV pool class for int2 (H4). Pending: an MHATokenToKVPool subclass holding
    Int2Store rows [int2_rows, Hkv, D/4] + scale/zero and the BF16 arena [bf16_rows, Hkv, D]
    per layer, addressed by pool_index's flat ids."""
    raise OscarError(PENDING.format(what="KV pool"))
