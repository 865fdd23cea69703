"""Per-token log-probabilities from hidden states, chunked over the sequence (memory-light).

For a position with hidden state ``h`` and unembedding ``W`` [D, V], ``z = h @ W`` (fp32
accumulation) with the padding entries ``v >= true_vocab_size`` masked out, and
``log p(v) = z_v - logsumexp(z)``. From it, per position:

* ``target_logprobs``   ``log p(y_t)``                                 (differentiable)
* ``entropy``           ``H_t = -sum_v p(v) log p(v)``                  (no gradient)
* ``gathered_logprobs`` ``log p(v)`` for given ids ``v in S_t`` (e.g. the teacher's top-k)  (differentiable)
* ``rest_logprob``      ``log sum_{v not in S_t} p(v)``, the mass outside those ids      (differentiable)
* ``topk_logprobs`` / ``topk_ids``  the model's own top-k (for teacher scoring; no gradient)

:func:`token_logprobs_chunked` holds one ``[B, chunk, V]`` block of logits at a time: a
``lax.scan`` walks over sequence chunks and keeps only the per-token outputs; its ``custom_vjp``
backward pass scans again, recomputes each chunk's logits and forms ``d/d logits`` in closed
form, so neither pass stores ``[B, T, V]``. Reductions over the vocabulary are jnp reductions,
and the few index operations (batched gathers of the target and of the ``K`` top-k ids, the
backward pass's target one-hot and top-k scatter) are ones GSPMD partitions along a batch sharded over ``data``/``fsdp`` and a vocabulary sharded over
``tensor``: the logits stay sharded and only ``[B, chunk]``-sized partial results are all-reduced. :func:`token_logprobs_reference` computes the same
from the full logits at once with plain autodiff (tests, small models).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dcd_jax.numerics import NEG_INF
from dcd_jax.sharding import traced_for_cpu

# On CPU the chunked loss keeps each chunk's fp32 logits for the backward pass, instead of
# recomputing them (one of its four [B*T, D] x [D, V] matmuls), while all of them fit in this budget.
CPU_SAVED_LOGITS_BYTES = 1 << 30
# Below this, sum_{v not in S} exp(z_v - max z) has lost precision (fp32 normals end at 1.2e-38).
_REST_FLOOR = 1e-30



class TokenStats(NamedTuple):
    """Per-position statistics of a model's next-token distribution (fp32, leading [B, T])."""

    target_logprobs: jax.Array
    entropy: jax.Array | None = None
    gathered_logprobs: jax.Array | None = None  # [B, T, K]
    rest_logprob: jax.Array | None = None
    topk_logprobs: jax.Array | None = None  # [B, T, k]
    topk_ids: jax.Array | None = None  # [B, T, k] int32


def _batched(fn):
    """``fn(row [V], ids [K])`` mapped over the leading ``[B, C]`` dims. ``vmap`` gives the gather /
    scatter explicit batching dimensions, so GSPMD partitions it along a sharded batch without
    exchanging index arrays (only the vocabulary-sharded dimension needs masking)."""
    return jax.vmap(jax.vmap(fn))


def _outside_mask(shape: tuple[int, ...], ids: jax.Array) -> jax.Array:
    """Boolean ``[B, C, V]``: True for vocabulary entries not among ``ids`` ``[B, C, K]``.

    A scatter, not a ``[B, C, K, V]`` comparison (which XLA:CPU would materialize)."""
    row = jnp.ones(shape[-1:], jnp.bool_)
    return _batched(lambda i: row.at[i].set(False, mode="drop"))(ids)


def _scatter_add(x: jax.Array, ids: jax.Array, values: jax.Array) -> jax.Array:
    """``x[b, c, ids[b, c, k]] += values[b, c, k]``."""
    return _batched(lambda r, i, v: r.at[i].add(v, mode="drop"))(x, ids, values)


def _stats_from_logits(
    logits: jax.Array,
    targets: jax.Array,
    gather_ids: jax.Array | None,
    *,
    true_vocab_size: int,
    return_entropy: bool,
    top_k: int,
) -> dict[str, jax.Array]:
    """All statistics of one block of fp32 logits ``[..., V]`` (see the module docstring), plus
    ``lse`` (``logsumexp(z)``, no gradient) for the chunked backward pass.

    One ``exp`` pass serves the log-normalizer, the entropy and the rest mass: with
    ``m = max(z)`` and ``e = exp(z - m)``, ``lse = m + log sum e``, ``H = lse - sum(e z) / sum e``
    and ``rest = log sum_{v not in S} e - log sum e``. Only where the rest mass underflows that
    shared scale (``sum_{v not in S} e`` below :data:`_REST_FLOOR`, i.e. the teacher's ids hold all
    but ~1e-30 of the mass) is it recomputed with its own maximum, so it stays exact."""
    vocab = logits.shape[-1]
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    if true_vocab_size < vocab:
        logits = jnp.where(iota < true_vocab_size, logits, NEG_INF)
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    e = jnp.exp(logits - m)
    total = jnp.sum(e, axis=-1)
    lse = m[..., 0] + jnp.log(total)
    # A gather, like the top-k ids below (GSPMD partitions it along a sharded vocabulary: local
    # lookups, then an all-reduce). A masked sum over [..., V] ran 3-5x slower than a plain sum on
    # XLA:CPU (a reduction fusion with a boolean operand), a tenth of the CE loss's time.
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1, mode="fill", fill_value=NEG_INF)[..., 0]
    out = {"target_logprobs": target_logit - lse, "lse": jax.lax.stop_gradient(lse)}
    if return_entropy:
        p_dot_z = jnp.sum(jax.lax.stop_gradient(e) * jax.lax.stop_gradient(logits), axis=-1)
        out["entropy"] = jax.lax.stop_gradient(lse - p_dot_z / total)
    if gather_ids is not None:
        gathered = jnp.take_along_axis(logits, gather_ids, axis=-1, mode="fill", fill_value=NEG_INF)
        out["gathered_logprobs"] = gathered - lse[..., None]
        outside = _outside_mask(logits.shape, gather_ids)
        rest_sum = jnp.sum(jnp.where(outside, e, 0.0), axis=-1)
        shared = jnp.log(jnp.maximum(rest_sum, _REST_FLOOR)) - jnp.log(total)

        def exact(_):
            return jax.nn.logsumexp(jnp.where(outside, logits, NEG_INF), axis=-1) - lse

        underflow = jnp.any(rest_sum < _REST_FLOOR)
        out["rest_logprob"] = jax.lax.cond(underflow, exact, lambda _: shared, None)
    if top_k:
        vals, ids = jax.lax.top_k(jax.lax.stop_gradient(logits), top_k)
        out["topk_logprobs"] = vals - jax.lax.stop_gradient(lse)[..., None]
        out["topk_ids"] = ids.astype(jnp.int32)
    return out


def _logits(hidden: jax.Array, unembed: jax.Array) -> jax.Array:
    w = unembed.astype(hidden.dtype)
    return jnp.einsum("...d,dv->...v", hidden, w, preferred_element_type=jnp.float32)


def _check_args(hidden, unembed, targets, gather_ids, true_vocab_size, top_k) -> int:
    if hidden.ndim != 3 or targets.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be [B, T, D] and targets [B, T]; got {hidden.shape} and {targets.shape}")
    if unembed.ndim != 2 or unembed.shape[0] != hidden.shape[-1]:
        raise ValueError(f"unembed must be [D, V] with D={hidden.shape[-1]}; got {unembed.shape}")
    vocab = unembed.shape[1]
    true_vocab_size = vocab if true_vocab_size is None else int(true_vocab_size)
    if not 0 < true_vocab_size <= vocab:
        raise ValueError(f"true_vocab_size={true_vocab_size} must be in [1, {vocab}] (the unembedding's columns)")
    if gather_ids is not None and gather_ids.shape[:2] != hidden.shape[:2]:
        raise ValueError(f"gather_ids must be [B, T, K]; got {gather_ids.shape}")
    if top_k and top_k > true_vocab_size:
        raise ValueError(f"top_k={top_k} exceeds the vocabulary ({true_vocab_size})")
    return true_vocab_size


