"""Trace-stability metrics: is the distilled student still producing well-formed traces?

Accuracy alone hides *how* a student fails.  Offline distillation is prone to exposure bias: the
student never saw its own mistakes during training, so on its own prefixes it may drift into
repetition loops, never stop (truncation at the token budget), or forget the answer format.
This module measures, per benchmark:

* response length (mean / median / p90 / max, in tokens when token counts are given);
* truncation rate: share of responses that hit the max-token budget (``finished`` is False);
* repetition rate: share of responses containing an n-gram loop (:func:`repetition_detected`);
* loop-truncation rate: share that are both truncated and repetitive (the classic degenerate case);
* format-failure rate: share with no extractable final answer.

and, as an opt-in metric that needs teacher log-probs, ExAccErr(l) of Arora et al. (2022),
which quantifies how much of the student's error on its own prefixes is *excess* error caused by
exposure bias (see :func:`exaccerr`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

__all__ = [
    "repetition_detected",
    "repetition_rate",
    "length_stats",
    "truncation_rate",
    "format_failure_rate",
    "stability_summary",
    "kl_estimate_student_samples",
    "kl_estimate_teacher_samples",
    "ExAccErrResult",
    "exaccerr_from_losses",
    "exaccerr",
]

DEFAULT_NGRAM = 20
DEFAULT_MIN_REPEATS = 3

_HASH_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant: a good polynomial-hash base


def _units(seq: str | Sequence[int] | np.ndarray) -> np.ndarray:
    """Integer units of a response: token ids as given, or word ids for a string."""
    if isinstance(seq, str):
        vocab: dict[str, int] = {}
        return np.fromiter((vocab.setdefault(w, len(vocab)) for w in seq.split()), dtype=np.int64)
    return np.asarray(seq, dtype=np.int64).reshape(-1)


def repetition_detected(
    seq: str | Sequence[int] | np.ndarray,
    *,
    ngram: int = DEFAULT_NGRAM,
    min_repeats: int = DEFAULT_MIN_REPEATS,
) -> bool:
    """Whether a response contains a repeated n-gram loop.

    Definition: some window of ``ngram`` consecutive units occurs at least ``min_repeats`` times
    in the response (occurrences may overlap).  Units are token ids when ``seq`` is a sequence of
    ints (preferred: exact and tokenizer-aware), or whitespace-separated words for a string.

    Why this definition: a degenerate loop "u u u u ..." with a period p <= ``ngram`` makes every
    window inside it recur every p units, and a long loop unit (p > ``ngram``) repeats whole
    windows verbatim, so both are caught once the looping span reaches about
    ``ngram + (min_repeats - 1) * p`` units.  Ordinary reasoning restates short phrases but rarely
    repeats a 20-token span three times verbatim; raise ``ngram`` to be more conservative.

    Runs in O(len * ngram) vectorised numpy operations (a 64-bit polynomial hash of every window,
    with the windows of the most repeated hash compared exactly, so hash collisions cannot create
    a false positive).
    """
    if ngram < 1 or min_repeats < 2:
        raise ValueError("need ngram >= 1 and min_repeats >= 2")
    a = _units(seq)
    n_win = a.size - ngram + 1
    if n_win < min_repeats:
        return False
    x = a.astype(np.uint64) + np.uint64(1)
    h = np.zeros(n_win, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(ngram):
            h = h * _HASH_BASE + x[j : j + n_win]
    _, inverse, counts = np.unique(h, return_inverse=True, return_counts=True)
    for cand in np.flatnonzero(counts >= min_repeats):
        pos = np.flatnonzero(inverse == cand)
        first = a[pos[0] : pos[0] + ngram]
        same = sum(1 for p in pos if np.array_equal(a[p : p + ngram], first))
        if same >= min_repeats:
            return True
    return False


def repetition_rate(
    seqs: Sequence[str | Sequence[int] | np.ndarray],
    *,
    ngram: int = DEFAULT_NGRAM,
    min_repeats: int = DEFAULT_MIN_REPEATS,
) -> float:
    """Share of responses for which :func:`repetition_detected` is true (NaN if empty)."""
    if len(seqs) == 0:
        return float("nan")
    return float(np.mean([repetition_detected(s, ngram=ngram, min_repeats=min_repeats) for s in seqs]))


def length_stats(lengths: Sequence[int] | np.ndarray) -> dict[str, float]:
    """Mean, median, 90th percentile, min and max of response lengths."""
    x = np.asarray(lengths, dtype=np.float64).reshape(-1)
    if x.size == 0:
        return {k: float("nan") for k in ("mean", "median", "p90", "min", "max")}
    return {
        "mean": float(x.mean()),
        "median": float(np.median(x)),
        "p90": float(np.quantile(x, 0.9)),
        "min": float(x.min()),
        "max": float(x.max()),
    }


def truncation_rate(finished: Sequence[bool] | np.ndarray) -> float:
    """Share of responses that did *not* finish (no EOS before the max-token budget)."""
    f = np.asarray(finished, dtype=bool).reshape(-1)
    return float((~f).mean()) if f.size else float("nan")


def format_failure_rate(extracted: Sequence[str | None]) -> float:
    """Share of responses with no extractable final answer (``extracted`` is None or empty)."""
    if len(extracted) == 0:
        return float("nan")
    return float(np.mean([e is None or str(e).strip() == "" for e in extracted]))


def stability_summary(
    *,
    finished: Sequence[bool],
    extracted: Sequence[str | None],
    lengths: Sequence[int] | None = None,
    sequences: Sequence[str | Sequence[int]] | None = None,
    ngram: int = DEFAULT_NGRAM,
    min_repeats: int = DEFAULT_MIN_REPEATS,
) -> dict[str, float | int]:
    """All trace-stability metrics of one benchmark's responses (parallel sequences).

    Args:
        finished: per response, whether generation stopped by itself (EOS / stop string) rather
            than by hitting the max-token budget.
        extracted: per response, the extracted final answer or None
            (:attr:`~dcd_jax.eval.grading.GradeResult.extracted`).
        lengths: per response length in tokens (default: word counts of ``sequences``).
        sequences: per response token ids (preferred) or text, for the repetition check.
        ngram, min_repeats: repetition-loop definition, see :func:`repetition_detected`.
    """
    n = len(finished)
    if len(extracted) != n or (lengths is not None and len(lengths) != n) or (
        sequences is not None and len(sequences) != n
    ):
        raise ValueError("finished, extracted, lengths and sequences must have the same length")
    out: dict[str, float | int] = {"n_responses": n}
    if lengths is None and sequences is not None:
        lengths = [len(_units(s)) for s in sequences]
    if lengths is not None:
        out.update({f"length_{k}": v for k, v in length_stats(lengths).items()})
    out["truncation_rate"] = truncation_rate(finished)
    out["format_failure_rate"] = format_failure_rate(extracted)
    if sequences is not None:
        rep = np.array([repetition_detected(s, ngram=ngram, min_repeats=min_repeats) for s in sequences], bool)
        trunc = ~np.asarray(finished, dtype=bool)
        out["repetition_rate"] = float(rep.mean()) if n else float("nan")
        out["loop_truncation_rate"] = float((rep & trunc).mean()) if n else float("nan")
    return out


# --------------------------------------------------------------------------------------------
# ExAccErr (Arora et al., 2022)
# --------------------------------------------------------------------------------------------


def _log_ratio(logp_teacher: Any, logp_student: Any, clip: float | None) -> np.ndarray:
    t = np.asarray(logp_teacher, dtype=np.float64)
    s = np.asarray(logp_student, dtype=np.float64)
    if t.shape != s.shape:
        raise ValueError(f"teacher and student log-probs differ in shape: {t.shape} vs {s.shape}")
    d = t - s
    if clip is not None:
        d = np.clip(d, -clip, clip)
    return d


def kl_estimate_student_samples(
    logp_teacher: Any, logp_student: Any, *, clip_log_ratio: float | None = None
) -> np.ndarray:
    """Per-position estimate of KL(teacher || student) at contexts where the token was drawn from the student.

    With ``w = p_T(x) / p_S(x)`` and ``x ~ p_S``: ``E[w log w - w + 1] = KL(p_T || p_S)``.  Each
    term is >= 0 (it is the Bregman form of the importance-weighted estimator), so averages never
    go negative from noise.  A token the teacher gives probability 0 contributes exactly 1.
    """
    d = _log_ratio(logp_teacher, logp_student, clip_log_ratio)
    with np.errstate(over="ignore", invalid="ignore"):
        w = np.exp(d)
        est = w * d - w + 1.0
    return np.where(np.isneginf(d) | (w == 0.0), 1.0, est)


def kl_estimate_teacher_samples(
    logp_teacher: Any, logp_student: Any, *, clip_log_ratio: float | None = None
) -> np.ndarray:
    """Per-position estimate of KL(teacher || student) at contexts where the token was drawn from the teacher.

    With ``r = p_S(x) / p_T(x)`` and ``x ~ p_T``: ``E[r - 1 - log r] = KL(p_T || p_S)`` (the
    low-variance non-negative "k3" estimator).
    """
    d = _log_ratio(logp_teacher, logp_student, clip_log_ratio)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.exp(-d) - 1.0 + d


@dataclasses.dataclass(frozen=True)
class ExAccErrResult:
    """ExAccErr curve, one entry per prefix length ``l = 1 .. L``.

    Attributes:
        prefix_len: prefix lengths ``l``.
        regret: ``R_<=l``, accumulated per-step error along the student's own generations.
        per_step_error: ``eps_<=l``, mean per-step error along teacher generations.
        acc_err: ``AccErr_<=l = R_<=l / eps_<=l`` (equals ``l`` when there is no exposure bias).
        ex_acc_err_pct: ``%ExAccErr_<=l = 100 * (R_<=l - l * eps_<=l) / (l * eps_<=l)``.
        n_student, n_teacher: number of sequences of each kind reaching length ``l``.
    """

    prefix_len: np.ndarray
    regret: np.ndarray
    per_step_error: np.ndarray
    acc_err: np.ndarray
    ex_acc_err_pct: np.ndarray
    n_student: np.ndarray
    n_teacher: np.ndarray

    def at(self, length: int) -> float:
        """%ExAccErr at prefix length ``length`` (NaN when out of range)."""
        if not 1 <= length <= self.prefix_len.size:
            return float("nan")
        return float(self.ex_acc_err_pct[length - 1])

    def to_dict(self) -> dict[str, list[float]]:
        return {k: np.asarray(v).tolist() for k, v in dataclasses.asdict(self).items()}


def _padded_cumsum(seqs: Sequence[Any], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative sums of ragged sequences up to ``length`` and per-position survival counts."""
    n = len(seqs)
    cum = np.zeros((n, length), dtype=np.float64)
    alive = np.zeros((n, length), dtype=bool)
    for i, s in enumerate(seqs):
        x = np.asarray(s, dtype=np.float64).reshape(-1)[:length]
        cum[i, : x.size] = np.cumsum(x)
        alive[i, : x.size] = True
    return cum, alive


