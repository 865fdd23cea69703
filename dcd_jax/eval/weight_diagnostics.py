"""What a weighting emphasizes: mean token weight by trace style and by position in the response.

The training step logs the weight by relative position (``pos<i>_weight`` in ``metrics.jsonl``)
but cannot know a trace's style. This module recomputes the weights offline, with the training
code itself (:func:`~dcd_jax.objectives.weights.compute_weights`), from a student checkpoint's
per-token log-probs on a set of traces (scored by :func:`~dcd_jax.teacher.scoring.score_teacher`
with the student in the teacher's place) and the teacher's cached log-probs:

    w_t = compute_weights(cfg, log pi_student(y_t), log pi_T(y_t))   (the set is one batch)
    by_style[s] = sum_{t in traces of style s} w_t / #tokens of those traces
    by_position[i] = mean w_t over tokens in the i-th fifth of their response
    by_token_class[c] = mean w_t over response tokens of class c (:func:`response_token_classes`)
    by_line_kind[k] = mean w_t over response tokens on lines of kind k (:func:`response_line_kinds`)
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from dcd_jax import storage

NUM_BINS = 5


def pad_rows(rows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged per-token rows -> (``[N, T]`` values, ``[N, T]`` mask)."""
    width = max((len(r) for r in rows), default=0)
    values = np.zeros((len(rows), max(width, 1)), np.float32)
    mask = np.zeros_like(values)
    for i, r in enumerate(rows):
        values[i, : len(r)] = r
        mask[i, : len(r)] = 1.0
    return values, mask


def token_weights(objective: Any, student_logprobs: Sequence[np.ndarray], teacher_logprobs: Sequence[np.ndarray],
                  *, step: int = 10**9) -> tuple[np.ndarray, np.ndarray]:
    """The training weights of every response token (one row per trace, all traces one batch).

    Returns ``(weights [N, T], mask [N, T])``; ``step`` sets the ``lam`` schedule (default: ramped up).
    """
    import jax.numpy as jnp

    from dcd_jax.objectives.weights import compute_weights

    lp, mask = pad_rows(student_logprobs)
    tlp, _ = pad_rows(teacher_logprobs)
    segment_ids = np.ones(lp.shape, np.int32)
    out = compute_weights(objective, target_logprobs=jnp.asarray(lp), mask=jnp.asarray(mask),
                          segment_ids=jnp.asarray(segment_ids), step=step, true_vocab_size=2,
                          teacher_logprobs=jnp.asarray(tlp), ref_logprobs=jnp.asarray(lp),
                          entropy=jnp.zeros_like(jnp.asarray(lp)))
    return np.asarray(out.weights), mask


def mean_weight_by_group(weights: np.ndarray, mask: np.ndarray, groups: Sequence[str]) -> dict[str, float]:
    """``{group: mean weight over the response tokens of the rows in that group}`` (token-weighted)."""
    out = {}
    for g in sorted(set(groups)):
        rows = np.array([x == g for x in groups])
        n = mask[rows].sum()
        if n > 0:
            out[g] = float((weights[rows] * mask[rows]).sum() / n)
    return out


def mean_weight_by_position(weights: np.ndarray, mask: np.ndarray, num_bins: int = NUM_BINS) -> list[float | None]:
    """Mean weight of the tokens in each ``1/num_bins`` of their own response (bin = floor(num_bins * t / len))."""
    sums, counts = np.zeros(num_bins), np.zeros(num_bins)
    for w, m in zip(weights, mask):
        n = int(m.sum())
        bins = (np.arange(n) * num_bins) // max(n, 1)
        np.add.at(sums, bins, w[:n])
        np.add.at(counts, bins, 1)
    return [float(s / c) if c else None for s, c in zip(sums, counts)]


#: What a response token of the embedded task is (:func:`response_token_classes`).
TOKEN_CLASSES = ("first", "restated", "operand", "operator", "result", "answer", "end", "other")


def _char_class(text: str, pos: int) -> str:
    """The class of character ``pos`` of an embedded-task response ``text`` (see :data:`TOKEN_CLASSES`)."""
    start = text.rfind("\n", 0, pos) + 1
    end = text.find("\n", pos)
    line = text[start: end if end >= 0 else len(text)]
    col = pos - start
    if line.startswith("The answer is"):
        return "answer"
    if " = " in line:
        eq = line.rfind(" = ")
        ch = line[col]
        if ch in "+-*/=":
            return "operator"
        if ch.isdigit():
            return "result" if col > eq else "operand"
        return "other"
    if start > 0 and line.endswith("."):  # a sentence of the problem copied before its computation
        return "restated"
    return "other"


