"""Recall probes used by the model-level clip selection."""

import torch

from oscar_kv.evals.clip_select import CUE, SPAN, SPAN_POS, recall_probes


def test_probe_layout_and_mask():
    ids = torch.arange(2 * 400).reshape(2, 400)
    probes, mask = recall_probes(ids, per_seq=3)
    assert probes.shape == (6, 400) and mask.shape == (6, 400)
    span = ids[1, 0:SPAN]  # probe (0, 0): donor sequence 1 at offset 0
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


def test_spans_differ_between_probes_of_one_sequence():
    ids = torch.arange(2 * 400).reshape(2, 400)
    probes, _ = recall_probes(ids, per_seq=4)
    spans = {tuple(p[-SPAN:].tolist()) for p in probes[:4]}
    assert len(spans) == 4
