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
