"""The plugin against the real sglang==0.5.17 on CPU (skipped when sglang is not importable).

Run via scripts/ci_sglang_cpu.sh (lean venv, docs/sglang_integration.md §2.3). Covers: entry
point discovery, every hook applied by `load_plugins()`, `--kv-cache-dtype int2` parsing and
ServerArgs resolution, the dtype mapping, model rejections, the cell size / arena budget.
"""

from __future__ import annotations

import argparse
import os
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

try:
    import sglang
    from sglang.srt.plugins import load_plugins
    from sglang.srt.plugins.hook_registry import HookRegistry
except Exception as e:  # ImportError, or torchvision's RuntimeError without the stub
    pytest.skip(f"sglang is not importable ({type(e).__name__}: {e}); run "
                "scripts/ci_sglang_cpu.sh for these tests", allow_module_level=True)

from oscar_kv.config import QuantSpec, WindowSpec  # noqa: E402
from oscar_kv.errors import OscarError  # noqa: E402
from oscar_kv.sglang_plugin import env as E  # noqa: E402
from oscar_kv.sglang_plugin import hooks as H  # noqa: E402
from oscar_kv.sglang_plugin.pool_index import int2_bytes_per_token  # noqa: E402


def _model_dir() -> Path | None:
    """A local model dir with config.json (only the config is read): OSCAR_TINY_LM, else
    ../shared/models/oscar-tiny-code-lm beside the repo."""
    env = os.environ.get("OSCAR_TINY_LM")
    repo = Path(__file__).resolve().parents[2]
    for cand in ([Path(env)] if env else []) + [repo.parent / "shared/models/oscar-tiny-code-lm"]:
        if (cand / "config.json").exists():
            return cand
    return None


MODEL = _model_dir()


@pytest.fixture(scope="module", autouse=True)
def plugins():
    assert sglang.__version__ == "0.5.17", sglang.__version__
    load_plugins()


@pytest.fixture
def int2_env(tmp_path, monkeypatch):
    for t in ("k", "v"):
        (tmp_path / f"{t}.pt").write_bytes(b"placeholder")
    for k in E.FLAGS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv(E.ENABLE, "1")
    monkeypatch.setenv(E.K_ROTATION_PATH, str(tmp_path / "k.pt"))
    monkeypatch.setenv(E.V_ROTATION_PATH, str(tmp_path / "v.pt"))
    return monkeypatch


def test_entry_point_registered():
    eps = {e.name: e.value for e in entry_points(group="sglang.srt.plugins")}
    assert eps.get("oscar_kv_int2") == "oscar_kv.sglang_plugin:register"


def test_all_hooks_applied():
    want = {f"{H.SA}.add_cli_args", f"{H.SA}.from_cli_args", f"{H.SA}.__post_init__",
            H.KV_DTYPE_FN, f"{H.KVC}._build_token_to_kv_pool", f"{H.POOLCFG}._compute_cell_size",
            f"{H.POOLCFG}.calculate_pool_sizes", f"{H.RUNNER}.load_model", *H.SERVING_TARGETS}
    assert want <= HookRegistry._patched
    H.check_installed()
    # capture hooks only with SGLANG_OSCAR_CAPTURE_DIR
    assert f"{H.RADIX}.forward" not in HookRegistry._patched


def test_glue_reaches_the_scheduler_modules():
    """The from-imports in schedule_batch / batch processing see the wrapped functions."""
    from sglang.srt.managers import schedule_batch
    from sglang.srt.mem_cache import allocation, common

    assert schedule_batch.alloc_for_extend is allocation.alloc_for_extend
    assert schedule_batch.alloc_for_decode is allocation.alloc_for_decode
    assert schedule_batch.release_kv_cache is common.release_kv_cache
    assert allocation.alloc_for_extend.__wrapped__.__module__ == allocation.__name__


