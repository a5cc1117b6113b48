"""server_args.py: int2 defaults and rejections on duck-typed ServerArgs (no sglang needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from oscar_kv.errors import OscarError
from oscar_kv.sglang_plugin import env as E
from oscar_kv.sglang_plugin import server_args as S


def args(**kw):
    base = dict(kv_cache_dtype="int2", attention_backend=None, prefill_attention_backend=None,
                decode_attention_backend=None, speculative_algorithm=None,
                disaggregation_mode="null", enable_hierarchical_cache=False,
                disable_radix_cache=False, page_size=None, max_running_requests=None)
    base.update(kw)
    return SimpleNamespace(**base)


def test_defaults_filled():
    sa = args()
    S.prepare_int2_args(sa)
    assert sa.attention_backend == sa.decode_attention_backend == S.BACKEND_NAME
    assert sa.prefill_attention_backend == S.BACKEND_NAME
    assert sa.disable_radix_cache is False and sa.radix_cache_backend == S.RADIX_BACKEND
    assert sa.page_size == 1
    assert sa.max_running_requests == S.DEFAULT_MAX_RUNNING_REQUESTS
    assert sa.disable_overlap_schedule is True and sa.disable_prefill_cuda_graph is True


def test_capture_needs_whole_eager_prefills_for_any_dtype():
    sa = args(kv_cache_dtype="auto", attention_backend="triton")
    S.prepare_int2_args(sa, capture=True)
    assert sa.disable_radix_cache is True and sa.disable_prefill_cuda_graph is True
    assert sa.attention_backend == "triton"


def test_radix_cache_off_keeps_the_chunk_cache():
    sa = args(disable_radix_cache=True, radix_cache_backend=None)
    S.prepare_int2_args(sa)
    assert sa.disable_radix_cache is True and sa.radix_cache_backend is None


def test_user_values_kept():
    sa = args(attention_backend=S.BACKEND_NAME, max_running_requests=32, page_size=1)
    S.prepare_int2_args(sa)
    assert sa.max_running_requests == 32


def test_other_dtypes_untouched():
    sa = args(kv_cache_dtype="auto", attention_backend="fa3", speculative_algorithm="EAGLE")
    S.prepare_int2_args(sa)
    assert sa.attention_backend == "fa3" and sa.disable_radix_cache is False
    assert S.finalize_int2_args(sa) is None


@pytest.mark.parametrize("prefill", ["fa3", "triton"])
def test_the_original_launch_line_is_accepted(prefill):
    """The seed README's `--prefill-attention-backend fa3 --decode-attention-backend triton`
    with int2 works as written and runs our backend."""
    sa = args(prefill_attention_backend=prefill, decode_attention_backend="triton")
    S.prepare_int2_args(sa)
    assert sa.attention_backend == sa.prefill_attention_backend == S.BACKEND_NAME
    assert sa.decode_attention_backend == S.BACKEND_NAME


@pytest.mark.parametrize("kw,needle", [
    (dict(speculative_algorithm="EAGLE"), "speculative"),
    (dict(disaggregation_mode="decode"), "disaggregation"),
    (dict(enable_hierarchical_cache=True), "hierarchical"),
    (dict(attention_backend="fa3"), "--attention-backend fa3"),
    (dict(decode_attention_backend="triton"), "--decode-attention-backend triton"),
    (dict(page_size=8), "--page-size 8"),
    (dict(enable_mixed_chunk=True), "--enable-mixed-chunk"),
    (dict(enable_dp_attention=True), "--enable-dp-attention"),
    (dict(pp_size=2), "--pp-size 2"),
    (dict(radix_cache_backend="lmcache"), "--radix-cache-backend lmcache"),
    (dict(enable_streaming_session=True), "--enable-streaming-session"),
    (dict(dcp_size=2), "--dcp-size 2"),
])
def test_unsupported_combos_rejected(kw, needle):
    with pytest.raises(OscarError) as ei:
        S.prepare_int2_args(args(**kw))
    assert needle in str(ei.value) and "int2" in str(ei.value)


def test_group_size_without_int2():
    sa = args(kv_cache_dtype="auto")
    setattr(sa, S.GROUP_SIZE_ATTR, 32)
    with pytest.raises(OscarError, match="only applies"):
        S.prepare_int2_args(sa)


def test_finalize_reads_env_once(tmp_path):
    for t in ("k", "v"):
        (tmp_path / f"{t}.pt").write_bytes(b"x")
    env = {E.ENABLE: "1", E.K_ROTATION_PATH: str(tmp_path / "k.pt"),
           E.V_ROTATION_PATH: str(tmp_path / "v.pt"), E.RECENT_TOKENS: "128"}
    sa = args()
    setattr(sa, S.GROUP_SIZE_ATTR, 64)
    S.prepare_int2_args(sa)
    cfg = S.finalize_int2_args(sa, env)
    assert cfg.window.recent_tokens == 128 and cfg.group_size == 64
    with pytest.raises(OscarError, match=E.ENABLE):
        S.finalize_int2_args(sa, {})


def kvc(hf=None, **kw):
    hf = hf or SimpleNamespace(architectures=["Qwen3ForCausalLM"], sliding_window=None)
    mc = SimpleNamespace(hf_config=hf, is_encoder_decoder=False)
    return SimpleNamespace(model_config=mc, use_mla_backend=False, is_hybrid_swa=False,
                           mambaish_config=None, **kw)


def test_plain_mha_model_accepted():
    S.check_int2_model(kvc())
    qwen2 = SimpleNamespace(architectures=["Qwen2"], sliding_window=4096,
                            use_sliding_window=False)
    S.check_int2_model(kvc(qwen2))


@pytest.mark.parametrize("make,needle", [
    (lambda: (kvc(), dict(is_dsa_model=True)), "MLA"),
    (lambda: (kvc(), dict(is_dsv4_model=True)), "MLA"),
    (lambda: (SimpleNamespace(**{**vars(kvc()), "use_mla_backend": True}), {}), "MLA"),
    (lambda: (SimpleNamespace(**{**vars(kvc()), "is_hybrid_swa": True}), {}), "sliding"),
    (lambda: (kvc(SimpleNamespace(architectures=["Mistral"], sliding_window=4096)), {}),
     "sliding"),
    (lambda: (kvc(SimpleNamespace(architectures=["Gemma3"], sliding_window=None,
                                  layer_types=["sliding_attention", "full_attention"])), {}),
     "sliding"),
    (lambda: (SimpleNamespace(**{**vars(kvc()), "mambaish_config": object()}), {}),
     "hybrid"),
])
def test_unsupported_models_rejected(make, needle):
    k, kw = make()
    with pytest.raises(OscarError, match=needle):
        S.check_int2_model(k, **kw)
