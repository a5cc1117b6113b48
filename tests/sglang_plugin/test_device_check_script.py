"""scripts/sglang_device_check.py: the parts that run without a GPU (entry point shim, prompt
plan, HF teacher-forced reference on CPU, agreement metrics and the verdict)."""

from __future__ import annotations

import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from oscar_kv.fit.checkpoint import build_checkpoint


@pytest.fixture(scope="module")
def dc(load_script):
    return load_script("scripts/sglang_device_check.py")


def test_entry_point_shim(dc, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "/x")
    how = dc.ensure_plugin_entry_point(tmp_path)
    eps = {e.name: e.value for e in entry_points(group="sglang.srt.plugins")}
    assert eps["oscar_kv_int2"] == "oscar_kv.sglang_plugin:register"
    if how != "installed":
        assert os.environ["PYTHONPATH"].split(os.pathsep) == [str(tmp_path), "/x"]


def test_prompt_plan_exercises_chunks_body_and_padding(dc):
    args = dc.parse_args(["--model", "m", "--rotations", "r"])
    prompts = dc.build_prompts(list(range(1, 30_000)), args)
    p, r = dc.WINDOW
    a, b = prompts["A"], prompts["B"]
    assert len(a["long_chunked"][0]) > 2 * args.chunk and len(a["long_one_chunk"][0]) > p + r
    assert a["shared_a"][0][:p + r] == a["shared_b"][0][:p + r]
    assert sum(len(x[0]) for x in b.values()) <= args.chunk  # one prefill batch, no chunking
    assert min(len(x[0]) + x[1] for x in b.values()) > p + r  # decode crosses the windows
    assert len({x[1] for x in b.values()}) == 6  # the batch shrinks one request at a time
    assert len(a["shared_a"][0]) <= args.chunk  # one chunk: HF's [0, hit) chunk matches it
    # int2: shared_a (460 + 63 committed) cached up to body_end(523) = 264, shared_b (450
    # tokens, one chunk) may reuse up to body_end(450) = 192 (sink + INT2 body)
    assert dc.expected_int2_hit(prompts, args) == 192


def test_chunk_bounds(dc):
    assert dc.chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert dc.chunk_bounds(10, 4, cached=3) == [(0, 3), (3, 7), (7, 10)]
    assert dc.chunk_bounds(4, 8, cached=3) == [(0, 3), (3, 4)]


def test_agreement_and_verdict(dc):
    sgl = {"x": {"tokens": [1, 2, 3, 4], "logprobs": [-0.1, -0.2, -0.3, -0.4]}}
    hf = {"x": {"top1": [1, 2, 9, 4], "lp": [-0.1, -0.25, -0.3, -0.4]}}
    m = dc.agreement(sgl, hf)
    assert m["top1"] == 0.75 and m["mean_abs_dlogprob"] == pytest.approx(0.0125)
    args = dc.parse_args(["--model", "m", "--rotations", "r"])
    eng = {"kv_cache_dtype": "int2", "attention_backend": "int2_triton",
           "A": {"shared_b": {"cached_tokens": 192}}}
    good = {"top1": 0.97, "mean_abs_dlogprob": 0.03}
    summary = {"engines": {"int2": eng, "bf16": {"A": {"shared_b": {"cached_tokens": 400}}}},
               "bf16_vs_hf_bf16": {"top1": 0.99, "mean_abs_dlogprob": 0.01},
               "int2_vs_hf_oscar": {**good, "per_prompt": {"shared_b": good}},
               "expected_int2_hit": 192}
    assert dc.verdict(summary, args) == []
    eng["A"]["shared_b"]["cached_tokens"] = 0
    assert [f for f in dc.verdict(summary, args) if "radix hit" in f]
    eng["A"]["shared_b"]["cached_tokens"] = 192
    bad = {"top1": 0.9, "mean_abs_dlogprob": 0.2}
    summary["int2_vs_hf_oscar"] = {**bad, "per_prompt": {"shared_b": bad}}
    assert len(dc.verdict(summary, args)) == 3


@pytest.mark.model
def test_hf_reference_teacher_forcing_on_cpu(dc, tiny_lm_dir, tmp_path):
    """bf16 method teacher-forced on its own greedy tokens agrees with itself; the oscar method
    runs through chunked prefill with a rotation directory."""
    transformers = pytest.importorskip("transformers")
    if tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (5, 17):
        pytest.skip(f"the HF oscar path needs transformers >= 5.17, this venv has "
                    f"{transformers.__version__} (SGLang's pin); the device script runs it in a "
                    "subprocess without the overlay")
    from transformers import AutoModelForCausalLM

    d, layers = 128, 6
    for t in ("k", "v"):
        torch.save(build_checkpoint(torch.eye(d).expand(layers, d, d).contiguous(),
                                    torch.ones(layers, d), "identity"),
                   tmp_path / f"{t}_rotation_identity.pt")
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.bfloat16).eval()
    prompt = dc.load_tokens(Path(tiny_lm_dir))[1000:1030]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=5, do_sample=False)[0, 30:].tolist()
    run = {"prompt": prompt, "tokens": greedy, "cached": 12}  # a hit: chunks [0,12), [12,28)..
    out = dc.hf_reference({"model": str(tiny_lm_dir), "rotations": str(tmp_path), "chunk": 16,
                           "device": "cpu", "runs": {"bf16": {"p": run}, "oscar": {"p": run}}})
    assert out["bf16"]["p"]["top1"] == greedy
    assert len(out["oscar"]["p"]["lp"]) == 5 and all(x <= 0 for x in out["oscar"]["p"]["lp"])
