"""What `--kv-cache-dtype int2` means for SGLang's ServerArgs and model: defaults + rejections.

Pure functions over duck-typed objects (sglang's `ServerArgs`, `KVCacheConfigurator`), so they
are unit-tested without sglang; `hooks.py` calls them from HookRegistry hooks:

- `prepare_int2_args(sa)`   BEFORE ServerArgs.__post_init__: fills our defaults (own attention
  backend, the `oscar_int2` radix-cache backend when the radix cache is on, page size 1, no
  overlap scheduler, no prefill CUDA graph) and
  rejects the combinations we do not support; with calibration capture on (any dtype) it
  turns off what would hide prompts from the capture hook (radix hits, prefill graphs);
- `finalize_int2_args(sa)`  AFTER ServerArgs.__post_init__: reads the env flags once
  (`env.read_plugin_config`) so a bad flag fails at startup, and re-checks resolved fields;
- `check_int2_model(kvc, ...)` before the KV pool is built: plain MHA models only.

Every rejection is an `OscarError` whose message is one sentence naming what to change.
"""

from __future__ import annotations

import logging

from oscar_kv.errors import OscarError
from oscar_kv.sglang_plugin.env import PluginConfig, read_plugin_config

KV_DTYPE = "int2"
BACKEND_NAME = "int2_triton"
GROUP_SIZE_ATTR = "kv_cache_quant_group_size"
GROUP_SIZE_FLAG = "--kv-cache-quant-group-size"
DEFAULT_MAX_RUNNING_REQUESTS = 64
RADIX_BACKEND = "oscar_int2"  # radix.RADIX_BACKEND (kept sglang-free here)
_BACKEND_FIELDS = ("attention_backend", "prefill_attention_backend",
                   "decode_attention_backend")
log = logging.getLogger("oscar_kv.sglang_plugin")


def is_int2(sa) -> bool:
    return getattr(sa, "kv_cache_dtype", None) == KV_DTYPE


def _reject_unsupported(sa) -> None:
    why = "--kv-cache-dtype int2 does not support"
    if getattr(sa, "speculative_algorithm", None):
        raise OscarError(f"{why} speculative decoding; remove --speculative-algorithm")
    if getattr(sa, "disaggregation_mode", "null") not in (None, "null"):
        raise OscarError(f"{why} prefill/decode disaggregation; remove --disaggregation-mode")
    if getattr(sa, "enable_hierarchical_cache", False):
        raise OscarError(f"{why} the hierarchical (host-offloaded) KV cache; remove "
                         "--enable-hierarchical-cache")
    for name in _BACKEND_FIELDS:
        val = getattr(sa, name, None)
        if val not in (None, BACKEND_NAME):
            flag = "--" + name.replace("_", "-")
            raise OscarError(f"{why} {flag} {val}; use --attention-backend {BACKEND_NAME} "
                             "or leave the attention backend unset")
    backend = getattr(sa, "radix_cache_backend", None)
    if backend not in (None, RADIX_BACKEND):
        raise OscarError(f"{why} --radix-cache-backend {backend}; its prefix cache is "
                         f"{RADIX_BACKEND} (the default), so remove --radix-cache-backend")
    page = getattr(sa, "page_size", None)
    if page not in (None, 1):
        raise OscarError(f"{why} --page-size {page}; the INT2 pool is token-granular, so "
                         "remove --page-size")
    for name, flag in (("enable_mixed_chunk", "--enable-mixed-chunk"),
                       ("enable_streaming_session", "--enable-streaming-session"),
                       ("enable_session_radix_cache", "--enable-session-radix-cache"),
                       ("enable_dp_attention", "--enable-dp-attention"),
                       ("enable_lora", "--enable-lora"),
                       ("enable_unified_memory", "--enable-unified-memory")):
        if getattr(sa, name, False):
            raise OscarError(f"{why} {flag}; remove it")
    for name, flag in (("pp_size", "--pp-size"), ("dcp_size", "--dcp-size")):
        if (getattr(sa, name, 1) or 1) > 1:
            raise OscarError(f"{why} {flag} {getattr(sa, name)} yet (tensor parallelism is "
                             f"supported); remove {flag}")


def prepare_capture_args(sa) -> None:
    """Calibration capture sees each prompt once, whole, in an eager prefill: no radix
    hits (a cached prefix would hide tokens) and no prefill CUDA graph (its replay would
    skip the Python capture hook)."""
    if not getattr(sa, "disable_radix_cache", False):
        log.info("oscar-kv capture: disabling the radix cache")
        sa.disable_radix_cache = True
    if not getattr(sa, "disable_prefill_cuda_graph", False):
        log.info("oscar-kv capture: disabling the prefill CUDA graph")
        sa.disable_prefill_cuda_graph = True


# The original's launch line (`--prefill-attention-backend fa3 --decode-attention-backend triton`
# with int2) named its patched stock backends; here the int2 path is one backend of our own.
ORIGINAL_SPELLING = {("fa3", "triton"), ("triton", "triton")}


