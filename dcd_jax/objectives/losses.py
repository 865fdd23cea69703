"""Per-token losses (unweighted, unreduced): token NLL, forward KL and ToDi on the teacher's top-k.

All functions take per-position statistics (fp32 ``[B, T]`` / ``[B, T, K]``) and return the
per-token loss ``[B, T]``; weighting and reduction happen in :mod:`dcd_jax.objectives.objective`.
Positions outside the loss mask may hold arbitrary filler (even NaN) in the teacher fields:
callers pass ``valid`` and those positions are replaced by harmless constants *before* any
arithmetic, so neither the value nor the gradient can be poisoned by them.

Notation on the teacher's top-k support ``S_t = {v_1..v_K}`` at position t:
``a_k = log p_T(v_k)`` (cached), ``s_k = log pi_theta(v_k)``, teacher tail mass
``m_T = max(0, 1 - sum_k exp(a_k))`` and student tail ``r = log sum_{v not in S_t} pi_theta(v)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ce_token_loss(target_logprobs: jax.Array) -> jax.Array:
    """Token cross-entropy ``l_t = -log pi_theta(y_t | x, y_<t)``."""
    return -target_logprobs


def sanitize_teacher_topk(topk_logprobs: jax.Array, valid: jax.Array) -> jax.Array:
    """Replace the filler at invalid positions by 0 (then ``m_T = 0`` there and every term is finite)."""
    return jnp.where(valid[..., None] > 0, jnp.asarray(topk_logprobs, jnp.float32), 0.0)


def _xlogx_ratio(p: jax.Array, log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """``p * (log_p - log_q)`` with ``0 log 0 = 0`` (NaN-free in value and gradient)."""
    safe_log_p = jnp.where(p > 0, log_p, 0.0)
    return jnp.where(p > 0, p * (safe_log_p - log_q), 0.0)


def support_distributions(
    teacher_topk_logprobs: jax.Array,
    student_topk_logprobs: jax.Array,
    student_rest_logprob: jax.Array,
    tail: str,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Teacher/student distributions over the outcomes the KL losses compare.

    ``tail='bucket'``: K+1 outcomes (top-k ids, then "any other token"); teacher
    ``(exp(a_1..a_K), m_T)``, student ``(s_1..s_K, r)``.
    ``tail='renormalize'``: K outcomes, both renormalized over the top-k ids.

    Returns ``(p, log_p, log_q)``: teacher probabilities and log-probs (``log_p = -inf`` where
    ``p = 0``) and the student's log-probs, each ``[B, T, K(+1)]``.
    """
    a = teacher_topk_logprobs
    s = student_topk_logprobs
    if tail == "bucket":
        m_t = jnp.clip(1.0 - jnp.sum(jnp.exp(a), axis=-1), 0.0, 1.0)
        log_m_t = jnp.where(m_t > 0, jnp.log(jnp.where(m_t > 0, m_t, 1.0)), -jnp.inf)
        log_p = jnp.concatenate([a, log_m_t[..., None]], axis=-1)
        p = jnp.concatenate([jnp.exp(a), m_t[..., None]], axis=-1)
        log_q = jnp.concatenate([s, student_rest_logprob[..., None]], axis=-1)
    elif tail == "renormalize":
        log_p = a - jax.nn.logsumexp(a, axis=-1, keepdims=True)
        p = jnp.exp(log_p)
        log_q = s - jax.nn.logsumexp(s, axis=-1, keepdims=True)
    else:
        raise ValueError(f"unknown KL tail handling {tail!r}; expected 'bucket' or 'renormalize'")
    return p, log_p, log_q


def forward_kl_token_loss(
    teacher_topk_logprobs: jax.Array,
    student_topk_logprobs: jax.Array,
    student_rest_logprob: jax.Array,
    *,
    tail: str = "bucket",
) -> jax.Array:
    """Forward ``KL(pi_T || pi_theta)`` per token on the teacher's top-k support.

    ``bucket``:      ``sum_k e^{a_k} (a_k - s_k) + m_T (log m_T - r)``  (0 log 0 = 0)
    ``renormalize``: ``sum_k q_k (log q_k - log q'_k)`` with ``q = softmax(a)``, ``q' = softmax(s)``.
    """
    p, log_p, log_q = support_distributions(teacher_topk_logprobs, student_topk_logprobs, student_rest_logprob, tail)
    return jnp.sum(_xlogx_ratio(p, log_p, log_q), axis=-1)


def todi_token_loss(
    teacher_topk_logprobs: jax.Array,
    student_topk_logprobs: jax.Array,
    student_rest_logprob: jax.Array,
    *,
    tail: str = "bucket",
    beta: float = 1.0,
    min_prob: float = 1e-8,
) -> tuple[jax.Array, jax.Array]:
    """ToDi (Jung et al., 2025) on the top-k support: per-entry sigmoid mix of forward and reverse KL.

    For every outcome i of :func:`support_distributions` (teacher ``p_i``, student ``q_i``):
    ``alpha_i = stop_gradient(sigmoid(beta * (log p~_i - log q_i)))``, ``p~_i = max(p_i, min_prob)``,
    ``l_t = sum_i alpha_i p_i log(p_i / q_i) + (1 - alpha_i) q_i log(q_i / p~_i)``.
    Where the teacher gives more mass than the student (``alpha -> 1``) the forward KL pulls the
    entry up; where the student over-estimates it (``alpha -> 0``) the reverse KL pushes it down.

    Returns ``(loss [B, T], alpha [B, T, K(+1)])``.
    """
    p, log_p, log_q = support_distributions(teacher_topk_logprobs, student_topk_logprobs, student_rest_logprob, tail)
    log_p_floor = jnp.maximum(log_p, jnp.log(min_prob))
    alpha = jax.lax.stop_gradient(jax.nn.sigmoid(beta * (log_p_floor - log_q)))
    forward = _xlogx_ratio(p, log_p, log_q)
    reverse = jnp.exp(log_q) * (log_q - log_p_floor)
    return jnp.sum(alpha * forward + (1.0 - alpha) * reverse, axis=-1), alpha
