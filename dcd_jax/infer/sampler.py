"""Batched, jitted text generation with a KV cache (the evaluation sampler).

Two layers:

* :func:`generate_tokens` - the pure, jitted core. Prompts arrive as a padded ``[B, P]`` id array
  plus a mask (left- or right-padded; rows are left-aligned inside). One prefill call writes the
  prompts into a fixed-size KV cache, then a ``lax.while_loop`` decodes one token per step for
  every row until all rows have finished (EOS or an in-loop stop sequence) or ``max_new_tokens``
  is reached; with ``min_rows`` (the single-device :class:`Sampler`) the batch halves whenever no
  more than half of it is still generating, so finished rows stop costing steps. Greedy (temperature 0) is an argmax; otherwise logits are divided by the
  temperature and filtered by top-k / top-p in fp32 before a categorical draw whose key is
  ``fold_in(row_key, step)``, so every row has its own reproducible stream.
* :class:`Sampler` - the host side: tokenization, ``n`` samples per prompt, chunking into
  batches, padding prompt lengths and batch sizes up to *buckets* (so the core compiles a bounded
  number of times), placing inputs on the mesh, detokenization and stop strings.

Stop conditions:
  * EOS: any id of ``SamplingConfig.eos_token_ids`` (default: ``dcd_jax.stop_tokens.stop_token_ids``,
    the tokenizer's EOS and the ``generation_config.json``'s eos ids) ends the row
    inside the loop; the EOS id is kept in ``Completion.token_ids`` but not in the text.
  * Stop strings are authoritative *post hoc*: the decoded text is cut before the first
    occurrence of any stop string, and ``token_ids`` are cut after the token that completes it.
    As an optimisation, each stop string's own tokenization (without special tokens) is also
    matched against the last generated ids inside the loop, so a row that emits it exactly
    stops early; a stop string produced by a different tokenization is only found post hoc
    (the row then runs on to EOS / ``max_new_tokens``, the result is the same, only slower).

Compilation: the core compiles once per (model, batch, prompt length, max_new_tokens, greedy or
not, top_k, top-p on/off, EOS ids, stop sequences, logprobs on/off); temperature and top-p values,
the seed and ``n`` are runtime inputs. The host pads prompt lengths to buckets (powers of two or
multiples of ``prompt_bucket``) and batches to powers of two up to ``batch_size``, so a whole
evaluation compiles O(log(longest prompt) * log(batch_size)) programs at most.

Memory: the prefill unembeds only each row's last prompt position (not [B, P, V] logits); the KV
cache holds ``P_bucket + max_new_tokens - 1`` slots per row in the model's compute dtype. On CPU
the loop also reads copies of the weights in decode layouts (:func:`cpu_decode_weights`: per-layer
arrays, fused q/k/v and gate/up kernels, a [D, V] unembedding), which a :class:`Sampler` makes once
and keeps (about twice the layer weights plus the unembedding, held next to the params).

Random streams: the key of the ``j``-th sample of prompt ``i`` is
``fold_in(fold_in(key(seed), i), j)``, independent of batch composition, chunking, padding,
ordering and sharding; the same seed gives the same completions.

Sharding: with a mesh, prompt rows are split over the ``batch`` logical axis (``data`` x
``fsdp``), parameters stay in the shardings they carry (tensor-parallel weights), and the KV
cache is constrained to ``(layers, batch, act_kv_heads, cache_length, head_dim)`` through
:mod:`dcd_jax.sharding` (on CPU, where it is a list of per-layer heads-major buffers, each to
``(batch, act_kv_heads, cache_length, head_dim)`` less its size-1 dims). The batch is padded to a multiple of the
batch-shard count.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dcd_jax.models import bind, positions_from_mask
from dcd_jax.models.transformer import HEADS_MAJOR_CACHE_AXES, per_layer_cache_axes
from dcd_jax.sharding import batch_shards, constrain, named_sharding, traced_for_cpu
from dcd_jax.stop_tokens import stop_token_ids

__all__ = [
    "SamplingConfig",
    "Completion",
    "Sampler",
    "generate_tokens",
    "sample_logits",
    "left_align",
    "prompt_bucket_length",
    "batch_bucket_size",
    "row_keys",
]

FinishReason = Literal["eos", "stop", "length"]

@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to generate.

    Attributes:
        max_new_tokens: generation budget per completion (EOS included).
        temperature: 0 = greedy (argmax); otherwise logits / temperature are sampled.
        top_p: nucleus sampling - keep the smallest set of top tokens whose probability mass is
            >= top_p (1.0 = off). Applied after top-k.
        top_k: keep the k most likely tokens (0 = off).
        n: completions per prompt (independent random streams).
        seed: base seed of all random streams.
        stop_strings: the text of a completion ends before the first occurrence of any of these.
        eos_token_ids: ids that end a completion. ``None`` = the tokenizer's stop ids
            (``dcd_jax.stop_tokens.stop_token_ids``); ``()`` = none.
        prompt_bucket: prompt lengths are padded up to a bucket so the core compiles once per
            bucket: ``"pow2"`` = the next power of two (at least 16), an int ``m`` = the next
            multiple of ``m``.
        batch_size: rows (prompts x n) per device batch; smaller final batches are padded up to
            the next power of two (and to a multiple of the batch-shard count on a mesh).
        logprobs: also return each generated token's log-probability under the model's own
            distribution (temperature 1, no top-k/top-p), in ``Completion.logprobs``.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int = 0
    stop_strings: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] | None = None
    prompt_bucket: int | str = "pow2"
    batch_size: int = 64
    logprobs: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}; must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}; must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}; must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}; must be >= 0 (0 = off)")
        if self.n < 1 or self.batch_size < 1:
            raise ValueError(f"n={self.n}, batch_size={self.batch_size}; both must be >= 1")
        if isinstance(self.stop_strings, str):
            raise TypeError("stop_strings must be a tuple of strings, not a string")
        if not (self.prompt_bucket == "pow2" or (isinstance(self.prompt_bucket, int) and self.prompt_bucket > 0)):
            raise ValueError(f"prompt_bucket={self.prompt_bucket!r}; expected 'pow2' or a positive int")
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if self.eos_token_ids is not None:
            object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclasses.dataclass(frozen=True)
class Completion:
    """One generated continuation.

    ``token_ids`` are the generated ids up to and including the EOS id or the token that
    completed a stop string; ``text`` is their decoding without the EOS and without the stop
    string; ``num_tokens == len(token_ids)``; ``logprobs`` (with ``SamplingConfig.logprobs``)
    holds one log-probability per entry of ``token_ids``.
    """

    text: str
    token_ids: list[int]
    finished_by: FinishReason
    num_tokens: int
    logprobs: list[float] | None = None


@dataclasses.dataclass(frozen=True)
class _DecodeSpec:
    """The part of the configuration the compiled loop's structure depends on (hashable, static).
    Temperature and top-p values are runtime arguments: changing them does not recompile."""

    max_new_tokens: int
    greedy: bool
    top_k: int
    use_top_p: bool
    eos_token_ids: tuple[int, ...]
    stop_sequences: tuple[tuple[int, ...], ...]
    pad_id: int
    logprobs: bool = False
    min_rows: int = 0  # halve the batch down to this many rows as rows finish (0: never)


# ---------------------------------------------------------------------------------------------
# Pure core
# ---------------------------------------------------------------------------------------------


def _spec_of(cfg: SamplingConfig, stop_sequences: Sequence[Sequence[int]], pad_id: int,
             min_rows: int = 0) -> _DecodeSpec:
    return _DecodeSpec(
        max_new_tokens=int(cfg.max_new_tokens),
        greedy=cfg.greedy,
        top_k=0 if cfg.greedy else int(cfg.top_k),
        use_top_p=not cfg.greedy and cfg.top_p < 1.0,
        eos_token_ids=tuple(cfg.eos_token_ids or ()),
        stop_sequences=tuple(tuple(int(t) for t in s) for s in stop_sequences if len(s)),
        pad_id=int(pad_id),
        logprobs=bool(cfg.logprobs),
        min_rows=int(min_rows),
    )


# The smallest batch the single-device sampler halves down to as rows finish (each halving adds a
# decode loop to the compiled program, so a bucket of 64 rows compiles 4).
MIN_DECODE_ROWS = 8


def row_stages(rows: int, min_rows: int) -> list[int]:
    """Batch sizes of the decode loop's stages: ``rows``, then halved while the half is a whole
    number of at least ``min_rows`` rows (``min_rows`` 0: one stage). A stage ends when no more
    rows than the next size are still generating; those rows move on to the smaller batch."""
    stages = [rows]
    while min_rows and stages[-1] % 2 == 0 and stages[-1] // 2 >= min_rows:
        stages.append(stages[-1] // 2)
    return stages


def _take_rows(state: dict, order: jax.Array) -> dict:
    """``state`` restricted to the rows ``order`` (every per-row array; the cache's batch axis:
    axis 0 of per-layer buffers and slot segments, axis 1 of the stacked [L, B, ...] k/v)."""
    out = {}
    for name, value in state.items():
        if name == "step":
            out[name] = value
        elif name == "cache":
            out[name] = {key: ([x[order] for x in c] if isinstance(c, (list, tuple))
                               else c[:, order] if key in ("k", "v") else c[order])
                         for key, c in value.items()}
        else:
            out[name] = value[order]
    return out


def left_align(prompt_ids: jax.Array, prompt_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Move every row's real tokens (mask 1) to the right end, keeping their order: turns right-
    (or arbitrarily) padded prompts into left-padded ones. Works on numpy and jax arrays."""
    xp = jnp if isinstance(prompt_ids, jax.Array) or isinstance(prompt_mask, jax.Array) else np
    mask = xp.asarray(prompt_mask).astype(bool)
    order = xp.argsort(mask.astype(np.int32), axis=1, stable=True)  # pads (0) first, in order
    ids = xp.take_along_axis(xp.asarray(prompt_ids), order, axis=1)
    mask = xp.take_along_axis(mask, order, axis=1)
    return xp.where(mask, ids, 0).astype(np.int32), mask.astype(np.int32)


