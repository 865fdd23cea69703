"""Pallas splash attention (TPU flash attention with block sparsity) for full-sequence passes.

out = softmax(q k^T * scale + mask) v, mask = causal AND same segment id (AND, for a
sliding-window layer, key slot > query slot - window: splash's ``LocalMask``), computed block by
block without ever materializing the [B, H, T, T] scores (the einsum kernel saves them for the
backward pass in every layer, which is what makes long reasoning traces not fit on a TPU).
Fully masked blocks (above the diagonal) are skipped. Grouped-query attention is native: the
kernel maps query head i to key/value head i // (H / KV).

On a mesh the kernel runs per shard under ``shard_map``: rows split like the batch, heads like
the tensor axis (both from the one sharding table). Off TPU it runs in Pallas interpret mode,
slowly but with the same numerics, which is how the tests check it on CPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from dcd_jax.sharding import logical_to_spec

# Largest query/key block (MaxText's default on v5e/v6e). Blocks are multiples of 128 lanes (a
# Pallas TPU constraint the kernel checks even when interpreted), so rows are padded to one.
MAX_BLOCK = 512
LANES = 128


def _block_and_padded_length(length: int) -> tuple[int, int]:
    """(block, padded length): the length rounded up to LANES, and the largest block in MAX_BLOCK,
    MAX_BLOCK/2, ..., LANES that divides it."""
    padded = -(-length // LANES) * LANES
    block = MAX_BLOCK
    while padded % block:
        block //= 2
    return block, padded


def _kernel(num_heads: int, length: int, block: int, interpret: bool, window: int | None = None):
    """The splash kernel for [num_heads, length, hd] queries.

    Built per call, not cached: the kernel holds its mask's block tables as arrays, which made
    inside a trace are that trace's constants (a cached kernel would leak them into the next
    trace or layer; made eagerly instead, they would need a real device, which an ahead-of-time
    TPU compile from a CPU host does not have). The numpy mask preprocessing, the costly part, is
    cached by splash itself (``_process_mask``), keyed by these equal masks and block sizes.
    """
    if window is None:
        masks = [splash.CausalMask((length, length)) for _ in range(num_heads)]
    else:  # keys s with t - (window - 1) <= s <= t: causal and within the window
        masks = [splash.LocalMask((length, length), window_size=(window - 1, 0), offset=0) for _ in range(num_heads)]
    mask = splash.MultiHeadMask(masks)
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _runs_on_tpu(mesh: jax.sharding.AbstractMesh) -> bool:
    device = None if mesh.empty else mesh.abstract_device
    platform = device.platform if device is not None else jax.default_backend()
    return platform == "tpu"


def _local_attention(q, k, v, segment_ids, interpret: bool, scale: float | None = None, window: int | None = None):
    """Per-shard splash: q [B, T, H, hd], k/v [B, T, KV, hd], segment_ids [B, T] -> [B, T, H, hd]."""
    b, t, h, hd = q.shape
    block, padded = _block_and_padded_length(t)
    kernel = _kernel(h, padded, block, interpret, window)
    # The kernel does not scale the logits; heads-major layout [B, H, T, hd].
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    q = jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    if padded != t:
        # Padding gets segment id -1: real tokens (>= 1) and pads (0) never attend to it, and its
        # rows are cut off below.
        pad = ((0, 0), (0, 0), (0, padded - t), (0, 0))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, padded - t)), constant_values=-1)

    def one_row(q_row, k_row, v_row, seg_row):
        return kernel(q_row, k_row, v_row, segment_ids=splash.SegmentIds(q=seg_row, kv=seg_row))

    out = jax.vmap(one_row)(q, k, v, segment_ids)
    return jnp.swapaxes(out[:, :, :t], 1, 2)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                     scale: float | None = None, window: int | None = None) -> jax.Array:
    """Causal, segment-masked attention of q [B, T, H, hd] over k/v [B, T, KV, hd] (slots 0..T-1);
    ``scale`` replaces 1 / sqrt(hd); ``window`` (static): keys less than ``window`` slots back only."""
    mesh = jax.sharding.get_abstract_mesh()
    interpret = not _runs_on_tpu(mesh)
    if mesh.empty:
        return _local_attention(q, k, v, segment_ids, interpret, scale, window)
    q_spec = logical_to_spec(("batch", "length", "act_heads", "head_dim"), mesh=mesh, shape=q.shape)
    kv_spec = logical_to_spec(("batch", "length", "act_kv_heads", "head_dim"), mesh=mesh, shape=k.shape)
    if q_spec[2] != kv_spec[2]:
        # KV heads not split like the query heads (e.g. 2 KV heads on a 4-way tensor axis): keep all
        # heads on every shard so each query head still finds its KV head.
        q_spec = jax.sharding.PartitionSpec(q_spec[0], None, None, None)
        kv_spec = jax.sharding.PartitionSpec(kv_spec[0], None, None, None)
    seg_spec = jax.sharding.PartitionSpec(q_spec[0], None)
    sharded = jax.shard_map(
        functools.partial(_local_attention, interpret=interpret, scale=scale, window=window), mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec, check_vma=False,
    )
    return sharded(q, k, v, segment_ids)