def test_radix_backend_builds_the_int2_tree():
    """`--radix-cache-backend oscar_int2` (the int2 default) through SGLang's create_tree_cache:
    our RadixCache subclass with the pool's window and the chunk size; the chunk cache when
    the radix cache is off; a clear error for another KV dtype."""
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.chunk_cache import ChunkCache
    from sglang.srt.mem_cache.radix_cache import RadixCache
    from sglang.srt.mem_cache.registry import (
        TreeCacheBuildContext,
        create_tree_cache,
        registered_radix_cache_backends,
    )

    from oscar_kv.config import WindowSpec

    assert "oscar_int2" in registered_radix_cache_backends()
    w = WindowSpec(8, 16, 8)
    alloc = SimpleNamespace(oscar_kv_int2=True, device="cpu",
                            get_kvcache=lambda: SimpleNamespace(layout=SimpleNamespace(window=w)))
    sa = SimpleNamespace(radix_cache_backend="oscar_int2", enable_session_radix_cache=False,
                         enable_streaming_session=False)

    def build(disable: bool, allocator=alloc):
        params = CacheInitParams(disable=disable, req_to_token_pool=None,
                                 token_to_kv_pool_allocator=allocator, page_size=1)
        return create_tree_cache(TreeCacheBuildContext(
            server_args=sa, params=params, is_hybrid_swa=False, is_hybrid_ssm=False,
            enable_hierarchical_cache=False, disable_radix_cache=disable,
            effective_chunked_prefill_size=512, tp_worker=None, model_config=None, tp_size=1,
            tp_rank=0, tp_group=None))

    tree = build(False)
    assert isinstance(tree, RadixCache) and tree.oscar_kv_int2
    assert tree.oscar_window == w and tree.oscar_chunk == 512
    assert isinstance(build(True), ChunkCache)
    with pytest.raises(OscarError, match="int2 only"):
        build(False, SimpleNamespace(device="cpu"))


def test_backend_registered():
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES

    from oscar_kv.sglang_plugin.backend import create_int2_backend, int2_backend_class

    assert "int2_triton" in ATTENTION_BACKENDS and "int2_triton" in ATTENTION_BACKEND_CHOICES
    assert issubclass(int2_backend_class(), AttentionBackend)
    runner = SimpleNamespace(model_config=SimpleNamespace(is_encoder_decoder=False),
                             token_to_kv_pool=object())
    with pytest.raises(OscarError, match="--kv-cache-dtype int2"):
        create_int2_backend(runner)


def test_cli_accepts_int2_only():
    from sglang.srt.server_args import ServerArgs

    p = argparse.ArgumentParser()
    ServerArgs.add_cli_args(p)
    ns = p.parse_args(["--model-path", "m", "--kv-cache-dtype", "int2",
                       "--kv-cache-quant-group-size", "32"])
    assert ns.kv_cache_dtype == "int2" and ns.kv_cache_quant_group_size == 32
    with pytest.raises(SystemExit):
        p.parse_args(["--model-path", "m", "--kv-cache-dtype", "int3"])


@pytest.mark.skipif(MODEL is None, reason="reference model config not found")
def test_server_args_resolve_with_int2(int2_env):
    from sglang.srt.server_args import prepare_server_args

    int2_env.setenv(E.RECENT_TOKENS, "128")
    sa = prepare_server_args(["--model-path", str(MODEL), "--device", "cpu",
                              "--kv-cache-dtype", "int2", "--kv-cache-quant-group-size", "64"])
    assert sa.kv_cache_dtype == "int2"
    assert sa.attention_backend == sa.decode_attention_backend == "int2_triton"
    assert sa.disable_radix_cache is False and sa.radix_cache_backend == "oscar_int2"
    assert sa.page_size == 1 and sa.kv_cache_quant_group_size == 64
    assert sa.disable_overlap_schedule is True
    assert sa.cuda_graph_config.prefill.backend == "disabled"


@pytest.mark.skipif(MODEL is None, reason="reference model config not found")
@pytest.mark.parametrize("extra,needle", [
    (["--attention-backend", "triton"], "--attention-backend triton"),
    (["--enable-hierarchical-cache"], "hierarchical"),
    (["--page-size", "16"], "page-size"),
    (["--radix-cache-backend", "flexkv"], "radix-cache-backend flexkv"),
])
def test_server_args_reject(int2_env, extra, needle):
    from sglang.srt.server_args import prepare_server_args

    with pytest.raises(OscarError, match=needle):
        prepare_server_args(["--model-path", str(MODEL), "--device", "cpu",
                             "--kv-cache-dtype", "int2", *extra])


@pytest.mark.skipif(MODEL is None, reason="reference model config not found")
def test_bad_env_fails_at_startup(int2_env):
    from sglang.srt.server_args import prepare_server_args

    int2_env.setenv(E.PREFIX_TOKENS, "30")
    with pytest.raises(OscarError, match="multiple of 8"):
        prepare_server_args(["--model-path", str(MODEL), "--device", "cpu",
                             "--kv-cache-dtype", "int2"])


def test_kv_dtype_mapping():
    from sglang.srt.mem_cache import kv_cache_dtype as K

    kw = dict(model=torch.nn.Linear(1, 1), is_draft_worker=False, is_dflash=False,
              speculative_draft_attention_backend=None)
    assert K.configure_kv_cache_dtype(server_args_kv_cache_dtype="int2",
                                      model_dtype=torch.bfloat16, **kw) \
        == ("int2", torch.bfloat16)
    assert K.configure_kv_cache_dtype(server_args_kv_cache_dtype="bf16",
                                      model_dtype=torch.float16, **kw)[1] == torch.bfloat16
    with pytest.raises(ValueError, match="Unsupported"):
        K.configure_kv_cache_dtype(server_args_kv_cache_dtype="int3",
                                   model_dtype=torch.bfloat16, **kw)


