"""Capture post-q/k-norm, post-RoPE Q and K and raw V from HF causal LMs (transformers 5.x).

A transformers attention function (``AttentionInterface``) named ``oscar_kv_capture`` is
registered once. It receives, per decoder layer, exactly what the model's attention sees:
query [B, Hq, T, D] after q_norm and RoPE, key/value [B, Hkv, T, D] before ``repeat_kv``, and
``module.layer_idx``. It hands them to the recorder passed through the forward kwargs and then
delegates to transformers' sdpa implementation, so the forward's outputs are unchanged.

The model is switched to this implementation only inside ``capture_qkv`` and restored after.
transformers is imported lazily; ``import oscar_kv.capture.hooks`` stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from oscar_kv.errors import OscarError

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe", "qwen2", "llama")
CAPTURE_ATTN_NAME = "oscar_kv_capture"
_RECORDER_KWARG = "oscar_kv_recorder"

# recorder(layer, q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, D])
Recorder = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def check_supported(model: Any) -> str:
    """Return the model_type or raise OscarError listing the supported families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise OscarError(f"model type {model_type!r} is not supported for calibration capture; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return model_type


def _capture_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, attention_mask: torch.Tensor | None,
                       **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """AttentionInterface function: record q/k/v of this layer, then run sdpa attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    recorder = kwargs.pop(_RECORDER_KWARG, None)
    if recorder is None:
        raise OscarError("the oscar_kv_capture attention ran without a recorder; use "
                         "oscar_kv.capture.hooks.run_capture to drive it")
    recorder(int(module.layer_idx), query.transpose(1, 2), key.transpose(1, 2),
             value.transpose(1, 2))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_ATTN_NAME, _capture_attention)
    # Same mask construction as sdpa (None for plain causal batches, padding masks otherwise).
    AttentionMaskInterface.register(CAPTURE_ATTN_NAME, sdpa_mask)


@contextmanager
def capture_qkv(model: Any) -> Iterator[Callable[..., Any]]:
    """Switch ``model`` to the capturing attention; yields ``forward(input_ids, recorder)``.

    ``forward`` runs the base model (no LM head, no KV cache) under ``torch.no_grad`` on
    input_ids [B, T] (moved to the model's device) and calls ``recorder`` once per layer.
    The model is put in eval mode; its attention implementation and training flag are
    restored on exit, also after an error.
    """
    check_supported(model)
    _register()
    original, was_training = model.config._attn_implementation, model.training
    model.eval()
    model.set_attn_implementation(CAPTURE_ATTN_NAME)
    if model.config._attn_implementation != CAPTURE_ATTN_NAME:
        raise OscarError(f"could not switch {type(model).__name__} to the capture attention; "
                         f"this transformers version may not support AttentionInterface")
    base = model.base_model
    device = next(model.parameters()).device

    def forward(input_ids: torch.Tensor, recorder: Recorder) -> None:
        ids = torch.as_tensor(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        with torch.no_grad():
            base(input_ids=ids.to(device=device, dtype=torch.long), use_cache=False,
                 **{_RECORDER_KWARG: recorder})

    try:
        yield forward
    finally:
        model.set_attn_implementation(original)
        model.train(was_training)


def run_capture(model: Any, input_ids: torch.Tensor
                ) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One forward; returns {layer: (q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, D])}.

    Convenience for tests and small inputs; calibration streams through ``capture_qkv``.
    """
    out: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def record(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        out[layer] = (q.detach().clone(), k.detach().clone(), v.detach().clone())

    with capture_qkv(model) as forward:
        forward(input_ids, record)
    return out
