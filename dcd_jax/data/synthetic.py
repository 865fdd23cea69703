"""The embedded reasoning task: multi-step arithmetic word problems and a mixed-style "teacher".

Why it exists: offline distillation trains a student on traces it did not write. When the
teacher writes in a way the student cannot follow (skipping intermediate results a small model
needs), imitation teaches it to produce confident wrong answers; that teacher-student mismatch
is what distribution correction is for. This module makes the effect visible on a laptop:

* :func:`generate_problems` - seeded word problems (``Ann has 12 apples. She buys 3 bags with 5
  apples in each. ... How many apples does Ann have now?``) with gold answers, and a teacher
  trace per problem in one of :data:`STYLES`:

  - ``careful``: one operation per line, every intermediate result written (a small student can
    follow it: each line needs one small computation); with ``restate`` each sentence of the
    problem is copied before its computation;
  - ``compressed``: two steps per line, intermediate results partly skipped;
  - ``terse``: the whole computation as one expression and its value;
  - ``answer_only``: just the answer;
  - ``mixed``: careful and compressed *within* one trace: each next pair of operations is written
    as one compressed line with probability ``mixed_line_rate``, else as careful lines (so no
    filter of whole traces can remove the hard lines).

  Every trace ends with the exact sentence ``The answer is N.``. ``error_rate`` makes a fraction
  of traces slip in their last computation (the trace's answer is then wrong; ``trace_correct``
  says so). ``intermediate_error_rate`` makes a fraction state a wrong value (off by 1-3) on one
  computation line before the last, while the next lines go on from the right value: the trace
  still reaches the right answer (``error_line`` is the index of the wrong line). Records also carry ``solution``: the canonical careful trace (always correct).
* :func:`teacher_training_records` - problems with their canonical solutions, to train a teacher.
* :func:`build_tokenizer` - a small Qwen2-style byte-level BPE (digits always single tokens,
  ~500 entries) with a ChatML-like chat template, saved in Hugging Face format.

Checkpoints for the task (random tiny Qwen2/Qwen3 students and teachers) are written by
:mod:`dcd_jax.tiny_models`, a layer above the data code.

Generation is pure Python and seeded per example (example ``i`` depends only on ``seed``,
``split`` and ``i``): 10k problems take well under a second.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import random
import re
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Mapping

from dcd_jax.config import ConfigError

STYLES = ("careful", "compressed", "terse", "answer_only", "mixed")
# The tokenizer's training corpus draws these (``mixed`` lines are careful and compressed lines, so
# its text adds nothing to learn, and leaving it out keeps every tokenizer built before it the same).
_TOKENIZER_STYLES = ("careful", "compressed", "terse", "answer_only")
SYSTEM_PROMPT = "Solve the problem step by step. End with: The answer is N."
ANSWER_RE = re.compile(r"The answer is (-?\d+)\.")

# name, subject pronoun
_NAMES = (("Ann", "She"), ("Ben", "He"), ("Cara", "She"), ("Dan", "He"), ("Eva", "She"), ("Finn", "He"),
          ("Gia", "She"), ("Hal", "He"), ("Ivy", "She"), ("Jon", "He"), ("Kim", "She"), ("Leo", "He"))
_ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "coins", "books", "shells", "cards", "stamps")
_CONTAINERS = ("bags", "boxes", "packs", "jars")
_KINDS = ("add", "sub", "mul", "div", "add_groups", "sub_groups")
# Problem narratives. ``story``: the distillation task. ``ledger``: other sentences about other
# subjects (a shop's stock), careful traces only in the demo: the student's pretraining data, so it
# arrives at distillation with its own style and partial arithmetic competence, like a real base model.
TEMPLATES = ("story", "ledger")
_PLACES = ("shop", "farm", "school", "club", "market", "library")

# Special tokens of the task tokenizer (ChatML-like, as in Qwen).
PAD, BOS, IM_START, IM_END = "<|endoftext|>", "<|bos|>", "<|im_start|>", "<|im_end|>"
# `generation` marks the assistant tokens for transformers' return_assistant_tokens_mask; plain
# rendering ignores it. The text is Qwen's ChatML plus a BOS.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>' -}}"
    "{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@dataclasses.dataclass(frozen=True)
class SyntheticTaskConfig:
    """Knobs of the embedded task.

    Attributes:
      seed: Seed of the generator (with ``split`` and the example index).
      n_examples: Problems to generate.
      split: Name mixed into the seed so that e.g. ``train`` and ``eval`` problems differ.
      min_steps: Fewest operations per problem.
      max_steps: Most operations per problem (difficulty).
      max_start: Starting amounts are drawn from [2, max_start].
      max_operand: Added / removed amounts are drawn from [1, max_operand]; groups hold
        [2, max_operand] items (capped at 9) and number [2, 5].
      max_value: Every intermediate amount stays within [0, max_value].
      style_mix: Relative weights of the trace styles (keys from :data:`STYLES`).
      error_rate: Fraction of traces whose last computation is off by 1-3.
      intermediate_error_rate: Fraction of traces with one wrong intermediate line (off by 1-3)
        that still reach the right answer (traces with two or more computation lines).
      mixed_line_rate: In ``mixed`` traces, the probability that the next two operations are
        written as one compressed line (else: careful lines for the next operation).
      template: Narrative of the problems (:data:`TEMPLATES`): ``story`` (a person's items) or
        ``ledger`` (a place's stock, other sentences; the demo pretrains its student on it).
      restate: Careful traces restate each sentence of the problem on its own line before its
        computation (the demo's regime: finding the next fact becomes copying the next sentence,
        which a tiny model learns fast; the compressed and terse styles skip it).
    """

    seed: int = 0
    n_examples: int = 10000
    split: str = "train"
    min_steps: int = 2
    max_steps: int = 4
    max_start: int = 30
    max_operand: int = 20
    max_value: int = 999
    style_mix: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"careful": 0.5, "compressed": 0.2, "terse": 0.2, "answer_only": 0.1}
    )
    error_rate: float = 0.0
    intermediate_error_rate: float = 0.0
    mixed_line_rate: float = 0.5
    template: str = "story"
    restate: bool = False

    def __hash__(self) -> int:
        # Frozen, but `style_mix` is a dict: hash its items so the config stays usable as a key.
        return hash(tuple((f.name, tuple(sorted(v.items())) if isinstance(v, dict) else v)
                          for f in dataclasses.fields(self) for v in [getattr(self, f.name)]))

    def validate(self) -> None:
        """Reject knobs that cannot generate problems (called by the config loader)."""
        if self.n_examples < 0:
            raise ConfigError(f"synthetic.n_examples must be >= 0, got {self.n_examples}")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ConfigError(f"synthetic: need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if self.max_start < 2 or self.max_operand < 2 or self.max_value < max(self.max_start, 20):
            raise ConfigError("synthetic: need max_start >= 2, max_operand >= 2, max_value >= max(max_start, 20)")
        unknown = sorted(set(self.style_mix) - set(STYLES))
        if unknown:
            raise ConfigError(f"synthetic.style_mix: unknown style(s) {unknown}; styles are {list(STYLES)}")
        if any(w < 0 for w in self.style_mix.values()) or sum(self.style_mix.values()) <= 0:
            raise ConfigError("synthetic.style_mix: weights must be >= 0 and not all 0")
        for knob in ("error_rate", "intermediate_error_rate", "mixed_line_rate"):
            if not 0.0 <= getattr(self, knob) <= 1.0:
                raise ConfigError(f"synthetic.{knob} must be in [0, 1], got {getattr(self, knob)}")
        if self.template not in TEMPLATES:
            raise ConfigError(f"synthetic.template={self.template!r}; expected one of {list(TEMPLATES)}")


@dataclasses.dataclass(frozen=True)
class _Step:
    kind: str
    a: int  # the amount (add/sub/mul/div) or the number of groups
    b: int  # the group size (groups only)
    before: int
    after: int


def _rng(cfg: SyntheticTaskConfig, index: int) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`: stable across runs and platforms.
    return random.Random(f"dcd-synthetic/{cfg.seed}/{cfg.split}/{index}")


def _feasible(x: int, rng: random.Random, cfg: SyntheticTaskConfig) -> list[tuple[str, int, int, int]]:
    """Every operation kind that keeps the amount in [0, max_value], with drawn operands."""
    out = []
    if x < cfg.max_value:
        k = rng.randint(1, min(cfg.max_operand, cfg.max_value - x))
        out.append(("add", k, 0, x + k))
    if x >= 2:
        k = rng.randint(1, min(cfg.max_operand, x - 1))
        out.append(("sub", k, 0, x - k))
    k = rng.choice((2, 3))
    if 0 < x * k <= cfg.max_value:
        out.append(("mul", k, 0, x * k))
    divisors = [d for d in (2, 3, 4, 5) if x >= 2 * d and x % d == 0]
    if divisors:
        d = rng.choice(divisors)
        out.append(("div", d, 0, x // d))
    n, m = rng.randint(2, 5), rng.randint(2, min(9, cfg.max_operand))
    if x + n * m <= cfg.max_value:
        out.append(("add_groups", n, m, x + n * m))
    if n * m < x:
        out.append(("sub_groups", n, m, x - n * m))
    return out


# One sentence per operation kind and template ({who}: the subject; {mult}: doubles / triples).
_SENTENCES = {
    "story": {
        "add": "{who} finds {a} more {item}.",
        "sub": "{who} gives {a} {item} to {other}.",
        "mul": "{who} {mult} the number of {item}.",
        "div": "{who} splits the {item} into {a} equal piles and keeps one pile.",
        "add_groups": "{who} buys {a} {container} with {b} {item} in each.",
        "sub_groups": "{who} gives away {a} {container} with {b} {item} in each.",
    },
    "ledger": {
        "add": "{who} gets {a} more {item}.",
        "sub": "It sells {a} {item}.",
        "mul": "Its stock of {item} {mult}.",
        "div": "It shares the {item} among {a} stores and keeps one share.",
        "add_groups": "A delivery brings {a} {container} of {b} {item}.",
        "sub_groups": "It sends out {a} {container} of {b} {item}.",
    },
}


def _sentence(template: str, step: _Step, **names: str) -> str:
    return _SENTENCES[template][step.kind].format(a=step.a, b=step.b, mult="doubles" if step.a == 2 else "triples",
                                                  **names)


def _careful_lines(steps: list[_Step], name: str, item: str, restated: list[str] | None = None) -> list[str]:
    lines = [f"{name} starts with {steps[0].before} {item}."]
    for i, s in enumerate(steps):
        if restated:  # the problem's sentence first, then its computation
            lines.append(restated[i])
        if s.kind in ("add_groups", "sub_groups"):
            lines.append(f"{s.a} * {s.b} = {s.a * s.b}.")
            op = "+" if s.kind == "add_groups" else "-"
            lines.append(f"{s.before} {op} {s.a * s.b} = {s.after}.")
        else:
            op = {"add": "+", "sub": "-", "mul": "*", "div": "/"}[s.kind]
            lines.append(f"{s.before} {op} {s.a} = {s.after}.")
    return lines


def _expression(steps: list[_Step]) -> str:
    """The steps as one left-to-right expression, parenthesized only where precedence needs it."""
    expr, additive = str(steps[0].before), False
    for s in steps:
        if s.kind in ("add", "sub"):
            expr, additive = f"{expr} {'+' if s.kind == 'add' else '-'} {s.a}", True
        elif s.kind in ("add_groups", "sub_groups"):
            expr, additive = f"{expr} {'+' if s.kind == 'add_groups' else '-'} {s.a} * {s.b}", True
        else:
            base = f"({expr})" if additive else expr
            expr, additive = f"{base} {'*' if s.kind == 'mul' else '/'} {s.a}", False
    return expr


def _mixed_lines(steps: list[_Step], name: str, item: str, restated: list[str] | None,
                 rng: random.Random, rate: float) -> list[str]:
    """Careful and compressed lines in one trace: at each position the next two operations become one
    compressed line with probability ``rate`` (when two remain), else the next one careful lines."""
    lines = [f"{name} starts with {steps[0].before} {item}."]
    i = 0
    while i < len(steps):
        if i + 1 < len(steps) and rng.random() < rate:
            lines.append(f"{_expression(steps[i : i + 2])} = {steps[i + 1].after}.")
            i += 2
        else:
            lines += _careful_lines([steps[i]], name, item, restated[i : i + 1] if restated else None)[1:]
            i += 1
    return lines


def _slip_intermediate(lines: list[str], rng: random.Random) -> tuple[list[str], int | None]:
    """One computation line before the last states a value off by 1-3; later lines are unchanged
    (they go on from the right value). Returns the lines and the index of the wrong one."""
    computations = [i for i, line in enumerate(lines) if " = " in line]
    if len(computations) < 2:
        return lines, None
    i = rng.choice(computations[:-1])
    left, value = lines[i].rsplit(" = ", 1)
    right = int(value.rstrip("."))
    wrong = right + rng.choice((-3, -2, -1, 1, 2, 3))
    wrong = wrong if wrong >= 0 else right + 1
    return lines[:i] + [f"{left} = {wrong}."] + lines[i + 1 :], i


def _trace(style: str, steps: list[_Step], name: str, item: str, final: int,
           restated: list[str] | None = None, line_rng: random.Random | None = None,
           mixed_line_rate: float = 0.5) -> str:
    """A teacher trace in ``style`` whose last stated value is ``final`` (careful traces restate
    each sentence of the problem before its computation when ``restated`` gives them; ``mixed``
    traces draw their line styles from ``line_rng``)."""
    answer = f"The answer is {final}."
    if style == "mixed":
        lines = _mixed_lines(steps, name, item, restated, line_rng or random.Random(0), mixed_line_rate)
        if final != steps[-1].after:
            lines[-1] = lines[-1].rsplit("=", 1)[0] + f"= {final}."
        return "\n".join(lines + [answer])
    if style == "answer_only":
        return answer
    if style == "terse":
        return f"{_expression(steps)} = {final}.\n{answer}"
    if style == "compressed":
        lines = []
        for i in range(0, len(steps), 2):
            chunk = steps[i : i + 2]
            value = final if i + 2 >= len(steps) else chunk[-1].after
            lines.append(f"{_expression(chunk)} = {value}.")
        return "\n".join(lines + [answer])
    lines = _careful_lines(steps, name, item, restated)
    if final != steps[-1].after:  # a slip in the last computation
        lines[-1] = lines[-1].rsplit("=", 1)[0] + f"= {final}."
    return "\n".join(lines + [answer])


def generate_problem(cfg: SyntheticTaskConfig, index: int) -> dict[str, Any]:
    """Problem ``index`` of the task: prompt, gold answer, a teacher trace and the canonical solution."""
    rng = _rng(cfg, index)
    name, pronoun = rng.choice(_NAMES)
    other = rng.choice([n for n, _ in _NAMES if n != name])
    item, container = rng.choice(_ITEMS), rng.choice(_CONTAINERS)
    x = rng.randint(2, cfg.max_start)
    steps: list[_Step] = []
    for _ in range(rng.randint(cfg.min_steps, cfg.max_steps)):
        # Amounts stay >= 1, so "add" (x < max_value) or "sub" (x >= 2) is always feasible.
        kind, a, b, after = rng.choice(_feasible(x, rng, cfg))
        steps.append(_Step(kind, a, b, x, after))
        x = after
    answer = x
    styles = [s for s in STYLES if cfg.style_mix.get(s, 0) > 0]
    style = rng.choices(styles, weights=[cfg.style_mix[s] for s in styles])[0]
    final = answer
    if rng.random() < cfg.error_rate:
        final = max(0, answer + rng.choice((-3, -2, -1, 1, 2, 3)))
        final = final if final != answer else answer + 1
    if cfg.template == "ledger":  # drawn last: story problems stay what they were
        place = rng.choice(_PLACES)
        name = f"The {place}"
        sentences = [_sentence("ledger", s, who=name, item=item, container=container) for s in steps]
        story = " ".join(sentences)
        prompt = f"The {place} has {steps[0].before} {item}. {story} How many {item} does the {place} have now?"
    else:
        sentences = [_sentence("story", s, who=pronoun, item=item, other=other, container=container) for s in steps]
        story = " ".join(sentences)
        prompt = f"{name} has {steps[0].before} {item}. {story} How many {item} does {name} have now?"
    restated = sentences if cfg.restate else None
    # The line-level draws (mixed styles, intermediate slips) come from their own stream, so the
    # problems and traces of a config without them are the same as before these knobs existed.
    line_rng = random.Random(f"dcd-synthetic/{cfg.seed}/{cfg.split}/{index}/lines")
    response = _trace(style, steps, name, item, final, restated, line_rng, cfg.mixed_line_rate)
    record = {
        "id": f"{cfg.split}-{cfg.seed}-{index}",
        "prompt": prompt,
        "response": response,
        "answer": str(answer),
        "style": style,
        "num_steps": len(steps),
        "trace_correct": final == answer,
        "solution": _trace("careful", steps, name, item, answer, restated),
    }
    if cfg.intermediate_error_rate > 0 and line_rng.random() < cfg.intermediate_error_rate:
        lines, wrong = _slip_intermediate(response.split("\n"), line_rng)
        if wrong is not None:
            record.update(response="\n".join(lines), error_line=wrong)
    return record


def generate_problems(cfg: SyntheticTaskConfig) -> list[dict[str, Any]]:
    """``cfg.n_examples`` problems (records with ``id``, ``prompt``, ``response``, ``answer``, ...)."""
    cfg.validate()
    return [generate_problem(cfg, i) for i in range(cfg.n_examples)]


def teacher_training_records(cfg: SyntheticTaskConfig) -> list[dict[str, Any]]:
    """Problems whose ``response`` is the canonical careful solution (to train a teacher model)."""
    return [dict(r, response=r["solution"], style="careful", trace_correct=True) for r in generate_problems(cfg)]


_OPERATOR_RE = re.compile(r" [-+*/] ")
#: Output styles :func:`classify_style` tells apart (``other``: no final answer sentence).
OUTPUT_STYLES = ("careful", "compressed", "answer_only", "other")


def classify_style(text: str) -> str:
    """The style of a trace (teacher's or a model's output), from its computation lines.

    ``careful``: every computation line (``... = N.``) has one operation; ``compressed``: some
    line has two or more (intermediate results skipped; the generator's ``compressed`` and
    ``terse`` traces); ``answer_only``: no computation line; ``other``: no ``The answer is N.``.
    """
    if extract_answer(text) is None:
        return "other"
    ops = [line_operations(line) for line in text.split("\n") if " = " in line]
    if not ops:
        return "answer_only"
    return "careful" if max(ops) <= 1 else "compressed"


def line_operations(line: str) -> int:
    """The number of operations left of `` = `` on a computation line (``4 + 3 - 2 = 5.`` -> 2)."""
    return len(_OPERATOR_RE.findall(line.split(" = ")[0]))


#: Where an output goes wrong (:func:`trace_errors`).
TRACE_ERRORS = ("arithmetic", "misquoted", "skipped", "answer")


def trace_errors(prompt: str, response: str) -> dict[str, int]:
    """Where an output of the embedded task goes wrong, line by line (a wrong answer's anatomy):

    ``arithmetic``: computation lines whose stated value is not their expression's value (or that
    do not parse); ``misquoted``: restated lines that are no sentence of the problem (a copy with a
    wrong number or verb; names of people and containers are not compared); ``skipped``: sentences of the problem a careful output (one
    operation per line, which restates each sentence before its computation) never restates (a
    compressed line stands for its sentences, so other outputs count none); ``answer``: 1 when the
    final answer is not the last computed value.
    """
    sentences = re.split(r"(?<=\.) ", prompt.rsplit("?", 1)[0].rsplit(". ", 1)[0] + ".")[1:]
    lines = response.split("\n")
    computations = [line for line in lines if " = " in line]
    arithmetic, values = 0, []
    for line in computations:
        left, _, right = line.rstrip(".").rpartition(" = ")
        value = _evaluate(left)
        stated = int(right) if right.strip().isdigit() else None
        arithmetic += value is None or stated is None or value != stated
        values.append(stated)
    restated = [_gist(line) for line in lines[1:] if " = " not in line and line and not line.startswith("The answer is")]
    sentences = [_gist(x) for x in sentences]
    answer = extract_answer(response)
    return {"arithmetic": arithmetic,
            "misquoted": sum(line not in sentences for line in restated),
            "skipped": sum(s not in restated for s in sentences)
            if computations and all(line_operations(c) <= 1 for c in computations) else 0,
            "answer": int(answer is not None and bool(values) and answer != str(values[-1]))}


_TOKEN_RE = re.compile(r"\s*(\d+|[-+*/()])")
_SUM_OPS = {"+": operator.add, "-": operator.sub}
_PRODUCT_OPS = {"*": operator.mul, "/": operator.truediv}


def _gist(sentence: str) -> tuple[str, ...]:
    """What a sentence of the problem says the amount does: its verb (second word) and its numbers.
    A restatement that names another person or container (harmless) has the same gist."""
    words = sentence.rstrip(".").split(" ")
    return (words[1] if len(words) > 1 else "", *re.findall(r"\d+", sentence))


def _evaluate(expression: str) -> Fraction | None:
    """The value of an integer expression with ``+ - * /`` and parentheses (None if it does not
    parse or divides by zero): a parser, never ``eval``."""
    tokens = _TOKEN_RE.findall(expression)
    if "".join(tokens) != expression.replace(" ", ""):
        return None
    pos = 0

    def atom():
        nonlocal pos
        if pos < len(tokens) and tokens[pos] == "(":
            pos += 1
            value = additive()
            if pos >= len(tokens) or tokens[pos] != ")":
                raise ValueError
            pos += 1
            return value
        if pos < len(tokens) and tokens[pos].isdigit():
            pos += 1
            return Fraction(int(tokens[pos - 1]))
        raise ValueError

    def level(ops: dict, operand):
        """A left-associative run of ``operand``s joined by the operators in ``ops``."""
        nonlocal pos
        value = operand()
        while pos < len(tokens) and tokens[pos] in ops:
            pos += 1
            value = ops[tokens[pos - 1]](value, operand())
        return value

    multiplicative = lambda: level(_PRODUCT_OPS, atom)  # noqa: E731
    additive = lambda: level(_SUM_OPS, multiplicative)  # noqa: E731

    try:
        value = additive()
    except (ValueError, ZeroDivisionError):
        return None
    return value if pos == len(tokens) else None


def extract_answer(text: str) -> str | None:
    """The number in the last ``The answer is N.`` of ``text`` (``None`` if there is none)."""
    found = ANSWER_RE.findall(text)
    return found[-1] if found else None


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write records one JSON object per line (UTF-8)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer(out_dir: str | Path | None = None, *, vocab_size: int = 512, seed: int = 0) -> Any:
    """A small Qwen2-style byte-level BPE for the task, trained on generated problems.

    It is a genuine ``Qwen2Tokenizer`` (Qwen2's NFC normalizer and pre-tokenizer, whose ``\\p{N}``
    rule makes every digit its own token; trained vocabulary and merges). That matters: for a
    ``qwen2`` checkpoint transformers always rebuilds the tokenizer as ``Qwen2Tokenizer`` from
    vocabulary and merges, so any other pre-tokenizer would silently change after saving the
    student. Any text is encodable (256 byte tokens) and decoding is lossless. Special tokens:
    ``<|bos|>`` (BOS), ``<|im_end|>`` (EOS, ends every assistant turn), ``<|endoftext|>``
    (padding), ``<|im_start|>``; the chat template is :data:`CHAT_TEMPLATE`. Saved to ``out_dir``
    (Hugging Face format) when given.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    corpus_cfg = SyntheticTaskConfig(seed=seed, n_examples=3000, split="tokenizer", max_steps=6,
                                     style_mix={s: 1.0 for s in _TOKENIZER_STYLES})
    corpus = [SYSTEM_PROMPT, "system user assistant"]
    for r in generate_problems(corpus_cfg):
        corpus += [r["prompt"], r["response"], r["solution"]]
    # Train with the exact normalizer / pre-tokenizer Qwen2Tokenizer will use.
    shape = Qwen2Tokenizer()._tokenizer
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = shape.normalizer
    trainer_tok.pre_tokenizer = shape.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, IM_START, IM_END, BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    trainer_tok.train_from_iterator(corpus, trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, unk_token=None, bos_token=BOS,
                               eos_token=IM_END, pad_token=PAD)
    tokenizer.add_tokens([AddedToken(IM_START, special=True)])
    tokenizer.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer
