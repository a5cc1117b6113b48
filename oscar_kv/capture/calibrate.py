"""Two-pass calibration of an HF causal LM into the statistics directory.

Pass 1 runs the model over every calibration sequence and accumulates qq/kk/vv and the causal
softmax weighting (svv/s_sum); the holdout sequences are captured raw. Pass 2 runs the same
sequences again to accumulate the ``sst`` surrogate (wvv/w_sum), which needs the *final*
per-group query covariance of pass 1. Everything is accumulated in fp64 on the model's device.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from oscar_kv.capture.hooks import capture_qkv, check_supported
from oscar_kv.capture.rawdump import RawDumpWriter
from oscar_kv.capture.stats import HOLDOUT_FILE, STATS_FILE, HoldoutCollector, StatsAccumulator
from oscar_kv.config import ModelGeometry
from oscar_kv.errors import OscarError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def geometry_from_hf_config(config: Any) -> ModelGeometry:
    """ModelGeometry from an HF config (head_dim falls back to hidden_size / heads)."""
    num_q = int(config.num_attention_heads)
    num_kv = int(getattr(config, "num_key_value_heads", None) or num_q)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_q
    return ModelGeometry(num_layers=int(config.num_hidden_layers), num_q_heads=num_q,
                         num_kv_heads=num_kv, head_dim=int(head_dim),
                         model_type=str(getattr(config, "model_type", "")),
                         name_or_path=str(getattr(config, "_name_or_path", "")))


def load_hf_model(path: str | os.PathLike, dtype: str = "float32", device: str = "cpu") -> Any:
    """Load a local HF causal LM (no network) in eval mode with sdpa attention."""
    from transformers import AutoModelForCausalLM

    p = Path(path)
    if not (p / "config.json").is_file():
        raise OscarError(f"no HF model at {p} (config.json missing); pass a local model "
                         f"directory")
    if dtype not in _DTYPES:
        raise OscarError(f"unknown model dtype {dtype!r}; use one of: {', '.join(_DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(p, dtype=_DTYPES[dtype], local_files_only=True,
                                                 attn_implementation="sdpa")
    return model.to(device).eval()


def _as_batches(token_batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each element int [B, T] or [T] -> int64 [B, T]; empty input or batches raise."""
    out = []
    for b in token_batches:
        b = torch.as_tensor(b, dtype=torch.long)
        b = b[None] if b.ndim == 1 else b
        if b.ndim != 2 or b.numel() == 0:
            raise OscarError(f"calibration batches must be non-empty [batch, tokens] id tensors, "
                             f"got shape {tuple(b.shape)}")
        out.append(b)
    if not out:
        raise OscarError("no calibration tokens; give a data source with at least one sequence")
    return out


def calibrate(model: Any, token_batches: Sequence[torch.Tensor], out_dir: str | os.PathLike,
              holdout_seqs: torch.Tensor | None = None, progress: bool = True,
              raw_dump_dir: str | os.PathLike | None = None, token_source: str = "",
              softmax_stats: bool = True) -> dict:
    """Run both passes and write ``out_dir/stats.pt`` (+ ``holdout.pt``).

    model: HF causal LM of a supported family (in fp32 or its own dtype; stats are fp64).
    token_batches: sequence of int token-id tensors [B, T] (or [T]); each row is one causal
        sequence, rows of a batch share T. Iterated twice, so it must be re-iterable.
    holdout_seqs: int [S_h, T_h] sequences kept out of the moments, saved raw (bf16) for the
        clip search; None or 0 rows writes no holdout.pt.
    raw_dump_dir: also write pass-1 q/k/v in the reference layout (one chunk per batch).
    Returns a summary dict (paths, token counts, seconds per pass).
    """
    check_supported(model)
    geo = geometry_from_hf_config(model.config)
    batches = _as_batches(token_batches)
    device = next(model.parameters()).device
    acc = StatsAccumulator(geo, token_source=token_source, device=device,
                           softmax_stats=softmax_stats)
    writer = RawDumpWriter(raw_dump_dir) if raw_dump_dir is not None else None
    total = sum(b.numel() for b in batches)
    timings = {}

    with capture_qkv(model) as forward:
        current = {"chunk": 0}  # raw-dump chunk id = batch index

        def record1(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
            for b in range(q.shape[0]):
                acc.add_pass1(layer, q[b], k[b], v[b])
            if writer is not None:
                flat = lambda x: x.reshape(-1, *x.shape[2:])
                lens = [q.shape[1]] * q.shape[0]
                writer.write(layer, current["chunk"], flat(q), flat(k), flat(v), lens)

        def record2(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
            for b in range(k.shape[0]):
                acc.add_pass2(layer, k[b], v[b])

        for name, rec in (("pass 1", record1), ("pass 2", record2)):
            start = time.perf_counter()
            bar = tqdm(total=total, desc=f"calibrate {name}", unit="tok", disable=not progress)
            for i, ids in enumerate(batches):
                current["chunk"] = i
                forward(ids, rec)
                bar.update(ids.numel())
            bar.close()
            timings[name] = time.perf_counter() - start

        hold = HoldoutCollector()
        if holdout_seqs is not None and len(holdout_seqs) > 0:
            held = torch.as_tensor(holdout_seqs, dtype=torch.long)
            if held.ndim != 2:
                raise OscarError(f"holdout sequences must be [S, T] token ids, got "
                                 f"{tuple(held.shape)}")

            def record_hold(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
                for b in range(q.shape[0]):
                    hold.add(layer, q[b], k[b], v[b])

            for row in held:
                forward(row, record_hold)

    hold_dict = None
    if len(hold):
        hold_dict = hold.to_dict()
        # token ids too, so a model-level clip selection can replay the held-out sequences
        hold_dict["ids"] = torch.as_tensor(holdout_seqs, dtype=torch.long).cpu()
    out = acc.save(out_dir, hold_dict)
    stats_n = acc.layers[0].n
    return {"out_dir": str(out), "stats_path": str(out / STATS_FILE),
            "holdout_path": str(out / HOLDOUT_FILE) if len(hold) else None,
            "num_tokens": int(stats_n), "num_sequences": int(acc.layers[0].num_sequences),
            "num_holdout": len(hold), "model": geo.to_dict(),
            "raw_dump_dir": str(raw_dump_dir) if raw_dump_dir is not None else None,
            "pass1_s": round(timings["pass 1"], 3), "pass2_s": round(timings["pass 2"], 3)}
