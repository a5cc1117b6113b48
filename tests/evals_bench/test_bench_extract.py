"""Final-answer extraction: reasoning split, MC letters, code blocks, math answers."""

from __future__ import annotations

import sys
import types

import pytest

from oscar_kv.evals.bench import mathnorm
from oscar_kv.evals.bench.extract import extract_code, extract_mc_letter, split_reasoning
from oscar_kv.evals.bench.mathnorm import answers_match, builtin_equiv, extract_math_answer


def test_answer_inside_think_is_never_scored():
    _, final = split_reasoning("<think>Maybe Answer: B</think>\nSo.\nAnswer: C")
    assert extract_mc_letter(final) == "C"


def test_template_opened_think_only_closing_tag():
    reasoning, final = split_reasoning("Answer: B is tempting</think>Answer: D")
    assert "Answer: B" in reasoning and extract_mc_letter(final) == "D"


def test_truncated_thinking_scores_nothing():
    _, final = split_reasoning("<think>Answer: A ... and then the budget ran out")
    assert final == "" and extract_mc_letter(final) is None


def test_server_reasoning_content_is_not_scored():
    reasoning, final = split_reasoning("Answer: A", "Answer: B")
    assert (reasoning, extract_mc_letter(final)) == ("Answer: B", "A")


@pytest.mark.parametrize("text,want", [
    ("Answer: C", "C"), ("**Answer:** (B)", "B"), ("answer : $D$", "D"), ("Answer:\nA", "A"),
    ("Answer: A\nno wait\nAnswer: D", "D"), ("the answer is (C).", "C"),
    ("Answer: Because", None), ("Answer: a bit", None), ("", None), (None, None),
    ("Answer: E", None), ("Answer: $\\boxed{B}$", "B"),
])
def test_mc_letter(text, want):
    assert extract_mc_letter(text) == want


def test_code_block_prefers_last_python_block():
    text = "```python\nx = 1\n```\nthen\n```\nnot code\n```\n```python\ny = 2\n```"
    assert extract_code(text) == "y = 2\n"
    assert extract_code("```python\nz = 3\n") == "z = 3\n"  # unclosed (truncated)
    assert extract_code("") == ""
    assert extract_code("print(1)") == "print(1)\n"


@pytest.mark.parametrize("text,want", [
    ("so \\boxed{\\frac{1}{2}} hmm, finally \\boxed{\\dfrac{3}{4}}.", "\\dfrac{3}{4}"),
    ("\\boxed{{1,2}}", "{1,2}"), ("Answer: 42", "42"), ("The final answer is 7.", "7"),
    ("\\boxed{12", None), ("no answer here", None), ("\\boxed 5$", "5"),
])
def test_math_extraction(text, want):
    assert extract_math_answer(text) == want


@pytest.mark.parametrize("pred,gold,ok", [
    ("042", "42", True), ("1,000", "1000", True), ("\\dfrac{3}{4}", "0.75", True),
    ("\\frac34", "3/4", True), ("x = 5", "5", True), ("5^\\circ", "5", True),
    ("(1, 2)", "(1,2)", True), ("(1,2)", "(2,1)", False), ("10\\%", "10", True),
    ("-\\frac{1}{2}", "-0.5", True), ("\\text{(B)}", "(B)", True), ("41", "42", False),
    ("", "1", False), ("\\sqrt2", "\\sqrt{2}", True),
])
def test_builtin_equivalence(pred, gold, ok):
    assert builtin_equiv(pred, gold) is ok


def test_math_verify_used_when_importable(monkeypatch):
    fake = types.SimpleNamespace(parse=lambda s, **kw: [s], verify=lambda g, p, **kw: True)
    monkeypatch.setitem(sys.modules, "math_verify", fake)
    assert mathnorm.math_verify_available()
    assert answers_match("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}")
    assert not answers_match(None, "1") and not answers_match("  ", "1")


def test_builtin_fallback_without_math_verify(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import raises ImportError
    assert not mathnorm.math_verify_available()
    assert answers_match("0.5", "\\frac{1}{2}")
