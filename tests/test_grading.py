"""Grading: a hand-written table of (response or answer, reference, expected) cases.

Every extraction rule and every equivalence kind has cases that must pass *and* lookalikes that
must fail, so a grader that says "yes" to everything (or "no") fails this file.
"""

from __future__ import annotations

import threading

import pytest

from dcd_jax.eval.grading import (
    GradeResult,
    extract_answer,
    extract_boxed,
    grade,
    is_equivalent,
    normalize_answer,
)

# ---------------------------------------------------------------------------------------------
# Extraction: (response, expected extracted answer)
# ---------------------------------------------------------------------------------------------
EXTRACTION_CASES = [
    # boxed, nesting, last one wins
    (r"So the result is \boxed{42}.", "42"),
    (r"We get $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
    (r"First \boxed{3}, but wait, correcting: \boxed{5}", "5"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"The set is \fbox{7}", "7"),
    (r"Therefore \boxed 9 is the answer", "9"),
    (r"\boxed{\text{(B)}}", r"\text{(B)}"),
    (r"Put it in \boxed{} like this: \boxed{12}", "12"),
    # an unclosed (truncated) box is skipped; an earlier complete one is used
    (r"Maybe \boxed{4}. Actually \boxed{\frac{1}{", "4"),
    # boxed beats the other rules
    ("The answer is 3. Final: \\boxed{4}", "4"),
    ("#### 10\n\\boxed{11}", "11"),
    # GSM8K ####
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("#### 1,234", "1,234"),
    ("#### $18", "18"),
    ("Step 1...\n#### -5\n", "-5"),
    # "the answer is"
    ("So the answer is 12.", "12"),
    ("THE ANSWER IS 3.5.", "3.5"),
    ("The answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
    ("Thus the final answer is **17**", "17"),
    ("Final answer: 8", "8"),
    ("The final answer is:\n\n$42$", "42"),
    ("I think the answer is 4. Wait, no. The answer is 6. I am confident.", "6"),
    ("The answer is \\(x^2\\).", "x^2"),
    ("The answer is 5 cm.", "5 cm"),
    ("Reasoning...\nThe answer is 1024.", "1024"),  # the embedded synthetic task's format
    ("7 - 19 = -12. The answer is -12.", "-12"),
    # nothing extractable
    ("I have no idea.", None),
    ("", None),
    ("Let me compute 3 + 4 = 7", None),
]


@pytest.mark.parametrize("response,expected", EXTRACTION_CASES)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_last_number_fallback_is_opt_in():
    text = "Let me compute 3 + 4 = 7, then times 2 gives 14"
    assert extract_answer(text) is None
    assert extract_answer(text, last_number_fallback=True) == "14"
    assert extract_answer("total 1,250", last_number_fallback=True) == "1,250"
    # fallback never overrides an explicit answer
    assert extract_answer("The answer is 3. Other numbers: 9", last_number_fallback=True) == "3"


def test_extract_boxed_edge_cases():
    assert extract_boxed(r"\boxed{}") is None
    assert extract_boxed(r"\boxed{1") is None
    assert extract_boxed(r"\boxedfoo{1}") is None
    assert extract_boxed(r"\boxed{a{b{c}}d}") == "a{b{c}}d"


# ---------------------------------------------------------------------------------------------
# Equivalence: (extracted answer, reference, expected)
# ---------------------------------------------------------------------------------------------
EQUIVALENCE_CASES = [
    # plain integers, negatives, thousands separators
    ("42", "42", True),
    ("-3", "-3", True),
    ("-3", "3", False),
    ("1,234", "1234", True),
    (r"1\,000", "1000", True),
    ("1{,}000", "1000", True),
    ("1.234", "1,234", False),
    ("10.0", "10", True),
    ("12", "1.2", False),
    # fractions, \frac / \dfrac / \tfrac, decimals vs fractions
    ("1/2", r"\frac{1}{2}", True),
    ("0.5", r"\frac12", True),
    (r"\dfrac{3}{4}", "0.75", True),
    (r"\tfrac{1}{4}", "0.25", True),
    (r"\frac{9}{2}", "4.5", True),
    (r"\frac{2}{4}", r"\frac{1}{2}", True),
    (r"-\frac{1}{2}", "-0.5", True),
    (r"\frac{2}{1}", r"\frac{1}{2}", False),
    ("-1/2", "1/2", False),
    ("1/3", "0.33", False),
    ("0.5", "5", False),
    # radicals, pi, expressions
    (r"\sqrt{2}/2", r"\frac{\sqrt2}{2}", True),
    (r"2\sqrt{3}", r"\sqrt{12}", True),
    (r"\sqrt{2}", "2", False),
    (r"\pi", "3.14159", False),
    ("2x+1", "1+2x", True),
    ("2x+1", "2x-1", False),
    ("x^2", "2x", False),
    ("y=2x+3", "2x+3", True),
    ("x=5", "5", True),
    # percentages
    (r"50\%", "50", True),
    ("50%", "50", True),
    (r"50\%", "0.5", True),
    (r"12\%", "13", False),
    # units, currency, degrees, text
    ("5 cm", "5", True),
    (r"5\text{ cm}", "5", True),
    ("5", r"5\text{ cm}", True),
    (r"4\text{ dollars}", "4", True),
    (r"\$18.90", "18.9", True),
    (r"90^\circ", "90", True),
    ("3 cm", "30 mm", False),
    (r"\text{Evelyn}", "Evelyn", True),
    ("Evelyn", "Alice", False),
    (r"\text{(C)}", "C", True),
    ("C", "B", False),
    # intervals
    ("[1,3)", "[1,3)", True),
    ("[1, 2]", "[1,2]", True),
    ("(-1, 1)", "(-1,1)", True),
    (r"(-\infty, 2]", r"x \le 2", True),
    ("(1,3]", "[1,3)", False),
    ("(1,2)", "(1,2]", False),
    # sets and tuples
    (r"\{1,2\}", r"\{2,1\}", True),
    (r"\{1,2\}", r"\{1,2,3\}", False),
    ("2,3", "3,2", True),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})", True),
    ("(1,2)", "(2,1)", False),
    # matrices / infinity
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}", True),
    (r"\infty", r"\infty", True),
    # degenerate inputs
    ("", "5", False),
    (None, "5", False),
]


