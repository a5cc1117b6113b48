"""Pull the scored part out of a chat completion: final text, MC letter, code block.

Reasoning handling (every task): the *final* text is what follows the thinking. When the
server ran a reasoning parser its `reasoning_content` holds the thinking and `content` the
answer; without a parser the thinking is inline as `<think>...</think>` (Qwen3-Thinking
templates open `<think>` inside the prompt, so only `</think>` appears). Everything up to the
last `</think>` is reasoning. An opened but never closed `<think>` (generation truncated
mid-thought) leaves no final text, so the sample scores 0: an "Answer: X" written while
thinking is never scored. This fixes the reference's first-match-in-whole-trace scoring.
"""

from __future__ import annotations

import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# "Answer: C", "**Answer:** (C)", "answer : $C$", "Answer:\nC"; the letter is an upper-case A-D
# standing alone ("Answer: a bit" and "Answer: Because" do not match).
MC_ANSWER_RE = re.compile(
    r"(?i:answer)\s*(?:\*\*)?\s*:\s*(?:\*\*)?\s*[\$\(\[]*\s*"
    r"(?:\\(?:textbf|text|boxed|mathrm)\{)?\s*([A-D])(?![A-Za-z0-9])")
MC_FALLBACK_RE = re.compile(r"(?i:answer\s+is)\s*[\*\$\(\[]*\s*([A-D])(?![A-Za-z0-9])")
CODE_BLOCK_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.S)


def split_reasoning(content: str | None, reasoning_content: str | None = None
                    ) -> tuple[str, str]:
    """(reasoning, final) for one completion; see the module docstring for the rules."""
    text = content or ""
    reasoning = reasoning_content or ""
    close = text.rfind(THINK_CLOSE)
    if close >= 0:
        inline = text[:close].replace(THINK_OPEN, "", 1)
        return (reasoning + inline).strip(), text[close + len(THINK_CLOSE):].strip()
    opened = text.find(THINK_OPEN)
    if opened >= 0:  # thinking never finished: nothing after it counts
        return (reasoning + text[opened + len(THINK_OPEN):]).strip(), text[:opened].strip()
    return reasoning.strip(), text.strip()


def extract_mc_letter(final_text: str) -> str | None:
    """The last "Answer: X" (X in A-D) in `final_text`, else the last "answer is X", else None."""
    hits = MC_ANSWER_RE.findall(final_text or "")
    if not hits:
        hits = MC_FALLBACK_RE.findall(final_text or "")
    return hits[-1] if hits else None


def extract_code(final_text: str, prefer: tuple[str, ...] = ("python", "py", "python3")) -> str:
    """The last fenced code block (python-tagged blocks win over untagged/other ones).

    With no closed fence: the text after an unclosed "```python" line, else the whole text
    (models sometimes answer with bare code).
    """
    text = final_text or ""
    blocks = CODE_BLOCK_RE.findall(text)
    tagged = [body for lang, body in blocks if lang.lower() in prefer]
    untagged = [body for lang, body in blocks if not lang]
    for group in (tagged, untagged, [b for _, b in blocks]):
        if group:
            return group[-1].rstrip() + "\n"
    m = re.search(r"```[ \t]*(?:python3?|py)?[ \t]*\n", text)
    if m:
        return text[m.end():].rstrip() + "\n"
    return text.strip() + "\n" if text.strip() else ""
