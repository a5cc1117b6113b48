"""Benchmark tasks: the common interface plus GPQA-diamond, AIME25 and MATH-500.

A task turns dataset rows into `Item`s, items into `Prepared` prompts for one seed, and a
final (post-thinking) answer text into a score in [0, 1]. The code tasks (HumanEval,
LiveCodeBench) live in `code_tasks.py`; both modules register into `TASKS`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from oscar_kv.evals.bench.data import HubSource, load_rows
from oscar_kv.evals.bench.data import field as get_field
from oscar_kv.evals.bench.extract import extract_mc_letter
from oscar_kv.evals.bench.mathnorm import answers_match, extract_math_answer
from oscar_kv.evals.bench.sandbox import SandboxLimits
from oscar_kv.registry import Registry

DEFAULT_SYSTEM = "You are a helpful assistant."

# simple-evals multiple-choice template (a prompt text, reproduced as the protocol requires).
GPQA_TEMPLATE = (
    "Answer the following multiple choice question. The last line of your response should be "
    "of the following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. "
    "Think step by step before answering.\n\n{question}\n\nA) {A}\nB) {B}\nC) {C}\nD) {D}")
MATH_TEMPLATE = ("{problem}\n\nPlease reason step by step, and put your final answer within "
                 "\\boxed{{}}.")


@dataclass(frozen=True)
class Item:
    """One dataset entry: a stable id plus task-specific fields."""

    id: str
    data: dict


@dataclass(frozen=True)
class Prepared:
    """One request for one (item, seed): the chat messages and what a correct answer is."""

    item_id: str
    messages: list
    gold: str
    meta: dict = field(default_factory=dict)


@dataclass
class BenchTask:
    """Base task. Subclasses set `name`, `label`, `hub` and implement `to_item`/`render`/`score`."""

    name: str = ""
    label: str = ""
    hub: HubSource = HubSource("")
    system_prompt: str | None = DEFAULT_SYSTEM
    _items: dict = field(default_factory=dict, repr=False, compare=False)

    def load(self, data: str | None = None, limit: int | None = None) -> list[Item]:
        """Items from `data` (local file) or the hub, in dataset order, first `limit` only."""
        rows = load_rows(data, self.hub)
        items = [self.to_item(r, i) for i, r in enumerate(rows)]
        return items[:limit] if limit else items

    def to_item(self, row: dict, index: int) -> Item:
        raise NotImplementedError

    def messages(self, user: str) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return sys_msg + [{"role": "user", "content": user}]

    def prepare_all(self, items: list[Item], seed: int) -> list[Prepared]:
        """Prompts for every item under `seed` (only GPQA's depend on the seed)."""
        self._items = {it.id: it for it in items}
        return [self.render(it, seed) for it in items]

    def render(self, item: Item, seed: int) -> Prepared:
        raise NotImplementedError

    def score(self, prep: Prepared, final_text: str, limits: SandboxLimits) -> dict:
        """{"score": 0..1, "extracted": str | None, ...} for the final answer text."""
        raise NotImplementedError


TASKS: Registry[type[BenchTask]] = Registry("benchmark task")


@TASKS.register("gpqa")
@dataclass
class GPQATask(BenchTask):
    """GPQA-diamond, 4-way multiple choice; the option order is a seeded permutation.

    For seed s the permutations are drawn in dataset order from one `random.Random(s)` stream
    (`rng.sample(range(4), 4)` per row over [correct, incorrect 1..3]), which for s = 0
    reproduces simple-evals' single-run order. The score is 1 when the last "Answer: X" of the
    final text names the correct letter.
    """

    name: str = "gpqa"
    label: str = "GPQA"
    hub: HubSource = HubSource("Idavidrein/gpqa", split="train", config="gpqa_diamond",
                               note="gated; or the simple-evals gpqa_diamond.csv")

    def to_item(self, row: dict, index: int) -> Item:
        inc = [str(get_field(row, f"Incorrect Answer {k}", f"incorrect_answer_{k}"))
               for k in (1, 2, 3)]
        return Item(str(get_field(row, "Record ID", "id", default=str(index))), {
            "question": str(get_field(row, "Question", "question")),
            "correct": str(get_field(row, "Correct Answer", "correct_answer")),
            "incorrect": inc})

    def prepare_all(self, items: list[Item], seed: int) -> list[Prepared]:
        rng = random.Random(seed)
        out = []
        for it in items:
            perm = rng.sample(range(4), 4)
            choices = [it.data["correct"], *it.data["incorrect"]]
            shown = [choices[i] for i in perm]
            letter = "ABCD"[perm.index(0)]
            text = GPQA_TEMPLATE.format(question=it.data["question"],
                                        **dict(zip("ABCD", shown, strict=False)))
            out.append(Prepared(it.id, self.messages(text), letter, {"permutation": perm}))
        return out

    def score(self, prep: Prepared, final_text: str, limits: SandboxLimits) -> dict:
        got = extract_mc_letter(final_text)
        return {"score": float(got == prep.gold), "extracted": got}


@dataclass
class _MathTask(BenchTask):
    """Free-form math: last \\boxed{} of the final text vs the reference answer."""

    def to_item(self, row: dict, index: int) -> Item:
        return Item(str(get_field(row, "id", "unique_id", "ID", default=str(index))), {
            "problem": str(get_field(row, "problem", "question", "Problem")),
            "answer": str(get_field(row, "answer", "Answer"))})

    def render(self, item: Item, seed: int) -> Prepared:
        return Prepared(item.id, self.messages(MATH_TEMPLATE.format(problem=item.data["problem"])),
                        item.data["answer"])

    def score(self, prep: Prepared, final_text: str, limits: SandboxLimits) -> dict:
        got = extract_math_answer(final_text)
        return {"score": float(answers_match(got, prep.gold)), "extracted": got}


@TASKS.register("aime25")
@dataclass
class AIME25Task(_MathTask):
    """AIME 2025 I+II (30 integer answers)."""

    name: str = "aime25"
    label: str = "AIME25"
    hub: HubSource = HubSource("math-ai/aime25", split="test")


@TASKS.register("math500")
@dataclass
class MATH500Task(_MathTask):
    """MATH-500 (the PRM800K test subset of MATH)."""

    name: str = "math500"
    label: str = "MATH500"
    hub: HubSource = HubSource("HuggingFaceH4/MATH-500", split="test")


def get_task(name: str) -> BenchTask:
    """A task instance by registry name (importing the code tasks registers them)."""
    import oscar_kv.evals.bench.code_tasks  # noqa: F401  (registers humaneval, lcb)

    return TASKS.get(name)()