def token_logprobs_reference(
    hidden: jax.Array,
    unembed: jax.Array,
    targets: jax.Array,
    *,
    true_vocab_size: int | None = None,
    gather_ids: jax.Array | None = None,
    return_entropy: bool = True,
    top_k: int = 0,
) -> TokenStats:
    """:func:`token_logprobs_chunked` computed from the full ``[B, T, V]`` logits at once."""
    true_vocab_size = _check_args(hidden, unembed, targets, gather_ids, true_vocab_size, top_k)
    out = _stats_from_logits(
        _logits(hidden, unembed),
        jnp.asarray(targets, jnp.int32),
        None if gather_ids is None else jnp.asarray(gather_ids, jnp.int32),
        true_vocab_size=true_vocab_size,
        return_entropy=return_entropy,
        top_k=top_k,
    )
    out.pop("lse")
    return TokenStats(**out)


def _chunk_cotangent(
    logits: jax.Array,
    targets: jax.Array,
    gather_ids: jax.Array | None,
    ct: dict[str, jax.Array],
    lse: jax.Array,
    rest_logprob: jax.Array | None,
    *,
    true_vocab_size: int,
) -> jax.Array:
    """``d loss / d logits`` of one chunk from the cotangents of its differentiable statistics.

    With ``p = softmax(z)`` and upstream cotangents ``g_y`` (target), ``g_k`` (gathered ids) and
    ``g_r`` (rest): every statistic is ``(something) - logsumexp(z)``, so
    ``dz = onehot(y) g_y + sum_k onehot(v_k) g_k + g_r softmax_{v not in S}(z)
          - (g_y + sum_k g_k + g_r) p``, and 0 on the padding columns.
    ``lse`` and ``rest_logprob`` come from the forward pass, so ``p = exp(z - lse)`` and
    ``softmax_{v not in S}(z) = exp(z - lse - rest_logprob)`` cost one ``exp`` each.
    """
    vocab = logits.shape[-1]
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    col_ok = iota < true_vocab_size
    z = jnp.where(col_ok, logits, NEG_INF) if true_vocab_size < vocab else logits
    g_t = ct["target_logprobs"]
    total = g_t
    dz = jnp.where(iota == targets[..., None], g_t[..., None], 0.0)
    if gather_ids is not None:
        g_g, g_r = ct["gathered_logprobs"], ct["rest_logprob"]
        total = total + jnp.sum(g_g, axis=-1) + g_r
        dz = _scatter_add(dz, gather_ids, g_g)
        rest_softmax = jnp.exp(z - (lse + rest_logprob)[..., None])
        dz = dz + jnp.where(_outside_mask(z.shape, gather_ids), g_r[..., None] * rest_softmax, 0.0)
    dz = dz - total[..., None] * jnp.exp(z - lse[..., None])
    if true_vocab_size < vocab:
        dz = jnp.where(col_ok, dz, 0.0)
    return dz