def response_token_classes(response: str, char_starts: Sequence[int | None]) -> list[str]:
    """Class of each response token of an embedded-task trace, from where it starts in ``response``.

    ``char_starts[i]``: the character offset in ``response`` where token ``i`` starts (``None`` for a
    token with no text, e.g. the end-of-turn token: class ``end``). A token is classed by its first
    non-blank character: ``first`` (the first response token), ``restated`` (a problem sentence
    copied before its computation), ``operand`` / ``operator`` / ``result`` (digits before ``=``,
    ``+ - * / =``, digits after ``=`` on a computation line), ``answer`` (the final sentence),
    ``other`` (the opening line, punctuation, tokens that are only blanks).
    """
    out = []
    for i, start in enumerate(char_starts):
        if i == 0:
            out.append("first")
            continue
        if start is None or start >= len(response):
            out.append("end")
            continue
        stop = next((s for s in char_starts[i + 1:] if s is not None), len(response))
        piece = response[start:stop]
        blanks = len(piece) - len(piece.lstrip(" \n"))
        out.append("other" if blanks == len(piece) else _char_class(response, start + blanks))
    return out


#: What kind of line a response token of the embedded task sits on (:func:`response_line_kinds`).
LINE_KINDS = ("one-op", "multi-op", "wrong", "text", "end")


def response_line_kinds(response: str, char_starts: Sequence[int | None], error_line: int | None = None) -> list[str]:
    """The kind of line each response token starts on: ``one-op`` (a computation line ``... = N.``
    with one operation: careful), ``multi-op`` (two or more: compressed), ``wrong`` (line index
    ``error_line`` of ``response.split("\n")``, the teacher's slip; it wins over the others),
    ``text`` (any other line: a restated sentence, the answer), ``end`` (no text: end of turn)."""
    from dcd_jax.data.synthetic import line_operations

    lines = response.split("\n")
    kinds = []
    for start in char_starts:
        if start is None or start >= len(response):
            kinds.append("end")
            continue
        index = response.count("\n", 0, start)
        line = lines[index]
        if index == error_line:
            kinds.append("wrong")
        elif " = " in line:
            kinds.append("multi-op" if line_operations(line) > 1 else "one-op")
        else:
            kinds.append("text")
    return kinds


def _aligned_responses(records: Sequence[Mapping[str, Any]], tokenizer: Any, data_cfg: Any):
    """``(record, response text, start offset in it of every response token)``, tokenized as training
    does (so aligned with the per-token arrays of a scores file)."""
    from dcd_jax.data.errors import Location
    from dcd_jax.data.records import parse_record
    from dcd_jax.data.tokenization import render_example, tokenize_example

    for i, raw in enumerate(records):
        record = parse_record(dict(raw), i, Location("<records>", index=i), data_cfg)
        example = tokenize_example(record, tokenizer, data_cfg)
        text, spans = render_example(record, tokenizer, data_cfg)
        offsets = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).offsets
        begin = spans[-1][0]
        positions = np.flatnonzero(example.response_mask)
        starts = [offsets[p][0] - begin if p < len(offsets) else None for p in positions]
        response = record.messages[-1].content  # rendered verbatim at ``begin``; end-of-turn markers follow it
        if not text.startswith(response, begin):
            raise ValueError(f"record {raw['id']}: the rendered assistant turn does not start with its text")
        yield raw, response, starts


def record_token_classes(records: Sequence[Mapping[str, Any]], tokenizer: Any, data_cfg: Any) -> dict[str, list[str]]:
    """``{id: class of every response token}`` (:func:`response_token_classes`), aligned with training."""
    return {str(raw["id"]): response_token_classes(response, starts)
            for raw, response, starts in _aligned_responses(records, tokenizer, data_cfg)}


def record_line_kinds(records: Sequence[Mapping[str, Any]], tokenizer: Any, data_cfg: Any) -> dict[str, list[str]]:
    """``{id: kind of line of every response token}`` (:func:`response_line_kinds`; a record's
    ``error_line`` marks its wrong line), aligned with training."""
    return {str(raw["id"]): response_line_kinds(response, starts, raw.get("error_line"))
            for raw, response, starts in _aligned_responses(records, tokenizer, data_cfg)}


def read_logprobs(path: str | Path) -> dict[str, np.ndarray]:
    """``{id: per-response-token log-probs}`` of a scores Parquet file."""
    import pyarrow.parquet as pq

    with storage.open_read(path) as f:
        table = pq.read_table(f, columns=["id", "teacher_logprobs"])
    return {str(i): np.asarray(v, np.float32) for i, v in zip(table.column("id").to_pylist(),
                                                              table.column("teacher_logprobs").to_pylist())}


