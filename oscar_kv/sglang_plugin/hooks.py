"""HookRegistry wiring for sglang==0.5.17 (with backend/pool/glue, the only code importing sglang).

`install()` runs in every SGLang process (entry point `sglang.srt.plugins`) and registers:

  H1 ServerArgs.add_cli_args        AFTER   `int2` in --kv-cache-dtype; --kv-cache-quant-group-size
     ServerArgs.from_cli_args       AROUND  carry the group size onto the ServerArgs object
     ServerArgs.__post_init__       BEFORE  server_args.prepare_int2_args (defaults, rejections)
     ServerArgs.__post_init__       AFTER   server_args.finalize_int2_args (env flags, once)
  H2 attention registry                     `int2_triton` -> backend.create_int2_backend
  H3 kv_cache_dtype.configure_kv_cache_dtype AROUND  "int2" -> ("int2", model dtype)
     KVCacheConfigurator._build_token_to_kv_pool AROUND  reject non-MHA models; remember the
                                                  request-slot count for H4
  H4 KVCacheConfigurator._build_mha_kv_pool   AROUND  pool.Int2MHATokenToKVPool
     KVCacheConfigurator._build_token_to_kv_pool_allocator AROUND  pool.Int2TokenAllocator
  H5 DefaultPoolConfigurator._compute_cell_size AROUND  packed INT2 bytes per token
     DefaultPoolConfigurator.calculate_pool_sizes AROUND  BF16 arena inside the budget
  G  allocation.alloc_for_extend / alloc_for_decode, common.release_kv_cache,
     ScheduleBatch.new_tokens_required_next_decode, PrefillAdder.add_one_req
                                              AROUND  glue.py (the planner)
  R  radix-cache registry                     `oscar_int2` -> radix.Int2RadixCache (prefix sharing)
  A  ModelRunner.load_model                   AFTER   absorb R_V (SGLANG_OSCAR_ABSORB_V_ROTATION)
  C  (SGLANG_OSCAR_CAPTURE_DIR set) RadixAttention.forward BEFORE, ModelRunner.forward AROUND,
     Scheduler.handle_rpc_request AROUND      calibration capture (capture.py)

Every hook defers to the original for every other dtype / allocator. `check_installed()`
refuses to build the int2 pool in a process where a serving hook failed to apply.
"""

from __future__ import annotations

import argparse
import functools
import logging

from oscar_kv.config import ModelGeometry, WindowSpec
from oscar_kv.errors import OscarError
from oscar_kv.sglang_plugin import glue
from oscar_kv.sglang_plugin import server_args as sargs
from oscar_kv.sglang_plugin.env import read_capture_config, read_plugin_config
from oscar_kv.sglang_plugin.pool_index import (
    PoolLayout,
    arena_bytes,
    int2_bytes_per_token,
)

SA = "sglang.srt.server_args.ServerArgs"
KVC = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
POOLCFG = "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator"
KV_DTYPE_FN = "sglang.srt.mem_cache.kv_cache_dtype.configure_kv_cache_dtype"
ALLOC = "sglang.srt.mem_cache.allocation"
RELEASE = "sglang.srt.mem_cache.common.release_kv_cache"
BATCH = "sglang.srt.managers.schedule_batch.ScheduleBatch"
RUNNER = "sglang.srt.model_executor.model_runner.ModelRunner"
RADIX = "sglang.srt.layers.radix_attention.RadixAttention"
SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
ADDER = "sglang.srt.managers.schedule_policy.PrefillAdder"
CAPTURE_FINISH_RPC = "oscar_capture_finish"
SERVING_TARGETS = (f"{KVC}._build_mha_kv_pool", f"{KVC}._build_token_to_kv_pool_allocator",
                   f"{ALLOC}.alloc_for_extend", f"{ALLOC}.alloc_for_decode", RELEASE,
                   f"{BATCH}.new_tokens_required_next_decode", f"{ADDER}.add_one_req")
_installed = False
_pending_group_size: list = [None]
_pending_req_slots: list = [None]
log = logging.getLogger("oscar_kv.sglang_plugin")


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
    sargs.prepare_int2_args(self, capture=read_capture_config() is not None)


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
    if getattr(self, "kv_cache_dtype_str", None) != sargs.KV_DTYPE:
        return orig(self, *args, **kwargs)
    sargs.check_int2_model(self, kwargs.get("is_dsa_model", False),
                           kwargs.get("is_dsv4_model", False))
    req_pool = kwargs.get("req_to_token_pool")
    _pending_req_slots[0] = getattr(req_pool, "size", None)
    try:
        return orig(self, *args, **kwargs)
    finally:
        _pending_req_slots[0] = None


