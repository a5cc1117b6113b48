"""End-to-end calibration on the reference model: schema, finiteness, raw-dump equivalence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oscar_kv.capture.calibrate import calibrate, load_hf_model
from oscar_kv.capture.data import load_calibration_data
from oscar_kv.capture.rawdump import read_layer, stats_from_raw_dump
from oscar_kv.capture.stats import load_holdout, load_stats
from oscar_kv.errors import OscarError

pytestmark = pytest.mark.model
LAYER_KEYS = {"qq", "kk", "vv", "wvv", "w_sum", "svv", "s_sum", "k_sum", "n", "n_q"}


@pytest.fixture(scope="module")
def tiny_data(tiny_lm_dir):
    return load_calibration_data(tiny_lm_dir / "heldout_tokens.npy", seq_len=256,
                                 max_tokens=512, holdout_seqs=1)


def test_calibrate_reference_model_schema(tiny_lm_dir, tiny_data, tmp_path) -> None:
    model = load_hf_model(tiny_lm_dir, dtype="float32")
    summary = calibrate(model, tiny_data.batches(2), tmp_path / "stats", tiny_data.holdout,
                        progress=False, token_source=tiny_data.source)
    assert summary["num_tokens"] == 512 and summary["num_holdout"] == 1
    stats = load_stats(tmp_path / "stats")
    assert stats["format"] == "oscar-kv-stats" and stats["version"] == 1
    assert stats["model"] == {"num_layers": 6, "num_q_heads": 8, "num_kv_heads": 2,
                              "head_dim": 128, "model_type": "qwen3",
                              "name_or_path": str(tiny_lm_dir)}
    assert (stats["num_tokens"], stats["num_sequences"], stats["seq_len"]) == (512, 2, 256)
    assert stats["token_source"].startswith("tokens:")
    assert sorted(stats["layers"]) == list(range(6))
    for layer in stats["layers"].values():
        assert set(layer) == LAYER_KEYS and layer["n"] == 512 and layer["n_q"] == 2048
        for name in ("qq", "kk", "vv", "wvv", "svv"):
            x = layer[name]
            assert x.shape == (2, 128, 128) and x.dtype == torch.float64
            assert torch.isfinite(x).all() and torch.allclose(x, x.transpose(1, 2))
            assert torch.linalg.eigvalsh(x).min() > -1e-8 * x.diagonal(dim1=1, dim2=2).sum()
        assert (layer["w_sum"] > 0).all() and (layer["s_sum"] > 0).all()
        assert layer["k_sum"].shape == (2, 128) and layer["k_sum"].dtype == torch.float64
        # s_t sums to the number of query rows' attention energy: between T/T and T per sequence
        assert (layer["s_sum"] <= 512 + 1e-6).all()
    held = load_holdout(tmp_path / "stats")
    assert held["q"][5].shape == (1, 256, 8, 128) and held["v"][0].dtype == torch.bfloat16
    assert model.config._attn_implementation == "sdpa"


def test_raw_dump_stats_equal_live_stats(tiny_lm_dir, tiny_data, tmp_path) -> None:
    # In bf16 the dumped tensors are exactly what the live pass accumulated.
    model = load_hf_model(tiny_lm_dir, dtype="bfloat16")
    batches = [torch.stack([s[:64] for s in tiny_data.sequences]), tiny_data.holdout[:, :96]]
    calibrate(model, batches, tmp_path / "stats", None, progress=False,
              raw_dump_dir=tmp_path / "dump")
    q, _, _, lens = read_layer(tmp_path / "dump", 2)
    assert q.shape == (224, 8, 128) and lens.tolist() == [64, 64, 96]
    live = load_stats(tmp_path / "stats")
    acc, _ = stats_from_raw_dump(tmp_path / "dump")
    dumped = acc.finalize()
    for layer in range(6):
        for name in ("qq", "kk", "vv", "wvv", "w_sum", "svv", "s_sum"):
            a, b = live["layers"][layer][name], dumped["layers"][layer][name]
            assert float((a - b).abs().max() / a.abs().max()) < 1e-10, (layer, name)
    assert not (tmp_path / "stats" / "holdout.pt").exists()


def test_calibrate_rejects_empty_and_nonfinite(tiny_lm_dir, tmp_path) -> None:
    model = load_hf_model(tiny_lm_dir, dtype="float32")
    with pytest.raises(OscarError, match="no calibration tokens"):
        calibrate(model, [], tmp_path / "s", progress=False)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] = float("nan")
    ids = torch.as_tensor(np.arange(1, 33))
    with pytest.raises(OscarError, match="layer 1"):
        calibrate(model, [ids], tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()
