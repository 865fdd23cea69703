"""Online GKD inside the train step: student rollouts, then a live teacher scores the batch.

One jitted step ``(state, batch, teacher_params) -> (state, metrics)``:

1. With probability ``objective.gkd.lmbda`` (a coin drawn from ``fold_in(state.rng, step)``) the
   batch is *regenerated*: each row's first prompt (the tokens of segment 1 up to its first
   response target) is completed by the student at its current parameters with the KV-cache
   sampler (:func:`dcd_jax.infer.sampler.generate_tokens`), and the row becomes
   ``[prompt, completion, padding]`` with the loss on the completion. The prompt window is
   ``seq_len - max_new_tokens`` and the generation budget ``max_new_tokens``: shapes are fixed,
   so the sampler compiles once with the step, never per step. Rollout keys are derived from the
   checkpointed ``state.rng`` and the step, so a resumed run draws the same rollouts.
2. The frozen teacher (its own params, sharded by the same logical-axis table on the same mesh)
   runs forward on the batch inside the loss; the loss is the generalized JSD over the full
   vocabulary (:mod:`dcd_jax.objectives.gkd`). Batches that are not regenerated are the data's
   own traces, also scored by the live teacher (GKD's "supervised" share).

Rows whose first prompt does not fit the prompt window, or that have no response, are left out
of a regenerated batch (their segment ids become 0).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dcd_jax.config import ConfigError
from dcd_jax.convert.model_dir import Pretrained, load_pretrained
from dcd_jax.infer.sampler import SamplingConfig, generate_tokens, left_align
from dcd_jax.models import abstract_model, bind
from dcd_jax.objectives import ObjectiveConfig, check_vocab_alignment, compute_objective
from dcd_jax.stop_tokens import stop_token_ids
from dcd_jax.train.step import make_train_step

# The fields a GKD step reads; cached teacher scores in the data are not used (the teacher is live).
GKD_BATCH_FIELDS = ("input_ids", "targets", "positions", "segment_ids", "loss_mask")


def first_prompts(batch: dict[str, jax.Array], prompt_window: int) -> tuple[jax.Array, jax.Array]:
    """``[N, prompt_window]`` ids and mask of each row's first prompt (0 mask: no usable prompt).

    The prompt of segment 1 is ``input_ids[:f + 1]`` with ``f`` its first response position (the
    position whose *target* is the first response token)."""
    seg1 = batch["segment_ids"] == 1
    response = seg1 & (batch["loss_mask"] > 0)
    first = jnp.argmax(response, axis=1)
    usable = jnp.any(response, axis=1) & (first < prompt_window)
    iota = jax.lax.broadcasted_iota(jnp.int32, seg1.shape, 1)
    mask = seg1 & (iota <= first[:, None]) & usable[:, None]
    ids = jnp.where(mask, batch["input_ids"], 0)
    return ids[:, :prompt_window], mask[:, :prompt_window].astype(jnp.int32)


def rollout_rows(prompt_ids: jax.Array, prompt_mask: jax.Array, tokens: jax.Array, lengths: jax.Array) -> dict[str, jax.Array]:
    """Rows ``[prompt, completion, 0...]`` of length ``P + G`` in the data pipeline's layout.

    ``tokens`` ``[N, G]`` / ``lengths`` ``[N]`` come from the sampler. ``loss_mask`` is 1 exactly where
    the target is a generated token (the EOS included when generated)."""
    ids, mask = left_align(prompt_ids, prompt_mask)  # prompts flush right in their window
    n, p = ids.shape
    g = tokens.shape[1]
    t = p + g
    prompt_len = mask.sum(axis=1)
    real = jnp.concatenate([mask > 0, jnp.arange(g)[None, :] < lengths[:, None]], axis=1)
    full = jnp.concatenate([ids, tokens.astype(jnp.int32)], axis=1)
    iota = jax.lax.broadcasted_iota(jnp.int32, (n, t), 1)
    src = (iota + (p - prompt_len)[:, None]) % t  # drop the left padding: rows start at slot 0
    real = jnp.take_along_axis(real, src, axis=1)
    input_ids = jnp.where(real, jnp.take_along_axis(full, src, axis=1), 0)
    target_real = jnp.concatenate([real[:, 1:], jnp.zeros((n, 1), bool)], axis=1)
    targets = jnp.where(target_real, jnp.concatenate([input_ids[:, 1:], jnp.zeros((n, 1), jnp.int32)], axis=1), 0)
    return {
        "input_ids": input_ids,
        "targets": targets,
        "positions": jnp.where(real, iota, 0),
        "segment_ids": real.astype(jnp.int32),
        "loss_mask": (target_real & (iota >= prompt_len[:, None] - 1)).astype(jnp.float32),
    }


def regenerate(
    graphdef: nnx.GraphDef,
    params: Any,
    batch: dict[str, jax.Array],
    key: jax.Array,
    sampling: SamplingConfig,
    pad_id: int,
) -> tuple[dict[str, jax.Array], jax.Array]:
    """Student rollouts for a ``[N, T]`` batch: the regenerated batch and the number of generated tokens."""
    n, t = batch["input_ids"].shape
    prompt_window = t - sampling.max_new_tokens
    ids, mask = first_prompts(batch, prompt_window)
    keys = jax.random.split(key, n)
    tokens, lengths, _ = generate_tokens(graphdef, params, ids, mask, keys, sampling, pad_id=pad_id)
    rows = rollout_rows(ids, mask, tokens, lengths)
    rows = {k: v.astype(batch[k].dtype) for k, v in rows.items()}
    return rows, jnp.sum(lengths)


def rollout_keys(rng: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(coin key, rollout key) of a step: pure functions of the checkpointed run key and the step."""
    base = jax.random.fold_in(rng, step)
    return jax.random.fold_in(base, 0), jax.random.fold_in(base, 1)


def rollout_sampling(objective: ObjectiveConfig, eos_ids: tuple[int, ...]) -> SamplingConfig:
    gkd = objective.gkd
    return SamplingConfig(max_new_tokens=gkd.max_new_tokens, temperature=gkd.temperature, eos_token_ids=eos_ids)


def make_gkd_loss_fn(graphdef, teacher_graphdef, teacher_params, objective: ObjectiveConfig, true_vocab_size: int):
    """``loss_fn(params, ref_params, micro_batch, step)`` with the teacher run forward on the micro-batch."""

    def loss_fn(params, ref_params, batch, step):
        del ref_params
        model = bind(graphdef, params)
        args = (batch["input_ids"], batch["positions"], batch["segment_ids"])
        hidden = model(*args, return_hidden=True)
        teacher = bind(teacher_graphdef, jax.lax.stop_gradient(teacher_params))
        teacher_hidden = jax.lax.stop_gradient(teacher(*args, return_hidden=True))
        out = compute_objective(
            objective, hidden, model.unembed_matrix(), batch, step=step, true_vocab_size=true_vocab_size,
            teacher_hidden=teacher_hidden, teacher_unembed=teacher.unembed_matrix(),
        )
        return out.loss_sum, out

    return loss_fn


def make_gkd_train_step(
    graphdef: nnx.GraphDef,
    teacher_graphdef: nnx.GraphDef,
    objective: ObjectiveConfig,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    true_vocab_size: int,
    *,
    eos_ids: tuple[int, ...],
    pad_id: int,
):
    """The pure GKD step ``(state, batch, teacher_params) -> (state, metrics)`` (module docstring).

    Extra metrics: ``on_policy`` (1 when the batch was regenerated) and ``generated_tokens``."""
    lmbda = objective.gkd.lmbda
    sampling = rollout_sampling(objective, eos_ids)

    def step_fn(state, batch, teacher_params):
        batch = {k: batch[k] for k in GKD_BATCH_FIELDS}
        coin_key, rollout_key = rollout_keys(state["rng"], state["step"])
        shape = batch["input_ids"].shape  # [accum, micro, T]: one rollout call for all rows
        flat = jax.tree.map(lambda x: x.reshape(-1, shape[-1]), batch)

        def on_policy(rows):
            new, generated = regenerate(graphdef, state["params"], rows, rollout_key, sampling, pad_id)
            return new, generated.astype(jnp.float32)

        def offline(rows):
            return rows, jnp.zeros((), jnp.float32)

        if lmbda == 0.0:
            use_rollout = jnp.zeros((), bool)
            flat, generated = offline(flat)
        elif lmbda == 1.0:
            use_rollout = jnp.ones((), bool)
            flat, generated = on_policy(flat)
        else:
            use_rollout = jax.random.uniform(coin_key) < lmbda
            flat, generated = jax.lax.cond(use_rollout, on_policy, offline, flat)
        batch = jax.tree.map(lambda x: x.reshape(shape), flat)
        loss_fn = make_gkd_loss_fn(graphdef, teacher_graphdef, teacher_params, objective, true_vocab_size)
        inner = make_train_step(graphdef, objective, tx, lr_schedule, true_vocab_size, loss_fn=loss_fn)
        new_state, metrics = inner(state, batch)
        return new_state, {**metrics, "on_policy": use_rollout.astype(jnp.float32), "generated_tokens": generated}

    return step_fn


def load_teacher(objective: ObjectiveConfig, student: Pretrained, mesh, *, attention: str,
                 trust_remote_code: bool) -> tuple[Pretrained, int]:
    """The frozen teacher on ``mesh`` and the vocabulary both models share (the loss's columns);
    refuses a teacher whose tokenizer differs from the student's. A checkpoint that does not record
    its tokenizer's size (``true_vocab_size``) counts the tokenizer's length, not its padded rows."""
    from dcd_jax.data.teacher_scores import tokenizer_fingerprint

    gkd = objective.gkd
    teacher = load_pretrained(
        gkd.teacher_path, mesh=mesh, dtype=gkd.teacher_dtype, param_dtype=gkd.teacher_dtype,
        attention=attention, trust_remote_code=trust_remote_code,
    )
    student_tok, teacher_tok = student.tokenizer(trust_remote_code), teacher.tokenizer(trust_remote_code)
    try:
        shared = check_vocab_alignment(
            student_vocab_size=student.cfg.vocab_size, teacher_vocab_size=teacher.cfg.vocab_size,
            student_true_vocab_size=student.cfg.true_vocab_size or len(student_tok),
            teacher_true_vocab_size=teacher.cfg.true_vocab_size or len(teacher_tok),
            student_tokenizer_hash=tokenizer_fingerprint(student_tok),
            teacher_tokenizer_hash=tokenizer_fingerprint(teacher_tok),
        )
    except ConfigError as e:
        raise ConfigError(f"objective.gkd.teacher_path={gkd.teacher_path}: {e}") from None
    return teacher, shared


def jit_gkd_step(
    objective: ObjectiveConfig,
    graphdef: nnx.GraphDef,
    teacher: Pretrained,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    true_vocab_size: int,
    tokenizer: Any,
    state_shardings: Any,
):
    """The jitted GKD step with the loop's signature ``(state, batch) -> (state, metrics)``.

    The teacher params keep the shardings :func:`load_teacher` gave them (the student's table and
    mesh); the state is donated like in the offline step. The stop ids (``stop_token_ids``: its EOS
    and its generation config's eos ids) and the pad id are the student tokenizer's."""
    eos_ids = stop_token_ids(tokenizer)
    pad = getattr(tokenizer, "pad_token_id", None)
    teacher_graphdef, _, _ = abstract_model(teacher.cfg)
    step_fn = make_gkd_train_step(
        graphdef, teacher_graphdef, objective, tx, lr_schedule, true_vocab_size,
        eos_ids=eos_ids, pad_id=0 if pad is None else int(pad),
    )
    jitted = jax.jit(step_fn, in_shardings=(state_shardings, None, None), out_shardings=(state_shardings, None),
                     donate_argnums=0)
    teacher_params = teacher.params
    return lambda state, batch: jitted(state, batch, teacher_params)


__all__ = [
    "GKD_BATCH_FIELDS",
    "first_prompts",
    "load_teacher",
    "make_gkd_train_step",
    "regenerate",
    "rollout_keys",
    "rollout_rows",
    "jit_gkd_step",
]