def model_geometry(model_config) -> ModelGeometry:
    """The model's global attention geometry from SGLang's ModelConfig."""
    hf = getattr(model_config, "hf_config", None)
    return ModelGeometry(num_layers=model_config.num_hidden_layers,
                         num_q_heads=model_config.num_attention_heads,
                         num_kv_heads=model_config.get_total_num_kv_heads(),
                         head_dim=model_config.head_dim,
                         model_type=str(getattr(hf, "model_type", "") or ""))


def check_installed() -> None:
    """Raise unless every serving hook is applied in this process."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    missing = [t for t in SERVING_TARGETS if t not in HookRegistry._patched]
    if missing:
        raise OscarError(f"the oscar-kv int2 hooks on {', '.join(missing)} are not applied in "
                         "this process (see the log for the failure); check that sglang==0.5.17 "
                         "is installed and SGLANG_PLUGINS does not exclude oscar_kv_int2")


def build_mha_kv_pool_around(orig, self, *, max_total_num_tokens: int, mha_pool_class,
                             quant_method=None):
    """H4: the mixed INT2/BF16 pool for int2; the stock pool otherwise."""
    if getattr(self, "kv_cache_dtype_str", None) != sargs.KV_DTYPE:
        return orig(self, max_total_num_tokens=max_total_num_tokens,
                    mha_pool_class=mha_pool_class, quant_method=quant_method)
    from oscar_kv.sglang_plugin.pool import PoolSetup, int2_pool_class

    check_installed()
    slots = _pending_req_slots[0]
    if not slots:
        raise OscarError("the int2 pool needs the request-slot count, but SGLang built the KV "
                         "pool outside _build_token_to_kv_pool; this SGLang version is not "
                         "supported")
    cfg = read_plugin_config(group_size=getattr(self.server_args, sargs.GROUP_SIZE_ATTR, None))
    budgeted = self.server_args.max_running_requests or sargs.DEFAULT_MAX_RUNNING_REQUESTS
    if slots > budgeted:
        raise OscarError(f"SGLang made {slots} request slots but the BF16 windows were budgeted "
                         f"for {budgeted}; set --max-running-requests explicitly")
    from sglang.srt.runtime_context import get_parallel

    from oscar_kv.sglang_plugin.numerics import rank_heads

    geom = model_geometry(self.model_config)
    par = get_parallel()
    _, kv_heads = rank_heads(geom, par.attn_tp_rank, par.attn_tp_size)
    setup = PoolSetup(cfg, geom, slots, kv_heads=tuple(kv_heads))
    return orig(self, max_total_num_tokens=max_total_num_tokens,
                mha_pool_class=functools.partial(int2_pool_class(), oscar_setup=setup),
                quant_method=None)


def build_allocator_around(orig, self, **kwargs):
    pool = kwargs.get("token_to_kv_pool")
    if not getattr(pool, "oscar_kv_int2", False):
        return orig(self, **kwargs)
    from oscar_kv.sglang_plugin.pool import int2_allocator_class

    if kwargs.get("token_to_kv_pool_allocator") is not None:
        raise OscarError("the int2 pool cannot share another worker's allocator (draft "
                         "models / speculative decoding are not supported)")
    return int2_allocator_class()(kwargs["sizes"].max_total_num_tokens,
                                  dtype=self.kv_cache_dtype, device=self.device, kvcache=pool)


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
        raise OscarError(f"the BF16 windows need {arena / 2**30:.2f} GiB but only "
                         f"{available_bytes / 2**30:.2f} GiB is left for the KV cache; raise "
                         "--mem-fraction-static or lower --max-running-requests")
    return orig(self, available_bytes - arena, page_size)


def load_model_after(result, self):
    """A: fold R_V into qkv_proj / o_proj after the weights (or dummy weights) are loaded."""
    sa = self.server_args
    if getattr(sa, "kv_cache_dtype", None) != sargs.KV_DTYPE or self.is_draft_worker:
        return result
    cfg = read_plugin_config(group_size=getattr(sa, sargs.GROUP_SIZE_ATTR, None))
    if not cfg.absorb_v_rotation:
        return result
    from oscar_kv.sglang_plugin.absorb import absorb_model
    from oscar_kv.sglang_plugin.numerics import load_numerics

    geom = model_geometry(self.model_config)
    numerics = load_numerics(cfg, geom, 0, geom.num_layers, self.device)
    n = absorb_model(self.model, numerics)
    log.info("oscar-kv int2: V rotation absorbed into qkv_proj/o_proj of %d layers", n)
    return result


# ---- calibration capture (only installed when SGLANG_OSCAR_CAPTURE_DIR is set) -----------
_capture: list = [None]


def rank_capture(runner):
    """This process's RankCapture, made on the first forward (needs the model's geometry)."""
    if _capture[0] is None:
        from sglang.srt.runtime_context import get_parallel

        from oscar_kv.sglang_plugin.capture import RankCapture
        from oscar_kv.sglang_plugin.numerics import rank_heads

        cfg = read_capture_config()
        geom = model_geometry(runner.model_config)
        par = get_parallel()
        q_heads, kv_heads = rank_heads(geom, par.attn_tp_rank, par.attn_tp_size)
        rank = par.tp_rank + par.pp_rank * par.tp_size
        _capture[0] = RankCapture(cfg.out_dir, rank, geom, q_heads, kv_heads, cfg.max_tokens,
                                  cfg.softmax_stats)
    return _capture[0]


def runner_forward_around(orig, self, forward_batch, *args, **kwargs):
    mode = forward_batch.forward_mode
    cap = rank_capture(self) if mode == mode.EXTEND else None
    if cap is not None:
        cap.begin_forward()
    try:
        return orig(self, forward_batch, *args, **kwargs)
    finally:
        if cap is not None:
            cap.end_forward()


def radix_forward_before(self, q, k, v, forward_batch, *args, **kwargs):
    cap = _capture[0]
    if cap is not None and cap.active and k is not None:
        cap.record(self.layer_id, q, k, v, forward_batch.extend_seq_lens_cpu,
                   forward_batch.extend_prefix_lens_cpu)


def handle_rpc_around(orig, self, recv_req):
    """`Engine.collective_rpc("oscar_capture_finish")`: every rank writes its pass-1 file."""
    if getattr(recv_req, "method", None) != CAPTURE_FINISH_RPC:
        return orig(self, recv_req)
    from sglang.srt.managers.io_struct import RpcReqOutput
    from torch.distributed import barrier

    msg = ""
    try:
        if _capture[0] is None:
            raise OscarError("no prompt was captured on this rank; send prompts first")
        _capture[0].finish()
    except Exception as e:  # reported to the caller through RpcReqOutput
        msg = f"{type(e).__name__}: {e}"
    barrier(group=self.tp_group.cpu_group)
    return RpcReqOutput(success=not msg, message=msg)


def install() -> None:
    """Register every hook once per process (SGLang applies them after all plugins load)."""
    global _installed
    if _installed:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from oscar_kv.sglang_plugin.backend import register_backend
    from oscar_kv.sglang_plugin.radix import register_radix_backend

    reg = HookRegistry.register
    reg(f"{SA}.add_cli_args", add_cli_args_after, HookType.AFTER)
    reg(f"{SA}.from_cli_args", from_cli_args_around, HookType.AROUND)
    reg(f"{SA}.__post_init__", post_init_before, HookType.BEFORE)
    reg(f"{SA}.__post_init__", post_init_after, HookType.AFTER)
    reg(KV_DTYPE_FN, configure_kv_cache_dtype_around, HookType.AROUND)
    reg(f"{KVC}._build_token_to_kv_pool", build_token_to_kv_pool_around, HookType.AROUND)
    reg(f"{KVC}._build_mha_kv_pool", build_mha_kv_pool_around, HookType.AROUND)
    reg(f"{KVC}._build_token_to_kv_pool_allocator", build_allocator_around, HookType.AROUND)
    reg(f"{POOLCFG}._compute_cell_size", compute_cell_size_around, HookType.AROUND)
    reg(f"{POOLCFG}.calculate_pool_sizes", calculate_pool_sizes_around, HookType.AROUND)
    reg(f"{ALLOC}.alloc_for_extend", glue.alloc_for_extend_around, HookType.AROUND)
    reg(f"{ALLOC}.alloc_for_decode", glue.alloc_for_decode_around, HookType.AROUND)
    reg(RELEASE, glue.release_kv_cache_around, HookType.AROUND)
    reg(f"{BATCH}.new_tokens_required_next_decode", glue.new_tokens_required_around,
        HookType.AROUND)
    reg(f"{ADDER}.add_one_req", glue.add_one_req_around, HookType.AROUND)
    reg(f"{RUNNER}.load_model", load_model_after, HookType.AFTER)
    if read_capture_config() is not None:
        reg(f"{RUNNER}.forward", runner_forward_around, HookType.AROUND)
        reg(f"{RADIX}.forward", radix_forward_before, HookType.BEFORE)
        reg(f"{SCHEDULER}.handle_rpc_request", handle_rpc_around, HookType.AROUND)
    register_backend()
    register_radix_backend()
    _installed = True
