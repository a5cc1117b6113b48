"""The "triton" decode backend (kernels.write_int2 body writes, plan_decode + decode_attention
per step) against the "torch" backend, end to end on the reference model. On CPU the kernels
run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), at ~1 s per layer and step,
so the fast test uses the model's first 2 layers and the full model is marked slow."""

from __future__ import annotations

import pytest
import torch
from hf_helpers import load_lm, random_rotation_set

from oscar_kv.config import WindowSpec
from oscar_kv.errors import OscarError
from oscar_kv.hf import OscarCache, prepare_model
from oscar_kv.hf.cache import resolve_backend

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")
W = WindowSpec(16, 32, 8)


@pytest.fixture(scope="module")
def lm_fp32_cut(tiny_lm_dir):
    return load_lm(tiny_lm_dir, torch.float32, layers=2)


@torch.no_grad()
def _greedy(model, handle, ids, backend, new_tokens):
    cache = handle.new_cache(decode_backend=backend)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, dim=1), cache


def _compare(model, ids, method, new_tokens, counts, tol):
    layers = model.config.num_hidden_layers
    h = prepare_model(model, method, rotations=random_rotation_set(layers, 128), window=W)
    try:
        seq_t, logits_t, cache_t = _greedy(model, h, ids, "torch", new_tokens)
        seq_k, logits_k, cache_k = _greedy(model, h, ids, "triton", new_tokens)
    finally:
        h.restore()
    first = cache_k.layers[0]
    assert first.store.backend == "triton" and cache_t.layers[0].store.backend == "torch"
    assert first.store.window_counts() == counts
    assert first.step.plan is not None
    assert all(layer.step is first.step for layer in cache_k.layers)  # one plan per step
    assert torch.equal(seq_k, seq_t)
    # fp32 model, fp32 math on both backends (split-K softmax in base 2 vs torch's softmax):
    # the differences grow with depth and steps as they feed back through the cache
    err = (logits_k - logits_t).abs().max() / logits_t.abs().max()
    assert err < tol, err


def test_triton_generation_matches_torch(lm_fp32_cut, heldout):
    """44-token prompt + 20 greedy tokens: the body is written (by the Triton kernel) at
    length 56 and read by the last 8 decode steps."""
    _compare(lm_fp32_cut, heldout[500:544][None], "oscar", 20, (16, 8, 39), 1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["oscar", "naive", "bf16"])
def test_triton_generation_matches_torch_full_model(lm_fp32, heldout, method):
    counts = (0, 0, 59) if method == "bf16" else (16, 8, 35)
    _compare(lm_fp32, heldout[500:520][None], method, 40, counts, 1e-3)  # oscar: 2e-4


def test_backend_names():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "triton"
    assert resolve_backend("triton", torch.device("cpu")) == "triton"
    with pytest.raises(OscarError, match="auto, torch, triton"):
        OscarCache([], decode_backend="cuda-magic")
