"""HookRegistry wiring for sglang==0.5.17 (the only module, with backend.py, importing sglang).

`install()` runs in every SGLang process (entry point `sglang.srt.plugins`) and registers:

  H1 ServerArgs.add_cli_args        AFTER   `int2` in --kv-cache-dtype; --kv-cache-quant-group-size
     ServerArgs.from_cli_args       AROUND  carry the group size onto the ServerArgs object
     ServerArgs.__post_init__       BEFORE  server_args.prepare_int2_args (defaults, rejections)
     ServerArgs.__post_init__       AFTER   server_args.finalize_int2_args (env flags, once)
  H2 attention registry                     `int2_triton` -> backend.create_int2_backend
  H3 kv_cache_dtype.configure_kv_cache_dtype AROUND  "int2" -> ("int2", model dtype)
     KVCacheConfigurator._build_token_to_kv_pool AROUND  reject non-MHA models
  H4 KVCacheConfigurator._build_mha_kv_pool   AROUND  our pool class (GPU work, see docs)
  H5 DefaultPoolConfigurator._compute_cell_size AROUND  packed INT2 bytes per token
     DefaultPoolConfigurator.calculate_pool_sizes AROUND  BF16 arena inside the budget

Only AROUND/AFTER/BEFORE hooks that defer to the original for every other dtype.
"""

from __future__ import annotations

import argparse

from oscar_kv.config import WindowSpec
from oscar_kv.sglang_plugin import server_args as sargs
from oscar_kv.sglang_plugin.env import read_plugin_config
from oscar_kv.sglang_plugin.pool_index import (
    PoolLayout,
    arena_bytes,
    int2_bytes_per_token,
)

SA = "sglang.srt.server_args.ServerArgs"
KVC = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
POOLCFG = "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator"
KV_DTYPE_FN = "sglang.srt.mem_cache.kv_cache_dtype.configure_kv_cache_dtype"
_installed = False
_pending_group_size: list = [None]


def add_cli_args_after(result, parser: argparse.ArgumentParser):
    """H1: allow `--kv-cache-dtype int2`; add `--kv-cache-quant-group-size N`."""
    for action in parser._actions:
        if "--kv-cache-dtype" in action.option_strings and action.choices is not None \
                and sargs.KV_DTYPE not in action.choices:
            action.choices = list(action.choices) + [sargs.KV_DTYPE]
    if sargs.GROUP_SIZE_FLAG not in parser._option_string_actions:
        parser.add_argument(sargs.GROUP_SIZE_FLAG, type=int, default=None,
                            help="INT2 KV cache: dims per scale/zero group (must divide "
                                 "head_dim; default: one group per head). int2 only.")
    return result


def from_cli_args_around(orig, cls, args: argparse.Namespace):
    """Carry --kv-cache-quant-group-size (not a ServerArgs field) onto the object."""
    _pending_group_size[0] = getattr(args, sargs.GROUP_SIZE_ATTR, None)
    try:
        return orig(cls, args)
    finally:
        _pending_group_size[0] = None


def post_init_before(self):
    if _pending_group_size[0] is not None:
        setattr(self, sargs.GROUP_SIZE_ATTR, _pending_group_size[0])
    sargs.prepare_int2_args(self)


def post_init_after(result, self):
    sargs.finalize_int2_args(self)
    return result


def configure_kv_cache_dtype_around(orig, *args, server_args_kv_cache_dtype: str,
                                    model_dtype, **kwargs):
    """H3: the nominal dtype stays the model dtype so generic code takes the unquantized path;
    the configurator still sees kv_cache_dtype_str == "int2"."""
    if server_args_kv_cache_dtype == sargs.KV_DTYPE:
        return sargs.KV_DTYPE, model_dtype
    return orig(*args, server_args_kv_cache_dtype=server_args_kv_cache_dtype,
                model_dtype=model_dtype, **kwargs)


def build_token_to_kv_pool_around(orig, self, *args, **kwargs):
    if getattr(self, "kv_cache_dtype_str", None) == sargs.KV_DTYPE:
        sargs.check_int2_model(self, kwargs.get("is_dsa_model", False),
                               kwargs.get("is_dsv4_model", False))
    return orig(self, *args, **kwargs)