def _fake_kvc(**kw):
    hf = SimpleNamespace(architectures=["DeepseekV3ForCausalLM"], sliding_window=None)
    mc = SimpleNamespace(hf_config=hf, is_encoder_decoder=False, head_dim=128,
                         get_num_kv_heads=lambda tp: 8 // tp)
    base = dict(kv_cache_dtype_str="int2", model_config=mc, use_mla_backend=False,
                is_hybrid_swa=False, mambaish_config=None,
                server_args=SimpleNamespace(max_running_requests=16,
                                            kv_cache_quant_group_size=None))
    base.update(kw)
    return SimpleNamespace(**base)


def test_pool_build_rejects_mla():
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator

    with pytest.raises(OscarError, match="MLA"):
        KVCacheConfigurator._build_token_to_kv_pool(
            _fake_kvc(use_mla_backend=True), sizes=None, is_dsa_model=False,
            is_dsv4_model=False, req_to_token_pool=None)


def test_cell_size_and_arena_budget(int2_env, monkeypatch):
    from sglang.srt.model_executor import pool_configurator as PC

    monkeypatch.setattr("sglang.srt.runtime_context.get_parallel",
                        lambda: SimpleNamespace(attn_tp_size=1))
    cfg = object.__new__(PC.DefaultPoolConfigurator)
    kvc = _fake_kvc()
    cell = PC.DefaultPoolConfigurator._compute_cell_size(cfg, kvc, 4)
    spec = QuantSpec(group_size=128, scale_dtype="bfloat16")
    assert cell == int2_bytes_per_token(4, 8, 128, spec) == 4 * 2 * 8 * 36
    arena = H.int2_arena_bytes(WindowSpec(64, 256, 8), 16, 4, 8, 128)
    assert cfg._oscar_arena_bytes == arena
    cfg._cell_size, cfg._zero_kv_max_tokens = cell, 0
    out = PC.DefaultPoolConfigurator.calculate_pool_sizes(cfg, arena + 1000 * cell, 1)
    assert out.max_total_num_tokens == 1000
    with pytest.raises(OscarError, match="mem-fraction-static"):
        PC.DefaultPoolConfigurator.calculate_pool_sizes(cfg, arena, 1)


def test_bf16_dtype_paths_unchanged():
    from sglang.srt.model_executor import pool_configurator as PC

    cfg = object.__new__(PC.DefaultPoolConfigurator)
    cfg._cell_size, cfg._zero_kv_max_tokens = 100, 0
    assert PC.DefaultPoolConfigurator.calculate_pool_sizes(cfg, 10_000, 1) \
        .max_total_num_tokens == 100


def _write_rotations(tmp_path, layers: int, d: int):
    from oscar_kv.fit.checkpoint import build_checkpoint

    for t in ("k", "v"):
        r, _ = torch.linalg.qr(torch.randn(layers, d, d, dtype=torch.float64))
        torch.save(build_checkpoint(r.float(), torch.ones(layers, d), "qqt_r_h_pbr",
                                    clip_ratios=[0.9] * layers), tmp_path / f"{t}.pt")


def test_configurator_builds_int2_pool_and_allocator(tmp_path, monkeypatch):
    """H4 through SGLang's own KVCacheConfigurator._build_token_to_kv_pool /
    _build_token_to_kv_pool_allocator (runtime context faked): our pool sized for the
    request slots, our allocator, the requested INT2 slot count."""
    from sglang.srt.mem_cache import kv_cache_configurator as KC
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    _write_rotations(tmp_path, 2, 64)
    for k in E.FLAGS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv(E.ENABLE, "1")
    monkeypatch.setenv(E.K_ROTATION_PATH, str(tmp_path / "k.pt"))
    monkeypatch.setenv(E.V_ROTATION_PATH, str(tmp_path / "v.pt"))
    ns = SimpleNamespace
    ctx = dict(get_memory=ns(enable_page_major_kv_layout=False),
               get_schedule=ns(prefill_only_disable_kv_cache=False, page_size=1),
               get_parallel=ns(attn_tp_size=2), get_exec=ns(features=ns(enable_memory_saver=False)),
               get_disagg=ns(enable_pdmux=False, disaggregation_mode="null"),
               get_spec=ns(speculative_algorithm=None))
    for name, val in ctx.items():
        monkeypatch.setattr(KC, name, lambda v=val: v)
    monkeypatch.setattr("sglang.srt.runtime_context.get_parallel",
                        lambda: ns(attn_tp_rank=1, attn_tp_size=2))
    hf = ns(architectures=["Qwen3ForCausalLM"], model_type="qwen3", sliding_window=None)
    mc = ns(hf_config=hf, is_encoder_decoder=False, head_dim=64, v_head_dim=64,
            num_hidden_layers=2, num_attention_heads=4, get_total_num_kv_heads=lambda: 2,
            get_num_kv_heads=lambda tp: 1)
    kvc = ns(kv_cache_dtype_str="int2", kv_cache_dtype=torch.bfloat16, model_config=mc,
             server_args=ns(max_running_requests=8, kv_cache_quant_group_size=32,
                            attention_backend="int2_triton"),
             use_mla_backend=False, is_hybrid_swa=False, mambaish_config=None,
             pool_page_size=1, device="cpu", post_capture_kv_active=False,
             layer_info=ns(num_effective_layers=2, start_layer=0, end_layer=2))
    kvc._build_mha_kv_pool = lambda **kw: KC.KVCacheConfigurator._build_mha_kv_pool(kvc, **kw)
    req_pool = ReqToTokenPool(6, 64, "cpu", False)
    sizes = ns(max_total_num_tokens=500)
    pool = KC.KVCacheConfigurator._build_token_to_kv_pool(
        kvc, sizes=sizes, is_dsa_model=False, is_dsv4_model=False, req_to_token_pool=req_pool)
    assert pool.oscar_kv_int2 and pool.layout.max_requests == 6
    assert pool.setup.kv_heads == (1,)  # TP rank 1 of 2 holds KV head 1
    assert pool.layout.num_int2_slots == 507 and pool.numerics.spec.group_size == 32
    alloc = KC.KVCacheConfigurator._build_token_to_kv_pool_allocator(
        kvc, sizes=sizes, token_to_kv_pool=pool, is_dsv4_model=False,
        req_to_token_pool=req_pool, token_to_kv_pool_allocator=None)
    assert alloc.oscar_kv_int2 and alloc.available_size() == 500
    assert H._pending_req_slots[0] is None  # scoped to the pool build


def test_capture_hooks_drive_a_rank_capture(tmp_path, monkeypatch):
    """ModelRunner.forward AROUND + RadixAttention.forward BEFORE record a prefill; the
    `oscar_capture_finish` RPC writes the rank file; the merge gives stats.pt."""
    import torch.distributed as dist
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from oscar_kv.capture.stats import load_stats
    from oscar_kv.sglang_plugin.capture import merge_capture

    ns = SimpleNamespace
    monkeypatch.setenv(E.CAPTURE_DIR, str(tmp_path))
    monkeypatch.setattr("sglang.srt.runtime_context.get_parallel",
                        lambda: ns(attn_tp_rank=0, attn_tp_size=1, tp_rank=0, pp_rank=0,
                                   tp_size=1))
    monkeypatch.setattr(dist, "barrier", lambda group=None: None)
    monkeypatch.setattr(H, "_capture", [None])
    mc = ns(num_hidden_layers=2, num_attention_heads=4, get_total_num_kv_heads=lambda: 2,
            head_dim=16, hf_config=ns(model_type="qwen3"))
    runner = ns(model_config=mc)
    layers = [ns(layer_id=i) for i in range(2)]

    def forward(self, fb):  # what the model does: every layer calls its RadixAttention
        for layer in layers:
            t = sum(fb.extend_seq_lens_cpu)
            H.radix_forward_before(layer, torch.randn(t, 64), torch.randn(t, 32),
                                   torch.randn(t, 32), fb)
        return "logits"

    fb = ns(forward_mode=ForwardMode.EXTEND, extend_seq_lens_cpu=[5, 7],
            extend_prefix_lens_cpu=[0, 0])
    assert H.runner_forward_around(forward, runner, fb) == "logits"
    decode = ns(forward_mode=ForwardMode.DECODE)
    H.runner_forward_around(lambda self, fb: None, runner, decode)  # not captured
    sched = ns(tp_group=ns(cpu_group=None))
    other = H.handle_rpc_around(lambda self, req: "orig", sched, ns(method="save_x"))
    assert other == "orig"
    out = H.handle_rpc_around(None, sched, ns(method=H.CAPTURE_FINISH_RPC))
    assert out.success, out.message
    merge_capture(tmp_path)
    stats = load_stats(tmp_path)
    assert stats["num_tokens"] == 12 and stats["num_sequences"] == 2
