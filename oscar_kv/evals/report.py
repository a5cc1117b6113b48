"""Readable tables for evaluation results (the JSON is the source of truth)."""

from __future__ import annotations


def format_results_table(results: list[dict], baseline: str = "bf16") -> str:
    """Markdown table: method, ppl, delta % vs baseline, KL, top-1 agreement, copy acc, BPE."""
    base = next((r for r in results if r["method"] == baseline), None)
    head = "| method | ppl | Δppl % | KL | top-1 agree | copy acc | BPE |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in results:
        delta = "–" if base is None or r is base else f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f}"
        copy = "–" if r.get("copy_acc") is None else f"{r['copy_acc']:.4f}"
        lines.append(f"| {r['method']} | {r['ppl']:.4f} | {delta} | {r['kl']:.5f} | "
                     f"{r['top1_agree']:.4f} | {copy} | {r['bpe']:.4f} |")
    return "\n".join(lines)
