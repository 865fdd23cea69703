"""The one sharding table: logical axis names -> mesh axes.

Layers name the logical axes of every parameter and activation (``embed``, ``vocab``, ``heads``,
...). :data:`LOGICAL_AXIS_RULES` maps each to zero or more axes of the device mesh
``(data, fsdp, tensor)``. The same table shards parameters, optimizer state (it mirrors the
params), activations (:func:`constrain`), checkpoints restored onto a mesh, and the sampler's
KV cache, so changing a layout is a one-line change here.

Mesh axes:
  * ``data``   - pure data parallelism: batch split, parameters replicated.
  * ``fsdp``   - batch split *and* parameters/optimizer state sharded (ZeRO-3 style).
  * ``tensor`` - Megatron-style tensor parallelism over heads / MLP / vocabulary.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from dcd_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch (rows) is split over data x fsdp

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
LOGICAL_AXIS_RULES: Mapping[str, Any] = {
    # activations
    "batch": BATCH_AXES,
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "cache_length": None,
    # parameters
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
}


def logical_to_spec(
    axes: Sequence[str | None], rules: Mapping[str, Any] = LOGICAL_AXIS_RULES, mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """PartitionSpec for a tensor whose dimensions carry the logical names ``axes``.

    A mesh axis is used at most once per tensor (first dimension wins). With ``mesh`` and
    ``shape`` given, a dimension that the mesh axes do not divide evenly is replicated instead
    (e.g. 2 KV heads on a 4-way tensor axis), so any checkpoint shape can be placed.
    """
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} is not in the sharding table {sorted(rules)}")
        target = rules[name]
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(t for t in targets if t not in used)
        if mesh is not None:
            targets = tuple(t for t in targets if mesh.shape.get(t, 1) > 1)
            if shape is not None:
                size = math.prod(mesh.shape[t] for t in targets)
                if size > 1 and shape[dim] % size != 0:
                    targets = ()
        used.update(targets)
        spec.append(targets[0] if len(targets) == 1 else (targets or None))
    return PartitionSpec(*spec)


def check_mesh_sizes(sizes: Sequence[int]) -> None:
    """Each size is >= 1, or -1 (= the rest) for at most one axis; raises :class:`ConfigError` naming the axis."""
    for axis, size in zip(MESH_AXES, sizes):
        if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
            raise ConfigError(f"mesh.{axis}={size!r}: each mesh size must be a positive integer, or -1 for 'the rest'")
    if list(sizes).count(-1) > 1:
        raise ConfigError(f"mesh {_describe(sizes)}: at most one mesh axis may be -1")


def _describe(sizes: Sequence[int]) -> str:
    return " x ".join(f"{axis}={size}" for axis, size in zip(MESH_AXES, sizes))


def resolve_mesh_shape(sizes: Sequence[int], n_devices: int) -> list[int]:
    """The mesh shape for ``n_devices`` (the -1 filled in); :class:`ConfigError` if it cannot hold them all."""
    check_mesh_sizes(sizes)
    sizes = list(sizes)
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(f"mesh {_describe(sizes)}: {n_devices} devices cannot be split into {known} x the rest")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"mesh {_describe(sizes)} = {math.prod(sizes)} devices, but {n_devices} are available "
            "(the product must equal the device count; set one axis to -1 for the rest)"
        )
    return sizes


def make_mesh(
    data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over all devices (of all hosts); one size may be -1 (= the rest)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_shape((data, fsdp, tensor), len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def batch_shards(mesh: Mesh) -> int:
    """Ways the batch is split: the product of the mesh's :data:`BATCH_AXES` sizes."""
    return math.prod(mesh.shape.get(axis, 1) for axis in BATCH_AXES)


def named_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, mesh=mesh, shape=shape))


def tree_shardings(mesh: Mesh, axes_tree: Any, shapes_tree: Any | None = None) -> Any:
    """Map a tree of logical-axis tuples (and optionally matching shapes) to NamedShardings."""
    is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
    if shapes_tree is None:
        return jax.tree.map(lambda a: named_sharding(mesh, a), axes_tree, is_leaf=is_axes)
    return jax.tree.map(
        lambda a, s: named_sharding(mesh, a, getattr(s, "shape", s)), axes_tree, shapes_tree, is_leaf=is_axes
    )


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op outside a mesh context (``jax.set_mesh``)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(axes, mesh=mesh, shape=x.shape)
    return jax.lax.with_sharding_constraint(x, spec)


def traced_for_cpu() -> bool:
    """Whether the program being traced will run on CPU devices: those of the mesh set with
    ``jax.set_mesh`` (an ahead-of-time plan for a TPU slice on a CPU host sets a TPU mesh), else
    the default backend. CPU-only trade-offs (more memory for less compute) key on it."""
    try:
        mesh = jax.sharding.get_mesh()
    except (ValueError, RuntimeError):
        mesh = None
    if mesh is not None and not mesh.empty:
        return mesh.devices.flat[0].platform == "cpu"
    return jax.default_backend() == "cpu"
