"""Configuration of the training objective: ``objective: {loss: ce|kl|todi|gkd, weighting: ..., ...}``.

Every option has a documented default; :meth:`ObjectiveConfig.validate` (called by
:func:`dcd_jax.config.from_dict`) refuses inconsistent settings with a :class:`ConfigError` that
says what to change. :func:`required_batch_fields` / :func:`check_batch_fields` tell the data
pipeline which cached teacher fields an objective needs, and how to produce missing ones. The
weightings, their batch fields and whether they need the reference model come from the registry
:data:`dcd_jax.objectives.weights.WEIGHTINGS`.

YAML example::

    objective:
      loss: ce                 # ce (token NLL) | kl (forward KL from the teacher's stored top-k) | todi | gkd (live teacher)
      weighting: dcd           # a registered weighting: none | dcd | dcd_prefix | dcd_sequence | dft | idft | iw_sft
      reduction: token         # token | sequence
      chunk_size: 256          # sequence chunk for the memory-light loss (0 = no chunking)
      dcd: {tau: 1.0, b: 0.0, normalize: true, clip_min: null, clip_max: null}
      lam: {kind: constant, max: 1.0, warmup_steps: 100}   # warmup_steps: for linear / cosine
"""

from __future__ import annotations

import dataclasses
from typing import AbstractSet, Iterable, Literal

from dcd_jax.config import ConfigError
from dcd_jax.objectives.weights import WEIGHTINGS

LOSSES = ("ce", "kl", "todi", "gkd")
TEACHER_TOPK = frozenset({"teacher_topk_ids", "teacher_topk_logprobs"})
# Cached batch fields each loss reads (beyond BASE_FIELDS).
LOSS_FIELDS = {"ce": frozenset(), "kl": TEACHER_TOPK, "todi": TEACHER_TOPK, "gkd": frozenset()}
# Losses that are a method of their own: their strength mixes the loss, they take no token weighting.
METHOD_LOSSES = ("todi", "gkd")

# The command that produces the cached teacher fields (see dcd_jax.cli).
SCORE_TEACHER_HINT = (
    "produce it with `dcd-jax score-teacher` (scores the traces with the teacher and caches its "
    "log-probs) and train on the scored data"
)

# Always needed: what the token-level objective is computed on.
BASE_FIELDS = frozenset({"targets", "loss_mask", "segment_ids"})

FIELD_DOCS = {
    "targets": "the next-token ids [B, T] (int32)",
    "loss_mask": "1 on response tokens [B, T] (float32)",
    "segment_ids": "packed-sequence ids [B, T] (int32, 0 = padding)",
    "teacher_logprobs": "the teacher's log-prob of each target token [B, T] (float32)",
    "teacher_topk_ids": "the teacher's top-k next-token ids [B, T, K] (int32)",
    "teacher_topk_logprobs": "the teacher's top-k next-token log-probs [B, T, K] (float32)",
}


