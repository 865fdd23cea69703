"""IFEval-style check: built-in prompts scored with lm-eval's checkers on hand-written responses."""

from __future__ import annotations

import json
import sys

import pytest

from dcd_jax.eval import ifeval
from dcd_jax.eval.ifeval import IFEVAL_INSTALL_HINT, NLTK_DATA_INSTRUCTIONS, ifeval_prompts, score_ifeval

pytest.importorskip("lm_eval", reason="optional dependency: pip install 'dcd-jax[ifeval]'")

_END = "Is there anything else I can help with?"
_LONG = " ".join(["Proofs turn a pattern that seems true into knowledge that is certain."] * 14)

# One (following, violating) response pair per built-in prompt, in order.
RESPONSES = [
    ("a prime number is a number bigger than one that only divides by one and itself.",
     "A prime number is a number bigger than one."),
    ("A VARIABLE IS A LETTER THAT STANDS FOR A NUMBER WE DO NOT KNOW YET.",
     "A variable is a letter standing for a number."),
    ("In a right triangle the square of the hypotenuse equals the sum of the squares of the legs.",
     _LONG),
    (_LONG, "Proofs give certainty."),
    ("* Estimate first.\n* Redo the sum backwards.\n* Check units.\n* Compare with the estimate.",
     "* Estimate first.\n* Check units.\n* Compare with the estimate."),
    ("Zero began as a placeholder.\n***\nIndian mathematicians made it a number.\n***\nIt reached Europe later.",
     "Zero began as a placeholder.\n***\nIt reached Europe later."),
    ("Square the radius and multiply by pi.", "Take the radius, square it, and multiply by pi."),
    ("Divide, multiply, subtract and bring down the next digit.", "Long division is easy: divide and repeat."),
    ("The denominator counts the parts of a whole. A bigger denominator means smaller parts. "
     "The denominator is never zero.",
     "The denominator counts the parts of a whole."),
    ('```json\n{"a": 3, "b": 4, "c": 5, "right_angled": true}\n```', "a=3, b=4, c=5, right angled."),
    ("<<Angles>>\nLines meet and angles bloom.", "Angles\nLines meet and angles bloom."),
    ("Two even numbers are 2a and 2b, and their sum 2(a+b) is even. " + _END,
     _END + " Two even numbers sum to an even number."),
    ('"A negative times a negative is a positive."', "A negative times a negative is a positive."),
    ("Well done on the exam!\nP.S. Keep practising fractions.", "Well done on the exam!"),
    ("First do *parentheses*, then *exponents*, then the rest.", "First do parentheses, then *exponents*."),
    ("Name: [name]\nClass: [class]\nDate: [date]", "Name: [name]\nClass: ____"),
    ("SECTION 1\nLinear equations.\nSECTION 2\nQuadratics.\nSECTION 3\nReview.",
     "SECTION 1\nLinear equations.\nSECTION 2\nQuadratics."),
    ("Describe how to add two fractions. Use a common denominator, then add the numerators.",
     "Use a common denominator, then add the numerators."),
    ("the median is the middle value of a sorted list.", "The median is the middle value of a sorted list."),
    ("Zeros: zero, zeta, zigzag, and a zone.", "A root of a function."),
]


def test_builtin_prompts_schema():
    prompts = ifeval_prompts()
    assert 10 <= len(prompts) <= 25 and len(prompts) == len(RESPONSES)
    assert len({p["key"] for p in prompts}) == len(prompts)
    kinds = set()
    for p in prompts:
        assert set(p) == {"key", "prompt", "instruction_id_list", "kwargs"}
        assert len(p["kwargs"]) == len(p["instruction_id_list"])
        kinds.update(p["instruction_id_list"])
    assert not kinds & NLTK_DATA_INSTRUCTIONS  # the built-in set never needs NLTK downloads
    assert len(kinds) >= 15
    json.dumps(prompts)
    prompts[0]["prompt"] = "mutated"
    assert ifeval_prompts()[0]["prompt"] != "mutated"  # a fresh copy each time
    assert kinds <= ifeval.available_instructions()


def test_following_responses_score_one_and_violations_zero():
    prompts = ifeval_prompts()
    good = score_ifeval(prompts, [g for g, _ in RESPONSES])
    failing = [d["key"] for d in good["details"] if not all(d["follow_strict"])]
    assert failing == []
    assert good["prompt_level_strict"] == 1.0 and good["instruction_level_strict"] == 1.0
    assert good["prompt_level_loose"] == 1.0
    assert good["n_prompts"] == len(prompts) and good["skipped_instructions"] == {}

    bad = score_ifeval(prompts, [b for _, b in RESPONSES])
    passing = [d["key"] for d in bad["details"] if all(d["follow_strict"])]
    assert passing == []
    assert bad["prompt_level_strict"] == 0.0
    assert set(bad["per_instruction"]) == set(good["per_instruction"])


def test_mixed_scores_and_instruction_level():
    prompts = ifeval_prompts()
    # prompt with two instructions (median one): satisfy only the word limit
    idx = next(i for i, p in enumerate(prompts) if len(p["instruction_id_list"]) == 2 and "median" in p["prompt"])
    res = score_ifeval([prompts[idx]], ["The median is the middle value."])
    assert res["prompt_level_strict"] == 0.0
    assert res["instruction_level_strict"] == 0.5
    assert res["details"][0]["follow_strict"] == [True, False]
    # loose accepts a response whose first line is chatter
    q = next(p for p in prompts if p["instruction_id_list"] == ["startend:quotation"])
    loose = score_ifeval([q], ['Sure!\n"A negative times a negative is a positive."'])
    assert loose["prompt_level_strict"] == 0.0 and loose["prompt_level_loose"] == 1.0
    empty = score_ifeval([q], [""])
    assert empty["prompt_level_loose"] == 0.0


def test_errors_and_nltk_skips(monkeypatch):
    prompts = ifeval_prompts()
    with pytest.raises(ValueError):
        score_ifeval(prompts, ["x"])
    with pytest.raises(ValueError, match="unknown IFEval instruction"):
        score_ifeval([{"prompt": "p", "instruction_id_list": ["nope:nope"], "kwargs": [{}]}], ["x"])
    # Pretend NLTK data is missing for sentence counting: that instruction is skipped, not failed.
    monkeypatch.setattr(ifeval, "_NLTK_PROBES", {"length_constraints:number_sentences"})
    p = {
        "key": 1,
        "prompt": "Answer in fewer than 3 sentences and at least 2 words.",
        "instruction_id_list": ["length_constraints:number_sentences", "length_constraints:number_words"],
        "kwargs": [{"num_sentences": 3, "relation": "less than"}, {"num_words": 2, "relation": "at least"}],
    }
    only = {"key": 2, "prompt": "x", "instruction_id_list": ["length_constraints:number_sentences"],
            "kwargs": [{"num_sentences": 3, "relation": "less than"}]}
    with pytest.warns(UserWarning, match="punkt"):
        res = score_ifeval([p, only], ["Two words.", "One."])
    assert res["skipped_instructions"] == {"length_constraints:number_sentences": 2}
    assert res["n_prompts"] == 1 and res["n_instructions"] == 1 and res["prompt_level_strict"] == 1.0


def test_missing_lm_eval_gives_install_hint(monkeypatch):
    monkeypatch.setattr(ifeval, "_LM_EVAL", None)
    for mod in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval...` raise ImportError
    with pytest.raises(ImportError, match=r"dcd-jax\[ifeval\]"):
        score_ifeval(ifeval_prompts()[:1], ["x"])
    assert "pip install" in IFEVAL_INSTALL_HINT
