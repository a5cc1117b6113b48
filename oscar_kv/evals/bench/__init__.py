"""Accuracy benchmarks over an OpenAI-compatible server: GPQA, HumanEval, LCB v6, AIME25, MATH500.

    python -m oscar_kv.evals.bench --task gpqa --base-url http://127.0.0.1:31057/v1 \\
        --model Qwen/Qwen3-8B --out runs/qwen3-8B/_eval_oscar --n 5 --method oscar
    python -m oscar_kv.evals.bench.serve --model-path Qwen/Qwen3-8B --method oscar \\
        --rot-dir ROT_DIR --task all --n 5 --out OUT        # launches + stops SGLang itself
    python scripts/results_table.py OUT_ROOT                  # README-style table

Modules: `client` (stdlib HTTP, retry policy that never re-sends in-flight work), `extract`
(reasoning split, MC letters, code blocks), `mathnorm` (\\boxed{} + equivalence), `sandbox`
(isolated execution of generated code), `data` (local file or hub), `tasks` / `code_tasks`
(the five tasks), `runner` (thread pool, seeds, JSONL, metrics.json), `aggregate` (tables),
`serve` (server lifecycle per method). Protocol choices are documented in rotation/README.md.
These modules import neither transformers nor sglang (torch only via the oscar_kv package).
"""
