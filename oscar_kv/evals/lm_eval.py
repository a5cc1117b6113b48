"""Teacher-forced evaluation of KV-cache methods on an HF causal LM.

Every position attends to its prefix exactly as a decode step at that position would (BF16
sink + recent window, INT2 body), via the `oscar_sim` attention of `oscar_kv.hf`. For each
method we report nll/ppl, KL to the BF16 method, top-1 agreement with BF16, long-range copy
accuracy, and the storage cost (BPE at the evaluated length).
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from oscar_kv.config import QuantSpec, WindowSpec
from oscar_kv.evals.metrics import MethodTally
from oscar_kv.formats import bits_per_element


def _sequence_logits(handle, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """ids [T] -> teacher-forced logits [T, V] fp32 on CPU."""
    return handle.simulate(ids[None].to(device))[0].float().cpu()


def evaluate_methods(model, methods: list[str], lm_ids: torch.Tensor,
                     copy_ids: torch.Tensor | None, copy_mask: torch.Tensor | None,
                     rotations=None, quant: QuantSpec = QuantSpec(),
                     window: WindowSpec = WindowSpec(), progress: bool = True) -> list[dict]:
    """Evaluate `methods` on lm_ids [S, T] (and copy probes [S2, T] with their mask).

    The `bf16` method is always evaluated first (added if missing) because KL and top-1
    agreement are measured against it. Returns one dict per requested method with keys
    method, ppl, nll, kl, top1_agree, copy_acc, bpe, seconds.
    """
    from oscar_kv.hf import prepare_model

    device = next(model.parameters()).device
    order = ["bf16"] + [m for m in methods if m != "bf16"]
    ref_logp: list[torch.Tensor] = []
    results: dict[str, dict] = {}
    seq_len = lm_ids.shape[1]
    for method in order:
        t0 = time.time()
        tally = MethodTally()
        handle = prepare_model(model, method, rotations=rotations, quant=quant, window=window,
                               mode="simulate")
        try:
            it = range(lm_ids.shape[0])
            for i in tqdm(it, desc=f"eval {method}", disable=not progress, leave=False):
                logits = _sequence_logits(handle, lm_ids[i], device)[:-1]
                targets = lm_ids[i, 1:]
                if method == "bf16":
                    ref_logp.append(torch.log_softmax(logits, dim=-1))
                tally.add_lm(logits, targets, ref_logp[i])
            if copy_ids is not None:
                for i in range(copy_ids.shape[0]):
                    logits = _sequence_logits(handle, copy_ids[i], device)[:-1]
                    tally.add_copy(logits, copy_ids[i, 1:], copy_mask[i, :-1])
        finally:
            handle.restore()
        row = {"method": method, **tally.summary(),
               "bpe": 16.0 if method == "bf16" else bits_per_element(seq_len, window, quant),
               "seconds": time.time() - t0}
        if method == "bf16":
            row["kl"], row["top1_agree"] = 0.0, 1.0
        results[method] = row
    return [results[m] for m in methods]
