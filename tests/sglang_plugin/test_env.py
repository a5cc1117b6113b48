"""env.py: the SGLang flags -> PluginConfig boundary (framework-free, no sglang needed)."""

from __future__ import annotations

import sys

import pytest
import torch

from oscar_kv.config import ModelGeometry, WindowSpec
from oscar_kv.errors import OscarError
from oscar_kv.fit.checkpoint import build_checkpoint
from oscar_kv.sglang_plugin import env as E

GEOM = ModelGeometry(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=16)


def _write_ckpt(path, clip):
    q, _ = torch.linalg.qr(torch.randn(GEOM.num_layers, 16, 16, dtype=torch.float64))
    ck = build_checkpoint(q.float(), torch.ones(GEOM.num_layers, 16), "qqt_r_h_pbr",
                          clip_ratios=clip)
    torch.save(ck, path)
    return str(path)


@pytest.fixture
def base_env(tmp_path):
    return {E.ENABLE: "1",
            E.K_ROTATION_PATH: _write_ckpt(tmp_path / "k_rotation_qqt_r_h_pbr.pt", [0.9, 0.95]),
            E.V_ROTATION_PATH: _write_ckpt(tmp_path / "v_rotation_sst_r_h_pbr.pt", [0.8, 0.85])}


def test_defaults_are_defined_once(base_env):
    cfg = E.read_plugin_config(base_env)
    assert cfg.window == WindowSpec(WindowSpec.sink_tokens, WindowSpec.recent_tokens, 8)
    assert cfg.window.flush_block == E.FLUSH_BLOCK == 8
    assert cfg.scale_dtype == "bfloat16" and cfg.quantizer == "minmax"
    assert cfg.hp_dtype == "bfloat16" and cfg.hp_max_splits == 8
    assert cfg.k_clip_ratio is None and cfg.v_clip_ratio is None
    assert cfg.absorb_v_rotation is False and cfg.group_size is None
    assert cfg.quant_spec(128).group_size == 128  # one group per head


def test_released_eval_flags(base_env):
    env = dict(base_env, **{E.PREFIX_TOKENS: "64", E.RECENT_TOKENS: "256",
                            E.SCALE_DTYPE: "float32", E.HP_DTYPE: "bfloat16",
                            E.HP_MAX_SPLITS: "8", E.K_CLIP_RATIO: "0.96",
                            E.V_CLIP_RATIO: "0.92", E.ABSORB_V_ROTATION: "1",
                            E.LLOYD_MAX: "0"})
    cfg = E.read_plugin_config(env, group_size=128)
    assert cfg.window == WindowSpec(64, 256, 8)
    assert cfg.scale_dtype == "float32" and cfg.group_size == 128
    assert (cfg.k_clip_ratio, cfg.v_clip_ratio) == (0.96, 0.92)
    assert cfg.absorb_v_rotation is True
    assert cfg.source[E.K_CLIP_RATIO] == "0.96"
    spec = cfg.quant_spec(128)
    assert spec.scale_dtype == "float32" and spec.groups(128) == 1


def test_lloyd_max_is_the_reference_grid(base_env):
    cfg = E.read_plugin_config(dict(base_env, **{E.LLOYD_MAX: "true"}))
    assert cfg.quantizer == "lloyd_max_uniform116"


def test_zero_windows_allowed(base_env):
    cfg = E.read_plugin_config(dict(base_env, **{E.PREFIX_TOKENS: "0", E.RECENT_TOKENS: "0"}))
    assert (cfg.window.sink_tokens, cfg.window.recent_tokens) == (0, 0)


def test_reads_os_environ_by_default(base_env, monkeypatch):
    for k in E.FLAGS:
        monkeypatch.delenv(k, raising=False)
    for k, v in base_env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv(E.RECENT_TOKENS, "128")
    assert E.read_plugin_config().window.recent_tokens == 128


def test_clip_defaults_to_checkpoint_fitted(base_env):
    rs = E.read_plugin_config(base_env).load_rotations(expect=GEOM)
    assert rs.clip_k == pytest.approx([0.9, 0.95]) and rs.clip_v == pytest.approx([0.8, 0.85])


