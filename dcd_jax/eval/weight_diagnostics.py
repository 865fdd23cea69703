"""What a weighting emphasizes: mean token weight by trace style and by position in the response.

The training step logs the weight by relative position (``pos<i>_weight`` in ``metrics.jsonl``)
but cannot know a trace's style. This module recomputes the weights offline, with the training
code itself (:func:`~dcd_jax.objectives.weights.compute_weights`), from a student checkpoint's
per-token log-probs on a set of traces (scored by :func:`~dcd_jax.teacher.scoring.score_teacher`
with the student in the teacher's place) and the teacher's cached log-probs:

    w_t = compute_weights(cfg, log pi_student(y_t), log pi_T(y_t))   (the set is one batch)
    by_style[s] = sum_{t in traces of style s} w_t / #tokens of those traces
    by_position[i] = mean w_t over tokens in the i-th fifth of their response
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

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


def read_logprobs(path: str | Path) -> dict[str, np.ndarray]:
    """``{id: per-response-token log-probs}`` of a scores Parquet file."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["id", "teacher_logprobs"])
    return {str(i): np.asarray(v, np.float32) for i, v in zip(table.column("id").to_pylist(),
                                                              table.column("teacher_logprobs").to_pylist())}


def weight_diagnostics(objective: Any, records: Sequence[Mapping[str, Any]], student_scores: str | Path,
                       teacher_scores: str | Path) -> dict[str, Any]:
    """Mean weight by trace ``style`` and by response position on ``records`` (distillation traces
    with ``id`` and ``style``), from the student's and the teacher's per-token log-probs of them
    (two scores files, e.g. ``dcd-jax score-teacher`` run once with each model)."""
    student_lp, teacher_lp = read_logprobs(student_scores), read_logprobs(teacher_scores)
    ids = [str(r["id"]) for r in records]
    weights, mask = token_weights(objective, [student_lp[i] for i in ids], [teacher_lp[i] for i in ids])
    return {"by_style": mean_weight_by_group(weights, mask, [r["style"] for r in records]),
            "by_position": mean_weight_by_position(weights, mask),
            "student_nll_by_style": mean_weight_by_group(-pad_rows([student_lp[i] for i in ids])[0], mask,
                                                         [r["style"] for r in records])}


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
