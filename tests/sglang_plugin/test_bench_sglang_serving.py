"""benchmarks/bench_sglang_serving.py: the parts that run without a GPU (model config, Hadamard
rotations accepted by the plugin's loader, prompts, capacity / bytes / throughput arithmetic,
the summary, engine keywords that are real ServerArgs fields, the warm-up before the timed
decode runs)."""

from __future__ import annotations

import dataclasses

import pytest


@pytest.fixture(scope="module")
def bs(load_script):
    return load_script("benchmarks/bench_sglang_serving.py")


def test_args(bs):
    a = bs.parse_args(["--out", "x"])
    assert a.kinds == ["bf16", "int2"] and a.context == 32768 and a.s1 < a.s2
    for bad in (["--kinds", "fp8"], ["--s1", "9", "--s2", "9"], ["--context", "40960"]):
        with pytest.raises(SystemExit):
            bs.parse_args(bad)


def test_model_dir_is_qwen3_8b_geometry(bs, tmp_path):
    d = bs.write_model_dir(tmp_path / "m")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.from_pretrained(d)
    assert cfg.model_type == "qwen3" and cfg.num_hidden_layers == 36
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.intermediate_size, cfg.vocab_size) == (4096, 32, 8, 128, 12288, 151936)
    assert not getattr(cfg, "use_sliding_window", False)


def test_rotations_load_through_the_plugin(bs, tmp_path):
    from oscar_kv.config import ModelGeometry
    from oscar_kv.sglang_plugin.env import read_plugin_config

    k, v = bs.write_rotations(tmp_path, 4, 128)
    cfg = read_plugin_config(bs.int2_env(k, v, 1))
    rs = cfg.load_rotations(expect=ModelGeometry(4, 32, 8, 128))
    assert list(rs.clip_k) == [0.96] * 4 and list(rs.clip_v) == [0.92] * 4
    assert cfg.window.sink_tokens == 64 and cfg.absorb_v_rotation


def test_prompts_capacity_bytes_throughput(bs):
    ps = bs.random_prompts(5, 40, 1000, seed=1)
    assert len({p[0] for p in ps}) == 5 and all(len(p) == 40 for p in ps)
    assert bs.random_prompts(5, 40, 1000, seed=1) == ps
    assert bs.max_concurrent(1_000_000, 32_841) == 30
    assert bs.max_concurrent(8_000_000, 32_841, 64) == 64
    b = bs.kv_bytes(36, 8, 128)
    assert b["bf16"] == 36 * 2 * 8 * 128 * 2 == 147456
    assert b["int2_body"] == 36 * 2 * 8 * (32 + 4) == 20736  # 7.11x fewer bytes
    assert b["int2_windows_per_request"] == (64 + 263) * 147456
    pool = bs.int2_pool_bytes(1_000_000, 64, 36, 8, 128)
    assert pool == (1_000_000 + 7 + 1) * 20736 + (64 * (64 + 263) + 1) * 147456
    assert bs.decode_tok_s(32, 8, 72, 2.0, 4.0) == 32 * 64 / 2.0
    with pytest.raises(ValueError, match="raise --s2"):
        bs.decode_tok_s(32, 8, 72, 2.0, 2.0)


def test_summary_ratios_and_goals(bs):
    eng = {"bf16": {"max_total_num_tokens": 100, "max_concurrent": 2, "decode_tok_s": 10.0,
                    "prefill_tok_s": 50.0},
           "int2": {"max_total_num_tokens": 700, "max_concurrent": 14, "decode_tok_s": 25.0,
                    "prefill_tok_s": 40.0}}
    s = bs.summarize(eng)
    assert s["ratios"] == {"token_capacity": 7.0, "max_concurrent_requests": 7.0,
                           "output_tok_s": 2.5, "prefill_tok_s": 0.8}
    assert s["goals"]["token_capacity"]["met"] is True
    assert s["goals"]["output_tok_s"]["met"] is False
    assert bs.summarize({"bf16": eng["bf16"]})["goals"]["output_tok_s"]["met"] is None


def test_engine_kwargs_are_server_args_fields(bs, tmp_path):
    try:
        from sglang.srt.server_args import ServerArgs
    except Exception as e:  # ImportError, or torchvision's RuntimeError without the stub
        pytest.skip(f"sglang is not importable ({type(e).__name__})")
    fields = {f.name for f in dataclasses.fields(ServerArgs)}
    args = bs.parse_args([])
    for kind in ("bf16", "int2"):
        kw = bs.engine_kwargs(kind, tmp_path, args)
        assert set(kw) <= fields, set(kw) - fields
        assert kw["context_length"] >= args.context + args.s2 + 1


def test_decode_runs_warm_up_before_timing(bs):
    """A one-time cost of the first hit + decode run (cold start) must not land in T1: the
    session-4 batch-48 run read 28.6 ms per step, faster than its KV bytes allow."""
    calls = []

    def run(new):  # 5 s hit prefill + 40 ms per decode step, +1.2 s the first time only
        calls.append(new)
        return 5.0 + 0.04 * (new - 1) + (1.2 if len(calls) == 1 else 0.0), [{"n": new}]

    d = bs.decode_runs(run, 8, 72)
    assert calls == [9, 9, 73]
    assert d["t_s1_warmup"] > d["t_s1"] and d["metas"] == [{"n": 9}, {"n": 73}]
    tok_s = bs.decode_tok_s(48, 8, 72, d["t_s1"], d["t_s2"])
    assert tok_s == pytest.approx(48 / 0.04)