def greedy_tokens(logits: jax.Array) -> jax.Array:
    """``argmax`` over the last axis (the first maximal index) as two plain reductions: max, then
    the smallest index attaining it. XLA:CPU runs jnp.argmax's fused (value, index) reduction
    unvectorized, ~5x slower at [64, 32k] (13% of a batch-64 decode step)."""
    best = jnp.max(logits, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where(logits == best, index, logits.shape[-1]), axis=-1).astype(jnp.int32)


def _filter_and_sample(
    logits: jax.Array, keys: jax.Array, spec: _DecodeSpec, temperature: jax.Array, top_p: jax.Array
) -> jax.Array:
    """Next token per row from fp32 ``logits`` [B, V] with per-row ``keys`` (typed) [B]."""
    if spec.greedy:
        return greedy_tokens(logits)
    logits = logits.astype(jnp.float32) / temperature
    vocab = logits.shape[-1]
    if 0 < spec.top_k < vocab:
        # Work in the top-k subspace: k values, already sorted descending.
        vals, idx = jax.lax.top_k(logits, spec.top_k)
    elif spec.use_top_p:
        vals, idx = jax.lax.top_k(logits, vocab)  # a full descending sort
    else:
        vals, idx = logits, None
    if spec.use_top_p:
        probs = jax.nn.softmax(vals, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # Keep a token when the mass of the strictly better tokens is below top_p: the smallest
        # prefix whose mass reaches top_p (the best token is always kept).
        vals = jnp.where(mass_before < top_p, vals, -jnp.inf)
    choice = jax.vmap(jax.random.categorical)(keys, vals).astype(jnp.int32)
    if idx is None:
        return choice
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("spec",))
def _sample_logits_jit(logits, keys, temperature, top_p, spec):
    if not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        keys = jax.random.wrap_key_data(keys)
    return _filter_and_sample(logits, keys, spec, temperature, top_p)


