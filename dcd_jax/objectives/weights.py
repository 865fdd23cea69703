"""Stop-gradient per-token weights: one function per weighting, one shared masking and reduction.

Every weighting maps the (stop-gradient) per-token statistics to a raw weight ``w_t`` and a
"clipped" indicator; :func:`compute_weights` dispatches on ``cfg.weighting`` and applies the
same masking and ``stop_gradient`` to all of them. The weighted reduction is shared too
(:mod:`dcd_jax.objectives.objective`), so a baseline differs from DCD in its weight only.

* ``none``   ``w_t = 1`` (SFT with ``loss=ce``, plain KD with ``loss=kl``).
* ``dcd``    ``l_t = log pi_theta(y_t) - log pi_T(y_t)``; ``w_t = sigmoid((l_t - b) / tau)``;
             ``w_t /= mean(w)`` over the batch's response tokens (``normalize``);
             ``w_t = clip(w_t, clip_min, clip_max)``; ``w_t = (1 - lam) + lam * w_t`` with
             ``lam = lam(step)`` (:func:`lam_schedule`).  (arXiv 2605.14071)
* ``dcd_prefix`` the DCD transform of the log-ratio averaged over the response prefix,
             ``m_t = mean_{s <= t} l_s`` (response tokens of the same sequence), then as ``dcd``:
             ``w_t = sigmoid((m_t - b) / tau)``, normalized, clipped, mixed by ``lam``; a token after a
             prefix the student would not have written counts less (offline counterpart of the
             accumulated-discrepancy weights of on-policy IW-OPD, arXiv 2606.22600).
* ``dft``    ``w_t = pi_theta(y_t)``  (Dynamic Fine-Tuning, Wu et al. 2025).
* ``idft``   ``w_t = pi_theta(y_t) ** alpha_t``, entropy-adaptive exponent
             ``alpha_t = s(step) (alpha_min + (alpha_max - alpha_min)(1 - H_t / log V))``.
* ``iw_sft`` sequence level ``w_s = clamp(exp(kappa mean_{t in s} log(pi_theta/pi_ref)), 0, c)``,
             token level ``w_t = clamp(pi_theta(y_t) / pi_ref(y_t), lo, hi)``;
             ``pi_ref`` = frozen initial student.
* ``todi``   ``w_t = 1`` (its per-vocabulary-entry weights live in the loss, see ``losses``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dcd_jax.objectives import segments
from dcd_jax.objectives.config import IDFTConfig, LamSchedule, ObjectiveConfig


class Weights(NamedTuple):
    weights: jax.Array  # [B, T] stop-gradient weights (1 outside the mask)
    clipped: jax.Array  # [B, T] 1.0 where a clamp changed the weight
    lam: jax.Array  # scalar correction strength used (1 for weightings without a schedule)


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
    """DCD: sigmoid of the token log-ratio, batch-normalized, clipped, mixed with 1 by ``lam``."""
    d = cfg.dcd
    w = jax.nn.sigmoid((log_ratio - d.b) / d.tau)
    if d.normalize:
        # Plain jnp reductions: under jit with a sharded batch this is the global-batch mean.
        mean = _masked_mean(w, mask)
        w = w / jnp.where(mean > 0, mean, 1.0)
    w, clipped = _clip(w, d.clip_min, d.clip_max)
    lam = lam_schedule(cfg.lam, step)
    return Weights((1.0 - lam) + lam * w, clipped, lam)


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
    """The stop-gradient weight of every token for ``cfg.weighting`` (1 outside ``mask``).

    All inputs are passed through ``stop_gradient``, and so is the result: ``jax.grad`` through
    the weight path alone is exactly zero.
    """
    sg = jax.lax.stop_gradient
    lp = sg(target_logprobs)
    ones = jnp.ones_like(lp)
    kind = cfg.weighting
    if kind in ("none", "todi"):
        out = Weights(ones, jnp.zeros_like(lp), jnp.ones((), jnp.float32))
    elif kind == "dcd":
        if teacher_logprobs is None:
            raise ValueError("weighting=dcd needs teacher_logprobs")
        out = dcd_weights(cfg, lp - sg(teacher_logprobs), mask, step)
    elif kind == "dcd_prefix":
        if teacher_logprobs is None:
            raise ValueError("weighting=dcd_prefix needs teacher_logprobs")
        out = dcd_prefix_weights(cfg, lp - sg(teacher_logprobs), mask, segment_ids, step)
    elif kind == "dft":
        out = Weights(jnp.exp(lp), jnp.zeros_like(lp), jnp.ones((), jnp.float32))
    elif kind == "idft":
        if entropy is None:
            raise ValueError("weighting=idft needs the student's entropy")
        alpha = idft_exponent(cfg.idft, sg(entropy), step, true_vocab_size)
        out = Weights(jnp.exp(alpha * lp), jnp.zeros_like(lp), _ramp(step, cfg.idft.warmup_steps))
    elif kind == "iw_sft":
        if ref_logprobs is None:
            raise ValueError("weighting=iw_sft needs the reference model's log-probs (ref_hidden / ref_unembed)")
        out = iw_sft_weights(cfg, lp - sg(ref_logprobs), mask, segment_ids)
    else:
        raise ValueError(f"unknown weighting {kind!r}")
    valid = mask > 0
    weights = out.weights
    if cfg.strength != 1.0:  # strength 0: plain SFT / KD (static: the default program is unchanged)
        weights = (1.0 - cfg.strength) + cfg.strength * weights
    return Weights(
        sg(jnp.where(valid, weights, 1.0)),
        sg(jnp.where(valid, out.clipped, 0.0)),
        sg(out.lam),
    )