def token_logprobs_chunked(
    hidden: jax.Array,
    unembed: jax.Array,
    targets: jax.Array,
    *,
    true_vocab_size: int | None = None,
    chunk_size: int = 512,
    gather_ids: jax.Array | None = None,
    return_entropy: bool = True,
    top_k: int = 0,
) -> TokenStats:
    """Per-token statistics of ``softmax(hidden @ unembed)`` without materializing [B, T, V].

    Args:
      hidden: ``[B, T, D]`` post-final-norm hidden states (compute dtype; the matmul accumulates
        in fp32 and the log-softmax is fp32).
      unembed: ``[D, V]``, logits = hidden @ unembed (cast to ``hidden.dtype`` like the model).
      targets: ``[B, T]`` int ids whose log-prob is returned.
      true_vocab_size: the tokenizer's vocabulary; columns ``>= true_vocab_size`` are padding
        and excluded from every statistic (None = all ``V`` columns).
      chunk_size: sequence positions per chunk; ``T`` need not be a multiple (the tail chunk is
        padded). ``0`` computes all positions at once with plain autodiff
        (:func:`token_logprobs_reference`).
      gather_ids: optional ``[B, T, K]`` ids (e.g. the teacher's top-k): returns their log-probs
        and the log of the mass outside them (``rest_logprob``). Ids must be distinct per position.
      return_entropy: also return the entropy (no gradient).
      top_k: also return the model's own top-k log-probs and ids (no gradient), e.g. to cache
        a teacher's top-k.

    Gradient: a ``custom_vjp``. The forward pass scans over sequence chunks keeping only the
    per-token outputs; the backward pass scans again, recomputes each chunk's logits, forms
    ``d loss / d logits`` in closed form (:func:`_chunk_cotangent`) and accumulates
    ``d hidden`` (per chunk) and ``d unembed`` (fp32 carry). Peak memory is a few
    ``[B, chunk, V]`` blocks instead of ``[B, T, V]``. On CPU, where memory is plentiful and the
    matmul is the cost, the forward pass keeps the chunks' logits for the backward pass instead
    (while they fit :data:`CPU_SAVED_LOGITS_BYTES`). (Autodiff through a checkpointed scan
    would let JAX hoist loop-invariant ``[B, chunk, V]`` masks out of the loop as residuals.)
    """
    true_vocab_size = _check_args(hidden, unembed, targets, gather_ids, true_vocab_size, top_k)
    targets = jnp.asarray(targets, jnp.int32)
    gather_ids = None if gather_ids is None else jnp.asarray(gather_ids, jnp.int32)
    if chunk_size <= 0:
        return token_logprobs_reference(
            hidden, unembed, targets, true_vocab_size=true_vocab_size, gather_ids=gather_ids,
            return_entropy=return_entropy, top_k=top_k,
        )
    b, t, _ = hidden.shape
    chunk = min(chunk_size, t)
    n = -(-t // chunk)
    pad = n * chunk - t
    stats = functools.partial(
        _stats_from_logits, true_vocab_size=true_vocab_size, return_entropy=return_entropy, top_k=top_k
    )
    nograd = jax.lax.stop_gradient

    def to_chunks(x):  # [B, T, ...] -> [n, B, chunk, ...]
        if pad:
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    def from_chunks(x):  # [n, B, chunk, ...] -> [B, T, ...]
        x = jnp.moveaxis(x, 0, 1)
        return x.reshape(b, n * chunk, *x.shape[3:])[:, :t]

    # Memory is what the recomputation buys; a CPU host has it, an accelerator's HBM may not.
    keep_logits = traced_for_cpu() and b * n * chunk * unembed.shape[1] * 4 <= CPU_SAVED_LOGITS_BYTES

    def forward(h, w, tgt, ids, keep=False):
        def body(carry, xs):
            hc, tc, ic = xs
            z = _logits(hc, w)
            return carry, (stats(z, tc, ic), z if keep else None)

        xs = (to_chunks(h), to_chunks(tgt), None if ids is None else to_chunks(ids))
        _, (out, logits) = jax.lax.scan(body, None, xs)
        # [n, B, chunk] per-token normalizer and rest mass: the backward pass reads them, saved as chunks.
        saved = (out.pop("lse"), out.get("rest_logprob"))
        return {k: from_chunks(v) for k, v in out.items()}, (saved, logits)

    @jax.custom_vjp
    def run(h, w, tgt, ids):
        return forward(h, w, tgt, ids)[0]

    def run_fwd(h, w, tgt, ids):
        out, ((lse, rest), logits) = forward(h, w, tgt, ids, keep=keep_logits)
        return out, (h, w, tgt, ids, lse, rest, logits)

    def run_bwd(res, ct):
        h, w, tgt, ids, lse, rest, saved_logits = res
        grad_keys = ["target_logprobs"] + (["gathered_logprobs", "rest_logprob"] if ids is not None else [])
        cts = {k: to_chunks(jnp.asarray(ct[k], jnp.float32)) for k in grad_keys}
        wc = w.astype(h.dtype)

        def body(dw, xs):
            hc, tc, ic, ctc, lc, rc, zc = xs
            zc = _logits(hc, w) if zc is None else zc
            dz = _chunk_cotangent(zc, tc, ic, ctc, lc, rc, true_vocab_size=true_vocab_size)
            dz = dz.astype(h.dtype)
            dh = jnp.einsum("bcv,dv->bcd", dz, wc, preferred_element_type=jnp.float32)
            dw = dw + jnp.einsum("bcd,bcv->dv", hc, dz, preferred_element_type=jnp.float32)
            return dw, dh.astype(h.dtype)

        xs = (to_chunks(h), to_chunks(tgt), None if ids is None else to_chunks(ids), cts, lse, rest, saved_logits)
        dw, dh = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), xs)
        return from_chunks(dh), dw.astype(w.dtype), None, None

    run.defvjp(run_fwd, run_bwd)
    out = run(hidden, unembed, targets, gather_ids)
    for key in ("entropy", "topk_logprobs", "topk_ids"):
        if key in out:
            out[key] = nograd(out[key])
    return TokenStats(**out)