def sample_logits(logits: jax.Array, rng_keys: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """One draw per row from fp32 ``logits`` [B, V] with ``cfg``'s temperature / top-k / top-p
    (argmax when greedy) and per-row keys [B, 2]: the sampling step of the decode loop, alone."""
    spec = _spec_of(dataclasses.replace(cfg, max_new_tokens=1, eos_token_ids=()), (), 0)
    temperature = np.float32(cfg.temperature if not cfg.greedy else 1.0)
    return _sample_logits_jit(jnp.asarray(logits, jnp.float32), rng_keys, temperature, np.float32(cfg.top_p), spec)


def _prefill(model, ids, positions, segment_ids, cache, layers, fused):
    """The prompts into the cache (slots 0..P-1); next-token logits of the last position only."""
    logits, cache = model.forward_with_cache(ids, positions, segment_ids, cache, 0, last_only=True, layers=layers,
                                             fused=fused)
    return logits[:, 0], cache


def _constrain_cache(cache: dict, kv_heads: int) -> dict:
    """Transformer.init_cache's layout: heads-major k/v stacked [L, B, KV, S, hd], or (on CPU) one
    array per layer (:func:`per_layer_cache_axes`); slot segments [B, S]."""
    batch = cache["segment_ids"].shape[0]
    out = {"segment_ids": constrain(cache["segment_ids"], ("batch", "cache_length"))}
    for name in ("k", "v"):
        value = cache[name]
        if isinstance(value, (list, tuple)):
            axes = per_layer_cache_axes(batch, kv_heads, name)
            out[name] = [constrain(x, axes) for x in value]
        else:
            out[name] = constrain(value, ("layers", *HEADS_MAJOR_CACHE_AXES))
    return out


def _mask_vocab(logits: jax.Array, limit: int) -> jax.Array:
    """Rows past the tokenizer's vocabulary (embedding padding) are never generated."""
    if limit >= logits.shape[-1]:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < limit, logits, -jnp.inf)


