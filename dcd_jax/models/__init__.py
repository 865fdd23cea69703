"""Flax NNX decoder models and their parameter trees.

Parameters travel through the codebase as plain nested dicts of arrays (``params``): that is
what the optimizer, the train step, Orbax and the converters see. ``nnx.merge(graphdef, params)``
turns them back into a callable :class:`Transformer` inside jitted functions.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dcd_jax.models.config import ModelConfig, RopeConfig, UnsupportedModelError
from dcd_jax.models.transformer import Transformer
from dcd_jax.sharding import tree_shardings

__all__ = [
    "ModelConfig",
    "RopeConfig",
    "UnsupportedModelError",
    "Transformer",
    "abstract_model",
    "init_params",
    "bind",
    "param_logical_axes",
    "positions_from_mask",
    "sharded_abstract_params",
]

# Parameters under this key are stacked over a leading "layers" dimension.
STACKED_KEY = "layers"


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, dict[str, Any], dict[str, Any]]:
    """(graphdef, params as ShapeDtypeStructs, logical axes per param) without allocating anything."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return graphdef, nnx.to_pure_dict(state), param_logical_axes(state)


def param_logical_axes(state: nnx.State) -> dict[str, Any]:
    """Nested dict (same structure as the params) of logical-axis tuples."""
    flat = {}
    for path, var in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        keys = tuple(getattr(p, "key", getattr(p, "name", p)) for p in path)
        axes = tuple(var.get_metadata()["logical_axes"])
        if keys[0] == STACKED_KEY:
            axes = (STACKED_KEY,) + axes
        flat[keys] = axes
    nested: dict[str, Any] = {}
    for keys, axes in flat.items():
        node = nested
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = axes
    return nested


def init_params(cfg: ModelConfig, seed: int = 0, mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
    """Random parameters (N(0, 0.02) kernels, unit norms, zero biases), created already sharded."""
    def create():
        return nnx.to_pure_dict(nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))[1])

    if mesh is None:
        return jax.jit(create)()
    _, shapes, axes = abstract_model(cfg)
    return jax.jit(create, out_shardings=tree_shardings(mesh, axes, shapes))()


def sharded_abstract_params(cfg: ModelConfig, mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
    """ShapeDtypeStructs carrying the target sharding of every param: the restore target for Orbax
    (``nnx.eval_shape`` drops sharding metadata, so shardings are attached explicitly here)."""
    _, shapes, axes = abstract_model(cfg)
    if mesh is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
    shardings = tree_shardings(mesh, axes, shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def bind(graphdef: nnx.GraphDef, params: dict[str, Any]) -> Transformer:
    """A callable model from a graphdef and a params dict (cheap; use inside jitted functions)."""
    return nnx.merge(graphdef, params)


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Position of each token among the real tokens of its left-aligned row ``[B, T]``:
    ``p_t = max(sum_{s <= t} m_s - 1, 0)`` (padding after the row repeats the last position)."""
    return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
