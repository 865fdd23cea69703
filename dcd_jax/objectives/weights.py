"""Stop-gradient per-token weights: a registry with one entry per weighting, one shared mix,
masking and reduction.

Each weighting is a :class:`Weighting` in :data:`WEIGHTINGS`: its name, its weight function
(the raw per-token weight ``w_t`` from stop-gradient statistics), the cached batch fields it
reads, whether it needs the frozen reference model, and its ``objective`` config section. Config
validation (:meth:`ObjectiveConfig.validate`), :func:`~dcd_jax.objectives.config.required_batch_fields`
and the objective all read the registry; adding a weighting is one function and one
:func:`register_weighting` call. :func:`compute_weights` applies the one strength mix and the
same masking and ``stop_gradient`` to all of them; the weighted reduction is shared too
(:mod:`dcd_jax.objectives.objective`), so a baseline differs from DCD in its weight only.

* ``none``   ``w_t = 1`` (SFT with ``loss=ce``, plain KD with ``loss=kl``).
* ``dcd``    ``l_t = log pi_theta(y_t) - log pi_T(y_t)``; ``w_t = sigmoid((l_t - b) / tau)``;
             ``w_t /= mean(w)`` over the batch's response tokens (``normalize``);
             ``w_t = clip(w_t, clip_min, clip_max)``.  (arXiv 2605.14071)
* ``dcd_prefix`` the DCD transform of the log-ratio averaged over the response prefix,
             ``m_t = mean_{s <= t} l_s`` (response tokens of the same sequence), then as ``dcd``:
             ``w_t = sigmoid((m_t - b) / tau)``, normalized, clipped; a token after a prefix the
             student would not have written counts less (offline counterpart of the
             accumulated-discrepancy weights of on-policy IW-OPD, arXiv 2606.22600).
* ``dcd_sequence`` the DCD transform of the log-ratio averaged over the whole response,
             ``m_s = mean_{t in s} l_t``, given to every token of trace ``s``:
             ``w_t = sigmoid((m_s - b) / tau)``, normalized, clipped. A soft trace selection: a
             trace the student would not write (high teacher / student ratio over all of it)
             counts less as a whole, while every token of a kept trace keeps its full signal
             (token ``dcd`` instead removes the signal from the hard tokens of every trace).
* ``dft``    ``w_t = pi_theta(y_t)``  (Dynamic Fine-Tuning, Wu et al. 2025).
* ``idft``   ``w_t = pi_theta(y_t) ** alpha_t``, entropy-adaptive exponent
             ``alpha_t = s(step) (alpha_min + (alpha_max - alpha_min)(1 - H_t / log V))``.
* ``iw_sft`` sequence level ``w_s = clamp(exp(kappa mean_{t in s} log(pi_theta/pi_ref)), 0, c)``,
             token level ``w_t = clamp(pi_theta(y_t) / pi_ref(y_t), lo, hi)``;
             ``pi_ref`` = frozen initial student.

The one mix (:func:`compute_weights`): ``w_t <- (1 - m) + m * w_t`` with ``m = strength * lam(step)``
for the DCD weightings (``lam`` ramps the correction in) and ``m = strength`` for the others;
``m = 0`` is exactly SFT / KD. (ToDi is a loss, ``loss: todi``: :mod:`dcd_jax.objectives.losses`.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Callable, NamedTuple

import jax
import jax.numpy as jnp

from dcd_jax.objectives import segments

if TYPE_CHECKING:  # config reads this registry to validate, so the types are imported for checkers only
    from dcd_jax.objectives.config import IDFTConfig, LamSchedule, ObjectiveConfig


class Weights(NamedTuple):
    weights: jax.Array  # [B, T] stop-gradient weights (1 outside the mask)
    clipped: jax.Array  # [B, T] 1.0 where a clamp changed the weight
    lam: jax.Array  # scalar schedule value (dcd: lam(step); idft: its warmup ramp; else 1)


class WeightInputs(NamedTuple):
    """What a weight function may read (all stop-gradient; ``[B, T]`` unless said otherwise)."""

    target_logprobs: jax.Array  # log pi_theta(y_t)
    mask: jax.Array  # 1.0 on response tokens
    segment_ids: jax.Array
    step: jax.Array | int
    true_vocab_size: int
    entropy: jax.Array | None  # the student's next-token entropy
    teacher_logprobs: jax.Array | None  # log pi_T(y_t) (cached or live)
    ref_logprobs: jax.Array | None  # log pi_ref(y_t), the frozen initial student


@dataclasses.dataclass(frozen=True)
class Weighting:
    """One token weighting of the registry.

    Attributes:
      name: the ``objective.weighting`` value.
      weight: ``(cfg, inputs) -> Weights``, the raw weight before the strength mix.
      batch_fields: cached batch fields it reads (beyond the base fields every objective reads).
      needs_reference_model: it reads ``ref_logprobs`` (the train state keeps the initial params).
      config_section: its ``objective.<section>`` options (None: it has none).
      lam_mix: the mix strength ramps with ``objective.lam`` (``m = strength * lam(step)``).
    """

    name: str
    weight: Callable[["ObjectiveConfig", WeightInputs], Weights]
    batch_fields: frozenset[str] = frozenset()
    needs_reference_model: bool = False
    config_section: str | None = None
    lam_mix: bool = False


WEIGHTINGS: dict[str, Weighting] = {}


def register_weighting(entry: Weighting) -> Weighting:
    """Add ``entry`` to :data:`WEIGHTINGS` (a name is registered once)."""
    if entry.name in WEIGHTINGS:
        raise ValueError(f"weighting {entry.name!r} is already registered")
    WEIGHTINGS[entry.name] = entry
    return entry


def _ramp(step: jax.Array | int, warmup_steps: int) -> jax.Array:
    """``min(1, step / warmup_steps)`` (1 when ``warmup_steps == 0``)."""
    if warmup_steps <= 0:
        return jnp.ones((), jnp.float32)
    return jnp.clip(jnp.asarray(step, jnp.float32) / warmup_steps, 0.0, 1.0)


def lam_schedule(sched: LamSchedule, step: jax.Array | int) -> jax.Array:
    """``lam(step)``: constant ``max``, or a linear / cosine ramp from 0 to ``max`` over warmup."""
    if sched.kind == "constant":
        frac = jnp.ones((), jnp.float32)
    elif sched.kind == "linear":
        frac = _ramp(step, sched.warmup_steps)
    elif sched.kind == "cosine":
        frac = 0.5 * (1.0 - jnp.cos(jnp.pi * _ramp(step, sched.warmup_steps)))
    else:
        raise ValueError(f"unknown lam schedule kind {sched.kind!r}")
    return sched.max * frac


def idft_exponent(cfg: IDFTConfig, entropy: jax.Array, step: jax.Array | int, true_vocab_size: int) -> jax.Array:
    """``alpha_t = s(step) * (alpha_min + (alpha_max - alpha_min) * (1 - H_t / log V))``."""
    h_norm = jnp.clip(entropy / math.log(max(true_vocab_size, 2)), 0.0, 1.0)
    return _ramp(step, cfg.warmup_steps) * (cfg.alpha_min + (cfg.alpha_max - cfg.alpha_min) * (1.0 - h_norm))


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask > 0, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1.0)


def _clip(w: jax.Array, lo: float | None, hi: float | None) -> tuple[jax.Array, jax.Array]:
    if lo is None and hi is None:
        return w, jnp.zeros_like(w)
    clipped_w = jnp.clip(w, lo, hi)
    return clipped_w, (clipped_w != w).astype(jnp.float32)


def dcd_weights(cfg: ObjectiveConfig, log_ratio: jax.Array, mask: jax.Array, step) -> Weights:
    """DCD: sigmoid of the token log-ratio, batch-normalized, clipped (``lam`` is returned for the mix)."""
    d = cfg.dcd
    w = jax.nn.sigmoid((log_ratio - d.b) / d.tau)
    if d.normalize:
        # Plain jnp reductions: under jit with a sharded batch this is the global-batch mean.
        mean = _masked_mean(w, mask)
        w = w / jnp.where(mean > 0, mean, 1.0)
    w, clipped = _clip(w, d.clip_min, d.clip_max)
    return Weights(w, clipped, lam_schedule(cfg.lam, step))


def prefix_mean(x: jax.Array, mask: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """``m_t = sum_{s <= t} mask_s x_s / sum_{s <= t} mask_s`` over positions ``s`` of ``t``'s segment.

    Packed rows hold several sequences: the running sums restart where ``segment_ids`` changes.
    Positions before the segment's first masked token get 0 (they are masked anyway).
    """
    x = jnp.where(mask > 0, x, 0.0)
    n = (mask > 0).astype(jnp.float32)
    cx, cn = jnp.cumsum(x, axis=-1), jnp.cumsum(n, axis=-1)
    idx = jnp.broadcast_to(jnp.arange(x.shape[-1]), x.shape)
    is_start = jnp.concatenate(
        [jnp.ones_like(segment_ids[..., :1], bool), segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
    start = jax.lax.cummax(jnp.where(is_start, idx, 0), axis=x.ndim - 1)
    # Sums up to (excluding) the segment's start position.
    base_x = jnp.take_along_axis(cx - x, start, axis=-1)
    base_n = jnp.take_along_axis(cn - n, start, axis=-1)
    count = cn - base_n
    return jnp.where(count > 0, (cx - base_x) / jnp.maximum(count, 1.0), 0.0)


def dcd_prefix_weights(cfg: ObjectiveConfig, log_ratio: jax.Array, mask: jax.Array, segment_ids: jax.Array,
                       step) -> Weights:
    """DCD on the prefix-mean log-ratio ``m_t`` (:func:`prefix_mean`), same knobs as ``dcd``."""
    return dcd_weights(cfg, prefix_mean(log_ratio, mask, segment_ids), mask, step)


def dcd_sequence_weights(cfg: ObjectiveConfig, log_ratio: jax.Array, mask: jax.Array, segment_ids: jax.Array,
                         step) -> Weights:
    """DCD on the trace-mean log-ratio ``m_s`` (one value per packed sequence), same knobs as ``dcd``."""
    seq_mean, _ = segments.sequence_means(log_ratio, mask, segment_ids)
    return dcd_weights(cfg, segments.broadcast_to_tokens(seq_mean, segment_ids), mask, step)


def iw_sft_weights(cfg: ObjectiveConfig, log_ratio_ref: jax.Array, mask: jax.Array, segment_ids: jax.Array) -> Weights:
    """iw-SFT with ``log_ratio_ref = log pi_theta(y_t) - log pi_ref(y_t)``."""
    c = cfg.iw_sft
    one = jnp.ones((), jnp.float32)
    if c.level == "token":
        w, clipped = _clip(jnp.exp(log_ratio_ref), c.lo, c.hi)
        return Weights(w, clipped, one)
    seq_mean, _ = segments.sequence_means(log_ratio_ref, mask, segment_ids)
    w_seq = jnp.exp(c.kappa * segments.broadcast_to_tokens(seq_mean, segment_ids))
    w, clipped = _clip(w_seq, 0.0, c.c)
    return Weights(w, clipped, one)


def _unit(x: jax.Array) -> Weights:
    return Weights(jnp.ones_like(x), jnp.zeros_like(x), jnp.ones((), jnp.float32))


def _idft(cfg: ObjectiveConfig, x: WeightInputs) -> Weights:
    if x.entropy is None:
        raise ValueError("weighting=idft needs the student's entropy")
    alpha = idft_exponent(cfg.idft, x.entropy, x.step, x.true_vocab_size)
    return Weights(jnp.exp(alpha * x.target_logprobs), jnp.zeros_like(x.target_logprobs),
                   _ramp(x.step, cfg.idft.warmup_steps))


TEACHER_LOGPROBS = frozenset({"teacher_logprobs"})

register_weighting(Weighting("none", lambda cfg, x: _unit(x.target_logprobs)))
register_weighting(Weighting(
    "dcd", lambda cfg, x: dcd_weights(cfg, x.target_logprobs - x.teacher_logprobs, x.mask, x.step),
    batch_fields=TEACHER_LOGPROBS, config_section="dcd", lam_mix=True))
register_weighting(Weighting(
    "dcd_prefix",
    lambda cfg, x: dcd_prefix_weights(cfg, x.target_logprobs - x.teacher_logprobs, x.mask, x.segment_ids, x.step),
    batch_fields=TEACHER_LOGPROBS, config_section="dcd", lam_mix=True))
register_weighting(Weighting(
    "dcd_sequence",
    lambda cfg, x: dcd_sequence_weights(cfg, x.target_logprobs - x.teacher_logprobs, x.mask, x.segment_ids, x.step),
    batch_fields=TEACHER_LOGPROBS, config_section="dcd", lam_mix=True))
register_weighting(Weighting(
    "dft", lambda cfg, x: Weights(jnp.exp(x.target_logprobs), jnp.zeros_like(x.target_logprobs),
                                  jnp.ones((), jnp.float32))))
register_weighting(Weighting("idft", _idft, config_section="idft"))
register_weighting(Weighting(
    "iw_sft", lambda cfg, x: iw_sft_weights(cfg, x.target_logprobs - x.ref_logprobs, x.mask, x.segment_ids),
    needs_reference_model=True, config_section="iw_sft"))


def compute_weights(
    cfg: ObjectiveConfig,
    *,
    target_logprobs: jax.Array,
    mask: jax.Array,
    segment_ids: jax.Array,
    step,
    true_vocab_size: int,
    entropy: jax.Array | None = None,
    teacher_logprobs: jax.Array | None = None,
    ref_logprobs: jax.Array | None = None,
) -> Weights:
    """The stop-gradient weight of every token for ``cfg.weighting`` (1 outside ``mask``):

        w_t = (1 - m) + m * raw_t,   m = strength * lam(step) (DCD weightings) or strength (others)

    All inputs are passed through ``stop_gradient``, and so is the result: ``jax.grad`` through
    the weight path alone is exactly zero.
    """
    entry = WEIGHTINGS.get(cfg.weighting)
    if entry is None:
        raise ValueError(f"unknown weighting {cfg.weighting!r}; registered: {sorted(WEIGHTINGS)}")
    if "teacher_logprobs" in entry.batch_fields and teacher_logprobs is None:
        raise ValueError(f"weighting={entry.name} needs teacher_logprobs")
    if entry.needs_reference_model and ref_logprobs is None:
        raise ValueError(f"weighting={entry.name} needs the reference model's log-probs (ref_hidden / ref_unembed)")
    sg = lambda x: None if x is None else jax.lax.stop_gradient(x)
    out = entry.weight(cfg, WeightInputs(sg(target_logprobs), mask, segment_ids, step, true_vocab_size,
                                         sg(entropy), sg(teacher_logprobs), sg(ref_logprobs)))
    weights = out.weights
    if entry.lam_mix or cfg.strength != 1.0:  # static: with neither, the program has no mix at all
        mix = cfg.strength * out.lam if entry.lam_mix else cfg.strength
        weights = (1.0 - mix) + mix * weights
    valid = mask > 0
    return Weights(
        sg(jnp.where(valid, weights, 1.0)),
        sg(jnp.where(valid, out.clipped, 0.0)),
        sg(out.lam),
    )