def cpu_decode_weights(model) -> dict:
    """The weight copies the CPU decode loop reads (:meth:`Transformer.unstacked_layers` and
    :meth:`Transformer.fused_decode_weights`): made once per call inside :func:`generate_tokens`,
    or once per :class:`Sampler` and passed in (they are ~2x the layer weights plus the
    unembedding: a few times a batch-1 step's memory traffic when copied every call)."""
    return {"layers": model.unstacked_layers(), "fused": model.fused_decode_weights()}


@jax.jit
def _cpu_decode_weights_jit(graphdef, params):
    return cpu_decode_weights(bind(graphdef, params))


@functools.partial(jax.jit, static_argnames=("spec",))
def _generate_jit(graphdef, params, prompt_ids, prompt_mask, rng_keys, temperature, top_p, decode_weights=None, *,
                  spec: _DecodeSpec):
    b, p = prompt_ids.shape
    model = bind(graphdef, params)
    vocab_limit = model.cfg.tokenizer_vocab_size
    max_new = spec.max_new_tokens

    ids, mask = left_align(jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask))
    ids = constrain(ids, ("batch", "length"))
    mask = constrain(mask, ("batch", "length"))
    keys = rng_keys
    if not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        keys = jax.random.wrap_key_data(keys)
    lengths_in = mask.sum(axis=1)  # real prompt tokens per row; 0 = a padding row
    positions = positions_from_mask(mask)

    on_cpu = traced_for_cpu()
    # On CPU, per-layer heads-major cache buffers updated in place (Transformer.init_cache) and
    # per-layer weight copies made once here, not per step inside the loop (see
    # Transformer.forward_with_cache). Elsewhere the stacked cache and weights are used as they are.
    kv_heads = model.cfg.num_kv_heads
    cache = _constrain_cache(model.init_cache(b, p + max_new - 1, per_layer=on_cpu), kv_heads)
    if on_cpu and decode_weights is None:
        decode_weights = cpu_decode_weights(model)
    layers = decode_weights["layers"] if on_cpu else None
    fused = decode_weights["fused"] if on_cpu else None
    logits, cache = _prefill(model, ids, positions, mask, cache, layers, fused)
    cache = _constrain_cache(cache, kv_heads)

    eos = jnp.asarray(spec.eos_token_ids or (-1,), jnp.int32)
    seq_len = max((len(s) for s in spec.stop_sequences), default=0)
    stop_seqs = [jnp.asarray(s, jnp.int32) for s in spec.stop_sequences]

    def pick(logits, step, done, window, keys):
        logits = _mask_vocab(logits, vocab_limit)
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
        tok = _filter_and_sample(logits, step_keys, spec, temperature, top_p)
        tok = jnp.where(done, spec.pad_id, tok)
        logprob = None
        if spec.logprobs:  # under the model's own distribution (temperature 1, no filtering)
            logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=-1)[:, 0]
            logprob = jnp.where(done, 0.0, logprob)
        ended = jnp.isin(tok, eos)
        if seq_len:
            window = jnp.concatenate([window[:, 1:], tok[:, None]], axis=1)
            for s in stop_seqs:
                ended = ended | jnp.all(window[:, seq_len - s.shape[0]:] == s, axis=1)
        return tok, logprob, ended & ~done, window

    def record(state, step, tok, logprob, ended, window):
        state = dict(state, tok=tok, window=window, step=step + 1)
        state["tokens"] = jax.lax.dynamic_update_slice_in_dim(state["tokens"], tok[:, None], step, axis=1)
        if spec.logprobs:
            state["logprobs"] = jax.lax.dynamic_update_slice_in_dim(state["logprobs"], logprob[:, None], step, axis=1)
        state["lengths"] = state["lengths"] + (~state["done"]).astype(jnp.int32)
        state["done"] = state["done"] | ended
        return state

    state = {
        "step": jnp.int32(0),
        "cache": cache,
        "tok": jnp.zeros((b,), jnp.int32),
        "tokens": constrain(jnp.full((b, max_new), spec.pad_id, jnp.int32), ("batch", "length")),
        "done": lengths_in == 0,  # padding rows are finished from the start
        "lengths": jnp.zeros((b,), jnp.int32),
        "window": jnp.full((b, max(seq_len, 1)), -1, jnp.int32),
        "lengths_in": lengths_in,
        "keys": keys,
        "row": jnp.arange(b, dtype=jnp.int32),  # each row's index in the prompt batch
    }
    if spec.logprobs:
        state["logprobs"] = constrain(jnp.zeros((b, max_new), jnp.float32), ("batch", "length"))
    state = record(state, 0, *pick(logits, 0, state["done"], state["window"], keys))

    def body(state):
        step = state["step"]
        # Feed the token sampled at step-1: position = prompt length + step - 1, slot P + step - 1.
        pos = (state["lengths_in"] + step - 1)[:, None]
        logits, cache = model.forward_with_cache(
            state["tok"][:, None], pos, jnp.ones_like(pos), state["cache"], p + step - 1, layers=layers,
            fused=fused,
        )
        state = dict(state, cache=_constrain_cache(cache, kv_heads))
        return record(state, step, *pick(logits[:, 0], step, state["done"], state["window"], state["keys"]))

    # Rows that finished early are not decoded on: once no more rows than half the batch are still
    # generating, those rows (and the other finished rows needed to fill it) move into a batch half
    # the size, in a loop compiled for it; each row's tokens, positions, random stream and cache
    # go with it, so its output is unchanged. Outputs go back to the prompt rows at each stage's end.
    outputs = {name: state[name] for name in ("tokens", "lengths", "done", "logprobs") if name in state}
    stages = row_stages(b, spec.min_rows)
    for i, rows in enumerate(stages):
        if i:
            running_first = jnp.argsort(state["done"], stable=True)[:rows]
            state = _take_rows(state, running_first)
            state["cache"] = _constrain_cache(state["cache"], kv_heads)
        next_rows = stages[i + 1] if i + 1 < len(stages) else 0

        def cond(state, next_rows=next_rows):
            running = ~state["done"]
            return (state["step"] < max_new) & (jnp.sum(running) > next_rows)

        state = jax.lax.while_loop(cond, body, state)
        if len(stages) > 1:
            outputs = {name: value.at[state["row"]].set(state[name]) for name, value in outputs.items()}
        else:
            outputs = {name: state[name] for name in outputs}
    finished = outputs["done"] & (lengths_in > 0)
    if spec.logprobs:
        return outputs["tokens"], outputs["lengths"], finished, outputs["logprobs"]
    return outputs["tokens"], outputs["lengths"], finished


