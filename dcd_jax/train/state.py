"""The train state pytree and its shardings.

``state = {"step", "params", "opt_state", "rng"}`` plus ``"ref_params"`` (a frozen copy of the
initial student, for ``iw_sft``; it has no optimizer slots and never receives gradients). The
optimizer state's shardings are derived from the params' logical axes through
``optax.tree_map_params``, so the one table in :mod:`dcd_jax.sharding` shards it too.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dcd_jax.sharding import tree_shardings

TrainState = dict[str, Any]


def init_train_state(params: Any, tx: optax.GradientTransformation, seed: int, with_reference: bool) -> TrainState:
    """Fresh state at step 0 (call under ``jax.jit`` with out_shardings to place it)."""
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jax.random.key(seed),
    }
    if with_reference:
        state["ref_params"] = jax.tree.map(jnp.copy, params)
    return state


def state_shardings(mesh: Mesh, param_axes: Any, abstract_state: TrainState, tx: optax.GradientTransformation) -> Any:
    """NamedShardings for every leaf of ``abstract_state`` (from ``jax.eval_shape(init_train_state, ...)``)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    param_shardings = tree_shardings(mesh, param_axes, abstract_state["params"])
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract_state["opt_state"],
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, (jax.ShapeDtypeStruct, NamedSharding)),
    )
    out = {"step": replicated, "params": param_shardings, "opt_state": opt_shardings, "rng": replicated}
    if "ref_params" in abstract_state:
        out["ref_params"] = param_shardings
    return out
