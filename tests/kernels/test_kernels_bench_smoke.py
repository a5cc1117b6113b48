"""The benchmark scripts run end to end with --smoke (tiny shapes, interpreter on CPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["bench_decode", "bench_write"])
def test_benchmark_smoke(triton_device, tmp_path, name, capsys):
    results = _load(name).main(["--smoke", "--out", str(tmp_path)])
    files = list(tmp_path.glob(f"{name}-smoke-*.json"))
    assert len(files) == 1 and results
    record = json.loads(files[0].read_text())
    assert {"date", "torch", "triton", "device"} <= set(record["env"])
    assert len(record["results"]) == len(results)
    assert "GB/s" in capsys.readouterr().out
