"""The jitted train step: ``(state, batch) -> (state, metrics)``.

Gradient accumulation runs inside the step: ``batch`` leaves are ``[accum, micro_batch, T, ...]``
and a ``lax.scan`` adds up the gradients of every micro-batch's ``loss_sum``; the sum is divided
once by the total ``denominator`` (tokens or sequences). That makes k micro-batches exactly
equal to one batch of their union (up to float summation order), and the same reasoning makes
multi-host data parallelism exact: the jitted reductions are global.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dcd_jax.models import bind
from dcd_jax.objectives import ObjectiveConfig, compute_objective, merge_metrics, summarize_metrics
from dcd_jax.train.batch import batch_sharding
from dcd_jax.train.state import TrainState

BATCH_MODEL_FIELDS = ("input_ids", "positions", "segment_ids")


def make_loss_fn(graphdef: nnx.GraphDef, objective: ObjectiveConfig, true_vocab_size: int):
    """``loss_fn(params, ref_params, micro_batch, step) -> (loss_sum, ObjectiveOutput)``."""

    def loss_fn(params, ref_params, batch, step):
        model = bind(graphdef, params)
        hidden = model(batch["input_ids"], batch["positions"], batch["segment_ids"], return_hidden=True)
        ref_hidden = ref_unembed = None
        if ref_params is not None:
            ref_model = bind(graphdef, jax.lax.stop_gradient(ref_params))
            ref_hidden = ref_model(batch["input_ids"], batch["positions"], batch["segment_ids"], return_hidden=True)
            ref_unembed = ref_model.unembed_matrix()
        out = compute_objective(
            objective, hidden, model.unembed_matrix(), batch, step=step, true_vocab_size=true_vocab_size,
            ref_hidden=ref_hidden, ref_unembed=ref_unembed,
        )
        return out.loss_sum, out

    return loss_fn


def make_train_step(
    graphdef: nnx.GraphDef,
    objective: ObjectiveConfig,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    true_vocab_size: int,
    loss_fn: Callable | None = None,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure step function (wrap it in ``jax.jit`` with shardings; see :mod:`dcd_jax.train.loop`).

    ``loss_fn``: replaces :func:`make_loss_fn`'s (same signature), e.g. one that also runs a live teacher."""
    grad_fn = jax.value_and_grad(loss_fn or make_loss_fn(graphdef, objective, true_vocab_size), has_aux=True)

    def step_fn(state: TrainState, batch: dict[str, jax.Array]):
        params, ref_params = state["params"], state.get("ref_params")

        def micro(micro_batch):
            (_, out), grads = grad_fn(params, ref_params, micro_batch, state["step"])
            return grads, out.metrics

        first = jax.tree.map(lambda x: x[0], batch)
        grads, metrics = micro(first)
        if jax.tree.leaves(batch)[0].shape[0] > 1:
            rest = jax.tree.map(lambda x: x[1:], batch)

            def body(carry, micro_batch):
                g_acc, m_acc = carry
                g, m = micro(micro_batch)
                return (jax.tree.map(jnp.add, g_acc, g), merge_metrics(m_acc, m)), None

            (grads, metrics), _ = jax.lax.scan(body, (grads, metrics), rest)

        denominator = jnp.maximum(metrics["denominator"], 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        out_metrics = {
            "loss": metrics["loss_sum"] / denominator,
            "grad_norm": optax.tree.norm(grads),
            "lr": lr_schedule(state["step"]),
            **{k: v for k, v in summarize_metrics(metrics).items() if k != "loss"},
        }
        new_state = {**state, "step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
        return new_state, out_metrics

    return step_fn


def jit_train_step(graphdef: nnx.GraphDef, objective: ObjectiveConfig, tx: optax.GradientTransformation,
                   lr_schedule: optax.Schedule, true_vocab_size: int, state_shardings, mesh):
    """The jitted step with the run's shardings: the state's in and out (donated, so it is updated
    in place), the batch split on the batch axes. ``dcd-jax plan`` compiles this same function
    ahead of time, and on a TPU the run then calls the plan's executable instead of compiling twice."""
    return jax.jit(
        make_train_step(graphdef, objective, tx, lr_schedule, true_vocab_size),
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