def generate_tokens(
    graphdef: nnx.GraphDef,
    params: dict[str, Any],
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    rng_keys: jax.Array,
    cfg: SamplingConfig,
    *,
    stop_sequences: Sequence[Sequence[int]] = (),
    pad_id: int = 0,
    decode_weights: dict | None = None,
    min_rows: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Generate up to ``cfg.max_new_tokens`` tokens for each prompt row.

    Jitted; compiles once per (model, B, P, max_new_tokens, greedy or not, top_k, top-p on or
    off, EOS ids, stop sequences). Temperature and top-p *values*, the seed and ``n`` are not part
    of the compiled program.

    Args:
        graphdef, params: the model (``nnx.split``; params a plain nested dict, possibly sharded).
        prompt_ids: [B, P] int32, left- or right-padded (rows are left-aligned internally).
        prompt_mask: [B, P], 1 on real prompt tokens. An all-zero row is a padding row: it
            generates nothing (length 0) and does not keep the loop running.
        rng_keys: [B, 2] uint32 raw keys (or [B] typed keys), one random stream per row.
        cfg: sampling parameters; ``cfg.eos_token_ids`` must be resolved (``None`` = no EOS).
        stop_sequences: id sequences that also end a row when generated (best effort, see module
            doc).
        pad_id: filler written after a row's last token.
        decode_weights: on CPU, :func:`cpu_decode_weights` of this model made beforehand (else they
            are made inside every call); ignored elsewhere.
        min_rows: decode rows that finish early no further: the batch halves (down to this many
            rows, :func:`row_stages`) whenever no more than half of it is still generating; 0 keeps
            every row to the end. Unsharded rows only (each half must be whole on every shard).

    Returns:
        tokens [B, max_new_tokens] int32 (``pad_id`` past each row's length), lengths [B] int32
        (generated tokens including the EOS / stop-sequence end), finished [B] bool (ended by EOS
        or a stop sequence rather than the token budget); with ``cfg.logprobs`` a fourth array,
        logprobs [B, max_new_tokens] fp32 (log-softmax of the unfiltered, temperature-1 logits at
        each generated token; 0 past the length).
    """
    spec = _spec_of(cfg, stop_sequences, pad_id, min_rows)
    temperature = np.float32(cfg.temperature if not cfg.greedy else 1.0)
    return _generate_jit(graphdef, params, prompt_ids, prompt_mask, rng_keys, temperature, np.float32(cfg.top_p),
                         decode_weights, spec=spec)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


def prompt_bucket_length(length: int, bucket: int | str) -> int:
    """The padded prompt length for a longest prompt of ``length`` tokens."""
    if bucket == "pow2":
        return max(16, 1 << max(0, int(length) - 1).bit_length())
    return max(1, math.ceil(length / bucket)) * bucket


def batch_bucket_size(rows: int, batch_size: int, multiple: int = 1) -> int:
    """The padded batch for ``rows`` (<= batch_size) rows: the next power of two capped at
    ``batch_size``, rounded up to a multiple of ``multiple`` (the batch-shard count)."""
    size = min(batch_size, 1 << max(0, rows - 1).bit_length())
    return math.ceil(size / multiple) * multiple


@jax.jit
def _row_keys_jit(seed, prompt_index, sample_index):
    fold = jax.vmap(jax.random.fold_in)
    base = jnp.broadcast_to(jax.random.PRNGKey(seed), (prompt_index.shape[0], 2))
    return fold(fold(base, prompt_index), sample_index)


def row_keys(seed: int, prompt_index: Sequence[int], sample_index: Sequence[int]) -> np.ndarray:
    """[R, 2] uint32 raw keys: ``fold_in(fold_in(PRNGKey(seed), i), j)`` for each (i, j) pair."""
    i = np.asarray(prompt_index, np.uint32)
    j = np.asarray(sample_index, np.uint32)
    return np.asarray(_row_keys_jit(np.uint32(seed), i, j))


class Sampler:
    """Host-side generation over prompts (strings or id lists) with a fixed model.

    Args:
        graphdef, params: the model (``nnx.split(model)``; params as a plain nested dict). Use
            :meth:`from_model` for a bound :class:`~dcd_jax.models.Transformer`.
        tokenizer: a Hugging Face tokenizer (needed for string prompts, text and stop strings).
        mesh: run sharded on this ``(data, fsdp, tensor)`` mesh; params keep their shardings.
        add_special_tokens: passed to the tokenizer for string prompts. Off by default: prompts
            are expected already rendered (chat templates include the BOS token).
        skip_special_tokens: passed to ``tokenizer.decode`` (EOS ids are always dropped).
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        params: dict[str, Any],
        tokenizer: Any = None,
        mesh: jax.sharding.Mesh | None = None,
        *,
        add_special_tokens: bool = False,
        skip_special_tokens: bool = False,
    ):
        self.graphdef, self.params, self.tokenizer, self.mesh = graphdef, params, tokenizer, mesh
        self.add_special_tokens = add_special_tokens
        self.skip_special_tokens = skip_special_tokens
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        self.pad_id = int(pad) if pad is not None else 0
        self._decode_weights = (None, None)  # (params they were made from, cpu_decode_weights)

    @classmethod
    def from_model(cls, model, tokenizer: Any = None, mesh: jax.sharding.Mesh | None = None, **kwargs) -> "Sampler":
        graphdef, state = nnx.split(model)
        return cls(graphdef, nnx.to_pure_dict(state), tokenizer, mesh, **kwargs)

    # -- helpers -----------------------------------------------------------------------------
    def _batch_multiple(self) -> int:
        if self.mesh is None:
            return 1
        return batch_shards(self.mesh)

    def _eos_ids(self, cfg: SamplingConfig) -> tuple[int, ...]:
        """``cfg.eos_token_ids``, else the tokenizer's EOS id followed by every ``eos_token_id`` of
        the ``generation_config.json`` next to the tokenizer's files (chat models list several:
        Gemma 3's end of turn and end of text, Llama 3's ``<|eot_id|>``)."""
        if cfg.eos_token_ids is not None:
            return cfg.eos_token_ids
        return stop_token_ids(self.tokenizer)

    def _encode(self, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
        out = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ValueError("string prompts need a tokenizer; pass token id lists instead")
                ids = self.tokenizer(prompt, add_special_tokens=self.add_special_tokens)["input_ids"]
            else:
                ids = [int(t) for t in prompt]
            if not ids:
                raise ValueError(f"prompt {i} is empty (no tokens): nothing to condition on")
            out.append(ids)
        return out

    def _stop_sequences(self, cfg: SamplingConfig) -> tuple[tuple[int, ...], ...]:
        if not cfg.stop_strings:
            return ()
        if self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer")
        seqs = []
        for s in cfg.stop_strings:
            ids = tuple(self.tokenizer(s, add_special_tokens=False)["input_ids"])
            if ids:
                seqs.append(ids)
        return tuple(seqs)

    def _decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def cpu_decode_weights(self) -> dict | None:
        """:func:`cpu_decode_weights` of the single-device CPU model, made once and reused by
        every batch (None elsewhere: on a mesh or an accelerator each call reads the params)."""
        if self.mesh is not None or not traced_for_cpu():  # the predicate _generate_jit keys on
            return None
        made_from, weights = self._decode_weights
        if made_from is not self.params:
            weights = _cpu_decode_weights_jit(self.graphdef, self.params)
            self._decode_weights = (self.params, weights)
        return weights

    def _run(self, ids: np.ndarray, mask: np.ndarray, keys: np.ndarray, cfg, stop_sequences):
        if self.mesh is None:
            return generate_tokens(self.graphdef, self.params, ids, mask, keys, cfg,
                                   stop_sequences=stop_sequences, pad_id=self.pad_id,
                                   decode_weights=self.cpu_decode_weights(), min_rows=MIN_DECODE_ROWS)
        put = lambda x, axes: jax.device_put(x, named_sharding(self.mesh, axes, x.shape))
        ids, mask, keys = put(ids, ("batch", "length")), put(mask, ("batch", "length")), put(keys, ("batch", None))
        with jax.set_mesh(self.mesh):
            return generate_tokens(self.graphdef, self.params, ids, mask, keys, cfg,
                                   stop_sequences=stop_sequences, pad_id=self.pad_id)

    def _finish(self, generated: list[int], ended: bool, eos_ids: tuple[int, ...], cfg: SamplingConfig) -> Completion:
        """Apply EOS and stop strings to one row's generated ids."""
        body = generated
        reason: FinishReason = "length"
        if ended and generated and generated[-1] in eos_ids:
            body, reason = generated[:-1], "eos"
        elif ended:
            reason = "stop"  # an in-loop stop sequence; the text search below finds the string
        text = self._decode(body)
        hits = [(text.find(s), s) for s in cfg.stop_strings if s and s in text]
        if hits:
            cut, _ = min(hits)
            # The shortest id prefix whose text contains a stop string (monotone -> bisection).
            lo, hi = 1, len(body)
            while lo < hi:
                mid = (lo + hi) // 2
                if any(s in self._decode(body[:mid]) for s in cfg.stop_strings if s):
                    hi = mid
                else:
                    lo = mid + 1
            token_ids = list(body[:lo])
            return Completion(text[:cut], token_ids, "stop", len(token_ids))
        return Completion(text, list(generated), reason, len(generated))

    # -- public ---------------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[str] | Sequence[Sequence[int]], cfg: SamplingConfig = SamplingConfig()
    ) -> list[list[Completion]]:
        """``cfg.n`` completions for each prompt (rendered strings or id lists), in prompt order."""
        encoded = self._encode(prompts)
        eos_ids = self._eos_ids(cfg)
        run_cfg = dataclasses.replace(cfg, eos_token_ids=eos_ids)
        stop_sequences = self._stop_sequences(cfg)
        rows = [(i, j) for i in range(len(encoded)) for j in range(cfg.n)]
        # Similar lengths together: fewer pads and smaller buckets (outputs do not depend on order).
        rows.sort(key=lambda r: len(encoded[r[0]]))
        results: list[list[Completion | None]] = [[None] * cfg.n for _ in encoded]
        multiple = self._batch_multiple()
        step = max(cfg.batch_size, multiple)
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            b = batch_bucket_size(len(chunk), step, multiple)
            p = prompt_bucket_length(max(len(encoded[i]) for i, _ in chunk), cfg.prompt_bucket)
            ids = np.full((b, p), self.pad_id, np.int32)
            mask = np.zeros((b, p), np.int32)
            which = np.zeros((2, b), np.int64)  # (prompt, sample) per row; padding rows reuse (0, 0)
            which[:, : len(chunk)] = np.asarray(chunk).T
            keys = row_keys(cfg.seed, which[0], which[1])
            for r, (i, j) in enumerate(chunk):
                prompt = encoded[i]
                ids[r, p - len(prompt):] = prompt
                mask[r, p - len(prompt):] = 1
            tokens, lengths, finished, *logprobs = jax.device_get(self._run(ids, mask, keys, run_cfg, stop_sequences))
            for r, (i, j) in enumerate(chunk):
                generated = tokens[r, : lengths[r]].tolist()
                completion = self._finish(generated, bool(finished[r]), eos_ids, cfg)
                if logprobs:
                    row_logprobs = logprobs[0][r, : completion.num_tokens].tolist()
                    completion = dataclasses.replace(completion, logprobs=row_logprobs)
                results[i][j] = completion
        return results  # type: ignore[return-value]
