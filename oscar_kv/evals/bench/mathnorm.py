"""Final-answer extraction and equivalence for AIME25 / MATH-500.

Extraction (from the post-thinking final text only): the last `\\boxed{...}` / `\\fbox{...}`
(balanced braces), else the last "Answer: ..." line, else the last "final answer is ...".

Equivalence: `math-verify` (parse + verify) when it is importable; otherwise the built-in
normalizer below, which is exact for what these two sets mostly need:
- integers (AIME: 0-999; leading zeros and thousands separators allowed), decimals,
  `a/b`, `\\frac{a}{b}` / `\\dfrac` / `\\tfrac` / `\\frac12`, with a leading sign: compared as
  exact fractions;
- simple LaTeX otherwise: `$`, `\\left`/`\\right`, spacing commands, `\\text{..}`/`\\mathrm{..}`
  wrappers, degree signs, `\\%`, a trailing period, a leading `x =` and all whitespace are
  removed, then strings are compared;
- tuples / intervals / lists with the same brackets are compared element-wise.
Anything else (e.g. `\\sqrt{2}/2` vs `\\frac{\\sqrt{2}}{2}`) counts as different: install
`math-verify` for symbolic equivalence.
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOX_CMDS = ("\\boxed", "\\fbox")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}, or `\\boxed 5`) in `text`."""
    best = None
    for cmd in _BOX_CMDS:
        i = text.rfind(cmd)
        if i >= 0 and (best is None or i > best[0]):
            best = (i, cmd)
    if best is None:
        return None
    j = best[0] + len(best[1])
    rest = text[j:]
    if rest.startswith(" ") and not rest.lstrip().startswith("{"):
        m = re.match(r"\s*([^\s$]+)", rest)
        return m.group(1) if m else None
    j = text.find("{", j)
    if j < 0:
        return None
    depth = 0
    for k in range(j, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1:k]
    return None  # unbalanced: truncated output


_ANSWER_LINE_RE = re.compile(r"(?i:answer)\s*:\s*(.+)")
_FINAL_IS_RE = re.compile(r"(?i:final answer is)\s*:?\s*(.+)")


def extract_math_answer(final_text: str) -> str | None:
    """The candidate answer string from the final text, or None when there is none."""
    text = final_text or ""
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    for rx in (_ANSWER_LINE_RE, _FINAL_IS_RE):
        hits = rx.findall(text)
        if hits:
            ans = hits[-1].strip().strip("*").strip()
            return ans.rstrip(".").strip("$ ") or None
    return None


def _strip_wrappers(s: str) -> str:
    for cmd in ("\\text", "\\mathrm", "\\mathbf", "\\textbf", "\\mbox", "\\boxed"):
        while True:
            i = s.find(cmd + "{")
            if i < 0:
                break
            depth, k = 0, i + len(cmd)
            for k in range(i + len(cmd), len(s)):
                depth += {"{": 1, "}": -1}.get(s[k], 0)
                if depth == 0:
                    break
            s = s[:i] + s[i + len(cmd) + 1:k] + s[k + 1:]
    return s


def normalize_answer(ans: str) -> str:
    """Canonical string form of a simple LaTeX answer (see the module docstring)."""
    s = ans.strip()
    s = _strip_wrappers(s)
    for a, b in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""),
                 ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""), ("\\ ", ""),
                 ("^{\\circ}", ""), ("^\\circ", ""), ("\\circ", ""), ("\\%", ""), ("%", ""),
                 ("$", ""), ("\\displaystyle", "")):
        s = s.replace(a, b)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"(?i)(degrees?|units?)$", "", s)
    s = s.rstrip(".")
    s = re.sub(r"^[a-zA-Z]=(?!=)", "", s)
    return s


_NUM_RE = re.compile(r"^[+-]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?$|^[+-]?\.\d+$")
_FRAC_RE = re.compile(r"^([+-]?)\\frac\{([^{}]+)\}\{([^{}]+)\}$")


def to_number(s: str) -> Fraction | None:
    """Exact value of a normalized integer/decimal/fraction string, else None."""
    if _NUM_RE.match(s):
        return Fraction(s.replace(",", ""))
    m = _FRAC_RE.match(s)
    if m:
        num, den = to_number(m.group(2)), to_number(m.group(3))
        if num is not None and den not in (None, 0):
            return (-1 if m.group(1) == "-" else 1) * num / den
        return None
    if s.count("/") == 1:
        a, b = s.split("/")
        num, den = to_number(a), to_number(b)
        if num is not None and den not in (None, 0):
            return num / den
    return None


def _split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def builtin_equiv(pred: str, gold: str) -> bool:
    """Equivalence by the built-in normalizer (no sympy)."""
    a, b = normalize_answer(pred), normalize_answer(gold)
    if not a or not b:
        return False
    if a == b:
        return True
    na, nb = to_number(a), to_number(b)
    if na is not None and nb is not None:
        return na == nb
    if a[:1] + a[-1:] == b[:1] + b[-1:] and a[:1] in "([{" and len(a) > 2 and len(b) > 2:
        pa, pb = _split_top(a[1:-1]), _split_top(b[1:-1])
        return len(pa) > 1 and len(pa) == len(pb) and all(
            builtin_equiv(x, y) for x, y in zip(pa, pb, strict=False))
    pa, pb = _split_top(a), _split_top(b)
    if len(pa) > 1 and len(pa) == len(pb) and not (na is not None or nb is not None):
        return all(builtin_equiv(x, y) for x, y in zip(pa, pb, strict=False))
    return False


def math_verify_available() -> bool:
    """True when the optional `math-verify` package can be imported."""
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return False
    return True


def answers_match(pred: str | None, gold: str, use_math_verify: bool = True) -> bool:
    """Is the extracted `pred` equivalent to `gold`? math-verify first if present."""
    if pred is None or not pred.strip():
        return False
    if use_math_verify and math_verify_available():
        import math_verify

        try:
            # timeouts rely on signals, which only work on the main thread; scoring runs in workers
            g = math_verify.parse(f"${gold}$", parsing_timeout=None)
            p = math_verify.parse(f"${pred}$", parsing_timeout=None)
            if g and p and math_verify.verify(g, p, timeout_seconds=None):
                return True
        except Exception:  # noqa: BLE001 - a parser crash must not kill the run
            pass
    return builtin_equiv(pred, gold)
