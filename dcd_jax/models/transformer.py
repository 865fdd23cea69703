"""Decoder-only transformer (every registered family: Llama 3, Qwen2/3, Gemma 3) in Flax NNX.

Design:
  * Every parameter is an ``nnx.Param`` whose ``logical_axes`` metadata names its dimensions;
    :mod:`dcd_jax.sharding` maps those names to the mesh. Layer parameters are *stacked* along
    a leading ``layers`` axis and the layers run under ``jax.lax.scan``, so compile time does
    not grow with depth and rematerialization is one ``jax.checkpoint`` around the scan body.
  * Parameters are stored in ``param_dtype`` and cast to the compute ``dtype`` where used
    (fp32 master weights, bf16 matmuls); norms and softmax run in fp32.
  * Attention masks come from ``segment_ids`` (0 = padding; packed examples never attend across
    segments) and slot indices (causality). The same code serves training (keys = the current
    sequence) and cached decoding (keys = the KV cache), see :meth:`Transformer.forward_with_cache`.
  * Sliding-window (local) layers (``cfg.local_layers``) add ``slot_q - slot_k < sliding_window``
    to the mask and use ``cfg.rope_local``. A layer's ``local`` flag is a Python bool where the
    layer index is static (unrolled layers, cached decoding) and a traced bool under the layer
    scan (the scan's per-layer input), where the rope table and window are selected by it.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dcd_jax.models.config import ModelConfig, RopeConfig
from dcd_jax.models.splash_attention import splash_attention
from dcd_jax.numerics import NEG_INF
from dcd_jax.sharding import constrain, traced_for_cpu


def _param(rngs: nnx.Rngs | None, init: str, shape: tuple[int, ...], dtype: str, axes: tuple[str, ...]) -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, computed in fp32; with ``plus_one`` (Gemma) the
    factor is (1 + scale) and the stored weight starts at 0."""

    def __init__(self, dim: int, eps: float, param_dtype: str, plus_one: bool = False):
        self.eps = eps
        self.plus_one = plus_one
        self.scale = _param(None, "zeros" if plus_one else "ones", (dim,), param_dtype, ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        if self.plus_one:
            scale = 1.0 + scale
        return (scale * x).astype(dtype)


# The window of a global layer where a layer's window is traced (the layer scan): above any length.
NO_WINDOW = 2**30


def window_of(local, window: int | None):
    """The sliding window of a layer whose ``local`` flag is a Python bool (static: ``window`` or
    None) or a traced bool (an int32 scalar: ``window``, or :data:`NO_WINDOW` for a global layer)."""
    if isinstance(local, (bool, np.bool_)) or local is None:
        return window if local else None
    return jnp.where(local, jnp.int32(window), jnp.int32(NO_WINDOW))


def rope_inverse_frequencies(head_dim: int, rope: RopeConfig) -> np.ndarray:
    """inv_freq_i = theta^(-2i/d), with Llama-3 smooth scaling of the low frequencies when configured."""
    inv_freq = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    if rope.kind == "linear":
        inv_freq = inv_freq / rope.factor
    if rope.kind == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate ``x`` [B, T, heads, hd] by angle positions * inv_freq (HF 'rotate_half' layout)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, hd/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    cos = jnp.concatenate([cos, cos], axis=-1)[:, :, None, :].astype(x.dtype)
    # rotate_half(x) * sin == roll(x, hd/2) * [-sin, sin]: the sign moves onto the [B, T, hd] table,
    # so x is only rolled (XLA:CPU ran concatenate([-x2, x1]) and its gradient ~10x slower: 3-4%
    # of the 25M train step).
    sin = jnp.concatenate([-sin, sin], axis=-1)[:, :, None, :].astype(x.dtype)
    return x * cos + jnp.roll(x, x.shape[-1] // 2, axis=-1) * sin


def attention_mask(q_segment: jax.Array, q_slot: jax.Array, kv_segment: jax.Array, kv_slot: jax.Array,
                   window=None) -> jax.Array:
    """[B, 1, 1, T, S] boolean: same segment and causal (key slot <= query slot); with ``window``
    (a sliding-window layer's) also q_slot - kv_slot < window."""
    same = q_segment[:, :, None] == kv_segment[:, None, :]
    causal = kv_slot[:, None, :] <= q_slot[:, :, None]
    keep = same & causal
    if window is not None:
        keep = keep & (q_slot[:, :, None] - kv_slot[:, None, :] < window)
    return keep[:, None, None, :, :]


def dense(x: jax.Array, w: jax.Array, contract: int = 1) -> jax.Array:
    """``y = x . w`` over x's last ``contract`` dims and w's first ``contract`` dims (a projection).

    On CPU it runs as one 2-D dot ``[N, in] @ [in, out]`` on reshaped (not copied) operands.
    Its gradient ``dw = x^T dy`` is then again a dot with a single contracting dim, which XLA:CPU
    reads in place; with the leading [B, T] dims kept, ``dw`` contracts two dims and XLA:CPU
    first copies ``x`` and ``dy`` into transposed layouts (a third of the tiny model's step).
    A single row (a batch-1 decode step) runs as :func:`split_matvec`.
    Accelerators get the plain ``tensordot``.
    """
    if not traced_for_cpu():
        return jnp.tensordot(x, w, axes=contract)
    lead, inner, out = x.shape[:x.ndim - contract], w.shape[:contract], w.shape[contract:]
    rows, k = math.prod(lead), math.prod(inner)
    x, w = x.reshape(rows, k), w.reshape(k, -1)
    if rows == 1 and k % MATVEC_SPLIT == 0:
        y = split_matvec(x, w)
    else:
        y = x @ w
    return y.reshape(*lead, *out)


# XLA:CPU runs a matrix-vector product on one thread, which streams a decode layer's small weight
# matrices (1-4 MiB) at about half the host's bandwidth; a batched dot runs its batch entries on
# separate threads.
MATVEC_SPLIT = 2


def split_matvec(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [1, K] @ w [K, N]`` as ``MATVEC_SPLIT`` partial products over slices of K, summed in
    fp32: y = sum_s x[:, K_s] @ w[K_s, :]. The slices are reshapes (no copy) and one batched dot,
    so XLA:CPU streams the slices of ``w`` on several threads (a batch-1 decode step's layers
    ~1.5x faster here)."""
    s, (k, n) = MATVEC_SPLIT, w.shape
    parts = jnp.einsum("sik,skn->sin", x.reshape(1, s, k // s).transpose(1, 0, 2), w.reshape(s, k // s, n),
                       preferred_element_type=jnp.float32)
    return parts.sum(0).astype(x.dtype)


def cache_bias(q_segment: jax.Array, q_slot: jax.Array, kv_segment: jax.Array, window: int | None = None) -> jax.Array:
    """[B, T, S] fp32 additive mask over cache slots 0..S-1: 0 where the key slot is in the query's
    segment and not after it (the :func:`attention_mask` rule), and with ``window`` less than
    ``window`` slots before it, ``NEG_INF`` elsewhere. Built once per cached pass (once per kind of
    layer) and shared by the layers. A local layer's cache keeps every slot; the bias hides the
    slots outside its window."""
    kv_slot = jnp.arange(kv_segment.shape[1], dtype=jnp.int32)
    keep = (q_segment[:, :, None] == kv_segment[:, None, :]) & (kv_slot[None, None, :] <= q_slot[:, :, None])
    if window is not None:
        keep = keep & (q_slot[:, :, None] - kv_slot[None, None, :] < window)
    return jnp.where(keep, 0.0, NEG_INF).astype(jnp.float32)


HEADS_MAJOR_CACHE_AXES = ("batch", "act_kv_heads", "cache_length", "head_dim")


def per_layer_cache_axes(batch: int, kv_heads: int, name: str) -> tuple[str, ...]:
    """Logical axes of a CPU per-layer ``k`` or ``v`` buffer (:meth:`Transformer.init_cache` with
    ``per_layer``): heads-major without its size-1 B and KV dims, the keys with slots minor
    ([B, KV, hd, S]) and the values [B, KV, S, hd].

    Size-1 dims: XLA:CPU drops a dot's size-1 dims through a bitcast of its operand; a bitcast
    between a buffer's in-place update and the attention's dot that reads it made XLA duplicate the
    update and copy the whole buffer (four copies of every layer's k and v per batch-1 decode step,
    growing with the cache). A buffer without size-1 dims is read by the dot as it is.
    Keys slots-minor: the score product ``q [G, hd] . k`` then contracts the buffer's major dim,
    the form XLA:CPU's small-matrix dots stream fastest (like ``probs . v``); against [S, hd] keys
    the score dot took ~3x the time of the value dot at 16 rows x 1055 slots."""
    kept = [axis for axis, size in (("batch", batch), ("act_kv_heads", kv_heads)) if size != 1]
    return (*kept, "head_dim", "cache_length") if name == "k" else (*kept, "cache_length", "head_dim")


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, bias: jax.Array,
                     kv_heads: int | None = None, *, keys_transposed: bool = False,
                     scale: float | None = None) -> jax.Array:
    """softmax(q k^T * scale + bias) v over a heads-major cache, fp32 scores (``scale`` default
    1 / sqrt(hd)).

    q [B, T, H, hd]; k_cache / v_cache [B, KV, S, hd], or a CPU per-layer buffer
    (:func:`per_layer_cache_axes`: without its size-1 B / KV dims, then ``kv_heads`` names KV; with
    ``keys_transposed`` the keys are [B, KV, hd, S]); bias [B, T, S] (:func:`cache_bias`).
    Both products are dots with the batch dims (B, KV) leading and one contracting dim, so
    XLA:CPU reads the cache in place: scores [B, KV, T*G, S] = q_h . k^T, out = probs . v.
    (A [B, S, KV, hd] cache would be copied into a transposed layout for each product, every
    layer of every decode step.) The additive bias equals the masked select: exp(s - 1e30 - max)
    underflows to the same 0. Every decode step runs this (any cache layout); a prefill from slot 0
    attends over its own rows instead (:meth:`Attention.with_heads_major_cache`).
    """
    b, t, h, hd = q.shape
    kvh = v_cache.shape[1] if v_cache.ndim == 4 else kv_heads
    s, lead = v_cache.shape[-2], v_cache.shape[:-2]
    g = h // kvh
    # q scaled, not the scores: XLA:CPU fused the scores' scale as a materialized [B, KV, T*G, S]
    # operand of the score dot's fusion, read again by every layer of every decode step.
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    q_h = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, kvh, g, hd)
    q_h = q_h.transpose(0, 2, 1, 3, 4).reshape(*lead, t * g, hd)
    spec = "...nd,...ds->...ns" if keys_transposed else "...nd,...sd->...ns"
    scores = jnp.einsum(spec, q_h, k_cache.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kvh, t, g, s) + bias[:, None, :, None, :]
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(*lead, t * g, s)
    out = jnp.einsum("...ns,...sd->...nd", probs, v_cache.astype(q.dtype))
    return out.reshape(b, kvh, t, g, hd).transpose(0, 2, 1, 3, 4).reshape(b, t, h, hd)


# Query rows per block of :func:`blockwise_causal_attention`: a block's [B, KV, c, G, S] scores stay
# a few MiB (cache-friendly on CPU) and blocks above the causal diagonal are never computed. The
# blocks are unrolled, so long sequences use longer blocks (at most MAX_ATTENTION_BLOCKS of them).
ATTENTION_BLOCK = 64
MAX_ATTENTION_BLOCKS = 16
# On CPU the blockwise attention runs a group of batch rows per loop iteration, as many as keep the
# group's largest score block within this many bytes (about a core's L2 cache, with room).
ROW_GROUP_BYTES = 2 << 20


def blockwise_causal_attention(
    q: jax.Array, keys: jax.Array, values: jax.Array, segment_ids: jax.Array, block: int = ATTENTION_BLOCK,
    *, row_group: int | None = None, scale: float | None = None, window=None,
) -> jax.Array:
    """Causal self-attention over packed rows, one block of ``block`` query rows at a time (at
    most :data:`MAX_ATTENTION_BLOCKS` blocks: longer blocks for long ``T``).

        out_t = sum_{s <= t, seg_s = seg_t} softmax_s(q_t . k_s / sqrt(hd)) v_s

    for q [B, T, H, hd], keys/values [B, T, KV, hd] (slots 0..T-1: the training / scoring pass).
    Query block [i c, (i+1) c) only sees keys [0, (i+1) c), so the upper triangle is skipped
    (about half the work of the dense masked softmax at long T). A ``custom_vjp`` keeps only q,
    k, v and the output for the backward pass, which recomputes each block's probabilities P and
    forms, with D_t = sum_d dO_td O_td,
        dV = P^T dO,  dS = P * (dO V^T - D),  dQ = dS K / sqrt(hd),  dK = dS^T Q / sqrt(hd),
    so no [B, H, T, T] tensor is stored per layer (the layer scan's residuals stay O(T)).

    ``row_group``: batch rows per iteration of a ``lax.map`` over the batch (a divisor of B; the
    largest one not above the value is used). Default: on CPU, as many rows as keep a group's
    largest score block (rows x KV x c x G x S fp32) within :data:`ROW_GROUP_BYTES`, so it stays
    in a core's cache between the ~6 elementwise and matmul passes over it, where a whole batch's
    block would not (one row at a time measured ~1.6x faster than the whole batch on the tiny
    shape, 1.1x on the 25M one; groups of 4 / 4 / 2 rows a further 7% / 3% / 2% on the tiny /
    demo / 25M train step: half the loop iterations, each a few dozen small ops). Accelerators
    keep the whole batch.
    Same values as the dense masked softmax (:func:`cached_attention` over the row as its own
    cache, :func:`attention_mask`'s rule) up to float summation order.

    ``scale`` replaces 1 / sqrt(hd); ``window`` (an int, or a traced int32 scalar under the layer
    scan) restricts each query to keys less than ``window`` slots before it (a sliding-window
    layer; the blocks left of the window are still computed, masked).
    """
    b, t, h, hd = q.shape
    kvh = keys.shape[2]
    g = h // kvh
    dtype = q.dtype
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    windowed = window is not None
    block = max(block, -(-t // MAX_ATTENTION_BLOCKS))
    bounds = [(start, min(start + block, t)) for start in range(0, t, block)]
    if row_group is None:
        row_bytes = kvh * block * g * t * 4  # one row's largest fp32 score block
        row_group = max(1, ROW_GROUP_BYTES // row_bytes) if traced_for_cpu() else b
    row_group = max(d for d in range(1, min(max(row_group, 1), b) + 1) if b % d == 0)

    # Every product is a dot with one contracting dimension and the batch dims (B, KV) leading:
    # scores [B, KV, n, S] with n = (c, G) merged query rows, and q / k / v / dO moved once to
    # [B, KV, T(*G), hd]. XLA:CPU reads such a dot's operands in place; with two contracting
    # dims (t, g) it first copies the score-sized operand into a transposed layout (the dV and
    # dK products), which costs more than the product itself at small head_dim.
    def heads_major(x):  # [B, T, KV*G, hd] -> [B, KV, T*G, hd]
        rows, length = x.shape[0], x.shape[1]
        return x.reshape(rows, length, kvh, -1, hd).transpose(0, 2, 1, 3, 4).reshape(rows, kvh, -1, hd)

    def seq_major(x, heads):  # inverse of heads_major
        rows = x.shape[0]
        return x.reshape(rows, kvh, -1, heads // kvh, hd).transpose(0, 2, 1, 3, 4).reshape(rows, -1, heads, hd)

    def block_probs(q_h, k_h, seg, win, start, stop):  # fp32 [B, KV, c*G, S]; q_h pre-scaled
        rows = q_h.shape[0]
        scores = jnp.einsum("bknd,bksd->bkns", q_h[:, :, start * g:stop * g], k_h[:, :, :stop],
                            preferred_element_type=jnp.float32).reshape(rows, kvh, stop - start, g, stop)
        same = seg[:, start:stop, None] == seg[:, None, :stop]
        causal = jnp.arange(stop)[None, :] <= jnp.arange(start, stop)[:, None]
        if windowed:
            causal = causal & (jnp.arange(start, stop)[:, None] - jnp.arange(stop)[None, :] < win)
        # An additive [B, 1, c, 1, S] bias, not a select against a scalar: XLA:CPU would
        # materialize the broadcast -inf operand at the full [B, KV, c, G, S] size.
        bias = jnp.where(same & causal, 0.0, NEG_INF)[:, None, :, None, :]
        return jax.nn.softmax(scores + bias, axis=-1).reshape(rows, kvh, (stop - start) * g, stop)

    def forward(q, k, v, seg, win):  # any leading batch size
        q_h = heads_major(q * jnp.asarray(scale, dtype))
        k_h, v_h = heads_major(k), heads_major(v)
        outs = [jnp.einsum("bkns,bksd->bknd", block_probs(q_h, k_h, seg, win, start, stop).astype(dtype), v_h[:, :, :stop])
                for start, stop in bounds]
        return seq_major(jnp.concatenate(outs, axis=2), h)

    def backward(q, k, v, seg, win, out, d_out):
        q_h = heads_major(q * jnp.asarray(scale, dtype))
        k_h, v_h, do_h = heads_major(k), heads_major(v), heads_major(d_out)
        delta = jnp.einsum("bknd,bknd->bkn", do_h, heads_major(out), preferred_element_type=jnp.float32)
        # dK and dV are accumulated transposed, [B, KV, hd, T]: dV^T = dO^T P is a dot whose operands
        # XLA:CPU hands to its fast kernel as they are, where P^T dO (query rows contracted from
        # the major side of both) ran as a slow generic dot (measured 2.3x slower per product; a
        # fifth of the tiny model's step). One [B, KV, hd, T] transpose at the end undoes it.
        dq = []
        dk_t = jnp.zeros(k_h.shape[:2] + (hd, t), jnp.float32)
        dv_t = jnp.zeros(v_h.shape[:2] + (hd, t), jnp.float32)
        for start, stop in bounds:
            p = block_probs(q_h, k_h, seg, win, start, stop)
            rows = slice(start * g, stop * g)
            do = do_h[:, :, rows]
            # Matmul operands in the compute dtype (bf16 matmuls on accelerators), fp32 accumulation.
            dv_t = dv_t.at[..., :stop].add(jnp.einsum("bknd,bkns->bkds", do, p.astype(dtype),
                                                      preferred_element_type=jnp.float32))
            dp = jnp.einsum("bknd,bksd->bkns", do, v_h[:, :, :stop], preferred_element_type=jnp.float32)
            ds = (p * (dp - delta[:, :, rows, None])).astype(dtype)
            dq.append(jnp.einsum("bkns,bksd->bknd", ds, k_h[:, :, :stop], preferred_element_type=jnp.float32))
            dk_t = dk_t.at[..., :stop].add(jnp.einsum("bknd,bkns->bkds", q_h[:, :, rows], ds,
                                                      preferred_element_type=jnp.float32))
        dq = seq_major(jnp.concatenate(dq, axis=2), h) * scale
        dk, dv = jnp.swapaxes(dk_t, 2, 3), jnp.swapaxes(dv_t, 2, 3)
        return dq.astype(q.dtype), seq_major(dk, kvh).astype(k.dtype), seq_major(dv, kvh).astype(v.dtype)

    def batched(fn):  # fn over the whole batch, or over groups of row_group rows (win: shared)
        if row_group == b:
            return fn

        def grouped(*xs):
            *xs, win = xs
            out = jax.lax.map(lambda group: fn(*group[:4], win, *group[4:]),
                              [x.reshape(b // row_group, row_group, *x.shape[1:]) for x in xs])
            return jax.tree.map(lambda y: y.reshape(b, *y.shape[2:]), out)

        def reorder(*xs):  # forward(q, k, v, seg, win) / backward(q, k, v, seg, win, out, d_out)
            return grouped(*xs[:4], *xs[5:], xs[4])

        return reorder

    # segment ids and the window are arguments, not closures: custom_vjp functions may not close
    # over tracers (the window is traced under the layer scan).
    @jax.custom_vjp
    def attend(q, k, v, seg, win):
        return batched(forward)(q, k, v, seg, win)

    def attend_fwd(q, k, v, seg, win):
        out = batched(forward)(q, k, v, seg, win)
        return out, (q, k, v, seg, win, out)

    def attend_bwd(res, d_out):
        return (*batched(backward)(*res, d_out), None, None)

    attend.defvjp(attend_fwd, attend_bwd)
    win = jnp.asarray(window if windowed else NO_WINDOW, jnp.int32)
    return attend(q, keys, values, jnp.asarray(segment_ids, jnp.int32), win)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, kv, hd, pd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.param_dtype
        self.cfg = cfg
        self.q_proj = nnx.Dict(kernel=_param(rngs, "normal", (d, h, hd), pd, ("embed", "heads", "head_dim")))
        self.k_proj = nnx.Dict(kernel=_param(rngs, "normal", (d, kv, hd), pd, ("embed", "kv_heads", "head_dim")))
        self.v_proj = nnx.Dict(kernel=_param(rngs, "normal", (d, kv, hd), pd, ("embed", "kv_heads", "head_dim")))
        self.o_proj = nnx.Dict(kernel=_param(rngs, "normal", (h, hd, d), pd, ("heads", "head_dim", "embed")))
        if cfg.qkv_bias:
            self.q_proj["bias"] = _param(rngs, "zeros", (h, hd), pd, ("heads", "head_dim"))
            self.k_proj["bias"] = _param(rngs, "zeros", (kv, hd), pd, ("kv_heads", "head_dim"))
            self.v_proj["bias"] = _param(rngs, "zeros", (kv, hd), pd, ("kv_heads", "head_dim"))
        if cfg.o_bias:
            self.o_proj["bias"] = _param(rngs, "zeros", (d,), pd, ("norm",))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, pd, cfg.norm_plus_one)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, pd, cfg.norm_plus_one)

    def _project(self, proj: nnx.Dict, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        y = dense(x, proj["kernel"][...].astype(dtype))
        if "bias" in proj:
            y = y + proj["bias"][...].astype(dtype)
        return y

    def _inverse_frequencies(self, local):
        """The layer's RoPE table: the global one, the local one (``local`` True), or selected by a
        traced ``local`` flag (under the layer scan)."""
        cfg = self.cfg
        global_freq = rope_inverse_frequencies(cfg.head_dim, cfg.rope)
        if cfg.rope_local is None or local is None or local is False:
            return global_freq
        local_freq = rope_inverse_frequencies(cfg.head_dim, cfg.rope_local)
        if local is True:
            return local_freq
        return jnp.where(local, jnp.asarray(local_freq), jnp.asarray(global_freq))

    def _qkv(self, x, positions, qkv_kernel=None, local=None):
        """Projected, normed and rotated q [B, T, H, hd], k and v [B, T, KV, hd]. ``qkv_kernel``
        [D, (H + 2 KV) hd] (:meth:`Transformer.fused_decode_weights`): the three projections as
        one dot (the same products; one pass over x and a wider, more efficient matmul).
        ``local``: whether this is a sliding-window layer (its RoPE; see the module docstring)."""
        cfg = self.cfg
        inv_freq = self._inverse_frequencies(local)
        if qkv_kernel is None:
            q = self._project(self.q_proj, x)
            k = self._project(self.k_proj, x)
            v = self._project(self.v_proj, x)
        else:
            dtype = x.dtype
            y = dense(x, qkv_kernel.astype(dtype))
            sizes = [cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads]
            bounds = np.cumsum([0] + sizes) * cfg.head_dim
            q, k, v = [y[..., bounds[j]:bounds[j + 1]].reshape(*x.shape[:-1], n, cfg.head_dim)
                       for j, n in enumerate(sizes)]
            q, k, v = [z + proj["bias"][...].astype(dtype) if "bias" in proj else z
                       for z, proj in ((q, self.q_proj), (k, self.k_proj), (v, self.v_proj))]
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = constrain(apply_rope(q, positions, inv_freq), ("batch", "length", "act_heads", "head_dim"))
        k = constrain(apply_rope(k, positions, inv_freq), ("batch", "length", "act_kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "act_kv_heads", "head_dim"))
        return q, k, v

    def _output(self, out, dtype):
        out = constrain(out, ("batch", "length", "act_heads", "head_dim"))
        y = dense(out, self.o_proj["kernel"][...].astype(dtype), contract=2)
        if "bias" in self.o_proj:
            y = y + self.o_proj["bias"][...].astype(dtype)
        return y

    def with_heads_major_cache(self, x, positions, k_cache, v_cache, bias, cache_index, qkv_kernel=None, *,
                               per_layer: bool = False, own_rows=None, local: bool = False):
        """Self-attention of ``x`` [B, T, D] over this layer's heads-major cache k/v
        [B, KV, S, hd] (``per_layer``: a CPU per-layer buffer, :func:`per_layer_cache_axes`): the
        new keys / values are written at slots [cache_index, cache_index + T) (an in-place update
        of a buffer the decode loop carries), then :func:`cached_attention` with ``bias``
        [B, T, S] (:func:`cache_bias`, the slots' segments already updated).
        ``own_rows`` (q_segment, q_slot) [B, T], for a pass writing slots [0, T) (a prefill): every
        slot a query may see is then one of its own rows', so the attention is the training pass's
        causal kernel over the new k / v (:meth:`_causal_attention`; ``bias`` unused), which skips
        the upper triangle and never forms [B, KV, T*G, S] scores.
        ``local`` (static): a sliding-window layer (its RoPE; ``bias`` is then the windowed one).
        Returns the output and the updated (k_cache, v_cache)."""
        q, k, v = self._qkv(x, positions, qkv_kernel, local)
        kvh = self.cfg.num_kv_heads
        k_axes, v_axes = ([per_layer_cache_axes(x.shape[0], kvh, name) for name in ("k", "v")] if per_layer
                          else [HEADS_MAJOR_CACHE_AXES] * 2)

        def update(cache, new, axes):  # new [B, T, KV, hd] -> the cache's layout, written at cache_index
            new = new.transpose(0, 2, 1, 3)  # [B, KV, T, hd]
            if axes[-1] == "cache_length":  # keys slots-minor
                new = jnp.swapaxes(new, -1, -2)
            new = new.reshape(*cache.shape[:-2], *new.shape[-2:])
            return constrain(jax.lax.dynamic_update_slice_in_dim(
                cache, new.astype(cache.dtype), cache_index, axis=axes.index("cache_length")), axes)

        k_cache, v_cache = update(k_cache, k, k_axes), update(v_cache, v, v_axes)
        if own_rows is not None:
            out = self._causal_attention(q, k, v, *own_rows, local=local)
        else:
            out = cached_attention(q, k_cache, v_cache, bias, kv_heads=kvh,
                                   keys_transposed=k_axes[-1] == "cache_length", scale=self.cfg.attention_scale)
        return self._output(out, x.dtype), (k_cache, v_cache)

    def _causal_attention(self, q, k, v, q_segment, q_slot, local=None):
        """Causal attention of q [B, T, H, hd] over k / v [B, T, KV, hd] of the same packed rows
        (slots 0..T-1) with the configured kernel; ``local``: a sliding-window layer (a Python
        bool, or a traced one under the layer scan)."""
        cfg = self.cfg
        attention, scale = cfg.attention, cfg.attention_scale
        window = window_of(local, cfg.sliding_window)
        if attention == "splash":
            if window is None or isinstance(window, int):  # causal + segments (+ window), no [T, T] mask
                return splash_attention(q, k, v, q_segment, scale=scale, window=window)
            # A traced flag (the layer scan): both kernels compiled, the layer's one run.
            return jax.lax.cond(local, lambda: splash_attention(q, k, v, q_segment, scale=scale, window=cfg.sliding_window),
                                lambda: splash_attention(q, k, v, q_segment, scale=scale))
        if attention == "einsum":
            return blockwise_causal_attention(q, k, v, q_segment, scale=scale, window=window)
        # Slots are 0..T-1 here, so is_causal is exact and lets cuDNN skip the upper triangle;
        # the mask adds the packed-segment (and padding) restriction, and a local layer's window.
        mask = attention_mask(q_segment, q_slot, q_segment, q_slot, window)
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, 0], is_causal=True, scale=scale,
                                            implementation=attention)

    def __call__(self, x, positions, q_segment, q_slot, local=None):
        """Causal self-attention of ``x`` [B, T, D] over its own packed rows (slots 0..T-1; the
        training and scoring pass; cached passes use :meth:`with_heads_major_cache`)."""
        q, k, v = self._qkv(x, positions, local=local)
        return self._output(self._causal_attention(q, k, v, q_segment, q_slot, local), x.dtype), None


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), act = silu (SwiGLU) or tanh-approximated gelu
    (GeGLU, HF's ``gelu_pytorch_tanh``) as ``cfg.mlp_activation`` says."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, pd = cfg.hidden_size, cfg.intermediate_size, cfg.param_dtype
        self.gate_proj = nnx.Dict(kernel=_param(rngs, "normal", (d, f), pd, ("embed", "mlp")))
        self.up_proj = nnx.Dict(kernel=_param(rngs, "normal", (d, f), pd, ("embed", "mlp")))
        self.down_proj = nnx.Dict(kernel=_param(rngs, "normal", (f, d), pd, ("mlp", "embed")))
        self.activation = cfg.mlp_activation

    def __call__(self, x: jax.Array, gate_up_kernel: jax.Array | None = None) -> jax.Array:
        """``gate_up_kernel`` [D, 2F] (:meth:`Transformer.fused_decode_weights`): gate and up as one dot."""
        dtype = x.dtype
        if gate_up_kernel is None:
            gate = dense(x, self.gate_proj["kernel"][...].astype(dtype))
            up = dense(x, self.up_proj["kernel"][...].astype(dtype))
        else:
            gate_up = dense(x, gate_up_kernel.astype(dtype))
            gate, up = jnp.split(gate_up, 2, axis=-1)
        act = jax.nn.silu(gate) if self.activation == "silu" else jax.nn.gelu(gate, approximate=True)
        hidden = constrain(act * up, ("batch", "length", "act_mlp"))
        return dense(hidden, self.down_proj["kernel"][...].astype(dtype))


class DecoderLayer(nnx.Module):
    """Pre-norm layer; ``cfg.sandwich_norms`` (Gemma) adds a norm of the attention output and one
    of the MLP output before their residual adds (``attn_out_norm``, ``mlp_out_norm``).
    ``post_attn_norm`` is the MLP's input norm in every family."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype, cfg.norm_plus_one)
        self.input_norm = norm()
        self.attn = Attention(cfg, rngs)
        self.post_attn_norm = norm()
        self.mlp = MLP(cfg, rngs)
        if cfg.sandwich_norms:
            self.attn_out_norm = norm()
            self.mlp_out_norm = norm()

    def _block(self, x, attend, gate_up_kernel=None):
        """The layer body, whatever the cache layout: x + attend(norm(x)), then x + mlp(norm(x))
        (each output normed first with sandwich norms). ``attend`` maps the normed input to
        (attention output, updated cache)."""
        attn_out, new_cache = attend(self.input_norm(x))
        if hasattr(self, "attn_out_norm"):
            attn_out = self.attn_out_norm(attn_out)
        x = x + attn_out
        mlp_out = self.mlp(self.post_attn_norm(x), gate_up_kernel)
        if hasattr(self, "mlp_out_norm"):
            mlp_out = self.mlp_out_norm(mlp_out)
        x = x + mlp_out
        return constrain(x, ("batch", "length", "act_embed")), new_cache

    def __call__(self, x, positions, q_segment, q_slot, local=None):
        return self._block(x, lambda h: self.attn(h, positions, q_segment, q_slot, local))

    def with_heads_major_cache(self, x, positions, k_cache, v_cache, bias, cache_index, fused=None, *,
                               per_layer: bool = False, own_rows=None, local: bool = False):
        """The layer over its own heads-major cache (see :meth:`Attention.with_heads_major_cache`);
        ``fused``: this layer's {"qkv", "gate_up"} kernels (:meth:`Transformer.fused_decode_weights`)."""
        fused = fused or {}
        return self._block(x, lambda h: self.attn.with_heads_major_cache(h, positions, k_cache, v_cache, bias,
                                                                        cache_index, fused.get("qkv"),
                                                                        per_layer=per_layer, own_rows=own_rows,
                                                                        local=local),
                           fused.get("gate_up"))


# On CPU the training / scoring pass runs up to this many layers as straight-line code instead of
# a layer scan (compile time grows with depth; the scan's per-layer copies matter for small models).
MAX_UNROLLED_LAYERS = 8

_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
    """The decoder. ``model(input_ids, positions, segment_ids)`` -> fp32 logits [B, T, V]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = cfg.param_dtype
        self.embed = nnx.Dict(embedding=_param(rngs, "normal", (cfg.vocab_size, cfg.hidden_size), pd, ("vocab", "embed")))
        # Stacked layers: build one layer's structure, then vmap its construction over L keys.
        layer_def, _ = nnx.split(nnx.eval_shape(lambda: DecoderLayer(cfg, nnx.Rngs(0))))
        keys = jax.random.split(rngs.params(), cfg.num_layers)
        stacked = jax.vmap(lambda k: nnx.split(DecoderLayer(cfg, nnx.Rngs(k)))[1])(keys)
        self.layers = nnx.merge(layer_def, stacked)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, cfg.norm_plus_one)
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Dict(kernel=_param(rngs, "normal", (cfg.hidden_size, cfg.vocab_size), pd, ("embed", "vocab")))

    # -- pieces used by losses and the sampler -------------------------------------------------
    def unembed_matrix(self) -> jax.Array:
        """[D, V] matrix with logits = hidden @ unembed (the transposed embedding when tied)."""
        if self.cfg.tie_word_embeddings:
            return self.embed["embedding"][...].T
        return self.lm_head["kernel"][...]

    def logits_from_hidden(self, hidden: jax.Array, unembed: jax.Array | None = None) -> jax.Array:
        """fp32 logits; ``unembed``: a [D, V] matrix to use instead (:meth:`fused_decode_weights`)."""
        if unembed is not None:
            logits = jnp.einsum("btd,dv->btv", hidden, unembed.astype(hidden.dtype), preferred_element_type=jnp.float32)
        elif self.cfg.tie_word_embeddings:  # contract against the embedding itself: no transposed copy
            w = self.embed["embedding"][...].astype(hidden.dtype)
            logits = jnp.einsum("btd,vd->btv", hidden, w, preferred_element_type=jnp.float32)
        else:
            w = self.lm_head["kernel"][...].astype(hidden.dtype)
            logits = jnp.einsum("btd,dv->btv", hidden, w, preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "act_vocab"))

    def _run_layers(self, x, positions, segment_ids, slots):
        layer_def, layer_state = nnx.split(self.layers)
        cfg = self.cfg
        # Sliding-window layers mixed with global ones: under the scan each layer's flag is a
        # scanned input; unrolled, each layer's flag is static (as is a uniform one).
        mixed = cfg.has_local_layers and not all(cfg.local_layers)

        def make_body(local):  # local: a static flag (None = no window), or "scanned"
            def body(h, xs):
                state, flag = xs if local == "scanned" else (xs, local)
                h, _ = nnx.merge(layer_def, state)(h, positions, segment_ids, slots, flag)
                return h, None

            if cfg.remat != "none":
                body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
            return body

        static = {flag: make_body(flag) for flag in (None, True, False)}
        uniform = static[True if cfg.has_local_layers and not mixed else None]
        if traced_for_cpu() and cfg.num_layers <= MAX_UNROLLED_LAYERS:
            # Unrolled on CPU: a scan would copy each layer's weights out of the stack and its
            # residuals into [L, ...] buffers every step; ``lax.split``'s gradient is one concatenate.
            layers = jax.tree.map(lambda a: jax.lax.split(a, [1] * cfg.num_layers), layer_state)
            for i in range(cfg.num_layers):
                state = jax.tree.map(lambda parts, i=i: parts[i][0], layers, is_leaf=lambda v: isinstance(v, list))
                x, _ = (static[cfg.layer_is_local(i)] if mixed else uniform)(x, state)
            return self.final_norm(x)
        if mixed:
            x, _ = jax.lax.scan(make_body("scanned"), x, (layer_state, jnp.asarray(cfg.local_layers, bool)))
        else:
            x, _ = jax.lax.scan(uniform, x, layer_state)
        return self.final_norm(x)

    def unstacked_layers(self) -> list:
        """Each layer's parameters as its own arrays (a copy): see :meth:`forward_with_cache`."""
        _, layer_state = nnx.split(self.layers)
        return [jax.tree.map(lambda a, i=i: a[i], layer_state) for i in range(self.cfg.num_layers)]

    def fused_decode_weights(self) -> dict:
        """Decode-time copies of the weights in the layouts XLA:CPU multiplies fastest, made once
        outside a decode loop: per layer ``qkv`` [D, (H + 2 KV) hd] (q, k, v kernels side by side)
        and ``gate_up`` [D, 2F], and ``unembed`` [D, V]. A [1 or 16, D] x [D, V] product streams
        the unembedding ~1.3x faster than against the tied [V, D] embedding, and one wide dot
        replaces three (two) narrow ones per layer (fewer, more efficient matmul calls)."""
        _, layer_state = nnx.split(self.layers)
        cfg = self.cfg
        attn, mlp = layer_state["attn"], layer_state["mlp"]
        flat = lambda w: w[...].reshape(cfg.num_layers, cfg.hidden_size, -1)
        qkv = jnp.concatenate([flat(attn["q_proj"]["kernel"]), flat(attn["k_proj"]["kernel"]),
                               flat(attn["v_proj"]["kernel"])], axis=-1)
        gate_up = jnp.concatenate([flat(mlp["gate_proj"]["kernel"]), flat(mlp["up_proj"]["kernel"])], axis=-1)
        return {
            "layers": [{"qkv": qkv[i], "gate_up": gate_up[i]} for i in range(cfg.num_layers)],
            "unembed": jnp.asarray(self.unembed_matrix()),
        }

    def _run_layers_cached(self, x, positions, segment_ids, slots, cache, cache_index, layers=None, fused=None):
        """The layers as a Python loop over static layer indices, each over its heads-major cache
        (a per-layer buffer, or a slice of the stacked one updated in place): the shared slot
        segments and the attention bias are updated / built once, not per layer. A pass from slot 0
        (a prefill; ``cache_index`` the int 0) attends over its own rows (``own_rows`` of
        :meth:`Attention.with_heads_major_cache`): causality hides every later slot."""
        layer_def, layer_state = nnx.split(self.layers)
        kv_segment = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, cache_index, axis=1)
        kv_segment = constrain(kv_segment, ("batch", "cache_length"))
        from_start = isinstance(cache_index, int) and cache_index == 0
        own_rows = (segment_ids, slots) if from_start else None
        cfg = self.cfg
        bias = None if from_start else cache_bias(segment_ids, slots, kv_segment)
        local_bias = (None if from_start or not cfg.has_local_layers
                      else cache_bias(segment_ids, slots, kv_segment, cfg.sliding_window))
        ks, vs = cache["k"], cache["v"]
        per_layer = isinstance(ks, (list, tuple))
        ks, vs = (list(ks), list(vs)) if per_layer else (ks, vs)
        for i in range(self.cfg.num_layers):
            state = layers[i] if layers is not None else jax.tree.map(lambda a: a[i], layer_state)
            layer = nnx.merge(layer_def, state)
            local = cfg.layer_is_local(i)
            x, (k, v) = layer.with_heads_major_cache(x, positions, ks[i], vs[i], local_bias if local else bias,
                                                     cache_index, fused["layers"][i] if fused is not None else None,
                                                     per_layer=per_layer, own_rows=own_rows, local=local)
            if per_layer:
                ks[i], vs[i] = k, v
            else:
                ks, vs = ks.at[i].set(k), vs.at[i].set(v)
        return self.final_norm(x), {"k": ks, "v": vs, "segment_ids": kv_segment}

    def _embed(self, input_ids, positions, segment_ids):
        input_ids = jnp.asarray(input_ids, jnp.int32)
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        dtype = jnp.dtype(self.cfg.dtype)
        x = jnp.take(self.embed["embedding"][...], input_ids, axis=0)
        if self.cfg.embed_scale:  # Gemma: times sqrt(hidden), the factor rounded to the param dtype as HF does
            x = x * jnp.asarray(math.sqrt(self.cfg.hidden_size), jnp.float32).astype(x.dtype)
        x = x.astype(dtype)
        x = constrain(x, ("batch", "length", "act_embed"))
        return x, jnp.asarray(positions, jnp.int32), jnp.asarray(segment_ids, jnp.int32)

    def __call__(self, input_ids, positions=None, segment_ids=None, *, return_hidden: bool = False):
        """Logits [B, T, V] in fp32, or the post-final-norm hidden states [B, T, D] (compute dtype)
        when ``return_hidden`` (memory-light losses apply the unembedding chunk by chunk)."""
        x, positions, segment_ids = self._embed(input_ids, positions, segment_ids)
        slots = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), segment_ids.shape)
        hidden = self._run_layers(x, positions, segment_ids, slots)
        return hidden if return_hidden else self.logits_from_hidden(hidden)

    # -- cached decoding --------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int, dtype: Any = None, *, per_layer: bool = False) -> dict:
        """Empty heads-major KV cache: k/v [L, B, KV, S, hd] and per-slot segment ids [B, S]
        (0 = empty), shared by all layers (every layer fills the same slots).

        ``per_layer`` (the CPU decode layout): k/v as lists of L arrays, k [B, KV, hd, S] and
        v [B, KV, S, hd] without their size-1 B / KV dims (:func:`per_layer_cache_axes`). A decode
        loop then updates each layer's buffer in place; with the stacked layout XLA:CPU slices,
        updates and writes back the whole [L, ...] cache once per layer per step."""
        cfg = self.cfg
        dtype = dtype or cfg.dtype
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        if per_layer:
            sizes = dict(zip(HEADS_MAJOR_CACHE_AXES, shape))
            k, v = ([jnp.zeros(tuple(sizes[a] for a in per_layer_cache_axes(batch, cfg.num_kv_heads, name)), dtype)
                     for _ in range(cfg.num_layers)] for name in ("k", "v"))
        else:
            k = jnp.zeros((cfg.num_layers, *shape), dtype)
            v = jnp.zeros((cfg.num_layers, *shape), dtype)
        return {"k": k, "v": v, "segment_ids": jnp.zeros((batch, max_len), jnp.int32)}

    def forward_with_cache(self, input_ids, positions, segment_ids, cache, cache_index, *, last_only: bool = False,
                           layers: list | None = None, fused: dict | None = None):
        """Run ``input_ids`` [B, T] occupying cache slots [cache_index, cache_index + T).

        Returns fp32 logits [B, T, V] (``[B, 1, V]`` of the last position with ``last_only``: a
        long prefill then never materializes [B, T, V]) and the updated cache. Rows may be
        left-padded (segment id 0 on pads): pads are never attended to by real tokens.

        ``layers``: :meth:`unstacked_layers`, computed once outside a decode loop. XLA:CPU copies a
        slice of the stacked ``[L, ...]`` weights before every matmul that reads it, inside the loop
        on every step (twice a batch-1 step's memory traffic); separate per-layer arrays are read
        in place. ``fused``: :meth:`fused_decode_weights` (also made once outside the loop), for
        the q/k/v and gate/up projections and the unembedding.
        """
        x, positions, segment_ids = self._embed(input_ids, positions, segment_ids)
        t = x.shape[1]
        slots = jnp.broadcast_to(cache_index + jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
        hidden, cache = self._run_layers_cached(x, positions, segment_ids, slots, cache, cache_index, layers, fused)
        if last_only:
            hidden = hidden[:, -1:]
        return self.logits_from_hidden(hidden, fused["unembed"] if fused is not None else None), cache