def build_mha_kv_pool_around(orig, self, *, max_total_num_tokens: int, mha_pool_class,
                             quant_method=None):
    """H4: the mixed INT2/BF16 pool for int2; the stock pool otherwise."""
    if getattr(self, "kv_cache_dtype_str", None) != sargs.KV_DTYPE:
        return orig(self, max_total_num_tokens=max_total_num_tokens,
                    mha_pool_class=mha_pool_class, quant_method=quant_method)
    from oscar_kv.sglang_plugin.backend import int2_pool_class

    return orig(self, max_total_num_tokens=max_total_num_tokens,
                mha_pool_class=int2_pool_class(), quant_method=None)


def int2_geometry(kvc, num_layers: int) -> tuple[int, int, int]:
    """(num_layers, kv heads on this attention-TP rank, head_dim) from a KVCacheConfigurator."""
    from sglang.srt.runtime_context import get_parallel

    heads = kvc.model_config.get_num_kv_heads(get_parallel().attn_tp_size)
    return num_layers, heads, kvc.model_config.head_dim


def compute_cell_size_around(orig, self, kvc, num_layers: int) -> int:
    """H5: bytes per INT2 token; remembers the BF16 arena for `calculate_pool_sizes`."""
    if getattr(kvc, "kv_cache_dtype_str", None) != sargs.KV_DTYPE:
        return orig(self, kvc, num_layers)
    layers, heads, head_dim = int2_geometry(kvc, num_layers)
    cfg = read_plugin_config(group_size=getattr(kvc.server_args, sargs.GROUP_SIZE_ATTR, None))
    max_reqs = kvc.server_args.max_running_requests or sargs.DEFAULT_MAX_RUNNING_REQUESTS
    self._oscar_arena_bytes = int2_arena_bytes(cfg.window, max_reqs, layers, heads, head_dim)
    return int2_bytes_per_token(layers, heads, head_dim, cfg.quant_spec(head_dim))


def int2_arena_bytes(window: WindowSpec, max_requests: int, num_layers: int,
                     num_kv_heads: int, head_dim: int) -> int:
    """BF16 sink/recent arena for `max_requests` slabs (+ the dummy row), all layers."""
    return arena_bytes(PoolLayout(window, 0, max_requests), num_layers, num_kv_heads, head_dim)


def calculate_pool_sizes_around(orig, self, available_bytes: int, page_size: int):
    """Budget the BF16 arena inside the memory fraction (the reference put it on top)."""
    arena = getattr(self, "_oscar_arena_bytes", 0)
    if arena and available_bytes <= arena:
        from oscar_kv.errors import OscarError

        raise OscarError(f"the BF16 windows need {arena / 2**30:.2f} GiB but only "
                         f"{available_bytes / 2**30:.2f} GiB is left for the KV cache; raise "
                         "--mem-fraction-static or lower --max-running-requests")
    return orig(self, available_bytes - arena, page_size)


def install() -> None:
    """Register every hook once per process (SGLang applies them after all plugins load)."""
    global _installed
    if _installed:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from oscar_kv.sglang_plugin.backend import register_backend

    reg = HookRegistry.register
    reg(f"{SA}.add_cli_args", add_cli_args_after, HookType.AFTER)
    reg(f"{SA}.from_cli_args", from_cli_args_around, HookType.AROUND)
    reg(f"{SA}.__post_init__", post_init_before, HookType.BEFORE)
    reg(f"{SA}.__post_init__", post_init_after, HookType.AFTER)
    reg(KV_DTYPE_FN, configure_kv_cache_dtype_around, HookType.AROUND)
    reg(f"{KVC}._build_token_to_kv_pool", build_token_to_kv_pool_around, HookType.AROUND)
    reg(f"{KVC}._build_mha_kv_pool", build_mha_kv_pool_around, HookType.AROUND)
    reg(f"{POOLCFG}._compute_cell_size", compute_cell_size_around, HookType.AROUND)
    reg(f"{POOLCFG}.calculate_pool_sizes", calculate_pool_sizes_around, HookType.AROUND)
    register_backend()
    _installed = True