def test_clip_env_overrides_every_layer(base_env):
    env = dict(base_env, **{E.K_CLIP_RATIO: "0.96", E.V_CLIP_RATIO: "0"})
    rs = E.read_plugin_config(env).load_rotations(expect=GEOM)
    assert rs.clip_k == [0.96, 0.96] and rs.clip_v == [0.0, 0.0]  # 0 = no clip


def test_rotations_checked_against_model(base_env):
    other = ModelGeometry(num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=16)
    with pytest.raises(OscarError, match="layers"):
        E.read_plugin_config(base_env).load_rotations(expect=other)


BAD = [
    ({E.ENABLE: "0"}, E.ENABLE),
    ({E.ENABLE: "maybe"}, "not a boolean"),
    ({E.PREFIX_TOKENS: "60"}, "multiple of 8"),
    ({E.RECENT_TOKENS: "-8"}, "out of range"),
    ({E.RECENT_TOKENS: "lots"}, "not an integer"),
    ({E.HP_DTYPE: "float16"}, "only support bfloat16"),
    ({E.SCALE_DTYPE: "int8"}, E.SCALE_DTYPE),
    ({E.HP_MAX_SPLITS: "0"}, E.HP_MAX_SPLITS),
    ({E.K_CLIP_RATIO: "1.5"}, "outside"),
    ({E.V_CLIP_RATIO: "abc"}, "not a number"),
    ({E.K_ROTATION_PATH: ""}, "is not set"),
    ({E.V_ROTATION_PATH: "/nonexistent/v.pt"}, "does not exist"),
    ({E.ABSORB_V_ROTATION: "2"}, "not a boolean"),
]


@pytest.mark.parametrize("override,needle", BAD)
def test_bad_values_fail_with_one_sentence(base_env, override, needle):
    env = dict(base_env, **override)
    with pytest.raises(OscarError) as ei:
        E.read_plugin_config(env)
    msg = str(ei.value)
    assert needle in msg and "\n" not in msg


def test_missing_enable_flag(base_env):
    env = {k: v for k, v in base_env.items() if k != E.ENABLE}
    with pytest.raises(OscarError, match=E.ENABLE):
        E.read_plugin_config(env)


@pytest.mark.parametrize("g", [0, -4])
def test_bad_group_size(base_env, g):
    with pytest.raises(OscarError, match="group-size"):
        E.read_plugin_config(base_env, group_size=g)


def test_group_size_must_divide_head_dim(base_env):
    cfg = E.read_plugin_config(base_env, group_size=48)
    with pytest.raises(OscarError, match="does not divide"):
        cfg.quant_spec(128)
    assert E.read_plugin_config(base_env, group_size=32).quant_spec(128).groups(128) == 4


def test_config_is_frozen(base_env):
    cfg = E.read_plugin_config(base_env)
    with pytest.raises(AttributeError):
        cfg.hp_max_splits = 4


def test_env_module_is_framework_free():
    import oscar_kv.sglang_plugin.env  # noqa: F401
    import oscar_kv.sglang_plugin.pool_index  # noqa: F401

    src = open(E.__file__).read() + open(sys.modules["oscar_kv.sglang_plugin.pool_index"]
                                         .__file__).read()
    assert "import sglang" not in src and "from sglang" not in src


def test_capture_config(tmp_path):
    assert E.read_capture_config({}) is None
    cfg = E.read_capture_config({E.CAPTURE_DIR: str(tmp_path / "cap"), E.CAPTURE_TOKENS: "30000",
                                 E.CAPTURE_SOFTMAX_STATS: "0"})
    assert cfg == E.CaptureConfig(str(tmp_path / "cap"), 30000, False)
    (tmp_path / "f").write_text("x")
    with pytest.raises(OscarError, match="is a file"):
        E.read_capture_config({E.CAPTURE_DIR: str(tmp_path / "f")})
    with pytest.raises(OscarError, match=E.CAPTURE_TOKENS):
        E.read_capture_config({E.CAPTURE_DIR: str(tmp_path), E.CAPTURE_TOKENS: "-1"})