@pytest.mark.parametrize("pred,gold,expected", EQUIVALENCE_CASES)
def test_is_equivalent(pred, gold, expected):
    assert is_equivalent(pred, gold) is expected


# ---------------------------------------------------------------------------------------------
# End to end: (full response, reference, expected correct)
# ---------------------------------------------------------------------------------------------
GRADE_CASES = [
    (r"... so $x = \boxed{\dfrac{3}{4}}$", "0.75", True),
    (r"... hence \boxed{\left[ 1, 3 \right)}", "[1,3)", True),
    ("Janet earns 9 * 2 = 18 dollars.\n#### 18", "18", True),
    ("Janet earns 9 * 2 = 18 dollars.\n#### 19", "18", False),
    ("The answer is 2,500.", "2500", True),
    ("The answer is $-7$.", "-7", True),
    ("The answer is 7.", "-7", False),
    ("Compute: 6 * 7 = 42. The answer is 42.", "42", True),  # the synthetic task's trace shape
    (r"I get \boxed{50\%}", "50", True),
    ("No final answer here, just 42", "42", False),
]


@pytest.mark.parametrize("response,gold,expected", GRADE_CASES)
def test_grade(response, gold, expected):
    res = grade(response, gold)
    assert isinstance(res, GradeResult)
    assert res.correct is expected


def test_total_hand_written_cases_at_least_60():
    assert len(EXTRACTION_CASES) + len(EQUIVALENCE_CASES) + len(GRADE_CASES) >= 60
    assert len(EQUIVALENCE_CASES) >= 40


def test_grade_format_flags():
    ok = grade(r"\boxed{3}", "3")
    assert ok == GradeResult(extracted="3", correct=True, format_ok=True)
    bad = grade("no answer", "3")
    assert bad == GradeResult(extracted=None, correct=False, format_ok=False)
    assert grade("no answer but 3", "3", last_number_fallback=True).correct
    assert bad.to_dict() == {"extracted": None, "correct": False, "format_ok": False}


def test_normalize_answer():
    assert normalize_answer(r"$\dfrac{1}{2}$.") == r"\frac{1}{2}"
    assert normalize_answer(r"\text{ Evelyn }") == "evelyn"
    assert normalize_answer("1,234,567") == "1234567"
    assert normalize_answer("(1,234)") == "(1,234)"  # a tuple, not a thousands separator
    assert normalize_answer(r"\left(1, 2\right)") == "(1,2)"


def test_overlong_answer_skips_symbolic_check():
    long = "1+" * 600 + "1"
    assert not is_equivalent(long, "601")
    assert is_equivalent(long, long)  # exact match still applies


def test_timeout_is_safe():
    # sympy would try to build 10**(10**10); the timeout makes it a (fast) "no".
    assert is_equivalent(r"10^{10^{10}}", "5", timeout_seconds=1) is False


def test_equivalence_from_worker_thread():
    """signal.alarm only works in the main thread: the wrapper must disable it, not crash."""
    out = {}

    def work():
        out["a"] = is_equivalent(r"\frac{1}{2}", "0.5")
        out["b"] = is_equivalent("3", "4")

    t = threading.Thread(target=work)
    t.start()
    t.join(timeout=60)
    assert out == {"a": True, "b": False}


def test_math_verify_exception_falls_back_to_exact_match(monkeypatch):
    import math_verify

    def boom(*a, **k):
        raise RuntimeError("broken parser")

    from dcd_jax.eval import grading

    grading._mv_parse.cache_clear()
    monkeypatch.setattr(math_verify, "parse", boom)
    try:
        assert is_equivalent("7", "7")  # exact match still works
        assert is_equivalent(r"\text{7}", "7")
        assert not is_equivalent("0.5", r"\frac{1}{2}")  # needs math-verify: now a safe "no"
    finally:
        grading._mv_parse.cache_clear()
