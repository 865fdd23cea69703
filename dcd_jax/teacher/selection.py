"""Trace selection by the student's fit: keep the teacher traces the student could have written.

Each trace ``s`` gets the mean, over its response tokens, of the student / teacher log-ratio,

    r_s = mean_{t in s} ( log pi_S(y_t | x, y_<t) - log pi_T(y_t | x, y_<t) ),

with ``pi_S`` the student *before* distillation (scored once, like the teacher) and ``pi_T`` the
teacher's cached log-probs. A trace in a style the student cannot follow has a very negative
``r_s``; the selection keeps the ``keep_fraction`` of traces with the largest ``r_s`` (ties broken
by id), or those with ``r_s >= min_log_ratio``. Training on the kept traces is plain SFT (or any
objective): the selection is fixed before training, so it cannot drift as the student learns
(a weight recomputed from the *current* student, ``weighting: dcd_sequence``, drifts back towards
uniform as the student learns the traces it was meant to discount; docs/objectives.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from dcd_jax import storage
from dcd_jax.atomic_files import atomic_write_text


def trace_log_ratios(student_logprobs: Mapping[str, Any], teacher_logprobs: Mapping[str, Any]) -> dict[str, float]:
    """``{id: r_s}``: the mean per-token student / teacher log-ratio of each trace both scored."""
    out = {}
    for rid, s in student_logprobs.items():
        t = teacher_logprobs.get(rid)
        if t is None:
            continue
        if len(s) != len(t):
            raise ValueError(f"trace {rid}: {len(s)} student log-probs but {len(t)} teacher log-probs "
                             "(scored with different tokenizers?)")
        out[rid] = float(sum(float(a) - float(b) for a, b in zip(s, t)) / max(len(s), 1))
    return out


def select_by_log_ratio(ratios: Mapping[str, float], *, keep_fraction: float | None = None,
                        min_log_ratio: float | None = None) -> list[str]:
    """The ids kept: the ``ceil(keep_fraction * N)`` largest ``r_s`` (ties by id), and/or ``r_s >= min_log_ratio``."""
    if keep_fraction is None and min_log_ratio is None:
        raise ValueError("give keep_fraction or min_log_ratio")
    ranked = sorted(ratios, key=lambda rid: (-ratios[rid], rid))
    if keep_fraction is not None:
        if not 0.0 < keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
        ranked = ranked[: math.ceil(keep_fraction * len(ranked))]
    if min_log_ratio is not None:
        ranked = [rid for rid in ranked if ratios[rid] >= min_log_ratio]
    return ranked


def select_traces(traces: str | Path, student_scores: str | Path, teacher_scores: str | Path, out: str | Path, *,
                  keep_fraction: float | None = None, min_log_ratio: float | None = None) -> dict[str, Any]:
    """Write the kept records of the JSONL file ``traces`` to ``out`` (same order, same fields) and
    ``<out>.selection.json`` (every trace's ``r_s``, the rule, counts). The scores files are per-token
    log-prob files of the same traces (``dcd-jax score-teacher`` output, run once with the student and
    once with the teacher); the teacher's stays valid for the kept subset (it is joined by id)."""
    from dcd_jax.eval.weight_diagnostics import read_logprobs

    ratios = trace_log_ratios(read_logprobs(student_scores), read_logprobs(teacher_scores))
    kept = set(select_by_log_ratio(ratios, keep_fraction=keep_fraction, min_log_ratio=min_log_ratio))
    lines = [line for line in storage.path(traces).read_text().splitlines() if line.strip()]
    chosen = [line for line in lines if str(json.loads(line).get("id")) in kept]
    atomic_write_text(out, "".join(line + "\n" for line in chosen))
    report = {"traces": len(lines), "scored": len(ratios), "kept": len(chosen), "keep_fraction": keep_fraction,
              "min_log_ratio": min_log_ratio, "log_ratios": ratios}
    atomic_write_text(f"{out}.selection.json", json.dumps(report, indent=1))
    return {k: v for k, v in report.items() if k != "log_ratios"}