def _adopt_original_spelling(sa) -> None:
    """Accept the original project's backend flags as written and serve them with ours."""
    pair = (getattr(sa, "prefill_attention_backend", None),
            getattr(sa, "decode_attention_backend", None))
    if getattr(sa, "attention_backend", None) is None and pair in ORIGINAL_SPELLING:
        log.info("oscar-kv int2: --prefill-attention-backend %s --decode-attention-backend %s "
                 "(the original's spelling) -> %s", pair[0], pair[1], BACKEND_NAME)
        sa.prefill_attention_backend = sa.decode_attention_backend = None


def prepare_int2_args(sa, capture: bool = False) -> None:
    """Before ServerArgs resolution: reject unsupported flags and fill int2 defaults."""
    if capture:
        prepare_capture_args(sa)
    if not is_int2(sa):
        if getattr(sa, GROUP_SIZE_ATTR, None) is not None:
            raise OscarError(f"{GROUP_SIZE_FLAG} only applies to --kv-cache-dtype int2; "
                             "remove it or add --kv-cache-dtype int2")
        return
    _adopt_original_spelling(sa)
    _reject_unsupported(sa)
    if getattr(sa, "attention_backend", None) is None:
        sa.attention_backend = BACKEND_NAME
    for name in _BACKEND_FIELDS[1:]:
        if getattr(sa, name, None) is None:
            setattr(sa, name, BACKEND_NAME)
    if not getattr(sa, "disable_radix_cache", False):
        # the tree shares sink rows and INT2 ids, never the per-request recent ring (radix.py)
        sa.radix_cache_backend = RADIX_BACKEND
    sa.page_size = 1
    # The flush and req_to_token remaps run at allocation time, ordered after the previous
    # forward only without the overlap scheduler (see glue.py).
    if not getattr(sa, "disable_overlap_schedule", False):
        log.info("oscar-kv int2: disabling the overlap scheduler")
        sa.disable_overlap_schedule = True
    # Prefill runs eagerly (host-planned per request); decode keeps its CUDA graphs.
    if not getattr(sa, "disable_prefill_cuda_graph", False):
        log.info("oscar-kv int2: disabling the prefill CUDA graph (decode graphs stay on)")
        sa.disable_prefill_cuda_graph = True
    if getattr(sa, "max_running_requests", None) is None:
        sa.max_running_requests = DEFAULT_MAX_RUNNING_REQUESTS


def finalize_int2_args(sa, env=None) -> PluginConfig | None:
    """After ServerArgs resolution: re-check resolved fields and read the env flags once.

    Returns the PluginConfig (None when the KV dtype is not int2)."""
    if not is_int2(sa):
        return None
    _reject_unsupported(sa)
    if getattr(sa, "page_size", 1) != 1:
        raise OscarError(f"--kv-cache-dtype int2 needs page size 1 but SGLang resolved "
                         f"{sa.page_size} for this model; this model is not supported")
    if not getattr(sa, "disable_overlap_schedule", True):
        raise OscarError("--kv-cache-dtype int2 needs the overlap scheduler off but SGLang "
                         "turned it back on; this configuration is not supported")
    return read_plugin_config(env, group_size=getattr(sa, GROUP_SIZE_ATTR, None))


def _sliding_window(hf_config) -> bool:
    if hf_config is None:
        return False
    types = getattr(hf_config, "layer_types", None) or []
    if any("sliding" in str(t) for t in types):
        return True
    sw = getattr(hf_config, "sliding_window", None)
    return bool(sw) and getattr(hf_config, "use_sliding_window", True) is not False


def check_int2_model(kvc, is_dsa_model: bool = False, is_dsv4_model: bool = False) -> None:
    """Reject models whose attention is not plain MHA/GQA (kvc: a KVCacheConfigurator)."""
    why = "--kv-cache-dtype int2 supports plain multi-head / grouped-query attention only"
    mc = getattr(kvc, "model_config", None)
    arch = getattr(getattr(mc, "hf_config", None), "architectures", None) or ["this model"]
    name = arch[0]
    if getattr(kvc, "use_mla_backend", False) or is_dsa_model or is_dsv4_model:
        raise OscarError(f"{why}, but {name} uses MLA/sparse attention; serve it without "
                         "--kv-cache-dtype int2")
    if getattr(kvc, "is_hybrid_swa", False) or _sliding_window(getattr(mc, "hf_config", None)):
        raise OscarError(f"{why}, but {name} uses sliding-window attention; serve it without "
                         "--kv-cache-dtype int2")
    if getattr(kvc, "mambaish_config", None):
        raise OscarError(f"{why}, but {name} is a hybrid linear-attention/Mamba model; serve "
                         "it without --kv-cache-dtype int2")
    if getattr(mc, "is_encoder_decoder", False):
        raise OscarError(f"{why}, but {name} is an encoder-decoder model; serve it without "
                         "--kv-cache-dtype int2")
