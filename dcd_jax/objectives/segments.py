"""Packing-aware reductions: per-sequence sums and means over ``(row, segment id)`` pairs.

A "sequence" is one ``(row, segment_id)`` pair with ``segment_id >= 1`` (0 = padding). Sums are
per row (``vmap`` of ``segment_sum`` with ``T + 1`` static buckets), so nothing ever mixes two
packed traces, and the batch dimension stays partitionable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _num_buckets(segment_ids: jax.Array) -> int:
    return segment_ids.shape[1] + 1  # ids are 0..n with n <= T


def segment_sum(x: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """``[B, T] -> [B, T + 1]``: sum of ``x`` over the positions of each segment id of each row."""
    n = _num_buckets(segment_ids)
    seg = jnp.clip(segment_ids, 0, n - 1)
    return jax.vmap(lambda xr, sr: jax.ops.segment_sum(xr, sr, num_segments=n))(x, seg)


def segment_min(x: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """``[B, T] -> [B, T + 1]``: per-segment minimum (``+inf``/max for empty segments)."""
    n = _num_buckets(segment_ids)
    seg = jnp.clip(segment_ids, 0, n - 1)
    return jax.vmap(lambda xr, sr: jax.ops.segment_min(xr, sr, num_segments=n))(x, seg)


def broadcast_to_tokens(per_segment: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """``[B, T + 1] -> [B, T]``: the value of each position's own segment."""
    seg = jnp.clip(segment_ids, 0, per_segment.shape[1] - 1)
    return jnp.take_along_axis(per_segment, seg, axis=1)


def sequence_counts(mask: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """``[B, T + 1]`` number of masked-in (response) tokens per sequence; bucket 0 (padding) zeroed."""
    counts = segment_sum(mask, segment_ids)
    return counts.at[:, 0].set(0.0)


def sequence_means(x: jax.Array, mask: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-sequence mean of ``x`` over its response tokens.

    Returns ``(means [B, T + 1], present [B, T + 1])``; ``present`` is 1 for sequences with at
    least one response token (others have mean 0).
    """
    counts = sequence_counts(mask, segment_ids)
    sums = segment_sum(jnp.where(mask > 0, x, 0.0), segment_ids)
    present = (counts > 0).astype(jnp.float32)
    return jnp.where(counts > 0, sums / jnp.where(counts > 0, counts, 1.0), 0.0), present


def relative_position_bins(mask: jax.Array, segment_ids: jax.Array, num_bins: int = 10) -> jax.Array:
    """``[B, T]`` bin index ``floor(num_bins * rank / n)`` of each response token in its sequence.

    ``rank`` is the token's index among its sequence's ``n`` response tokens (0..n-1), so bins
    cover equal fractions of each trace whatever its length. Segments are contiguous (packing).
    """
    before = jnp.cumsum(mask, axis=1) - mask  # response tokens earlier in the row
    start = broadcast_to_tokens(segment_min(before, segment_ids), segment_ids)
    rank = before - start
    n = broadcast_to_tokens(sequence_counts(mask, segment_ids), segment_ids)
    bins = jnp.floor(num_bins * rank / jnp.maximum(n, 1.0))
    return jnp.clip(bins, 0, num_bins - 1).astype(jnp.int32)
