"""The benchmark scripts run end to end with --smoke (tiny shapes, interpreter on CPU)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")


@pytest.mark.parametrize("name", ["bench_decode", "bench_write"])
def test_benchmark_smoke(triton_device, tmp_path, name, capsys, load_script):
    results = load_script(f"benchmarks/{name}.py").main(["--smoke", "--out", str(tmp_path)])
    files = list(tmp_path.glob(f"{name}-smoke-*.json"))
    assert len(files) == 1 and results
    record = json.loads(files[0].read_text())
    assert {"date", "torch", "triton", "device"} <= set(record["env"])
    assert len(record["results"]) == len(results)
    assert "GB/s" in capsys.readouterr().out


def test_decode_benchmark_times_other_codes_in_the_same_run(triton_device, tmp_path,
                                                            load_script):
    """--also-codes adds other code variants' times, their ratios to the default (sub) codes of
    the same run and their errors against the same fp32 reference (equal within bf16 noise)."""
    results = load_script("benchmarks/bench_decode.py").main(
        ["--smoke", "--also-codes", "plain", "centered", "--out", str(tmp_path)])
    for r in results:
        for c in (r["int2_plain_codes"], r["int2_centered_codes"]):
            assert c["ms"] > 0 and c["x_default"] == pytest.approx(r["int2"]["ms"] / c["ms"])
            assert c["rel_err"] < 1e-2 and abs(c["rel_err"] - r["int2_rel_err"]) < 5e-3


def test_write_benchmark_times_other_rotation_precisions(triton_device, tmp_path, load_script):
    """--also-precision times the fused write with another rotation dot mode in the same run
    and reports how many bytes then differ from the fp32 reference."""
    results = load_script("benchmarks/bench_write.py").main(
        ["--smoke", "--also-precision", "tf32x3", "--out", str(tmp_path)])
    for r in results:
        row = r["int2_triton_tf32x3"]
        assert row["ms"] > 0 and 0.0 <= row["byte_mismatch_frac"] <= 1.0
        assert row["x_ieee"] == pytest.approx(r["int2_triton"]["ms"] / row["ms"])
