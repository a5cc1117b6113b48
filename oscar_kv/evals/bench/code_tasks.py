"""Code-generation tasks whose answers are executed: HumanEval and LiveCodeBench v6.

The program is built from the last fenced code block of the final text and run by
`sandbox.run_python` (separate `python -I`, time/memory limits, no network, temp dir);
pass@1 per sample is 1 only when every test passes.

LiveCodeBench problems carry two kinds of tests (the dataset's `testtype`):
- `stdin`: the program reads stdin and prints; outputs are compared line by line after
  stripping, tokens equal as strings or as exact decimals ("1.0" == "1");
- `functional`: LeetCode style; `Solution().<func_name>(*args)` with one JSON argument per
  input line, compared with the JSON-decoded expected output (tuples as lists).
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import re
import zlib
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from oscar_kv.evals.bench.data import HubSource
from oscar_kv.evals.bench.data import field as get_field
from oscar_kv.evals.bench.extract import extract_code
from oscar_kv.evals.bench.sandbox import SandboxLimits, run_python
from oscar_kv.evals.bench.tasks import TASKS, BenchTask, Item, Prepared

HUMANEVAL_INSTRUCTION = (
    "Read the following function signature and docstring, and fully implement the function "
    "described. Your response should only contain the code for this function.\n")
LCB_SYSTEM = (
    "You are an expert Python programmer. You will be given a question (problem "
    "specification) and will generate a correct Python program that matches the "
    "specification and passes all tests.")
LCB_STARTER = (
    "### Format: You will use the following starter code to write the solution to the problem "
    "and enclose your code within delimiters.\n```python\n{starter}\n```\n\n")
LCB_STDIN = (
    "### Format: Read the inputs from stdin, solve the problem and write the answer to stdout "
    "(do not directly test on the sample inputs). Enclose your code within delimiters as "
    "follows. Ensure that when the python program runs, it reads the inputs, runs the "
    "algorithm and writes output to STDOUT.\n```python\n# YOUR CODE HERE\n```\n\n")
IMPORT_HEADER = (
    "import sys, os, math, heapq, bisect, itertools, functools, collections, string, re\n"
    "from typing import *\nfrom collections import *\nfrom itertools import *\n"
    "from functools import *\nfrom heapq import *\nfrom bisect import *\nfrom math import *\n")
MAX_TOTAL_S = 120.0

FUNCTIONAL_DRIVER = r'''
import json, sys
ns = {"__name__": "solution"}
exec(compile(open("header.py").read() + open("solution.py").read(), "solution.py", "exec"), ns)
spec = json.load(open("cases.json"))
name = spec["func_name"]
target = getattr(ns["Solution"](), name) if "Solution" in ns else ns[name]


def norm(x):
    if isinstance(x, (list, tuple)):
        return [norm(y) for y in x]
    if isinstance(x, dict):
        return {k: norm(v) for k, v in x.items()}
    return x


for i, case in enumerate(spec["cases"]):
    args = [json.loads(line) for line in case["input"].split("\n") if line.strip()]
    got = target(*args)
    if norm(got) != norm(json.loads(case["output"])):
        print(json.dumps({"failed": i, "got": repr(got)[:200]}))
        sys.exit(1)
print("ALL_PASSED")
'''


@TASKS.register("humaneval")
@dataclass
class HumanEvalTask(BenchTask):
    """HumanEval (164 problems): the completed function must pass the problem's `check`."""

    name: str = "humaneval"
    label: str = "HumanEval"
    hub: HubSource = HubSource("openai/openai_humaneval", split="test")

    def to_item(self, row: dict, index: int) -> Item:
        return Item(str(get_field(row, "task_id", default=str(index))), {
            "prompt": str(get_field(row, "prompt")), "test": str(get_field(row, "test")),
            "entry_point": str(get_field(row, "entry_point"))})

    def render(self, item: Item, seed: int) -> Prepared:
        return Prepared(item.id, self.messages(HUMANEVAL_INSTRUCTION + item.data["prompt"]),
                        item.data["entry_point"], {})

    def score(self, prep: Prepared, final_text: str, limits: SandboxLimits) -> dict:
        code = extract_code(final_text)
        if not code.strip():
            return {"score": 0.0, "extracted": None, "exec": "no_code"}
        item = self._items[prep.item_id]
        program = build_humaneval_program(item.data["prompt"], code, item.data["test"],
                                          item.data["entry_point"])
        res = run_python(program, limits=limits)
        return {"score": float(res.ok), "extracted": code,
                "exec": "timeout" if res.timed_out else res.returncode,
                "stderr": res.stderr[-500:]}


def build_humaneval_program(prompt: str, code: str, test: str, entry_point: str) -> str:
    """prompt + completion + tests + `check(entry_point)`.

    A completion that (re)defines `entry_point` at top level follows the prompt with its stub
    closed by `pass`, so helpers defined in the prompt stay available; a body-only completion
    is appended to the prompt (indented if it is not).
    """
    if re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", code, re.M):
        head = prompt.rstrip("\n") + "\n    pass\n\n\n" + code
    else:
        lines = code.splitlines()
        first = next((ln for ln in lines if ln.strip()), "")
        if first and not first.startswith((" ", "\t")):
            code = "\n".join(("    " + ln) if ln.strip() else ln for ln in lines) + "\n"
        head = prompt + code
    return f"{head}\n\n{test}\n\ncheck({entry_point})\n"


