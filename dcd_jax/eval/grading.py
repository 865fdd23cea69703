"""Answer extraction and equivalence for math benchmarks.

Two separate steps, because they fail in different ways and we want to count both:

1. :func:`extract_answer` finds *where* the model put its final answer (a ``\\boxed{}``, a GSM8K
   ``#### N`` line, or a sentence "the answer is X").  A response with no extractable answer is a
   *format failure*, reported on its own by the trace-stability metrics: a distilled student that
   forgets to box its answer is a different problem from one that computes the wrong number.
2. :func:`is_equivalent` decides whether the extracted string means the same as the gold answer:
   first a cheap normalized string comparison (which also covers non-math answers such as names),
   then math-verify's symbolic comparison (fractions vs decimals, LaTeX, units, percentages,
   intervals, sets, tuples).  math-verify is wrapped so that an exception, a pathological input
   that would hang sympy, or a call from a worker thread (where its ``signal.alarm`` timeout does
   not work) can never crash or stall an evaluation run; such cases fall back to the exact match.

:func:`grade` combines both into a :class:`GradeResult`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import threading
from typing import Any

__all__ = [
    "GradeResult",
    "extract_answer",
    "extract_boxed",
    "normalize_answer",
    "is_equivalent",
    "grade",
]

logger = logging.getLogger(__name__)

# Default per-call budget (seconds) for math-verify's parse and verify.  Real answers take
# milliseconds; only adversarial inputs such as 10^{10^{10}} ever get near it.
DEFAULT_TIMEOUT_SECONDS = 3
# Longer "answers" (a whole paragraph put in a box) are compared by exact match only: no real
# final answer is that long, and sympy can spend its full timeout on each of them.
MAX_SYMBOLIC_CHARS = 1000


@dataclasses.dataclass(frozen=True)
class GradeResult:
    """Outcome of grading one response.

    Attributes:
        extracted: the final answer found in the response, or ``None``.
        correct: whether ``extracted`` is equivalent to the gold answer.
        format_ok: whether an answer could be extracted at all (``extracted is not None``).
    """

    extracted: str | None
    correct: bool
    format_ok: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_GSM8K_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS_RE = re.compile(
    r"(?:\bthe\s+)?(?:\bfinal\s+)?\banswer\s*(?:is\b\s*:?|:)[ \t]*", re.IGNORECASE
)
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _balanced_group(text: str, open_pos: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_pos``, or ``None`` if it is never closed.

    Escaped braces (``\\{``, ``\\}``, as in ``\\boxed{\\{1,2\\}}``) do not count.
    """
    depth = 0
    i = open_pos
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last complete, non-empty ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``.

    Braces may nest (``\\boxed{\\frac{1}{2}}``).  An unclosed box (a generation truncated inside
    its answer) and an empty ``\\boxed{}`` (the instruction echoed back) are skipped, so the last
    *usable* box wins.  The brace-less form ``\\boxed 5`` is accepted too.
    """
    best: str | None = None
    for m in _BOXED_RE.finditer(text):
        j = m.end()
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            close = _balanced_group(text, j)
            if close is None:
                continue
            content = text[j + 1 : close].strip()
        elif j > m.end():  # "\boxed 5": a single token after whitespace
            tok = re.match(r"[^\s$]+", text[j:])
            content = tok.group(0) if tok else ""
        else:
            continue
        if content:
            best = content
    return best


def _strip_wrappers(ans: str) -> str:
    """Remove markdown bold, math delimiters and trailing punctuation around a short answer."""
    prev = None
    ans = ans.strip()
    while prev != ans:
        prev = ans
        ans = ans.strip().strip("*").strip()
        ans = ans.rstrip(".").rstrip()
        for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
            if ans.startswith(left) and ans.endswith(right):
                ans = ans[len(left) : -len(right)]
        if ans.startswith("$") or ans.endswith("$"):
            ans = ans.strip("$")
    return ans.strip()


def _cut_sentence(rest: str) -> str:
    """Keep the answer part of "the answer is X. More text": cut at the first sentence end.

    A period only ends the sentence when followed by whitespace or the end of the text, so
    decimals ("3.5") survive.  A period inside ``$...$`` math does not count either.
    """
    in_math = False
    i = 0
    while i < len(rest):
        ch = rest[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "$":
            in_math = not in_math
        elif ch == "." and not in_math and (i + 1 == len(rest) or rest[i + 1].isspace()):
            return rest[:i]
        i += 1
    return rest


def extract_answer(text: str | None, *, last_number_fallback: bool = False) -> str | None:
    """Find the final answer in a model response.

    Rules, in priority order (the first that matches wins):

    1. the last complete ``\\boxed{...}`` or ``\\fbox{...}`` (balanced nested braces);
    2. the last GSM8K-style ``#### N`` line;
    3. the last "the answer is X" / "final answer: X" (case-insensitive), cut at the end of the
       sentence, with ``$``/``\\(``/markdown wrappers and the trailing period removed.  This is
       also the rule that reads the embedded synthetic task, whose traces end "The answer is N.";
    4. only if ``last_number_fallback`` is set: the last number in the text.  Off by default,
       because it turns any unfinished or rambling response into a guess and hides format
       failures that the stability metrics are meant to count.

    Returns ``None`` when nothing matches (a format failure).
    """
    if not text:
        return None
    boxed = extract_boxed(text)
    if boxed:
        return boxed

    matches = list(_GSM8K_RE.finditer(text))
    for m in reversed(matches):
        ans = _strip_wrappers(m.group(1))
        if ans:
            return ans

    for m in reversed(list(_ANSWER_IS_RE.finditer(text))):
        rest = text[m.end() :]
        line = rest.split("\n", 1)[0]
        if not line.strip():  # "The final answer is:\n\n42"
            line = rest.lstrip().split("\n", 1)[0]
        rest = line
        ans = _strip_wrappers(_cut_sentence(rest))
        if ans:
            return ans

    if last_number_fallback:
        nums = _NUMBER_RE.findall(text)
        if nums:
            return nums[-1].rstrip(",")
    return None


# --------------------------------------------------------------------------------------------
# Normalization (exact-match fallback)
# --------------------------------------------------------------------------------------------

_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_THOUSANDS_RE = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def normalize_answer(ans: str) -> str:
    """Canonical string form of an answer for the exact-match comparison.

    Removes what never changes the meaning of a final answer: math delimiters, ``\\left``/
    ``\\right``, LaTeX spacing, ``\\text{}``-style wrappers, ``\\dfrac``/``\\tfrac`` spellings,
    degree signs, percent signs, ``\\$``, thousands separators in plain numbers, a trailing period,
    whitespace and letter case.  Deliberately conservative: anything subtler (``0.5`` vs ``1/2``)
    is math-verify's job.
    """
    s = _strip_wrappers(str(ans))
    s = s.replace("\\left", "").replace("\\right", "")
    s = re.sub(r"(\d)\\[,;:!]\s*(?=\d)", r"\1", s)  # 1\,000 -> 1000
    s = s.replace("{,}", "")
    s = re.sub(r"\\[,;:! ]", " ", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    prev = None
    while prev != s:
        prev = s
        s = _TEXT_CMD_RE.sub(r"\1", s)
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "")
    s = s.strip().rstrip(".")
    if _THOUSANDS_RE.match(s.replace(" ", "")):
        s = s.replace(",", "")
    s = re.sub(r"\s+", "", s)
    return s.lower()


# --------------------------------------------------------------------------------------------
# Equivalence
# --------------------------------------------------------------------------------------------


def _timeout_for_this_thread(timeout_seconds: int | None) -> int | None:
    """math-verify's timeout uses ``signal.alarm``, which only works in the main thread.

    From any other thread we must disable it (or math-verify raises); the exception guard still
    applies, only a genuinely hanging sympy call could then block that worker.
    """
    if timeout_seconds is None or timeout_seconds <= 0:
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    return int(max(1, round(timeout_seconds)))


@functools.lru_cache(maxsize=8192)
def _mv_parse(ans: str, timeout_seconds: int | None) -> tuple:
    from math_verify import parse

    # Wrapping in \boxed{} makes math-verify treat the whole string as one LaTeX answer; bare
    # strings only get its plain-expression regexes (no intervals, sets or \frac).
    return tuple(parse("\\boxed{" + ans + "}", parsing_timeout=timeout_seconds))


def _mv_equivalent(pred: str, gold: str, timeout_seconds: int | None) -> bool | None:
    """math-verify verdict, or ``None`` when it could not decide (error, timeout, unparsable)."""
    try:
        from math_verify import verify
        from math_verify.errors import TimeoutException
    except ImportError:  # pragma: no cover - math-verify is a core dependency
        logger.warning("math-verify is not installed; falling back to exact match")
        return None
    try:
        gold_parsed = list(_mv_parse(gold, timeout_seconds))
        pred_parsed = list(_mv_parse(pred, timeout_seconds))
        if not gold_parsed or not pred_parsed:
            return None
        # verify() is asymmetric: gold first.
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_seconds))
    except (Exception, TimeoutException):  # noqa: BLE001 - a grader must never crash a run
        logger.debug("math-verify failed on pred=%r gold=%r", pred[:200], gold[:200], exc_info=True)
        return None


_PLAIN_INT_RE = re.compile(r"[+-]?(?:\d+|\d{1,3}(?:,\d{3})+)")


def _plain_int(s: str) -> int | None:
    """The integer spelled by ``s`` ("42", "-7", "1,234", "024"), or None for anything else."""
    s = s.strip()
    if not _PLAIN_INT_RE.fullmatch(s):
        return None
    return int(s.replace(",", ""))


def is_equivalent(
    pred: str | None, gold: str | None, *, timeout_seconds: int | None = DEFAULT_TIMEOUT_SECONDS
) -> bool:
    """Whether the predicted answer means the same as the gold answer.

    Normalized exact match first (fast, and the only check for non-math answers), then
    math-verify ``verify(parse(gold), parse(pred))``.  Never raises: errors and timeouts count
    as "not equivalent" unless the exact match already succeeded.
    """
    if pred is None or gold is None:
        return False
    # "$\frac12$" in a gold column (Omni-MATH) or "\(x\)" in a response mean the bare content.
    pred, gold = _strip_wrappers(str(pred)), _strip_wrappers(str(gold))
    if not pred or not gold:
        return False
    if normalize_answer(pred) == normalize_answer(gold):
        return True
    # Fast path for the most common case (GSM8K, AIME, AMC, the synthetic task): two plain
    # integers are decided exactly, without the ~10 ms of a sympy round trip.
    p_int, g_int = _plain_int(pred), _plain_int(gold)
    if p_int is not None and g_int is not None:
        return p_int == g_int
    if len(pred) > MAX_SYMBOLIC_CHARS or len(gold) > MAX_SYMBOLIC_CHARS:
        return False
    verdict = _mv_equivalent(pred, gold, _timeout_for_this_thread(timeout_seconds))
    return bool(verdict)


def grade(
    response: str | None,
    gold: str,
    *,
    last_number_fallback: bool = False,
    timeout_seconds: int | None = DEFAULT_TIMEOUT_SECONDS,
) -> GradeResult:
    """Extract the answer from ``response`` and compare it with ``gold``."""
    extracted = extract_answer(response, last_number_fallback=last_number_fallback)
    correct = extracted is not None and is_equivalent(extracted, gold, timeout_seconds=timeout_seconds)
    return GradeResult(extracted=extracted, correct=correct, format_ok=extracted is not None)
