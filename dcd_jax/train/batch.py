"""The global training batch: rows split over the mesh's batch axes (data x fsdp), ``grad_accum``
micro-batches stacked in front: ``[accum, rows / accum, seq_len, ...]``."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dcd_jax.config import ConfigError
from dcd_jax.data.pipeline import BATCH_DTYPES
from dcd_jax.sharding import BATCH_AXES, batch_shards
from dcd_jax.train.config import RunConfig


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Micro-batches replicated on the leading axis, rows split over :data:`BATCH_AXES`."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))


def check_batch_split(cfg: RunConfig, mesh: Mesh, process_count: int = 1) -> None:
    """Refuse (before any work) a batch that the mesh or the hosts cannot split evenly."""
    micro_rows = cfg.data.batch_size // cfg.train.grad_accum
    shards = batch_shards(mesh)
    if micro_rows % shards:
        raise ConfigError(
            f"data.batch_size / train.grad_accum = {micro_rows} rows per micro-batch must be divisible by "
            f"mesh data x fsdp = {shards} (the batch is split over those axes)"
        )
    local = cfg.data.local_batch_size(process_count)
    if local % cfg.train.grad_accum:
        raise ConfigError(f"per-host rows {local} must be divisible by train.grad_accum={cfg.train.grad_accum}")


def abstract_train_batch(cfg: RunConfig, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes, dtypes and shardings of one global batch (for compiling the step without data)."""
    accum = cfg.train.grad_accum
    rows, t, k = cfg.data.batch_size // accum, cfg.data.seq_len, cfg.data.topk
    sharding = batch_sharding(mesh)
    out = {}
    for name in sorted(cfg.data.batch_fields()):
        shape = (accum, rows, t, k) if name.startswith("teacher_topk") else (accum, rows, t)
        out[name] = jax.ShapeDtypeStruct(shape, BATCH_DTYPES[name], sharding=sharding)
    return out


def to_global_batch(local: dict[str, np.ndarray], mesh: Mesh, accum: int) -> dict[str, jax.Array]:
    """Host rows [B_local, T, ...] -> global arrays [accum, B_global / accum, T, ...] sharded on the batch."""
    sharding = batch_sharding(mesh)
    out = {}
    for name, value in local.items():
        micro = value.reshape(accum, value.shape[0] // accum, *value.shape[1:])
        global_shape = (accum, micro.shape[1] * jax.process_count(), *micro.shape[2:])
        out[name] = jax.make_array_from_process_local_data(sharding, micro, global_shape)
    return out