def exaccerr_from_losses(
    student_prefix_losses: Sequence[Any],
    teacher_prefix_losses: Sequence[Any],
    *,
    max_len: int | None = None,
    min_count: int = 1,
) -> ExAccErrResult:
    """ExAccErr(l) from per-position losses ``loss_t = KL(p_T(.|ctx_t) || p_S(.|ctx_t))`` (or estimates).

    Args:
        student_prefix_losses: one 1-D array per student-generated continuation; entry t is the
            per-step error of the student at the context (prompt + its own first t tokens).
        teacher_prefix_losses: the same on teacher-generated continuations of the same prompts.
        max_len: largest l (default: the longest length both kinds of sequences reach).
        min_count: entries supported by fewer sequences than this (of either kind) are NaN.

    With ``C_t(y) = sum_{s<=t} loss_s(y)`` the accumulated error of sequence y:
    ``R_<=l = mean_{student y, |y|>=l} C_l(y)``, ``eps_<=l = mean_{teacher y, |y|>=l} C_l(y) / l``,
    ``AccErr_<=l = R_<=l / eps_<=l`` and ``%ExAccErr_<=l = 100 (R_<=l - l eps_<=l) / (l eps_<=l)``.
    Averages at length l are over the sequences that reach l (as in the authors' code):
    a finished sequence stops contributing instead of counting as zero error.
    """
    if not student_prefix_losses or not teacher_prefix_losses:
        raise ValueError("need at least one student and one teacher sequence")
    s_max = max(np.size(s) for s in student_prefix_losses)
    t_max = max(np.size(t) for t in teacher_prefix_losses)
    length = min(s_max, t_max) if max_len is None else int(max_len)
    if length < 1:
        raise ValueError("sequences are empty")
    s_cum, s_alive = _padded_cumsum(student_prefix_losses, length)
    t_cum, t_alive = _padded_cumsum(teacher_prefix_losses, length)
    n_s = s_alive.sum(axis=0)
    n_t = t_alive.sum(axis=0)
    ls = np.arange(1, length + 1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        regret = (s_cum * s_alive).sum(axis=0) / n_s
        teacher_acc = (t_cum * t_alive).sum(axis=0) / n_t  # = l * eps_<=l
        eps = teacher_acc / ls
        acc_err = regret / eps
        ex = 100.0 * (regret - teacher_acc) / teacher_acc
    bad = (n_s < min_count) | (n_t < min_count) | ~(teacher_acc > 0)
    for arr in (acc_err, ex):
        arr[bad] = np.nan
    regret[n_s < min_count] = np.nan
    eps[n_t < min_count] = np.nan
    return ExAccErrResult(
        prefix_len=np.arange(1, length + 1),
        regret=regret,
        per_step_error=eps,
        acc_err=acc_err,
        ex_acc_err_pct=ex,
        n_student=n_s,
        n_teacher=n_t,
    )


def exaccerr(
    student_gen_teacher_logp: Sequence[Any],
    student_gen_student_logp: Sequence[Any],
    teacher_gen_teacher_logp: Sequence[Any],
    teacher_gen_student_logp: Sequence[Any],
    *,
    max_len: int | None = None,
    min_count: int = 1,
    clip_log_ratio: float | None = None,
) -> ExAccErrResult:
    """ExAccErr(l) (Arora et al., 2022, "Why Exposure Bias Matters") from sampled-token log-probs.

    The teacher plays the oracle.  The per-step error of the student at a context is
    ``KL(p_T(.|ctx) || p_S(.|ctx))`` - the error that teacher-forced (offline) distillation
    minimises, evaluated by the teacher.  ``R_<=l`` accumulates it along the student's *own*
    generations, ``l * eps_<=l`` along *teacher* generations; their ratio minus one is the excess
    error that exposure bias adds (0 % = none).

    Inputs are ragged lists (one 1-D array per sequence, continuation positions only, prompt
    excluded) of per-token log-probabilities, scored by the driver with both models:

    * ``student_gen_teacher_logp`` / ``student_gen_student_logp``: log p_T and log p_S of the
      tokens of student-sampled continuations (sampled at temperature 1 from p_S: the estimator
      relies on the tokens being draws from the distribution whose log-probs are given);
    * ``teacher_gen_teacher_logp`` / ``teacher_gen_student_logp``: the same on teacher-sampled
      continuations of the same prompts.

    KL is estimated per position without bias from the sampled token alone:
    :func:`kl_estimate_student_samples` (``w log w - w + 1``, ``w = p_T/p_S``) on student tokens,
    :func:`kl_estimate_teacher_samples` (``r - 1 - log r``, ``r = p_S/p_T``) on teacher tokens.
    A driver that has full logits can compute the exact per-position KL instead and call
    :func:`exaccerr_from_losses` directly.  ``clip_log_ratio`` bounds |log p_T - log p_S| to tame
    the variance of rare tokens (biased; off by default).
    """
    if len(student_gen_teacher_logp) != len(student_gen_student_logp):
        raise ValueError("student-generated: teacher and student log-prob lists differ in length")
    if len(teacher_gen_teacher_logp) != len(teacher_gen_student_logp):
        raise ValueError("teacher-generated: teacher and student log-prob lists differ in length")
    s_losses = [
        kl_estimate_student_samples(t, s, clip_log_ratio=clip_log_ratio)
        for t, s in zip(student_gen_teacher_logp, student_gen_student_logp)
    ]
    t_losses = [
        kl_estimate_teacher_samples(t, s, clip_log_ratio=clip_log_ratio)
        for t, s in zip(teacher_gen_teacher_logp, teacher_gen_student_logp)
    ]
    return exaccerr_from_losses(s_losses, t_losses, max_len=max_len, min_count=min_count)
