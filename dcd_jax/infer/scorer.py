"""The scorer kernel: per-token log-probs (and top-k) of given sequences under a model, in one
jitted forward pass; used for cached teacher scores and ExAccErr."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dcd_jax.models import bind, positions_from_mask
from dcd_jax.objectives.logprobs import token_logprobs_chunked


def make_scorer(graphdef: Any, true_vocab_size: int, topk: int, chunk_size: int):
    """Jitted ``(params, input_ids [B, L], segment_ids [B, L]) -> (logp [B, L], topk_lp, topk_ids)``:
    position t scores token t+1 under the model (the log-prob of ``input_ids[:, t + 1]``)."""

    @jax.jit
    def score(params, input_ids, segment_ids):
        model = bind(graphdef, params)
        positions = positions_from_mask(segment_ids > 0)
        hidden = model(input_ids, positions, segment_ids, return_hidden=True)
        targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
        stats = token_logprobs_chunked(
            hidden, model.unembed_matrix(), targets, true_vocab_size=true_vocab_size, chunk_size=chunk_size,
            return_entropy=False, top_k=topk,
        )
        return stats.target_logprobs, stats.topk_logprobs, stats.topk_ids

    return score


def pad_to_bucket(sequences: Sequence[Sequence[int]], rows: int, bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """Token sequences -> (``input_ids``, ``segment_ids``) ``[rows, L]``, each sequence left-aligned in
    its row, ``L`` the longest rounded up to a multiple of ``bucket`` (a bounded number of compiled
    shapes); rows past ``len(sequences)`` and positions past a sequence are padding (segment 0)."""
    length = -(-max(len(s) for s in sequences) // bucket) * bucket
    ids = np.zeros((rows, length), np.int32)
    seg = np.zeros((rows, length), np.int32)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
        seg[row, : len(seq)] = 1
    return ids, seg