class VocabMismatchError(ConfigError):
    """Teacher and student do not share one tokenizer (cross-tokenizer distillation is refused)."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclasses.dataclass(frozen=True)
class DCDConfig:
    """Distribution-corrected weights (arXiv 2605.14071).

    ``w_t = sigmoid((l_t - b) / tau)`` with ``l_t = log pi_theta(y_t) - log pi_T(y_t)``; then
    ``w_t / mean(w)`` over the batch's response tokens when ``normalize``; then
    ``clip(w_t, clip_min, clip_max)`` where a bound is set; then the ``lam`` mix with 1.
    """

    tau: float = 1.0  # temperature of the log-ratio transform (> 0); large tau -> uniform weights
    b: float = 0.0  # offset of the log-ratio; tau=1, b=0 gives pi_theta / (pi_theta + pi_T)
    normalize: bool = True  # divide by the mean weight over the batch's response tokens
    clip_min: float | None = None  # optional lower safety bound (after normalization)
    clip_max: float | None = None  # optional upper safety bound (after normalization)

    def validate(self) -> None:
        _check(self.tau > 0, f"objective.dcd.tau must be > 0, got {self.tau}")
        if self.clip_min is not None:
            _check(self.clip_min >= 0, f"objective.dcd.clip_min must be >= 0, got {self.clip_min}")
        if self.clip_max is not None:
            _check(self.clip_max > 0, f"objective.dcd.clip_max must be > 0, got {self.clip_max}")
        if self.clip_min is not None and self.clip_max is not None:
            _check(
                self.clip_min <= self.clip_max,
                f"objective.dcd.clip_min={self.clip_min} is above clip_max={self.clip_max}",
            )


@dataclasses.dataclass(frozen=True)
class LamSchedule:
    """Strength ``lam(step)`` of the DCD correction: ``w <- (1 - lam) + lam * w`` (lam = 0 is SFT).

    ``constant``: lam = max.  ``linear``: lam = max * min(1, step / warmup_steps).
    ``cosine``: lam = max * (1 - cos(pi * min(1, step / warmup_steps))) / 2.
    With ``warmup_steps = 0`` every kind is the constant ``max``.
    """

    # Default constant (full strength from step 0): the issue-14 validation sweep (docs/objectives.md,
    # "Defaults"): under a ramp the student first imitates the style DCD is meant to down-weight, and
    # once it has, its log-ratio no longer flags those tokens.
    kind: Literal["constant", "linear", "cosine"] = "constant"
    max: float = 1.0
    warmup_steps: int = 100

    def validate(self) -> None:
        _check(0.0 <= self.max <= 1.0, f"objective.lam.max must be in [0, 1], got {self.max}")
        _check(self.warmup_steps >= 0, f"objective.lam.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclasses.dataclass(frozen=True)
class IDFTConfig:
    """Entropy-adaptive DFT: ``w_t = pi_theta(y_t) ** alpha_t`` (stop-gradient) with

    ``alpha_t = s(step) * (alpha_min + (alpha_max - alpha_min) * (1 - H_t / log V))``,
    ``H_t`` the student's next-token entropy, ``V`` the true vocabulary size and
    ``s(step) = min(1, step / warmup_steps)`` (1 when ``warmup_steps = 0``). Confident positions
    (low entropy) get the full DFT exponent ``alpha_max``; uncertain ones stay close to SFT.
    """

    alpha_min: float = 0.0
    alpha_max: float = 1.0
    warmup_steps: int = 0

    def validate(self) -> None:
        _check(
            0.0 <= self.alpha_min <= self.alpha_max,
            f"objective.idft needs 0 <= alpha_min <= alpha_max, got alpha_min={self.alpha_min}, "
            f"alpha_max={self.alpha_max}",
        )
        _check(self.warmup_steps >= 0, f"objective.idft.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclasses.dataclass(frozen=True)
class IWSFTConfig:
    """Importance-weighted SFT against the frozen initial student ``pi_ref``.

    ``level: sequence``: ``w_s = clamp(exp(kappa * mean_{t in s} log(pi_theta / pi_ref)), 0, c)``
    for every token of sequence ``s``. ``level: token``: ``w_t = clamp(pi_theta / pi_ref, lo, hi)``.
    """

    level: Literal["sequence", "token"] = "sequence"
    kappa: float = 1.0
    c: float = 2.0
    lo: float = 0.5
    hi: float = 2.0

    def validate(self) -> None:
        _check(self.kappa >= 0, f"objective.iw_sft.kappa must be >= 0, got {self.kappa}")
        _check(self.c > 0, f"objective.iw_sft.c must be > 0, got {self.c}")
        _check(
            0.0 <= self.lo <= self.hi,
            f"objective.iw_sft needs 0 <= lo <= hi, got lo={self.lo}, hi={self.hi}",
        )


@dataclasses.dataclass(frozen=True)
class ToDiConfig:
    """ToDi (``loss: todi``): per-vocabulary-entry mix of forward and reverse KL on the teacher's top-k support.

    ``alpha_i = sigmoid(beta * log(p_i / q_i))`` (stop-gradient), loss
    ``sum_i alpha_i p_i log(p_i/q_i) + (1 - alpha_i) q_i log(q_i/p_i)``. Teacher probabilities
    are floored at ``min_prob`` inside the reverse-KL term and ``alpha`` (the teacher's tail
    bucket can be empty, where the reverse KL would be infinite).
    """

    beta: float = 1.0
    min_prob: float = 1e-8

    def validate(self) -> None:
        _check(self.beta > 0, f"objective.todi.beta must be > 0, got {self.beta}")
        _check(0 < self.min_prob < 1, f"objective.todi.min_prob must be in (0, 1), got {self.min_prob}")


@dataclasses.dataclass(frozen=True)
class KLConfig:
    """How the KL losses treat the teacher's probability mass outside its stored top-k.

    ``bucket`` (default): the tail is one extra outcome, teacher mass ``1 - sum_k p_T,k`` against
    the student's mass outside the same ids; the KL is then exact for the coarse-grained
    (top-k + "rest") distributions, a lower bound of the full-vocabulary KL.
    ``renormalize``: both distributions are renormalized over the top-k ids, the tail ignored.
    """

    tail: Literal["bucket", "renormalize"] = "bucket"


@dataclasses.dataclass(frozen=True)
class GKDConfig:
    """Online GKD (``loss: gkd``): a live teacher scores every batch; with probability ``lmbda`` the
    batch is first regenerated by the student (on-policy); the loss is the generalized JSD over the
    full vocabulary (:mod:`dcd_jax.objectives.gkd`).

    ``lmbda``: probability that a step's batch is replaced by student rollouts (one per row, from the
    row's first prompt, sampled at the current parameters). ``beta``: 0 = forward KL(teacher ||
    student), 1 = reverse KL, in between the generalized JSD. ``temperature`` / ``max_new_tokens``:
    rollout sampling; prompts longer than ``data.seq_len - max_new_tokens`` tokens are left out of
    the rollout batch. ``teacher_path``: the teacher (same tokenizer as the student), loaded frozen
    on the student's mesh in ``teacher_dtype`` (bfloat16 on accelerators, float32 for exact CPU
    checks).
    """

    lmbda: float = 0.5
    beta: float = 0.5
    temperature: float = 1.0
    max_new_tokens: int = 128
    teacher_path: str = ""
    teacher_dtype: Literal["float32", "bfloat16"] = "bfloat16"

    def validate(self) -> None:
        _check(0.0 <= self.lmbda <= 1.0, f"objective.gkd.lmbda must be in [0, 1], got {self.lmbda}")
        _check(0.0 <= self.beta <= 1.0, f"objective.gkd.beta must be in [0, 1], got {self.beta}")
        _check(self.temperature > 0, f"objective.gkd.temperature must be > 0, got {self.temperature}")
        _check(self.max_new_tokens >= 1, f"objective.gkd.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """The training objective: a per-token loss, a stop-gradient per-token weight, a reduction.

    ``loss``: ``ce`` = token NLL ``-log pi_theta(y_t)``; ``kl`` = forward KL(pi_T || pi_theta) on
    the teacher's stored top-k support (tail per ``kl.tail``); ``todi`` = ToDi's per-entry mix of
    forward and reverse KL on that support (``todi``); ``gkd`` = generalized JSD to a live teacher
    over the full vocabulary, on partly student-generated batches (``gkd``).
    ``weighting``: a registered weighting (:data:`~dcd_jax.objectives.weights.WEIGHTINGS`): ``none``
    (SFT / plain KD), ``dcd`` (the method), ``dcd_prefix`` (DCD on the prefix-mean log-ratio), ``dcd_sequence``
    (DCD on the trace-mean log-ratio: a soft trace selection; both use the ``dcd`` and ``lam``
    knobs), ``dft``, ``idft``, ``iw_sft`` - the offline baselines. ``todi``
    and ``gkd`` losses take ``weighting: none``.
    ``reduction``: ``token`` = sum over response tokens / their number (global batch);
    ``sequence`` = mean over each sequence's response tokens, then mean over sequences.
    ``chunk_size``: sequence positions per chunk of the memory-light loss (0 = whole sequence).
    ``strength``: the one mixing knob ``s`` of every method: weights ``w <- (1 - m) + m * w`` with
    ``m = s * lam(step)`` for the DCD weightings and ``m = s`` otherwise; ``loss: todi`` mixes its
    loss, ``(1 - s) * forward KL + s * ToDi``. ``s = 0`` is exactly plain SFT (ce) / KD (kl).
    """

    loss: Literal["ce", "kl", "todi", "gkd"] = "ce"
    weighting: str = "none"
    reduction: Literal["token", "sequence"] = "token"
    chunk_size: int = 256
    strength: float = 1.0
    dcd: DCDConfig = dataclasses.field(default_factory=DCDConfig)
    lam: LamSchedule = dataclasses.field(default_factory=LamSchedule)
    idft: IDFTConfig = dataclasses.field(default_factory=IDFTConfig)
    iw_sft: IWSFTConfig = dataclasses.field(default_factory=IWSFTConfig)
    todi: ToDiConfig = dataclasses.field(default_factory=ToDiConfig)
    kl: KLConfig = dataclasses.field(default_factory=KLConfig)
    gkd: GKDConfig = dataclasses.field(default_factory=GKDConfig)

    def validate(self) -> None:
        _check(self.loss in LOSSES, f"objective.loss={self.loss!r}; expected one of {list(LOSSES)}")
        if self.weighting == "todi":
            raise ConfigError(
                "objective.weighting=todi is now objective.loss=todi (ToDi mixes forward and reverse KL per "
                "vocabulary entry: a loss, not a token weight); set loss: todi, weighting: none"
            )
        _check(
            self.weighting in WEIGHTINGS,
            f"objective.weighting={self.weighting!r}; expected a registered weighting: {sorted(WEIGHTINGS)}",
        )
        _check(
            self.reduction in ("token", "sequence"),
            f"objective.reduction={self.reduction!r}; expected 'token' or 'sequence'",
        )
        _check(self.chunk_size >= 0, f"objective.chunk_size must be >= 0 (0 = no chunking), got {self.chunk_size}")
        _check(0.0 <= self.strength <= 1.0, f"objective.strength must be in [0, 1], got {self.strength}")
        if self.loss in METHOD_LOSSES:
            _check(
                self.weighting == "none",
                f"objective.loss={self.loss} takes no token weighting (got weighting={self.weighting}); use weighting=none",
            )
        if self.loss == "gkd":
            _check(bool(self.gkd.teacher_path), "objective.loss=gkd needs objective.gkd.teacher_path (the live teacher)")
        for sub in (self.dcd, self.lam, self.idft, self.iw_sft, self.todi, self.gkd):
            sub.validate()

    @property
    def needs_reference_model(self) -> bool:
        """The weighting reads the frozen initial student (``ref_hidden``; ``iw_sft``)."""
        return WEIGHTINGS[self.weighting].needs_reference_model

    @property
    def uses_teacher_topk(self) -> bool:
        """The loss reads the teacher's cached top-k (``kl``, ``todi``)."""
        return LOSS_FIELDS[self.loss] >= TEACHER_TOPK


