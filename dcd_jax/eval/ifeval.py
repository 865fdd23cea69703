"""A small IFEval-style instruction-following check.

Distilling long math traces into a small model can erode its general instruction following
("answer in under 60 words", "use exactly 4 bullet points").  This module gives a cheap,
deterministic regression check: a built-in set of ~20 prompts with verifiable instructions, in
the schema of the IFEval dataset (Zhou et al., 2023: ``key``, ``prompt``, ``instruction_id_list``,
``kwargs``), scored with the reference checkers shipped in lm-eval
(``lm_eval.tasks.ifeval``).  We deliberately do not re-implement any checker: lm-eval's are
the de-facto standard and their quirks are what published IFEval numbers include.

lm-eval is an optional dependency (``pip install 'dcd-jax[ifeval]'``) imported lazily.

NLTK data: lm-eval's ``instructions_util`` tries to *download* the ``punkt_tab`` tokenizer when
imported.  At evaluation time there may be no network, so when the data is not installed we
import it with that download disabled (set ``DCD_IFEVAL_ALLOW_NLTK_DOWNLOAD=1`` to let it try).
Only two instruction types actually need the data (``length_constraints:number_sentences`` and
``change_case:capital_word_frequency``); the built-in set avoids both, and if user-supplied
prompts use them without the data installed they are skipped with a warning and reported under
``skipped_instructions`` instead of crashing or silently scoring as failures.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from collections import defaultdict
from typing import Any, Mapping, Sequence

__all__ = [
    "IFEVAL_INSTALL_HINT",
    "NLTK_DATA_INSTRUCTIONS",
    "ifeval_prompts",
    "score_ifeval",
    "available_instructions",
]

IFEVAL_INSTALL_HINT = (
    "IFEval scoring reuses lm-eval's instruction checkers, which are not installed. "
    "Install them with: pip install 'dcd-jax[ifeval]'  "
    "(i.e. lm-eval>=0.4.9,<0.5 langdetect nltk>=3.9.1 immutabledict)"
)

#: Instruction ids whose lm-eval checker needs downloadable NLTK data (punkt).
NLTK_DATA_INSTRUCTIONS = frozenset({"length_constraints:number_sentences", "change_case:capital_word_frequency"})

_END_PHRASE = "Is there anything else I can help with?"

_BUILTIN: list[dict[str, Any]] = [
    {
        "prompt": "Explain what a prime number is to a ten-year-old. Your entire response should be in "
        "English, and in all lowercase letters. No capital letters are allowed.",
        "instruction_id_list": ["change_case:english_lowercase"],
        "kwargs": [{}],
    },
    {
        "prompt": "Explain what a variable is in algebra. Your entire response should be in English, "
        "and in all capital letters.",
        "instruction_id_list": ["change_case:english_capital"],
        "kwargs": [{}],
    },
    {
        "prompt": "Describe the Pythagorean theorem in fewer than 60 words.",
        "instruction_id_list": ["length_constraints:number_words"],
        "kwargs": [{"num_words": 60, "relation": "less than"}],
    },
    {
        "prompt": "Write a short essay on why proofs matter in mathematics. Answer with at least 150 words.",
        "instruction_id_list": ["length_constraints:number_words"],
        "kwargs": [{"num_words": 150, "relation": "at least"}],
    },
    {
        "prompt": "Give tips for catching arithmetic mistakes. Your answer must contain exactly 4 bullet "
        "points. Use the markdown bullet points such as:\n* This is point 1.\n* This is point 2",
        "instruction_id_list": ["detectable_format:number_bullet_lists"],
        "kwargs": [{"num_bullets": 4}],
    },
    {
        "prompt": "Write about the history of the number zero. There should be 3 paragraphs. Paragraphs "
        "are separated with the markdown divider: ***",
        "instruction_id_list": ["length_constraints:number_paragraphs"],
        "kwargs": [{"num_paragraphs": 3}],
    },
    {
        "prompt": "Explain how to compute the area of a circle. Include the keywords 'radius' and "
        "'square' in the response, and do not use any commas.",
        "instruction_id_list": ["keywords:existence", "punctuation:no_comma"],
        "kwargs": [{"keywords": ["radius", "square"]}, {}],
    },
    {
        "prompt": "Describe how long division works. Do not include the words 'easy' or 'simple' in "
        "the response.",
        "instruction_id_list": ["keywords:forbidden_words"],
        "kwargs": [{"forbidden_words": ["easy", "simple"]}],
    },
    {
        "prompt": "Explain what a fraction is. In your response, the word 'denominator' should appear "
        "at least 3 times.",
        "instruction_id_list": ["keywords:frequency"],
        "kwargs": [{"keyword": "denominator", "frequency": 3, "relation": "at least"}],
    },
    {
        "prompt": "Describe a triangle with side lengths 3, 4 and 5 as an object with keys 'a', 'b', "
        "'c' and 'right_angled'. Entire output should be wrapped in JSON format.",
        "instruction_id_list": ["detectable_format:json_format"],
        "kwargs": [{}],
    },
    {
        "prompt": "Write a short poem about geometry. Your answer must contain a title, wrapped in "
        "double angular brackets, such as <<poem of joy>>.",
        "instruction_id_list": ["detectable_format:title"],
        "kwargs": [{}],
    },
    {
        "prompt": "Explain why the sum of two even numbers is even. Finish your response with this "
        f"exact phrase '{_END_PHRASE}'. No other words should follow this phrase.",
        "instruction_id_list": ["startend:end_checker"],
        "kwargs": [{"end_phrase": _END_PHRASE}],
    },
    {
        "prompt": "Summarize the rule for multiplying two negative numbers. Wrap your entire response "
        "with double quotation marks.",
        "instruction_id_list": ["startend:quotation"],
        "kwargs": [{}],
    },
    {
        "prompt": "Write a short note to a student about their exam results. At the end of your "
        "response, please explicitly add a postscript starting with P.S.",
        "instruction_id_list": ["detectable_content:postscript"],
        "kwargs": [{"postscript_marker": "P.S."}],
    },
    {
        "prompt": "Explain the order of operations. Highlight at least 2 sections in your answer with "
        "markdown, i.e. *highlighted section*.",
        "instruction_id_list": ["detectable_format:number_highlighted_sections"],
        "kwargs": [{"num_highlights": 2}],
    },
    {
        "prompt": "Write a template for a math homework cover page. The response must contain at "
        "least 3 placeholders represented by square brackets, such as [name].",
        "instruction_id_list": ["detectable_content:number_placeholders"],
        "kwargs": [{"num_placeholders": 3}],
    },
    {
        "prompt": "Write a one-week study plan for learning algebra. Your response must have 3 "
        "sections. Mark the beginning of each section with SECTION X, such as:\nSECTION 1\n"
        "[content of section 1]\nSECTION 2\n[content of section 2]",
        "instruction_id_list": ["detectable_format:multiple_sections"],
        "kwargs": [{"section_spliter": "SECTION", "num_sections": 3}],
    },
    {
        "prompt": "Describe how to add two fractions. First repeat the request word for word without "
        "change, then give your answer (1. do not say any words or characters before repeating the "
        "request; 2. the request you need to repeat does not include this sentence)",
        "instruction_id_list": ["combination:repeat_prompt"],
        "kwargs": [{"prompt_to_repeat": "Describe how to add two fractions."}],
    },
    {
        "prompt": "Explain what the median of a list of numbers is, in fewer than 80 words, in English "
        "and in all lowercase letters.",
        "instruction_id_list": ["length_constraints:number_words", "change_case:english_lowercase"],
        "kwargs": [{"num_words": 80, "relation": "less than"}, {}],
    },
    {
        "prompt": "Name a few words about the zero of a function. In your response, the letter z should "
        "appear at least 4 times.",
        "instruction_id_list": ["keywords:letter_frequency"],
        "kwargs": [{"letter": "z", "let_frequency": 4, "let_relation": "at least"}],
    },
]


def ifeval_prompts() -> list[dict[str, Any]]:
    """The built-in prompts (a fresh deep copy), in IFEval's schema.

    Each dict has ``key`` (int), ``prompt`` (str), ``instruction_id_list`` (list of lm-eval
    instruction ids) and ``kwargs`` (one dict of checker arguments per instruction).
    """
    return [{"key": 1000 + i, **copy.deepcopy(p)} for i, p in enumerate(_BUILTIN)]


def _nltk_data_available(resource: str) -> bool:
    try:
        import nltk

        nltk.data.find(resource)
        return True
    except (LookupError, ImportError, OSError):
        return False


_LM_EVAL: tuple[Any, Any] | None = None


def _load_lm_eval() -> tuple[Any, Any]:
    """Import lm-eval's IFEval modules (registry, scoring utils), without network side effects."""
    global _LM_EVAL
    if _LM_EVAL is not None:
        return _LM_EVAL
    try:
        import immutabledict  # noqa: F401
        import langdetect  # noqa: F401
        import nltk  # noqa: F401 - checked here for a clear message
    except ImportError as e:
        raise ImportError(f"{IFEVAL_INSTALL_HINT} (missing: {e.name})") from e

    allow_download = os.environ.get("DCD_IFEVAL_ALLOW_NLTK_DOWNLOAD", "") == "1"
    patch = not allow_download and not _nltk_data_available("tokenizers/punkt_tab")
    import nltk

    original_download = nltk.download
    if patch:
        # lm-eval calls nltk.download("punkt_tab") at import time when the data is missing; that
        # would try the network (and hang or fail offline).  Nothing we score needs it.
        nltk.download = lambda *a, **k: False
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it also prints "Downloaded punkt_tab"
            from lm_eval.tasks.ifeval import instructions_registry, utils
    except ImportError as e:
        raise ImportError(f"{IFEVAL_INSTALL_HINT} ({e})") from e
    finally:
        nltk.download = original_download
    _LM_EVAL = (instructions_registry, utils)
    return _LM_EVAL


