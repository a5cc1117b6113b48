"""The one boundary where SGLang's environment flags become our frozen config.

The original fork is configured by `SGLANG_MIXED_KV_*` / `SGLANG_OSCAR_*` / `SGLANG_LLOYD_MAX`
environment variables plus `--kv-cache-quant-group-size`. `read_plugin_config` reads them
exactly once (at server start, in every SGLang process) into a `PluginConfig`; nothing else
in the plugin reads the environment. Meanings follow the fork (spec §7.1); defaults are ours,
defined once in `oscar_kv.config` (sink 64, recent 256, BF16 scale/zero) rather than the
fork's environ.py values, and clip ratios default to those fitted in the rotation checkpoint.

Bad values raise `OscarError` with one sentence naming the flag and a valid value. This module
imports neither sglang nor triton.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from oscar_kv.config import ModelGeometry, QuantSpec, WindowSpec, canonical_scale_dtype
from oscar_kv.errors import OscarError

ENABLE = "SGLANG_ENABLE_MIXED_KV_WINDOWS"
PREFIX_TOKENS = "SGLANG_MIXED_KV_PREFIX_TOKENS"
RECENT_TOKENS = "SGLANG_MIXED_KV_RECENT_TOKENS"
HP_DTYPE = "SGLANG_MIXED_KV_HP_DTYPE"
SCALE_DTYPE = "SGLANG_MIXED_KV_SCALE_DTYPE"
HP_MAX_SPLITS = "SGLANG_MIXED_KV_HP_MAX_SPLITS"
K_ROTATION_PATH = "SGLANG_OSCAR_K_ROTATION_PATH"
V_ROTATION_PATH = "SGLANG_OSCAR_V_ROTATION_PATH"
K_CLIP_RATIO = "SGLANG_OSCAR_K_CLIP_RATIO"
V_CLIP_RATIO = "SGLANG_OSCAR_V_CLIP_RATIO"
ABSORB_V_ROTATION = "SGLANG_OSCAR_ABSORB_V_ROTATION"
LLOYD_MAX = "SGLANG_LLOYD_MAX"
CAPTURE_DIR = "SGLANG_OSCAR_CAPTURE_DIR"
CAPTURE_TOKENS = "SGLANG_OSCAR_CAPTURE_TOKENS"
CAPTURE_SOFTMAX_STATS = "SGLANG_OSCAR_CAPTURE_SOFTMAX_STATS"
FLAGS = (ENABLE, PREFIX_TOKENS, RECENT_TOKENS, HP_DTYPE, SCALE_DTYPE, HP_MAX_SPLITS,
         K_ROTATION_PATH, V_ROTATION_PATH, K_CLIP_RATIO, V_CLIP_RATIO, ABSORB_V_ROTATION,
         LLOYD_MAX)

# The BF16 windows move to INT2 in blocks of 8 tokens: the fork's page of N_Q = 4 * 2 bytes.
FLUSH_BLOCK = 8
HP_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16"}
DEFAULT_HP_MAX_SPLITS = 8
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _get(env: Mapping[str, str], name: str) -> str | None:
    v = env.get(name)
    return None if v is None else v.strip()


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    v = _get(env, name)
    if v is None:
        return default
    if v.lower() in _TRUE:
        return True
    if v.lower() in _FALSE:
        return False
    raise OscarError(f"{name}={v!r} is not a boolean; set it to 1 or 0")


def _int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    v = _get(env, name)
    if v is None or v == "":
        return default
    try:
        n = int(v)
    except ValueError:
        raise OscarError(f"{name}={v!r} is not an integer; set it to an integer >= "
                         f"{minimum}") from None
    if n < minimum:
        raise OscarError(f"{name}={n} is out of range; set it to an integer >= {minimum}")
    return n


def _clip(env: Mapping[str, str], name: str) -> float | None:
    v = _get(env, name)
    if v is None or v == "":
        return None  # use the ratios fitted in the checkpoint
    try:
        r = float(v)
    except ValueError:
        raise OscarError(f"{name}={v!r} is not a number; set it in [0, 1] (0 = no clipping) "
                         "or unset it to use the checkpoint's fitted ratios") from None
    if not 0.0 <= r <= 1.0:
        raise OscarError(f"{name}={r} is outside [0, 1]; set it in [0, 1] (0 = no clipping) "
                         "or unset it to use the checkpoint's fitted ratios")
    return r


def _multiple(name: str, n: int) -> int:
    if n % FLUSH_BLOCK:
        raise OscarError(f"{name}={n} is not a multiple of {FLUSH_BLOCK}; round it to a "
                         f"multiple of {FLUSH_BLOCK}")
    return n


@dataclass(frozen=True)
class PluginConfig:
    """Everything the env flags and `--kv-cache-quant-group-size` decide, validated.

    window: sink = SGLANG_MIXED_KV_PREFIX_TOKENS, recent = SGLANG_MIXED_KV_RECENT_TOKENS,
    flush_block = 8. group_size None means one group per head (resolved by `quant_spec`).
    k_clip_ratio / v_clip_ratio None mean "the checkpoint's fitted per-layer ratios";
    a number (0 = no clipping, as in the fork) overrides every layer.
    """

    window: WindowSpec
    k_rotation_path: str
    v_rotation_path: str
    scale_dtype: str = QuantSpec.scale_dtype
    group_size: int | None = None
    quantizer: str = "minmax"
    hp_dtype: str = "bfloat16"
    hp_max_splits: int = DEFAULT_HP_MAX_SPLITS
    k_clip_ratio: float | None = None
    v_clip_ratio: float | None = None
    absorb_v_rotation: bool = False
    source: dict = field(default_factory=dict, compare=False)

    def quant_spec(self, head_dim: int) -> QuantSpec:
        """The INT2 body format for a model with this head_dim (fails if G does not divide D)."""
        g = head_dim if self.group_size is None else self.group_size
        spec = QuantSpec(group_size=g, scale_dtype=self.scale_dtype, quantizer=self.quantizer)
        try:
            spec.groups(head_dim)
        except OscarError:
            raise OscarError(f"--kv-cache-quant-group-size {g} does not divide the model's "
                             f"head_dim {head_dim} (or head_dim is not a multiple of 4); "
                             "pick a divisor of head_dim") from None
        return spec

    def load_rotations(self, expect: ModelGeometry | None = None):
        """Load the K/V rotation checkpoints (validated against `expect`) with the clip
        ratios this config resolves: env overrides, else the fitted ones. -> RotationSet"""
        from oscar_kv.fit.checkpoint import load_rotation_set

        return load_rotation_set((self.k_rotation_path, self.v_rotation_path), expect=expect,
                                 clip_k=self.k_clip_ratio, clip_v=self.v_clip_ratio)


def read_plugin_config(env: Mapping[str, str] | None = None,
                       group_size: int | None = None) -> PluginConfig:
    """Read the flags once (default: os.environ) into a validated PluginConfig.

    group_size: the value of --kv-cache-quant-group-size (None: one group per head).
    Raises OscarError (one sentence) for a missing or malformed flag."""
    env = os.environ if env is None else env
    if not _bool(env, ENABLE, False):
        raise OscarError(f"--kv-cache-dtype int2 needs {ENABLE}=1 (the fork's legacy all-INT2 "
                         "Hadamard pool is not provided); set it, with "
                         f"{PREFIX_TOKENS}=0 {RECENT_TOKENS}=0 if you want no BF16 windows")
    sink = _multiple(PREFIX_TOKENS, _int(env, PREFIX_TOKENS, WindowSpec.sink_tokens, 0))
    recent = _multiple(RECENT_TOKENS, _int(env, RECENT_TOKENS, WindowSpec.recent_tokens, 0))
    hp = (_get(env, HP_DTYPE) or "bfloat16").lower()
    if hp not in HP_DTYPES:
        raise OscarError(f"{HP_DTYPE}={hp!r} is not supported; the BF16 windows only support "
                         "bfloat16, so unset it or set it to bfloat16")
    scale_name = _get(env, SCALE_DTYPE) or QuantSpec.scale_dtype
    try:
        scale = canonical_scale_dtype(scale_name.lower())
    except OscarError:
        raise OscarError(f"{SCALE_DTYPE}={scale_name!r} is not supported; set it to "
                         "bfloat16, float16 or float32") from None
    if group_size is not None and (isinstance(group_size, bool) or int(group_size) <= 0):
        raise OscarError(f"--kv-cache-quant-group-size {group_size} must be a positive "
                         "divisor of head_dim")
    paths = {}
    for name in (K_ROTATION_PATH, V_ROTATION_PATH):
        p = _get(env, name) or ""
        if not p:
            raise OscarError(f"{name} is not set; point it at the rotation checkpoint written "
                             "by `python -m oscar_kv fit`")
        if not os.path.isfile(p):
            raise OscarError(f"{name}={p} does not exist; point it at the rotation checkpoint "
                             "written by `python -m oscar_kv fit`")
        paths[name] = p
    return PluginConfig(
        window=WindowSpec(sink_tokens=sink, recent_tokens=recent, flush_block=FLUSH_BLOCK),
        k_rotation_path=paths[K_ROTATION_PATH], v_rotation_path=paths[V_ROTATION_PATH],
        scale_dtype=scale, group_size=None if group_size is None else int(group_size),
        quantizer="lloyd_max_uniform116" if _bool(env, LLOYD_MAX, False) else "minmax",
        hp_dtype=HP_DTYPES[hp],
        hp_max_splits=_int(env, HP_MAX_SPLITS, DEFAULT_HP_MAX_SPLITS, 1),
        k_clip_ratio=_clip(env, K_CLIP_RATIO), v_clip_ratio=_clip(env, V_CLIP_RATIO),
        absorb_v_rotation=_bool(env, ABSORB_V_ROTATION, False),
        source={k: env[k] for k in FLAGS if k in env})


@dataclass(frozen=True)
class CaptureConfig:
    """Calibration capture inside a server: every rank writes under out_dir; after max_tokens
    captured prompt tokens (0: until the `oscar_capture_finish` RPC) it saves and stops.
    softmax_stats False skips the causal-softmax weights (only the `svv` estimator needs
    them; they cost O(T^2) per sequence and layer)."""

    out_dir: str
    max_tokens: int = 0
    softmax_stats: bool = True


def read_capture_config(env: Mapping[str, str] | None = None) -> CaptureConfig | None:
    """SGLANG_OSCAR_CAPTURE_DIR (+ _TOKENS, _SOFTMAX_STATS) -> CaptureConfig, or None when
    capture is off. Read once per process, like the serving flags."""
    env = os.environ if env is None else env
    out = _get(env, CAPTURE_DIR) or ""
    if not out:
        return None
    if os.path.exists(out) and not os.path.isdir(out):
        raise OscarError(f"{CAPTURE_DIR}={out} is a file; point it at a directory (it is "
                         "created if missing)")
    return CaptureConfig(out_dir=out, max_tokens=_int(env, CAPTURE_TOKENS, 0, 0),
                         softmax_stats=_bool(env, CAPTURE_SOFTMAX_STATS, True))