def required_batch_fields(cfg: ObjectiveConfig) -> set[str]:
    """The batch fields ``compute_objective(cfg, ...)`` reads: the base fields, the loss's and the weighting's."""
    return set(BASE_FIELDS | LOSS_FIELDS[cfg.loss] | WEIGHTINGS[cfg.weighting].batch_fields)


def check_batch_fields(cfg: ObjectiveConfig, available_fields: Iterable[str] | AbstractSet[str]) -> None:
    """Raise a :class:`ConfigError` naming each missing field, why it is needed and how to get it."""
    available = set(available_fields)
    missing = sorted(required_batch_fields(cfg) - available)
    if not missing:
        return
    lines = []
    for name in missing:
        if name in LOSS_FIELDS[cfg.loss]:
            why = f"loss={cfg.loss}"
        elif name in WEIGHTINGS[cfg.weighting].batch_fields:
            why = f"weighting={cfg.weighting}"
        else:
            why = "every objective"
        lines.append(f"{why} needs `{name}` ({FIELD_DOCS.get(name, '?')}) in the data")
    hint = SCORE_TEACHER_HINT if any(n.startswith("teacher_") for n in missing) else (
        "the data pipeline must provide it"
    )
    raise ConfigError("; ".join(lines) + f"; {hint}. Fields present: {sorted(available)}")


