"""Turn a HF causal LM into an OSCAR model: one call, one handle, undoable.

    handle = prepare_model(model, "oscar", rotations="rot_dir/", window=WindowSpec(...))
    out = model.generate(ids, past_key_values=handle.new_cache(), max_new_tokens=64)
    logits = handle.simulate(ids)          # teacher-forced, every position as a decode step
    handle.restore()                       # weights and attention implementation as before

Methods (string registry `METHODS`): `bf16` (no quantization, no rotation), `naive` (INT2,
identity rotation, no clip), `hadamard` (INT2, H_D for K and V, no clip), `oscar` (INT2, fitted
R_K/R_V and clip ratios of a rotation set). Supported families: Qwen3/Qwen2/Llama-style
attention (q_proj/k_proj/v_proj/o_proj, head_dim, num_key_value_heads, full attention).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from oscar_kv.config import ModelGeometry, QuantSpec, WindowSpec
from oscar_kv.errors import OscarError
from oscar_kv.hf.absorb import absorb_v_rotation, restore_weights
from oscar_kv.hf.attention import GENERATE_IMPL, SIMULATE_IMPL
from oscar_kv.hf.cache import OscarCache
from oscar_kv.hf.plan import LayerPlan
from oscar_kv.registry import Registry

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")
MODES = {"generate": GENERATE_IMPL, "simulate": SIMULATE_IMPL}


@dataclass(frozen=True, eq=False)
class MethodRotations:
    """A method resolved for one model: k, v fp32 [L, D, D] or None (identity), per-layer clip
    ratios [L], whether the body is INT2 at all, and key means fp32 [L, Hkv, D] or None."""

    k: torch.Tensor | None
    v: torch.Tensor | None
    clip_k: list[float]
    clip_v: list[float]
    quantized: bool
    k_mean: torch.Tensor | None = None


MethodFn = Callable[[ModelGeometry, object], MethodRotations]
METHODS: Registry[MethodFn] = Registry("method")


def _no_clip(geom: ModelGeometry) -> list[float]:
    return [1.0] * geom.num_layers


@METHODS.register("bf16")
def _bf16(geom: ModelGeometry, rotations: object) -> MethodRotations:
    return MethodRotations(None, None, _no_clip(geom), _no_clip(geom), quantized=False)


@METHODS.register("naive")
def _naive(geom: ModelGeometry, rotations: object) -> MethodRotations:
    return MethodRotations(None, None, _no_clip(geom), _no_clip(geom), quantized=True)


@METHODS.register("hadamard")
def _hadamard(geom: ModelGeometry, rotations: object) -> MethodRotations:
    from oscar_kv.fit.checkpoint import hadamard_rotation_set

    rs = hadamard_rotation_set(geom)
    return MethodRotations(rs.k, rs.v, _no_clip(geom), _no_clip(geom), quantized=True)


@METHODS.register("oscar")
def _oscar(geom: ModelGeometry, rotations: object) -> MethodRotations:
    if rotations is None:
        raise OscarError("method 'oscar' needs a rotation set; pass rotations=<rotation dir> or "
                         "a RotationSet from oscar_kv.fit.checkpoint.load_rotation_set")
    if isinstance(rotations, (str, Path)):
        from oscar_kv.fit.checkpoint import load_rotation_set

        rotations = load_rotation_set(rotations, expect=geom)
    check_rotation_geometry(rotations, geom)
    return MethodRotations(rotations.k.float(), rotations.v.float(),
                           [float(c) for c in rotations.clip_k],
                           [float(c) for c in rotations.clip_v], quantized=True,
                           k_mean=getattr(rotations, "k_mean", None))


def check_rotation_geometry(rotations: object, geom: ModelGeometry) -> None:
    """Rotation set (anything with .k, .v [L, D, D], .clip_k, .clip_v [L]) vs the model."""
    want = (geom.num_layers, geom.head_dim, geom.head_dim)
    for name in ("k", "v"):
        r = getattr(rotations, name)
        if tuple(r.shape) != want:
            raise OscarError(f"the rotation set's {name} rotations are {list(r.shape)} "
                             f"({r.shape[0]} layers, head_dim {r.shape[-1]}) but the model "
                             f"{geom.name_or_path or geom.model_type} has {geom.num_layers} "
                             f"layers of head_dim {geom.head_dim}; use rotations fitted for it")
    for name in ("clip_k", "clip_v"):
        if len(getattr(rotations, name)) != geom.num_layers:
            raise OscarError(f"the rotation set has {len(getattr(rotations, name))} {name} "
                             f"ratios but the model has {geom.num_layers} layers; refit it")
    k_mean = getattr(rotations, "k_mean", None)
    want_mean = (geom.num_layers, geom.num_kv_heads, geom.head_dim)
    if k_mean is not None and tuple(k_mean.shape) != want_mean:
        raise OscarError(f"the rotation set's key means are {list(k_mean.shape)} but the model "
                         f"needs {list(want_mean)} (layers, KV heads, head_dim); use rotations "
                         f"fitted for this model")


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise OscarError(f"{type(model).__name__} has no .model.layers; only Qwen3/Qwen2/Llama-"
                         "style causal LMs are supported")
    return layers


def model_geometry(model: nn.Module) -> ModelGeometry:
    """The attention geometry of a supported HF causal LM; OscarError for other families."""
    cfg = model.config
    mtype = getattr(cfg, "model_type", "")
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise OscarError(f"model type {mtype!r} is not supported; supported families: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"} or getattr(cfg, "use_sliding_window", False):
        raise OscarError(f"layer types {sorted(kinds)} include sliding/other attention; only "
                         "full-attention models are supported")
    hq = cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    for i, layer in enumerate(_decoder_layers(model)):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj",
                                                               "o_proj")):
            raise OscarError(f"layer {i} has no self_attn with q_proj/k_proj/v_proj/o_proj; "
                             "only Qwen3/Qwen2/Llama-style attention is supported")
    return ModelGeometry(num_layers=cfg.num_hidden_layers, num_q_heads=hq,
                         num_kv_heads=getattr(cfg, "num_key_value_heads", None) or hq,
                         head_dim=d, model_type=mtype,
                         name_or_path=str(getattr(cfg, "name_or_path", "") or ""))


class OscarHandle:
    """A prepared model: builds caches, switches generate/simulate, and undoes everything."""

    def __init__(self, model: nn.Module, method: str, geometry: ModelGeometry,
                 plans: list[LayerPlan], saved: list[dict[str, torch.Tensor]],
                 previous_impl: str | None) -> None:
        self.model = model
        self.method = method
        self.geometry = geometry
        self.plans = plans
        self._saved = saved
        self._previous_impl = previous_impl
        self._attns = [layer.self_attn for layer in _decoder_layers(model)]
        self.restored = False

    def new_cache(self, decode_backend: str = "auto") -> OscarCache:
        """A fresh cache for one `generate` call (batch of equal-length sequences);
        decode_backend "auto" = Triton kernels on CUDA, torch elsewhere (see OscarCache)."""
        self._check_live()
        return OscarCache(self.plans, decode_backend=decode_backend)

    def set_mode(self, mode: str) -> None:
        """'generate' -> attention "oscar" (needs an OscarCache); 'simulate' -> "oscar_sim"."""
        self._check_live()
        if mode not in MODES:
            raise OscarError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
        _set_attn(self.model, MODES[mode])

    @torch.no_grad()
    def simulate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Teacher-forced logits [B, T, V] for input_ids [B, T]: every position sees the cache
        exactly as a decode step at that position would. Leaves the mode unchanged."""
        self._check_live()
        before = self.model.config._attn_implementation
        _set_attn(self.model, SIMULATE_IMPL)
        try:
            return self.model(input_ids=input_ids, use_cache=False, **kwargs).logits
        finally:
            _set_attn(self.model, before)

    def generate(self, input_ids: torch.Tensor, decode_backend: str = "auto", **kwargs):
        """`model.generate` with a fresh OscarCache in generate mode (kwargs passed through)."""
        self.set_mode("generate")
        return self.model.generate(input_ids, past_key_values=self.new_cache(decode_backend),
                                   **kwargs)

    def restore(self) -> None:
        """Undo absorption (bit-exact), drop the plans, restore the attention implementation."""
        if self.restored:
            return
        for attn, saved in zip(self._attns, self._saved, strict=True):
            restore_weights(attn, saved)
            if hasattr(attn, "oscar_plan"):
                del attn.oscar_plan
        if self._previous_impl is not None:
            _set_attn(self.model, self._previous_impl)
        self.restored = True

    def _check_live(self) -> None:
        if self.restored:
            raise OscarError("this OscarHandle was restored; call prepare_model again")


def _set_attn(model: nn.Module, impl: str) -> None:
    model.set_attn_implementation(impl)


def prepare_model(model: nn.Module, method: str, rotations: object = None,
                  quant: QuantSpec = QuantSpec(), window: WindowSpec | None = WindowSpec(),
                  mode: str = "generate") -> OscarHandle:
    """Prepare `model` in place for `method` and return the handle.

    rotations: a RotationSet-like object (.k, .v [L, D, D], .clip_k, .clip_v) or a rotation
    directory; only `oscar` uses it (other methods ignore it). window=None keeps every row
    BF16 (rotations, if any, still apply). R_V is absorbed into v_proj/o_proj, each attention module
    gets its `oscar_plan`, and the attention implementation is set for `mode`.
    """
    fn = METHODS.get(method)
    geom = model_geometry(model)
    resolved = fn(geom, rotations)
    attns = [layer.self_attn for layer in _decoder_layers(model)]
    if any(hasattr(a, "oscar_plan") for a in attns):
        raise OscarError("this model is already prepared; call handle.restore() first")
    if mode not in MODES:
        raise OscarError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    device = next(model.parameters()).device
    plans, saved = [], []
    for i, attn in enumerate(attns):
        r_k = None if resolved.k is None else resolved.k[i].to(device, torch.float32)
        k_mean = (None if resolved.k_mean is None
                  else resolved.k_mean[i].to(device, torch.float32))
        plan = LayerPlan(r_k, resolved.clip_k[i], resolved.clip_v[i], quant,
                         window if resolved.quantized else None, k_mean)
        saved.append({} if resolved.v is None else absorb_v_rotation(
            attn, resolved.v[i], geom.num_kv_heads, geom.num_q_heads, geom.head_dim))
        attn.oscar_plan = plan
        plans.append(plan)
    previous = model.config._attn_implementation
    handle = OscarHandle(model, method, geom, plans, saved, previous)
    handle.set_mode(mode)
    return handle