def mean_by_token_class(values: np.ndarray, mask: np.ndarray, classes: Sequence[Sequence[str]],
                        order: Sequence[str] = TOKEN_CLASSES) -> dict[str, float]:
    """``{class: mean of values over the masked tokens of that class}`` (rows of ``classes`` align
    with the rows of ``values``; keys in ``order``)."""
    sums: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)
    for row, (v, m) in enumerate(zip(values, mask)):
        for t, c in enumerate(classes[row]):
            if t < len(m) and m[t] > 0:
                sums[c] += float(v[t])
                counts[c] += 1
    return {c: sums[c] / counts[c] for c in order if counts.get(c)}


def weight_diagnostics(objective: Any, records: Sequence[Mapping[str, Any]], student_scores: str | Path,
                       teacher_scores: str | Path, token_classes: Mapping[str, Sequence[str]] | None = None,
                       line_kinds: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """Mean weight by trace ``style`` and by response position on ``records`` (distillation traces
    with ``id`` and ``style``), from the student's and the teacher's per-token log-probs of them
    (two scores files, e.g. ``dcd-jax score-teacher`` run once with each model). With
    ``token_classes`` (:func:`record_token_classes`), also the mean weight by token class (overall and
    within each trace style), the student's NLL and the teacher's NLL by token class; with
    ``line_kinds`` (:func:`record_line_kinds`), the same three by kind of line."""
    student_lp, teacher_lp = read_logprobs(student_scores), read_logprobs(teacher_scores)
    ids = [str(r["id"]) for r in records]
    weights, mask = token_weights(objective, [student_lp[i] for i in ids], [teacher_lp[i] for i in ids])
    out = {"by_style": mean_weight_by_group(weights, mask, [r["style"] for r in records]),
           "by_position": mean_weight_by_position(weights, mask),
           "student_nll_by_style": mean_weight_by_group(-pad_rows([student_lp[i] for i in ids])[0], mask,
                                                        [r["style"] for r in records])}
    if token_classes is not None:
        classes = [token_classes[i] for i in ids]
        out["by_token_class"] = mean_by_token_class(weights, mask, classes)
        styles = [r["style"] for r in records]
        out["by_style_and_token_class"] = {
            style: mean_by_token_class(weights[rows], mask[rows], [c for c, keep in zip(classes, rows) if keep])
            for style in sorted(set(styles)) for rows in [np.array([x == style for x in styles])]}
        out["student_nll_by_token_class"] = mean_by_token_class(-pad_rows([student_lp[i] for i in ids])[0], mask,
                                                                classes)
        out["teacher_nll_by_token_class"] = mean_by_token_class(-pad_rows([teacher_lp[i] for i in ids])[0], mask,
                                                                classes)
    if line_kinds is not None:
        kinds = [line_kinds[i] for i in ids]
        for key, values in (("by_line_kind", weights), ("student_nll_by_line_kind", -pad_rows([student_lp[i] for i in ids])[0]),
                            ("teacher_nll_by_line_kind", -pad_rows([teacher_lp[i] for i in ids])[0])):
            out[key] = mean_by_token_class(values, mask, kinds, LINE_KINDS)
    return out


def style_counts(texts) -> dict[str, int]:
    """How many of ``texts`` are in each output style (:func:`~dcd_jax.data.synthetic.classify_style`)."""
    from dcd_jax.data.synthetic import classify_style

    return dict(collections.Counter(classify_style(t) for t in texts))


def output_diagnostics(generations: list[dict[str, Any]], num_steps: dict[str, int]) -> dict[str, Any]:
    """``accuracy_by_steps`` ({operations: accuracy}) and ``style_shares`` ({style: share}) of
    greedy generations (records with ``id``, ``response``, ``correct``)."""
    by_steps: dict[int, list[bool]] = collections.defaultdict(list)
    for g in generations:
        by_steps[num_steps[g["id"]]].append(bool(g["correct"]))
    counts = style_counts(g["response"] for g in generations)
    n = max(len(generations), 1)
    return {"accuracy_by_steps": {k: sum(v) / len(v) for k, v in sorted(by_steps.items())},
            "style_shares": {k: v / n for k, v in sorted(counts.items())}}


def error_shares(generations: list[dict[str, Any]]) -> dict[str, float]:
    """The anatomy of greedy outputs of the embedded task: the share of outputs with each kind of
    :func:`~dcd_jax.data.synthetic.trace_errors` error, and ``wrong_otherwise``, the share that are
    wrong with none of them (a wrong operand taken from the problem or an earlier line)."""
    from dcd_jax.data.synthetic import TRACE_ERRORS, trace_errors

    greedy = [g for g in generations if g.get("kind", "greedy") == "greedy"]
    counts = dict.fromkeys((*TRACE_ERRORS, "wrong_otherwise"), 0)
    for g in greedy:
        errors = trace_errors(g["prompt"], g["response"])
        for kind, n in errors.items():
            counts[kind] += n > 0
        counts["wrong_otherwise"] += not g["correct"] and not any(errors.values())
    return {k: v / max(len(greedy), 1) for k, v in counts.items()}
