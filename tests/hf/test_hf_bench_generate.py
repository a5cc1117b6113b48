"""benchmarks/bench_generate.py runs end to end with --smoke (tiny random model, CPU)."""

from __future__ import annotations

import json


def test_bench_generate_smoke(tmp_path, capsys, load_script):
    mod = load_script("benchmarks/bench_generate.py")
    results = mod.main(["--smoke", "--out", str(tmp_path)])
    files = list(tmp_path.glob("bench_generate-smoke-*.json"))
    assert len(files) == 1 and len(results) == 2
    record = json.loads(files[0].read_text())
    assert {"date", "torch", "triton", "transformers", "device"} <= set(record["env"])
    for r in record["results"]:
        assert r["bf16"]["tokens_per_s"] > 0 and r["oscar"]["tokens_per_s"] > 0
        assert r["oscar"]["cached_tokens"] == r["context"] + 1 + 3  # warmup 1, 3 timed steps
        assert r["kv_bytes_per_token"]["int2_body"] < r["kv_bytes_per_token"]["bf16"]
    # at 70 tokens (P + R = 24) the OSCAR store holds less than the fp32 DynamicCache
    assert record["results"][1]["memory_ratio"] > 1.5
    assert "tok/s" in capsys.readouterr().out
