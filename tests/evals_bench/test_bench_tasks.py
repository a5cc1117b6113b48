"""Every task end to end against canned completions: prompts, extraction, execution, metrics."""

from __future__ import annotations

import json
import random
from pathlib import Path

from bench_fake_server import FakeServer, Reply, canned

from oscar_kv.evals.bench.client import ChatClient, ClientConfig, SamplingParams
from oscar_kv.evals.bench.code_tasks import build_humaneval_program, decode_tests, outputs_match
from oscar_kv.evals.bench.runner import RunConfig, run_task
from oscar_kv.evals.bench.sandbox import SandboxLimits
from oscar_kv.evals.bench.tasks import get_task

FIX = Path(__file__).parent / "fixtures"
LIMITS = SandboxLimits(timeout_s=2.0, memory_mb=1024)


def _run(task_name, responder, tmp_path, n=1, workers=4, **task_kw):
    task = get_task(task_name)
    for k, v in task_kw.items():
        setattr(task, k, v)
    ext = "csv" if task_name == "gpqa" else "jsonl"
    items = task.load(str(FIX / f"{task_name}.{ext}"))
    with FakeServer(responder) as srv:
        client = ChatClient(ClientConfig(srv.base_url, "fake", backoff_base=0.01))
        m = run_task(task, items, client, SamplingParams(), RunConfig(
            out=str(tmp_path / task_name), n=n, workers=workers, limits=LIMITS,
            method="oscar", model_label="tiny"), log=lambda *a: None)
    return m, srv


def _gpqa_letter(body):
    """The letter under which the fake server's prompt shows the correct answer."""
    text = body["messages"][-1]["content"]
    golds = {"gold?": "Au", "negative": "electron", "base ten": "4"}
    gold = next(v for k, v in golds.items() if k in text)
    return next(line[0] for line in text.splitlines() if line[1:3] == ") "
                and line[3:] == gold)


def test_gpqa_scores_final_answer_not_the_one_in_thinking(tmp_path):
    def respond(body, n):
        good = _gpqa_letter(body)
        bad = next(c for c in "ABCD" if c != good)
        return Reply(f"<think>Answer: {bad}</think>\nReasoning done.\nAnswer: {good}")

    m, srv = _run("gpqa", respond, tmp_path, n=2)
    assert m["scores"] == [100.0, 100.0] and m["std"] == 0.0 and m["n_items"] == 3
    assert srv.requests[0]["messages"][0] == {"role": "system",
                                             "content": "You are a helpful assistant."}
    m, _ = _run("gpqa", lambda b, n: Reply(f"Answer: {_gpqa_letter(b)}</think>Answer: Z"),
                tmp_path / "b")
    assert m["scores"] == [0.0]


def test_gpqa_permutation_is_seeded_like_simple_evals():
    task = get_task("gpqa")
    items = task.load(str(FIX / "gpqa.csv"))
    rng = random.Random(0)
    perms = [rng.sample(range(4), 4) for _ in items]
    preps = task.prepare_all(items, 0)
    assert [p.meta["permutation"] for p in preps] == perms
    assert [p.gold for p in preps] == ["ABCD"[p.index(0)] for p in perms]
    assert [p.meta["permutation"] for p in task.prepare_all(items, 1)] != perms


def test_humaneval_executes_tests(tmp_path):
    rules = [("def add", "```python\ndef add(a, b):\n    return a + b\n```"),
             ("double_all", "Here:\n```python\n    return [helper(x) for x in xs]\n```")]
    m, _ = _run("humaneval", canned(rules), tmp_path)
    assert m["scores"] == [100.0]
    wrong = [("def add", "```python\ndef add(a, b):\n    return a - b\n```"),
             ("double_all", "```python\ndef double_all(xs):\n    while True:\n        pass\n```")]
    m, _ = _run("humaneval", canned(wrong), tmp_path / "w")
    assert m["scores"] == [0.0]
    lines = (tmp_path / "w" / "humaneval" / "samples_seed0.jsonl").read_text().splitlines()
    assert {json.loads(x)["details"]["exec"] for x in lines} >= {"timeout"}


def test_humaneval_program_shapes():
    prog = build_humaneval_program("def f(x):\n    \"\"\"doc\"\"\"\n", "return x", "def check(c):"
                                   "\n    assert c(1) == 1\n", "f")
    assert "    return x" in prog and prog.endswith("check(f)\n")


def test_lcb_stdin_and_functional(tmp_path):
    rules = [("A+B", "```python\na, b = map(int, input().split())\nprint(a + b)\n```"),
             ("maximum", "```python\nclass Solution:\n    def maxOf(self, nums: List[int]) -> int:"
                         "\n        return max(nums)\n```"),
             ("hello", "```python\nprint('hello')\n```")]
    m, _ = _run("lcb", canned(rules), tmp_path)
    assert m["scores"] == [100.0] and m["n_items"] == 3
    m, _ = _run("lcb", canned(rules), tmp_path / "d", start_date="2025-01-01")
    assert m["n_items"] == 2
    bad = [("A+B", "```python\nprint(3)\n```"), ("maximum", "```python\nclass Solution:\n"
           "    def maxOf(self, nums):\n        return nums[0]\n```"),
           ("hello", "```python\nimport socket\nsocket.socket()\nprint('hello')\n```")]
    m, _ = _run("lcb", canned(bad), tmp_path / "b")
    assert m["scores"] == [0.0]


def test_lcb_test_decoding_and_output_comparison():
    items = get_task("lcb").load(str(FIX / "lcb.jsonl"))
    assert items[0].data["tests"][-1]["input"] == "10 20\n"  # compressed private tests
    assert decode_tests("") == [] and decode_tests([{"a": 1}]) == [{"a": 1}]
    assert outputs_match("1.0 2\n\n", "1 2") and outputs_match(" x \ny", "x\ny ")
    assert not outputs_match("1 2", "1 3") and not outputs_match("1\n2", "1")


def test_math_tasks(tmp_path):
    aime = [("2025", "<think>\\boxed{24}</think>The answer is \\boxed{025}"),
            ("6 times 7", "Answer: 42")]
    m, srv = _run("aime25", canned(aime), tmp_path)
    assert m["scores"] == [100.0]
    assert "\\boxed{}" in srv.requests[0]["messages"][-1]["content"]
    m5 = [("1/2 + 1/4", "\\boxed{0.75}"), ("x + 3", "\\boxed{x = 2}"), ("(1,2)", "<think>")]
    m, _ = _run("math500", canned(m5), tmp_path / "m")
    assert abs(m["scores"][0] - 200 / 3) < 1e-9


def test_malformed_empty_and_error_responses_score_zero(tmp_path):
    m, _ = _run("aime25", lambda b, n: Reply(status=400), tmp_path)
    assert m["scores"] == [0.0] and m["errors"] == {"bad_request": 2}
    m, _ = _run("math500", lambda b, n: Reply(raw=b"{}"), tmp_path / "x")
    assert m["scores"] == [0.0] and m["errors"]["malformed_response"] == 3


def test_concurrency_and_resume(tmp_path):
    m, srv = _run("gpqa", lambda b, n: Reply("Answer: A", delay=0.2), tmp_path, n=4, workers=6)
    assert 1 < srv.max_inflight <= 6 and len(srv.requests) == 12 and len(m["scores"]) == 4
    m2, srv2 = _run("gpqa", lambda b, n: Reply("Answer: B"), tmp_path, n=4)
    assert len(srv2.requests) == 0 and m2["scores"] == m["scores"]  # all reused
