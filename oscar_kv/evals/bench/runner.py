"""Run one task against a server: n seeded repeats, a thread pool, JSONL logs, metrics.json.

Layout written under `out/`:
- `samples_seed<S>.jsonl`: one line per (item, seed): request parameters, raw content and
  reasoning, the final text, the extracted answer, gold, score, finish reason, token usage,
  latency, attempts and error;
- `metrics.json`: per-seed scores in percent, their mean and sample std (ddof 1), counts of
  errors / truncations, the sampling parameters and the run's identity (task, model,
  model label, method) read back by `aggregate.py`.

Resuming (default): lines already in the sample files are reused unless they carry a
transport error (timeouts, lost connections, exhausted retries), which are asked again.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from oscar_kv.evals.bench.aggregate import mean_std
from oscar_kv.evals.bench.client import ChatClient, SamplingParams
from oscar_kv.evals.bench.extract import split_reasoning
from oscar_kv.evals.bench.sandbox import SandboxLimits
from oscar_kv.evals.bench.tasks import BenchTask, Item, Prepared

FINAL_ERRORS = (None, "bad_request")  # records with these are kept when resuming


@dataclass(frozen=True)
class RunConfig:
    """How to run one task (see the CLI for the meaning of each flag)."""

    out: str
    n: int = 1
    seed: int = 0
    workers: int = 32
    exec_workers: int = max(1, min(8, os.cpu_count() or 1))
    request_seed: bool = True
    resume: bool = True
    method: str = ""
    model_label: str = ""
    limits: SandboxLimits = field(default_factory=SandboxLimits)


def request_seed(seed: int, index: int) -> int:
    """Deterministic per-request sampling seed for (run seed, item index), in [0, 2**31)."""
    return (seed * 100_003 + index) % (2**31)


def _load_done(out: Path, seeds: list[int]) -> dict[tuple[int, str], dict]:
    done: dict[tuple[int, str], dict] = {}
    for s in seeds:
        p = out / f"samples_seed{s}.jsonl"
        if not p.is_file():
            continue
        with p.open(encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                done[(s, rec["item_id"])] = rec
    return {k: r for k, r in done.items() if r.get("error") in FINAL_ERRORS}


def _one(task: BenchTask, client: ChatClient, params: SamplingParams, cfg: RunConfig,
         seed: int, index: int, prep: Prepared, exec_sem: threading.Semaphore) -> dict:
    sp = replace(params, seed=request_seed(seed, index) if cfg.request_seed else None)
    comp = client.complete(prep.messages, sp)
    reasoning, final = split_reasoning(comp.content, comp.reasoning_content)
    with exec_sem:
        scored = task.score(prep, final, cfg.limits)
    return {"task": task.name, "seed": seed, "index": index, "item_id": prep.item_id,
            "gold": prep.gold, "score": float(scored.pop("score")),
            "extracted": scored.pop("extracted", None), "details": scored,
            "final_text": final, "content": comp.content,
            "reasoning_content": comp.reasoning_content,
            "reasoning_chars": len(reasoning), "finish_reason": comp.finish_reason,
            "usage": comp.usage, "latency_s": round(comp.latency_s, 3),
            "attempts": comp.attempts, "status": comp.status, "error": comp.error,
            "sampling": sp.to_body(), "messages": prep.messages, "meta": prep.meta}


def run_task(task: BenchTask, items: list[Item], client: ChatClient, params: SamplingParams,
             cfg: RunConfig, log=print) -> dict:
    """Run `task` over `items` for seeds cfg.seed .. cfg.seed+n-1; returns the metrics dict."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [cfg.seed + r for r in range(cfg.n)]
    done = _load_done(out, seeds) if cfg.resume else {}
    preps = {s: task.prepare_all(items, s) for s in seeds}
    jobs = [(s, i, p) for s in seeds for i, p in enumerate(preps[s])
            if (s, p.item_id) not in done]
    mode = "a" if cfg.resume else "w"
    files = {s: (out / f"samples_seed{s}.jsonl").open(mode, encoding="utf-8") for s in seeds}
    lock, exec_sem = threading.Lock(), threading.Semaphore(cfg.exec_workers)
    records = dict(done)
    t0, step = time.monotonic(), max(1, len(jobs) // 10)
    log(f"[{task.name}] {len(items)} items x {len(seeds)} seeds: {len(jobs)} requests "
        f"({len(done)} reused) -> {out}")
    try:
        with ThreadPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
            futs = [pool.submit(_one, task, client, params, cfg, s, i, p, exec_sem)
                    for s, i, p in jobs]
            for k, fut in enumerate(as_completed(futs), 1):
                rec = fut.result()
                with lock:
                    files[rec["seed"]].write(json.dumps(rec, ensure_ascii=False) + "\n")
                    files[rec["seed"]].flush()
                    records[(rec["seed"], rec["item_id"])] = rec
                if k % step == 0 or k == len(futs):
                    log(f"[{task.name}] {k}/{len(futs)} done, {time.monotonic() - t0:.0f} s")
    finally:
        for f in files.values():
            f.close()
    metrics = summarize(task, items, seeds, records, params, cfg, client.cfg.model)
    metrics["wall_s"] = round(time.monotonic() - t0, 1)
    write_json_atomic(out / "metrics.json", metrics)
    log(f"[{task.name}] score {metrics['mean']:.2f}"
        + (f" ± {metrics['std']:.2f}" if metrics["std"] is not None else "")
        + f" over {len(seeds)} seed(s)")
    return metrics


def summarize(task: BenchTask, items: list[Item], seeds: list[int],
              records: dict[tuple[int, str], dict], params: SamplingParams, cfg: RunConfig,
              model: str) -> dict:
    """Per-seed percentages (missing items count as wrong) and run-level counters."""
    per_seed = []
    for s in seeds:
        vals = [records[(s, it.id)]["score"] if (s, it.id) in records else 0.0 for it in items]
        per_seed.append(100.0 * sum(vals) / max(1, len(vals)))
    recs = list(records.values())
    mean, std = mean_std(per_seed)
    toks = [r["usage"].get("completion_tokens", 0) for r in recs if r.get("usage")]
    return {"task": task.name, "label": task.label, "model": model,
            "model_label": cfg.model_label or model, "method": cfg.method,
            "n_items": len(items), "seeds": seeds, "scores": per_seed, "mean": mean, "std": std,
            "errors": dict(Counter(r["error"] for r in recs if r.get("error"))),
            "finish_reasons": dict(Counter(str(r.get("finish_reason")) for r in recs)),
            "mean_completion_tokens": (sum(toks) / len(toks)) if toks else None,
            "sampling": {k: v for k, v in asdict(params).items() if k != "seed"},
            "request_seed": cfg.request_seed, "system_prompt": task.system_prompt,
            "limits": asdict(cfg.limits)}


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON to `path` via a temp file + rename (no half-written metrics)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
