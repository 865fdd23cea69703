"""The training objective: per-token loss x stop-gradient weight -> (weighted sum, denominator).

    loss = loss_sum / denominator

``reduction='token'`` (default):
    loss_sum = sum_{b,t} m_bt w_bt l_bt,             denominator = sum_{b,t} m_bt
``reduction='sequence'`` (mean per sequence, then over sequences):
    loss_sum = sum_s (1/n_s) sum_{t in s} m_t w_t l_t,  denominator = #{s : n_s > 0}

with ``m`` = loss_mask (response tokens of non-padding segments: prompt and padding tokens
never enter either term, in the KL too), ``l`` the per-token loss (``ce`` or ``kl``) and ``w``
the weight of ``cfg.weighting`` (:mod:`dcd_jax.objectives.weights`). Returning the pair instead
of a mean keeps gradient accumulation and multi-host averaging exact: add the ``loss_sum`` s and
the ``denominator`` s of all micro-batches, divide once (the pattern of Tunix's weighted
metrics and MaxText's distillation metrics). The batch-level normalization of the DCD weights
is over the batch given to one call (the global batch under jit with sharded arrays; with
gradient accumulation, each global micro-batch).

Diagnostics come back as additive statistics (see :data:`METRIC_DOC`), merged across
micro-batches / hosts with :func:`merge_metrics` and turned into readable numbers with
:func:`summarize_metrics`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from dcd_jax.objectives import losses, segments
from dcd_jax.objectives.config import ObjectiveConfig, required_batch_fields
from dcd_jax.objectives.gkd import generalized_jsd_chunked
from dcd_jax.objectives.logprobs import TokenStats, token_logprobs_chunked
from dcd_jax.objectives.weights import compute_weights

NUM_POSITION_BINS = 10

METRIC_DOC = {
    "loss_sum": "weighted loss sum (= ObjectiveOutput.loss_sum, no gradient)",
    "denominator": "loss denominator (tokens or sequences)",
    "tokens": "number of response tokens",
    "sequences": "number of sequences with at least one response token",
    "nll_sum": "sum of -log pi_theta(y_t) over response tokens (unweighted)",
    "entropy_sum": "sum of the student's next-token entropy over response tokens",
    "kl_sum": "sum of the unweighted per-token KL (loss=kl)",
    "jsd_sum": "sum of the per-token generalized JSD to the live teacher (loss=gkd)",
    "weight_sum": "sum of token weights",
    "weight_sq_sum": "sum of squared token weights",
    "weight_min": "minimum token weight (merge: min)",
    "weight_max": "maximum token weight (merge: max)",
    "clipped_count": "tokens whose weight a clamp changed",
    "seq_weight_sum": "sum over sequences of the sequence's mean token weight W_s",
    "seq_weight_sq_sum": "sum over sequences of W_s^2",
    "log_ratio_sum": "sum of l_t = log pi_theta(y_t) - log pi_T(y_t) (when teacher_logprobs is in the batch)",
    "todi_alpha_sum": "sum of ToDi's per-entry alpha over response tokens' support entries",
    "todi_alpha_count": "number of such entries",
    "lam": "schedule value at this step (dcd: lam; idft: warmup scale; else 1) (merge: last)",
    "pos{i}_weight_sum": "sum of token weights in relative-position bin i (0..9) of their trace",
    "pos{i}_count": "response tokens in bin i",
}

_LAST = ("lam",)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ObjectiveOutput:
    """``loss = loss_sum / denominator``; ``metrics``: additive diagnostics (:data:`METRIC_DOC`)."""

    loss_sum: jax.Array  # scalar, differentiable
    denominator: jax.Array  # scalar, no gradient
    metrics: dict[str, jax.Array]

    @property
    def loss(self) -> jax.Array:
        return self.loss_sum / jnp.maximum(self.denominator, 1.0)


def _as_f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def compute_objective(
    cfg: ObjectiveConfig,
    hidden: jax.Array,
    unembed: jax.Array,
    batch: Mapping[str, Any],
    *,
    step: jax.Array | int,
    true_vocab_size: int | None = None,
    ref_hidden: jax.Array | None = None,
    ref_unembed: jax.Array | None = None,
    teacher_hidden: jax.Array | None = None,
    teacher_unembed: jax.Array | None = None,
) -> ObjectiveOutput:
    """Weighted loss of the student on one (global) batch of packed traces.

    Args:
      cfg: the objective (validated :class:`ObjectiveConfig`; static under jit).
      hidden: student post-final-norm hidden states ``[B, T, D]``.
      unembed: student unembedding ``[D, V]`` (logits = hidden @ unembed).
      batch: ``targets``, ``loss_mask``, ``segment_ids`` and the teacher fields the objective
        needs (:func:`~dcd_jax.objectives.config.required_batch_fields`).
      step: optimizer step for the ``lam`` / ``idft`` schedules (Python int or traced).
      true_vocab_size: tokenizer vocabulary (columns beyond it are padding); None = ``V``.
      ref_hidden, ref_unembed: frozen reference model (``iw_sft`` only; no gradient flows).
      teacher_hidden, teacher_unembed: the live teacher on the same batch (``loss=gkd`` only; no
        gradient flows).
    """
    missing = sorted(f for f in ("targets", "loss_mask", "segment_ids") if f not in batch)
    if missing:
        raise KeyError(f"batch lacks {missing}")
    vocab = unembed.shape[-1]
    true_vocab_size = vocab if true_vocab_size is None else int(true_vocab_size)
    targets = jnp.asarray(batch["targets"], jnp.int32)
    segment_ids = jnp.asarray(batch["segment_ids"], jnp.int32)
    mask = jnp.where(segment_ids > 0, _as_f32(batch["loss_mask"]), 0.0)
    valid = mask > 0

    topk_ids = None
    if cfg.uses_teacher_topk:
        for f in ("teacher_topk_ids", "teacher_topk_logprobs"):
            if f not in batch:
                raise KeyError(f"loss={cfg.loss} needs `{f}` in the batch")
        # Filler ids at masked positions: any in-range id (they are never used).
        topk_ids = jnp.where(valid[..., None], jnp.asarray(batch["teacher_topk_ids"], jnp.int32), 0)
        topk_ids = jnp.clip(topk_ids, 0, true_vocab_size - 1)
    gkd_stats = None
    if cfg.loss == "gkd":
        if teacher_hidden is None or teacher_unembed is None:
            raise ValueError("loss=gkd needs teacher_hidden and teacher_unembed (the live teacher on this batch)")
        # One pass over the vocabulary gives the JSD and the student's own statistics.
        gkd_stats = generalized_jsd_chunked(
            hidden, unembed, teacher_hidden, teacher_unembed, targets, beta=cfg.gkd.beta,
            true_vocab_size=true_vocab_size, chunk_size=cfg.chunk_size or targets.shape[1],
        )
        stats = TokenStats(target_logprobs=gkd_stats.student_target_logprobs, entropy=gkd_stats.student_entropy)
    else:
        stats = token_logprobs_chunked(
            hidden,
            unembed,
            targets,
            true_vocab_size=true_vocab_size,
            chunk_size=cfg.chunk_size,
            gather_ids=topk_ids,
            return_entropy=True,
        )
    teacher_lp = None
    if gkd_stats is not None:
        teacher_lp = jnp.where(valid, gkd_stats.teacher_target_logprobs, 0.0)
    elif "teacher_logprobs" in batch:
        teacher_lp = jnp.where(valid, _as_f32(batch["teacher_logprobs"]), 0.0)
    elif "teacher_logprobs" in required_batch_fields(cfg):
        raise KeyError(f"weighting={cfg.weighting} needs `teacher_logprobs` in the batch")
    ref_lp = None
    if cfg.needs_reference_model:
        if ref_hidden is None or ref_unembed is None:
            raise ValueError(f"weighting={cfg.weighting} needs ref_hidden and ref_unembed (the frozen initial student)")
        ref_lp = token_logprobs_chunked(
            jax.lax.stop_gradient(ref_hidden),
            jax.lax.stop_gradient(ref_unembed),
            targets,
            true_vocab_size=true_vocab_size,
            chunk_size=cfg.chunk_size,
            return_entropy=False,
        ).target_logprobs

    # Per-token loss.
    metrics: dict[str, jax.Array] = {}
    if cfg.uses_teacher_topk:
        teacher_topk = losses.sanitize_teacher_topk(batch["teacher_topk_logprobs"], mask)
        if cfg.loss == "todi":
            per_token, alpha = losses.todi_token_loss(
                teacher_topk, stats.gathered_logprobs, stats.rest_logprob,
                tail=cfg.kl.tail, beta=cfg.todi.beta, min_prob=cfg.todi.min_prob,
            )
            metrics["todi_alpha_sum"] = jnp.sum(jnp.where(valid[..., None], alpha, 0.0))
            metrics["todi_alpha_count"] = jnp.sum(mask) * alpha.shape[-1]
            kl_value = losses.forward_kl_token_loss(
                teacher_topk, stats.gathered_logprobs, stats.rest_logprob, tail=cfg.kl.tail
            )
            if cfg.strength != 1.0:  # the method's one mix; strength 0: plain forward-KL distillation
                per_token = (1.0 - cfg.strength) * kl_value + cfg.strength * per_token
        else:
            per_token = kl_value = losses.forward_kl_token_loss(
                teacher_topk, stats.gathered_logprobs, stats.rest_logprob, tail=cfg.kl.tail
            )
        metrics["kl_sum"] = jax.lax.stop_gradient(jnp.sum(jnp.where(valid, kl_value, 0.0)))
    elif gkd_stats is not None:
        per_token = gkd_stats.jsd
        metrics["jsd_sum"] = jax.lax.stop_gradient(jnp.sum(jnp.where(valid, per_token, 0.0)))
    else:
        per_token = losses.ce_token_loss(stats.target_logprobs)

    w = compute_weights(
        cfg,
        target_logprobs=stats.target_logprobs,
        mask=mask,
        segment_ids=segment_ids,
        step=step,
        true_vocab_size=true_vocab_size,
        entropy=stats.entropy,
        teacher_logprobs=teacher_lp,
        ref_logprobs=ref_lp,
    )

    # Shared weighted reduction; masked positions are selected away (never multiplied by 0).
    contrib = jnp.where(valid, w.weights * per_token, 0.0)
    if cfg.reduction == "token":
        loss_sum = jnp.sum(contrib)
        denominator = jnp.sum(mask)
    else:
        counts = segments.sequence_counts(mask, segment_ids)
        seq_sums = segments.segment_sum(contrib, segment_ids)
        loss_sum = jnp.sum(jnp.where(counts > 0, seq_sums / jnp.where(counts > 0, counts, 1.0), 0.0))
        denominator = jnp.sum((counts > 0).astype(jnp.float32))
    denominator = jax.lax.stop_gradient(denominator)

    metrics.update(
        _diagnostics(
            weights=w.weights, clipped=w.clipped, mask=mask, segment_ids=segment_ids,
            target_logprobs=stats.target_logprobs, entropy=stats.entropy, teacher_logprobs=teacher_lp,
        )
    )
    metrics["loss_sum"] = jax.lax.stop_gradient(loss_sum)
    metrics["denominator"] = denominator
    metrics["lam"] = w.lam
    return ObjectiveOutput(loss_sum=loss_sum, denominator=denominator, metrics=metrics)


def _diagnostics(*, weights, clipped, mask, segment_ids, target_logprobs, entropy, teacher_logprobs) -> dict[str, jax.Array]:
    """Additive weight diagnostics over the response tokens (all stop-gradient)."""
    sg = jax.lax.stop_gradient
    valid = mask > 0
    w = sg(weights)
    lp = sg(target_logprobs)

    def msum(x):
        return jnp.sum(jnp.where(valid, x, 0.0))

    out = {
        "tokens": jnp.sum(mask),
        "nll_sum": msum(-lp),
        "weight_sum": msum(w),
        "weight_sq_sum": msum(w * w),
        "weight_min": jnp.min(jnp.where(valid, w, jnp.inf)),
        "weight_max": jnp.max(jnp.where(valid, w, -jnp.inf)),
        "clipped_count": msum(clipped),
    }
    if entropy is not None:
        out["entropy_sum"] = msum(sg(entropy))
    if teacher_logprobs is not None:
        out["log_ratio_sum"] = msum(lp - sg(teacher_logprobs))
    seq_w, present = segments.sequence_means(w, mask, segment_ids)
    out["sequences"] = jnp.sum(present)
    out["seq_weight_sum"] = jnp.sum(seq_w * present)
    out["seq_weight_sq_sum"] = jnp.sum(seq_w * seq_w * present)
    bins = segments.relative_position_bins(mask, segment_ids, NUM_POSITION_BINS)
    onehot = (bins[..., None] == jnp.arange(NUM_POSITION_BINS)) & valid[..., None]
    pos_w = jnp.sum(jnp.where(onehot, w[..., None], 0.0), axis=(0, 1))
    pos_n = jnp.sum(onehot.astype(jnp.float32), axis=(0, 1))
    for i in range(NUM_POSITION_BINS):
        out[f"pos{i}_weight_sum"] = pos_w[i]
        out[f"pos{i}_count"] = pos_n[i]
    return out


def merge_metrics(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Combine the metrics of two micro-batches / hosts: add sums and counts, min/max extremes."""
    out = {}
    for key in a.keys() | b.keys():
        if key not in a or key not in b:
            out[key] = a[key] if key in a else b[key]
        elif key.endswith("_min"):
            out[key] = jnp.minimum(a[key], b[key])
        elif key.endswith("_max"):
            out[key] = jnp.maximum(a[key], b[key])
        elif key in _LAST:
            out[key] = b[key]
        else:
            out[key] = a[key] + b[key]
    return out