def check_vocab_alignment(
    *,
    student_vocab_size: int,
    teacher_vocab_size: int,
    student_true_vocab_size: int | None = None,
    teacher_true_vocab_size: int | None = None,
    student_tokenizer_hash: str | None = None,
    teacher_tokenizer_hash: str | None = None,
) -> int:
    """The tokenizer vocabulary shared by teacher and student, or :class:`VocabMismatchError`.

    Embedding matrices may differ by padding rows only (e.g. Qwen2.5-7B has 152064 rows and
    Qwen2.5-0.5B 151936 for one 151665-token tokenizer): losses are computed on the first
    ``true_vocab_size`` entries and padding rows are masked out. Different tokenizers (different
    true sizes or, when given, different tokenizer fingerprints) are refused.
    """
    s_true = student_true_vocab_size or student_vocab_size
    t_true = teacher_true_vocab_size or teacher_vocab_size
    if s_true > student_vocab_size or t_true > teacher_vocab_size:
        raise VocabMismatchError(
            f"true vocabulary larger than the embedding: student {s_true} > {student_vocab_size} rows or "
            f"teacher {t_true} > {teacher_vocab_size} rows"
        )
    if s_true != t_true:
        raise VocabMismatchError(
            f"teacher and student tokenizers differ: teacher vocabulary has {t_true} tokens, student {s_true} "
            f"(embedding rows {teacher_vocab_size} vs {student_vocab_size}). Distillation from cached teacher "
            "log-probs needs one shared tokenizer; pick a student from the teacher's model family"
        )
    if student_tokenizer_hash and teacher_tokenizer_hash and student_tokenizer_hash != teacher_tokenizer_hash:
        raise VocabMismatchError(
            f"teacher and student tokenizers differ (fingerprints {teacher_tokenizer_hash!r} vs "
            f"{student_tokenizer_hash!r}) although both have {s_true} tokens; cached teacher token ids "
            "would mean different strings for the student"
        )
    return s_true