class _NoGlobals(pickle.Unpickler):
    """Unpickler for LCB's compressed test blobs: plain strings only, no globals/code."""

    def find_class(self, module: str, name: str):  # noqa: D102
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from test data")


def decode_tests(value: object) -> list[dict]:
    """LCB test cases from a list, a JSON string, or base64(zlib(pickle(json string)))."""
    if value in (None, ""):
        return []
    if isinstance(value, list):
        return value
    text = str(value)
    try:
        return json.loads(text)
    except ValueError:
        raw = zlib.decompress(base64.b64decode(text))
        return json.loads(_NoGlobals(io.BytesIO(raw)).load())


def outputs_match(got: str, want: str) -> bool:
    """stdin-task output comparison (see the module docstring)."""
    g = [ln.strip() for ln in got.strip().splitlines()]
    w = [ln.strip() for ln in want.strip().splitlines()]
    if g == w:
        return True
    if len(g) != len(w):
        return False
    for a, b in zip(g, w, strict=False):
        ta, tb = a.split(), b.split()
        if len(ta) != len(tb):
            return False
        for x, y in zip(ta, tb, strict=False):
            if x == y:
                continue
            try:
                if Decimal(x) != Decimal(y):
                    return False
            except InvalidOperation:
                return False
    return True


@TASKS.register("lcb")
@dataclass
class LCBTask(BenchTask):
    """LiveCodeBench v6 code generation (the release_v6 problems, optionally date-filtered)."""

    name: str = "lcb"
    label: str = "LCB v6"
    hub: HubSource = HubSource("livecodebench/code_generation_lite", files=("test6.jsonl",))
    system_prompt: str | None = LCB_SYSTEM
    start_date: str = ""  # inclusive ISO date prefix filter on contest_date, e.g. 2025-02-01
    end_date: str = ""

    def to_item(self, row: dict, index: int) -> Item:
        meta = get_field(row, "metadata", default="{}")
        meta = json.loads(meta) if isinstance(meta, str) else meta
        tests = (decode_tests(row.get("public_test_cases"))
                 + decode_tests(row.get("private_test_cases")))
        return Item(str(get_field(row, "question_id", "id", default=str(index))), {
            "question": str(get_field(row, "question_content", "question")),
            "starter": str(row.get("starter_code") or ""), "tests": tests,
            "func_name": (meta or {}).get("func_name"),
            "date": str(row.get("contest_date") or "")})

    def load(self, data: str | None = None, limit: int | None = None) -> list[Item]:
        items = super().load(data, None)
        items = [it for it in items
                 if (not self.start_date or it.data["date"][:10] >= self.start_date)
                 and (not self.end_date or it.data["date"][:10] <= self.end_date)]
        return items[:limit] if limit else items

    def render(self, item: Item, seed: int) -> Prepared:
        fmt = (LCB_STARTER.format(starter=item.data["starter"]) if item.data["starter"]
               else LCB_STDIN)
        text = (f"### Question:\n{item.data['question']}\n\n{fmt}"
                "### Answer: (use the provided format with backticks)\n\n")
        return Prepared(item.id, self.messages(text), "", {})

    def score(self, prep: Prepared, final_text: str, limits: SandboxLimits) -> dict:
        code = extract_code(final_text)
        item = self._items[prep.item_id]
        if not code.strip():
            return {"score": 0.0, "extracted": None, "exec": "no_code"}
        tests = item.data["tests"]
        if not tests:
            return {"score": 0.0, "extracted": code, "exec": "no_tests"}
        if tests[0].get("testtype") == "functional":
            ok, info = run_functional(code, tests, item.data["func_name"], limits)
        else:
            ok, info = run_stdin(code, tests, limits)
        return {"score": float(ok), "extracted": code, "exec": info}


def run_functional(code: str, tests: list[dict], func_name: str | None,
                   limits: SandboxLimits) -> tuple[bool, str]:
    """All functional tests in one sandboxed process; (passed, detail)."""
    if not func_name:
        return False, "no_func_name"
    total = min(MAX_TOTAL_S, limits.timeout_s * max(1, len(tests)))
    lim = SandboxLimits(total, limits.memory_mb, limits.file_size_mb, limits.max_output_chars)
    cases = json.dumps({"func_name": func_name, "cases": tests})
    res = run_python(FUNCTIONAL_DRIVER, limits=lim, files={
        "solution.py": code, "header.py": IMPORT_HEADER, "cases.json": cases})
    if res.timed_out:
        return False, "timeout"
    return res.ok and "ALL_PASSED" in res.stdout, (res.stdout + res.stderr)[-300:]


def run_stdin(code: str, tests: list[dict], limits: SandboxLimits) -> tuple[bool, str]:
    """One sandboxed process per stdin test, stopping at the first failure."""
    program = IMPORT_HEADER + code
    for i, case in enumerate(tests):
        res = run_python(program, stdin=case["input"], limits=limits)
        if res.timed_out:
            return False, f"timeout@{i}"
        if res.returncode != 0:
            return False, f"error@{i}: {res.stderr[-200:]}"
        if not outputs_match(res.stdout, case["output"]):
            return False, f"wrong@{i}"
    return True, "passed"