def available_instructions() -> set[str]:
    """Instruction ids that can be checked here (lm-eval's registry minus those lacking NLTK data)."""
    registry, _ = _load_lm_eval()
    ids = set(registry.INSTRUCTION_DICT)
    return ids - _unavailable_nltk_instructions()


_NLTK_PROBES: set[str] | None = None


def _unavailable_nltk_instructions() -> set[str]:
    """Instruction ids whose checker fails for lack of NLTK data (probed once, by running it)."""
    global _NLTK_PROBES
    if _NLTK_PROBES is None:
        from lm_eval.tasks.ifeval import instructions_util

        probes = {
            "length_constraints:number_sentences": lambda: instructions_util.count_sentences("One. Two."),
            "change_case:capital_word_frequency": lambda: instructions_util.nltk.word_tokenize("A B c"),
        }
        missing = set()
        for iid, probe in probes.items():
            try:
                probe()
            except Exception:  # noqa: BLE001 - LookupError, or an unpickling error on new nltk
                missing.add(iid)
        _NLTK_PROBES = missing
    return set(_NLTK_PROBES)


def score_ifeval(
    prompts: Sequence[Mapping[str, Any]],
    responses: Sequence[str],
) -> dict[str, Any]:
    """Score responses to IFEval-schema prompts with lm-eval's strict and loose checkers.

    Args:
        prompts: dicts with ``prompt``, ``instruction_id_list``, ``kwargs`` (and optional ``key``),
            e.g. :func:`ifeval_prompts`.
        responses: one model response per prompt (the text only, no chat template).

    Returns:
        ``prompt_level_strict`` / ``prompt_level_loose``: share of prompts whose instructions
        are *all* followed; ``instruction_level_strict`` / ``instruction_level_loose``: share of
        individual instructions followed; ``per_instruction``: strict accuracy by instruction id;
        ``details``: per prompt, the strict and loose follow lists (for the generations file);
        ``n_prompts``, ``n_instructions``; ``skipped_instructions``: instruction ids not scored
        because their NLTK data is missing (a prompt left with none is dropped).
        "Loose" is IFEval's upper bound that also accepts the response with its first/last line
        or markdown asterisks removed.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    registry, utils = _load_lm_eval()
    unavailable = _unavailable_nltk_instructions()
    skipped: dict[str, int] = defaultdict(int)
    strict_all: list[bool] = []
    loose_all: list[bool] = []
    strict_inst: list[bool] = []
    loose_inst: list[bool] = []
    per_inst: dict[str, list[bool]] = defaultdict(list)
    details: list[dict[str, Any]] = []

    for i, (p, response) in enumerate(zip(prompts, responses)):
        ids = list(p["instruction_id_list"])
        kwargs = list(p.get("kwargs") or [{} for _ in ids])
        if len(kwargs) != len(ids):
            raise ValueError(f"prompt {p.get('key', i)}: {len(ids)} instructions but {len(kwargs)} kwargs")
        keep = []
        for j, iid in enumerate(ids):
            if iid not in registry.INSTRUCTION_DICT:
                raise ValueError(f"prompt {p.get('key', i)}: unknown IFEval instruction {iid!r}")
            if iid in unavailable:
                skipped[iid] += 1
            else:
                keep.append(j)
        if not keep:
            continue
        inp = utils.InputExample(
            key=p.get("key", i),
            instruction_id_list=[ids[j] for j in keep],
            prompt=p["prompt"],
            kwargs=[dict(kwargs[j] or {}) for j in keep],
        )
        response = response if isinstance(response, str) else ""
        strict = utils.test_instruction_following_strict(inp, response)
        loose = utils.test_instruction_following_loose(inp, response)
        strict_all.append(bool(strict.follow_all_instructions))
        loose_all.append(bool(loose.follow_all_instructions))
        strict_inst.extend(map(bool, strict.follow_instruction_list))
        loose_inst.extend(map(bool, loose.follow_instruction_list))
        for iid, ok in zip(inp.instruction_id_list, strict.follow_instruction_list):
            per_inst[iid].append(bool(ok))
        details.append(
            {
                "key": inp.key,
                "instruction_id_list": inp.instruction_id_list,
                "follow_strict": list(map(bool, strict.follow_instruction_list)),
                "follow_loose": list(map(bool, loose.follow_instruction_list)),
            }
        )

    if skipped:
        warnings.warn(
            "IFEval: skipped instructions whose lm-eval checker needs NLTK 'punkt' data, which is "
            f"not installed (no download at evaluation time): {dict(skipped)}. Install it with "
            "`python -m nltk.downloader punkt punkt_tab` to score them.",
            stacklevel=2,
        )

    def mean(xs: list[bool]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    return {
        "prompt_level_strict": mean(strict_all),
        "instruction_level_strict": mean(strict_inst),
        "prompt_level_loose": mean(loose_all),
        "instruction_level_loose": mean(loose_inst),
        "n_prompts": len(strict_all),
        "n_instructions": len(strict_inst),
        "per_instruction": {k: mean(v) for k, v in sorted(per_inst.items())},
        "skipped_instructions": dict(skipped),
        "details": details,
    }
