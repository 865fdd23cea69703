"""Generalized Jensen-Shannon divergence between a live teacher and the student (online GKD).

GKD (Agarwal et al., 2024, "On-Policy Distillation of Language Models") trains on a mix of fixed
and student-generated sequences with, per token, the generalized JSD between the teacher's full
next-token distribution ``P`` and the student's ``Q``::

    M_beta       = beta * P + (1 - beta) * Q
    JSD_beta     = beta * KL(P || M_beta) + (1 - beta) * KL(Q || M_beta)      0 < beta < 1
    JSD_0        = KL(P || Q)    (forward KL, the limit direction of supervised KD)
    JSD_1        = KL(Q || P)    (reverse KL, mode seeking)

(the endpoints are the two KLs, as in TRL's ``GKDTrainer``; the mixture formula itself tends to 0
at both ends). Both distributions are ``softmax(hidden @ unembed)`` over the tokenizer's vocabulary
(padding columns ``>= true_vocab_size`` are excluded), computed here from hidden states chunk by
chunk over the sequence: neither pass holds more than a few ``[B, chunk, V]`` blocks, never
``[B, T, V]``. The gradient flows into the student only (the teacher is frozen).

Gradient w.r.t. the student logits ``z`` (``s = log Q``, ``t = log P``, ``m = log M_beta``),
in closed form for the custom VJP: ``dL/dz = Q * (g - <Q, g>)`` with
``g = (1 - beta) (s - m)`` for 0 < beta < 1, ``g = s - t`` for beta = 1, and ``dL/dz = Q - P``
for beta = 0.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dcd_jax.numerics import NEG_INF


class GKDStats(NamedTuple):
    """Per-position outputs (fp32 ``[B, T]``); only ``jsd`` carries a gradient (into the student)."""

    jsd: jax.Array
    student_target_logprobs: jax.Array
    student_entropy: jax.Array
    teacher_target_logprobs: jax.Array


def _log_softmax_masked(logits: jax.Array, true_vocab_size: int) -> jax.Array:
    vocab = logits.shape[-1]
    if true_vocab_size < vocab:
        iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
        logits = jnp.where(iota < true_vocab_size, logits, NEG_INF)
    return logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)


def _plogp_ratio(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    """``sum_v a_v (log a_v - log b_v)`` with ``0 log 0 = 0`` (masked columns have ``a = 0``)."""
    a = jnp.exp(log_a)
    return jnp.sum(jnp.where(a > 0, a * (log_a - log_b), 0.0), axis=-1)


def _mixture_log(s: jax.Array, t: jax.Array, beta: float) -> jax.Array:
    """``log(beta * P + (1 - beta) * Q)`` from the log-probabilities (stable)."""
    return jnp.logaddexp(t + math.log(beta), s + math.log1p(-beta))


def jsd_from_logprobs(s: jax.Array, t: jax.Array, beta: float) -> jax.Array:
    """``JSD_beta`` per position from student / teacher log-probabilities ``[..., V]`` (module doc)."""
    if beta == 0.0:
        return _plogp_ratio(t, s)
    if beta == 1.0:
        return _plogp_ratio(s, t)
    m = _mixture_log(s, t, beta)
    return beta * _plogp_ratio(t, m) + (1.0 - beta) * _plogp_ratio(s, m)


def _jsd_logit_grad(s: jax.Array, t: jax.Array, jsd: jax.Array, beta: float) -> jax.Array:
    """``d JSD_beta / d z`` (student logits) for one block, per the module docstring."""
    q = jnp.exp(s)
    if beta == 0.0:
        return q - jnp.exp(t)
    if beta == 1.0:
        return q * (jnp.where(q > 0, s - t, 0.0) - jsd[..., None])
    g = jnp.where(q > 0, (1.0 - beta) * (s - _mixture_log(s, t, beta)), 0.0)
    return q * (g - jnp.sum(q * g, axis=-1, keepdims=True))


def _logits(hidden: jax.Array, unembed: jax.Array) -> jax.Array:
    return jnp.einsum("...d,dv->...v", hidden, unembed.astype(hidden.dtype), preferred_element_type=jnp.float32)


def _pad_columns(w: jax.Array, vocab: int) -> jax.Array:
    return w if w.shape[1] == vocab else jnp.pad(w, [(0, 0), (0, vocab - w.shape[1])])


def generalized_jsd_chunked(
    student_hidden: jax.Array,
    student_unembed: jax.Array,
    teacher_hidden: jax.Array,
    teacher_unembed: jax.Array,
    targets: jax.Array,
    *,
    beta: float,
    true_vocab_size: int,
    chunk_size: int = 256,
) -> GKDStats:
    """Per-token ``JSD_beta(P_teacher || Q_student)`` over the full vocabulary, chunked over the sequence.

    Args:
      student_hidden: ``[B, T, D_s]`` post-final-norm hidden states; ``student_unembed`` ``[D_s, V_s]``.
      teacher_hidden: ``[B, T, D_t]`` (no gradient); ``teacher_unembed`` ``[D_t, V_t]``. Embedding
        matrices may differ by padding columns only: both are compared on ``[0, true_vocab_size)``.
      targets: ``[B, T]`` next-token ids (for the diagnostic target log-probs only).
      beta: in ``[0, 1]``; 0 = forward KL(P || Q), 1 = reverse KL(Q || P).
      true_vocab_size: the shared tokenizer vocabulary.
      chunk_size: sequence positions per chunk (``T`` need not be a multiple; >= 1).

    Masking is the caller's reduction (select the valid positions' ``jsd``): values at padding
    positions are finite and their cotangent is whatever the caller gives them (0 after a select).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} must be in [0, 1]")
    if student_hidden.shape[:2] != teacher_hidden.shape[:2] or targets.shape != student_hidden.shape[:2]:
        raise ValueError(
            f"student hidden {student_hidden.shape}, teacher hidden {teacher_hidden.shape} and targets "
            f"{targets.shape} must share [B, T]"
        )
    vocab = max(student_unembed.shape[1], teacher_unembed.shape[1])
    if not 0 < true_vocab_size <= min(student_unembed.shape[1], teacher_unembed.shape[1]):
        raise ValueError(f"true_vocab_size={true_vocab_size} exceeds an unembedding's columns")
    beta = float(beta)
    b, t, _ = student_hidden.shape
    chunk = max(1, min(int(chunk_size), t))
    n = -(-t // chunk)
    pad = n * chunk - t
    w_s = _pad_columns(student_unembed, vocab)
    w_t = jax.lax.stop_gradient(_pad_columns(teacher_unembed, vocab))
    h_t = jax.lax.stop_gradient(teacher_hidden)
    targets = jnp.asarray(targets, jnp.int32)

    def to_chunks(x):  # [B, T, ...] -> [n, B, chunk, ...]
        if pad:
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    def from_chunks(x):  # [n, B, chunk] -> [B, T]
        return jnp.moveaxis(x, 0, 1).reshape(b, n * chunk)[:, :t]

    def block(hs, ws, ht, tgt):
        s = _log_softmax_masked(_logits(hs, ws), true_vocab_size)
        tl = _log_softmax_masked(_logits(ht, w_t), true_vocab_size)
        return s, tl, jsd_from_logprobs(s, tl, beta)

    def forward(hs, ws, ht, tgt):
        def body(_, xs):
            hc, htc, tc = xs
            s, tl, jsd = block(hc, ws, htc, tc)
            pick = lambda lp: jnp.take_along_axis(lp, tc[..., None], axis=-1)[..., 0]
            entropy = -jnp.sum(jnp.exp(s) * jnp.where(jnp.exp(s) > 0, s, 0.0), axis=-1)
            return None, (jsd, pick(s), entropy, pick(tl))

        _, out = jax.lax.scan(body, None, (to_chunks(hs), to_chunks(ht), to_chunks(tgt)))
        return tuple(from_chunks(x) for x in out)

    def run_bwd(res, cts):
        hs, ws, ht, tgt = res
        ct = to_chunks(jnp.asarray(cts[0], jnp.float32))  # only the JSD is differentiable
        wc = ws.astype(hs.dtype)

        def body(dw, xs):
            hc, htc, tc, gc = xs
            s, tl, jsd = block(hc, ws, htc, tc)
            dz = (gc[..., None] * _jsd_logit_grad(s, tl, jsd, beta)).astype(hs.dtype)
            dh = jnp.einsum("bcv,dv->bcd", dz, wc, preferred_element_type=jnp.float32)
            dw = dw + jnp.einsum("bcd,bcv->dv", hc, dz, preferred_element_type=jnp.float32)
            return dw, dh.astype(hs.dtype)

        dw, dh = jax.lax.scan(body, jnp.zeros(ws.shape, jnp.float32), (to_chunks(hs), to_chunks(ht), to_chunks(tgt), ct))
        dh = jnp.moveaxis(dh, 0, 1).reshape(b, n * chunk, -1)[:, :t]
        return dh, dw.astype(ws.dtype), None, None

    run = jax.custom_vjp(forward)
    run.defvjp(lambda *args: (forward(*args), args), run_bwd)  # residuals: the inputs (recompute per chunk)
    jsd, s_lp, s_ent, t_lp = run(student_hidden, w_s, h_t, targets)
    sg = jax.lax.stop_gradient
    return GKDStats(jsd=jsd, student_target_logprobs=sg(s_lp), student_entropy=sg(s_ent), teacher_target_logprobs=sg(t_lp))


def generalized_jsd_loss(
    student_hidden: jax.Array,
    student_unembed: jax.Array,
    teacher_hidden: jax.Array,
    teacher_unembed: jax.Array,
    targets: jax.Array,
    loss_mask: jax.Array,
    segment_ids: jax.Array,
    *,
    beta: float,
    true_vocab_size: int,
    chunk_size: int = 256,
) -> tuple[jax.Array, jax.Array]:
    """``(loss_sum, denominator)`` of the token-mean generalized JSD:

    ``loss_sum = sum_{b,t} m_bt JSD_beta(P_bt || Q_bt)``, ``denominator = sum_{b,t} m_bt`` with
    ``m = loss_mask * [segment_ids > 0]`` (response tokens of real, possibly packed, segments).
    """
    valid = (jnp.asarray(segment_ids) > 0) & (jnp.asarray(loss_mask) > 0)
    stats = generalized_jsd_chunked(
        student_hidden, student_unembed, teacher_hidden, teacher_unembed, targets,
        beta=beta, true_vocab_size=true_vocab_size, chunk_size=chunk_size,
    )
    loss_sum = jnp.sum(jnp.where(valid, stats.jsd, 0.0))
    return loss_sum, jax.lax.stop_gradient(jnp.sum(valid.astype(jnp.float32)))

