"""Recall probes used by the model-level clip selection."""

import torch

from oscar_kv.evals.clip_select import CUE, SPAN, SPAN_POS, recall_probes


def test_probe_layout_and_mask():
    ids = torch.arange(2 * 400).reshape(2, 400)
    probes, mask = recall_probes(ids)
    assert probes.shape == ids.shape and mask.shape == ids.shape
    span = ids[1, 200:200 + SPAN]
    assert torch.equal(probes[0, SPAN_POS:SPAN_POS + SPAN], span)
    assert torch.equal(probes[0, -SPAN:], span)
    # the rest of the sequence is untouched
    assert torch.equal(probes[0, :SPAN_POS], ids[0, :SPAN_POS])
    # mask marks the positions whose *next* token is span[CUE:] of the second copy
    pos = mask[0].nonzero().flatten()
    assert pos.numel() == SPAN - CUE
    assert torch.equal(probes[0, pos + 1], span[CUE:])


def test_too_short_sequences_give_no_probes():
    probes, mask = recall_probes(torch.zeros(2, 100, dtype=torch.long))
    assert probes.shape[0] == 0 and mask.shape[0] == 0
