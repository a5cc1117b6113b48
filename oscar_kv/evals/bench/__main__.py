"""`python -m oscar_kv.evals.bench`: run benchmark tasks against an OpenAI-compatible server.

Example:
    python -m oscar_kv.evals.bench --task gpqa --base-url http://127.0.0.1:31057/v1 \\
        --model Qwen/Qwen3-8B --out runs/qwen3-8B/_eval_oscar --n 5 --method oscar

Writes OUT/<task>/{samples_seed<S>.jsonl,metrics.json} per task; `--table ROOT` prints the
markdown table of every metrics.json under ROOT instead. Exit status 2 on user errors.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from oscar_kv.errors import OscarError
from oscar_kv.evals.bench.aggregate import TASK_ORDER
from oscar_kv.evals.bench.client import ChatClient, ClientConfig, SamplingParams
from oscar_kv.evals.bench.runner import RunConfig, run_task
from oscar_kv.evals.bench.sandbox import SandboxLimits


def add_run_args(p: argparse.ArgumentParser, out_required: bool = True,
                 method_tag: bool = True) -> None:
    """Flags shared by this CLI and `serve` (everything but where the server is)."""
    p.add_argument("--task", default="gpqa",
                   help=f"comma-separated tasks or 'all' ({','.join(TASK_ORDER)})")
    p.add_argument("--out", required=out_required,
                   help="results folder; each task writes OUT/<task>/")
    p.add_argument("--n", type=int, default=1, help="repeats; seeds SEED .. SEED+n-1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None,
                   help="local .jsonl/.json/.csv instead of the hub (one task only)")
    p.add_argument("--limit", type=int, default=None, help="first N items only (smoke runs)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=40, help="<= 0 leaves it to the server")
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--system-prompt", default=None,
                   help="override the task's system message ('' for none)")
    p.add_argument("--workers", type=int, default=32, help="concurrent requests")
    p.add_argument("--exec-workers", type=int, default=None,
                   help="concurrent sandboxed code runs (default min(8, CPUs))")
    p.add_argument("--no-request-seed", action="store_true",
                   help="do not send a per-request `seed` to the server")
    p.add_argument("--no-resume", action="store_true", help="ignore existing sample files")
    p.add_argument("--connect-timeout", type=float, default=30.0)
    p.add_argument("--read-timeout", type=float, default=7200.0)
    p.add_argument("--max-retries", type=int, default=8)
    p.add_argument("--resend-after-send", action="store_true",
                   help="also re-send after a read timeout / lost connection (may duplicate "
                        "work the server is still doing)")
    p.add_argument("--code-timeout", type=float, default=10.0, help="seconds per code test run")
    p.add_argument("--code-memory-mb", type=int, default=4096)
    p.add_argument("--lcb-start-date", default="", help="LCB contest_date lower bound YYYY-MM-DD")
    p.add_argument("--lcb-end-date", default="", help="LCB contest_date upper bound YYYY-MM-DD")
    if method_tag:
        p.add_argument("--method", default="", help="method tag recorded in metrics (bf16…)")
    p.add_argument("--model-label", default="", help="model name for tables (default --model)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m oscar_kv.evals.bench",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:31057/v1")
    ap.add_argument("--model", default=None, help="model name sent in requests")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    add_run_args(ap, out_required=False)
    ap.add_argument("--table", default=None, help="print the results table of ROOT and exit")
    return ap


def parse_tasks(spec: str) -> list[str]:
    """'all' or a comma list -> validated task names in canonical order."""
    from oscar_kv.evals.bench.tasks import get_task

    names = list(TASK_ORDER) if spec == "all" else [t for t in spec.split(",") if t]
    for n in names:
        get_task(n)
    return names


def run_tasks(args: argparse.Namespace, base_url: str, model: str, log=print) -> list[dict]:
    """Run every task of `args.task` against `base_url`; returns the metrics dicts."""
    from oscar_kv.evals.bench.tasks import get_task

    names = parse_tasks(args.task)
    if args.data and len(names) > 1:
        raise OscarError("--data is one task's file; run one --task at a time with it")
    client = ChatClient(ClientConfig(
        base_url=base_url, model=model, api_key=getattr(args, "api_key", None),
        connect_timeout=args.connect_timeout, read_timeout=args.read_timeout,
        max_retries=args.max_retries, resend_after_send=args.resend_after_send))
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens)
    limits = SandboxLimits(timeout_s=args.code_timeout, memory_mb=args.code_memory_mb)
    results = []
    for name in names:
        task = get_task(name)
        if args.system_prompt is not None:
            task.system_prompt = args.system_prompt or None
        if name == "lcb":
            task.start_date, task.end_date = args.lcb_start_date, args.lcb_end_date
        items = task.load(args.data, args.limit)
        if not items:
            raise OscarError(f"task {name} has no items (check --data / --limit / dates)")
        cfg = RunConfig(out=str(Path(args.out) / name), n=args.n, seed=args.seed,
                        workers=args.workers, request_seed=not args.no_request_seed,
                        resume=not args.no_resume, method=args.method,
                        model_label=args.model_label, limits=limits,
                        **({"exec_workers": args.exec_workers} if args.exec_workers else {}))
        results.append(run_task(task, items, client, params, cfg, log=log))
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.table:
            from oscar_kv.evals.bench.aggregate import collect, report

            print(report(collect(args.table)), end="")
            return 0
        if not args.out or not args.model:
            raise OscarError("--out and --model are required to run tasks")
        run_tasks(args, args.base_url, args.model)
    except (OscarError, ValueError) as e:
        print(f"oscar-kv bench: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