def validate_batch(cfg: ObjectiveConfig, batch, *, true_vocab_size: int) -> None:
    """Host-side check of one batch (e.g. the first): fields, shapes and token-id ranges.

    Call it outside jit on NumPy arrays (any leading dims before ``T``); it raises :class:`ConfigError` for missing fields or
    inconsistent shapes and :class:`VocabMismatchError` when target or teacher top-k ids on
    response tokens fall outside the tokenizer vocabulary (teacher data from another tokenizer).
    """
    import numpy as np

    check_batch_fields(cfg, batch.keys())
    targets = np.asarray(batch["targets"])
    shape = targets.shape
    if len(shape) < 2:
        raise ConfigError(f"batch.targets must be [B, T] (or [accum, B, T]), got shape {shape}")
    for name in ("loss_mask", "segment_ids", "teacher_logprobs"):
        if name in batch and np.shape(batch[name]) != shape:
            raise ConfigError(f"batch.{name} has shape {np.shape(batch[name])}, expected {shape} like targets")
    mask = (np.asarray(batch["loss_mask"]) > 0) & (np.asarray(batch["segment_ids"]) > 0)
    bad = mask & ((targets < 0) | (targets >= true_vocab_size))
    if bad.any():
        raise VocabMismatchError(
            f"{int(bad.sum())} response target ids fall outside the tokenizer vocabulary [0, {true_vocab_size})"
        )
    if "teacher_topk_ids" in batch and cfg.uses_teacher_topk:
        ids = np.asarray(batch["teacher_topk_ids"])
        lps = np.asarray(batch["teacher_topk_logprobs"])
        if ids.shape[:-1] != shape or lps.shape != ids.shape:
            raise ConfigError(
                f"teacher_topk_ids {ids.shape} / teacher_topk_logprobs {lps.shape} must both be [B, T, K] with "
                f"[B, T] = {shape}"
            )
        bad = mask[..., None] & ((ids < 0) | (ids >= true_vocab_size))
        if bad.any():
            raise VocabMismatchError(
                f"{int(bad.sum())} teacher top-k ids on response tokens fall outside the student's tokenizer "
                f"vocabulary [0, {true_vocab_size}): the teacher data was scored with a different tokenizer"
            )
        dup = np.sort(ids, axis=-1)
        if (mask & (dup[..., 1:] == dup[..., :-1]).any(-1)).any():
            raise ConfigError("teacher_topk_ids repeat an id at some response position; top-k ids must be distinct")