def summarize_metrics(m: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Readable diagnostics from (merged) additive metrics.

    ``loss``, ``nll``, ``entropy``, ``kl``: means; ``weight_mean/std/min/max``; ``frac_clipped``;
    ``ess_token = (sum w)^2 / sum w^2`` over tokens and ``ess_token_frac = ess_token / tokens``;
    ``ess_seq``, ``ess_seq_frac`` the same over sequences (sequence weight = mean token weight);
    ``weight_pos{i}`` mean weight in relative-position bin i; ``log_ratio_mean``; ``lam``.
    """

    def div(a, b):
        return jnp.asarray(a, jnp.float32) / jnp.maximum(jnp.asarray(b, jnp.float32), 1e-12)

    tokens = m["tokens"]
    mean = div(m["weight_sum"], tokens)
    out = {
        "loss": div(m["loss_sum"], m["denominator"]),
        "nll": div(m["nll_sum"], tokens),
        "weight_mean": mean,
        "weight_std": jnp.sqrt(jnp.maximum(div(m["weight_sq_sum"], tokens) - mean * mean, 0.0)),
        "weight_min": jnp.asarray(m["weight_min"], jnp.float32),
        "weight_max": jnp.asarray(m["weight_max"], jnp.float32),
        "frac_clipped": div(m["clipped_count"], tokens),
        "ess_token": div(jnp.square(m["weight_sum"]), m["weight_sq_sum"]),
        "ess_seq": div(jnp.square(m["seq_weight_sum"]), m["seq_weight_sq_sum"]),
        "tokens": jnp.asarray(tokens, jnp.float32),
        "sequences": jnp.asarray(m["sequences"], jnp.float32),
        "lam": jnp.asarray(m["lam"], jnp.float32),
    }
    out["ess_token_frac"] = div(out["ess_token"], tokens)
    out["ess_seq_frac"] = div(out["ess_seq"], m["sequences"])
    for key, name in (("entropy_sum", "entropy"), ("kl_sum", "kl"), ("jsd_sum", "jsd"), ("log_ratio_sum", "log_ratio_mean")):
        if key in m:
            out[name] = div(m[key], tokens)
    if "todi_alpha_sum" in m:
        out["todi_alpha_mean"] = div(m["todi_alpha_sum"], m["todi_alpha_count"])
    for i in range(NUM_POSITION_BINS):
        if f"pos{i}_weight_sum" in m:
            out[f"weight_pos{i}"] = div(m[f"pos{i}_weight_sum"], m[f"pos{i}_count"])
    return out
