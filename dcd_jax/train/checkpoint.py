"""Orbax checkpoints of a training run: params, optimizer state, step, RNG and data position.

Layout under ``<out_dir>/checkpoints/<step>/``: ``params`` and ``opt_state`` (sharded arrays,
restored straight into the current mesh's shardings, whatever mesh saved them), ``meta`` (step,
RNG key data, process count, eval metrics) and ``data`` (one JSON iterator state per process).

Safety: Orbax writes each step into a temporary directory and renames it only when every item
is complete, so a step being written when the process dies is never listed. ``meta`` also holds a
checksum of every array of ``params`` and ``opt_state`` (computed on device when the step is saved,
see :func:`array_checksums`), verified after each restore. A step that is unreadable, incomplete
(e.g. its data-position file is gone) or whose arrays do not match their checksums is skipped with
one WARNING line saying why, in favour of the previous step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
from pathlib import Path
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN

from dcd_jax import storage
from dcd_jax.config import ConfigError
from dcd_jax.errors import PathError

log = logging.getLogger(__name__)

CHECKSUM_VERSION = 1


@contextlib.contextmanager
def _disk_full_is_a_user_error(directory: Path):
    """A full disk while saving (raised here or from Orbax's background thread, possibly wrapped)
    becomes one clear :class:`PathError` instead of a thread traceback."""
    try:
        yield
    except Exception as e:
        cause: BaseException | None = e
        while cause is not None:
            if (isinstance(cause, OSError) and cause.errno == errno.ENOSPC) or "No space left on device" in str(cause):
                raise PathError(
                    f"train.out_dir: no space left on device while saving a checkpoint in {directory}; the "
                    "checkpoints saved before are intact",
                    hint="free some space, then rerun the same command to resume from the last complete step",
                ) from e
            cause = cause.__cause__ or cause.__context__
        raise


class UnusableCheckpointError(Exception):
    """A listed step cannot be trusted (incomplete, or its arrays differ from their checksums)."""


def _bit_words(x: jax.Array) -> jax.Array:
    """The bit patterns of ``x`` as uint32 words (one per element; 8-byte values fold their halves)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size == 8:
        halves = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
        return halves[..., 0] ^ (halves[..., 1] * jnp.uint32(0x85EBCA6B))
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _array_checksum(x: jax.Array) -> jax.Array:
    """Position-weighted sum of the bit patterns, modulo 2**32:

        c(x) = sum_i  w_i * bits(x_i)  (mod 2**32),   w_i = 2654435761 * i + 1  (mod 2**32)

    Integer addition wraps and is associative, so the value does not depend on the sharding or the
    reduction order (a checkpoint saved on one mesh verifies on another); the weights make a swap of
    two values, or any change of one value, change the sum.
    """
    words = _bit_words(x).reshape(-1)
    weights = jnp.arange(words.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.sum(words * weights, dtype=jnp.uint32)


@jax.jit
def _checksums_on_device(tree: Any) -> Any:
    return jax.tree.map(_array_checksum, tree)


def array_checksums(tree: Any) -> dict[str, int]:
    """``{key path: uint32 checksum}`` of every array of ``tree`` (computed on device, one small transfer)."""
    sums = jax.device_get(_checksums_on_device(tree))
    return {jax.tree_util.keystr(path): int(v) for path, v in jax.tree_util.tree_leaves_with_path(sums)}


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Checkpointing.

    Attributes:
      every_steps: save every N optimizer steps (and always at the end and on SIGTERM/SIGINT).
      keep: keep the latest K checkpoints ...
      best_metric: ... plus the best one by this eval metric (e.g. ``eval/embedded/accuracy``); None = off.
      best_mode: ``max`` or ``min`` for ``best_metric``.
      async_save: write in the background while training continues.
    """

    every_steps: int = 500
    keep: int = 3
    best_metric: str | None = None
    best_mode: Literal["max", "min"] = "max"
    async_save: bool = True

    def validate(self) -> None:
        if self.every_steps <= 0 or self.keep <= 0:
            raise ConfigError("checkpoint.every_steps and checkpoint.keep must be positive")


class DataStateHandler(ocp.CheckpointHandler):
    """One JSON file per process with that process's data-iterator state."""

    def save(self, directory: epath.Path, args: "DataStateSave") -> None:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None) -> dict[str, Any]:
        files = sorted(p.name for p in directory.iterdir() if p.name.startswith("process_"))
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not files:  # removed or never written: this step is incomplete, not a process-count change
            raise UnusableCheckpointError(f"its data-position file is missing ({directory}/{name})")
        if name not in [str(f) for f in files]:
            saved = files[0].split("-of-")[-1].removesuffix(".json") if files else "?"
            raise ConfigError(
                f"{directory}: the data position was saved by {saved} process(es) but this run has "
                f"{jax.process_count()}: each process reads its own share of the examples, so the saved "
                "positions cannot be mapped onto a different process count. Resume with the same number "
                "of processes (the mesh shape may differ), or start a new run directory."
            )
        return json.loads((directory / name).read_text())

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any  # a snapshot (JSON-able), taken when save() is called: the iterator keeps moving


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


def _metric_fn(name: str) -> Callable[[dict], float]:
    return lambda metrics: float(metrics[name])


class RunCheckpointer:
    """Save / restore a run's state with an Orbax ``CheckpointManager``."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig):
        self.directory = storage.absolute(directory)  # Orbax takes local and gs:// directories alike
        self.cfg = cfg
        policies = [LatestN(n=cfg.keep)]
        if cfg.best_metric:
            policies.append(
                BestN(get_metric_fn=_metric_fn(cfg.best_metric), reverse=cfg.best_mode == "min", n=1,
                      keep_checkpoints_without_metrics=False)
            )
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=cfg.async_save,
            preservation_policy=AnyPreservationPolicy(policies),
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.unusable: set[int] = set()  # steps found bad on restore; set aside before they are saved again

    def _set_aside(self, step: int) -> None:
        """Rename an unusable step out of the way (kept for inspection) so the retrained step can be saved."""
        if jax.process_index() == 0:
            src = self.directory / str(step)
            dst = self.directory / f"unusable_step_{step}"
            n = 1
            while dst.exists():
                n += 1
                dst = self.directory / f"unusable_step_{step}.{n}"
            if src.exists():
                storage.move_tree(src, dst)
                log.warning("moved the unusable checkpoint %s aside to %s", src, dst)
        self.manager.reload()
        self.unusable.discard(step)

    def save(self, step: int, state: dict[str, Any], data_state: Any, metrics: dict[str, float] | None = None,
             force: bool = False) -> bool:
        """Start saving ``state`` at ``step`` (asynchronous unless configured otherwise)."""
        meta = {
            "step": int(step),
            "rng": np.asarray(jax.random.key_data(state["rng"])).tolist(),
            "process_count": jax.process_count(),
            "checksum_version": CHECKSUM_VERSION,
            "checksums": {item: array_checksums(state[item]) for item in ("params", "opt_state")},
        }
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            opt_state=ocp.args.StandardSave(state["opt_state"]),
            meta=ocp.args.JsonSave(meta),
            data=DataStateSave(data_state),
        )
        if int(step) in self.unusable:
            self._set_aside(int(step))
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        if self.cfg.best_metric and self.cfg.best_metric not in metrics:
            metrics = None  # not an eval step: LatestN decides
        with _disk_full_is_a_user_error(self.directory):
            return self.manager.save(int(step), args=args, metrics=metrics, force=force)

    def wait(self) -> None:
        with _disk_full_is_a_user_error(self.directory):
            self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(
        self, target_state: dict[str, Any], skip: dict[int, str] | None = None
    ) -> tuple[dict[str, Any], Any] | None:
        """Restore the newest usable checkpoint onto the shardings of ``target_state`` (abstract or
        concrete arrays); returns (state, data_state) or None when there is none.

        ``skip`` maps steps already found bad (e.g. a non-finite loss right after restoring them) to why.
        """
        skip = skip or {}
        for step in reversed(self.steps()):
            if step in skip:
                self.unusable.add(step)
                continue
            self.unusable.add(step)
            try:
                restored = self.restore(step, target_state)
                self.unusable.discard(step)
                return restored
            except ConfigError:
                raise
            except UnusableCheckpointError as e:
                log.warning("checkpoint %s/%d is unusable (%s); falling back to the previous one",
                            self.directory, step, e)
            except Exception as e:  # unreadable: skip to the previous one
                log.warning("checkpoint %s/%d is unreadable (%s: %s); falling back to the previous one",
                            self.directory, step, type(e).__name__, (str(e).splitlines() or [""])[0][:200])
        return None

    def restore(self, step: int, target_state: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        abstract = lambda tree: jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
        )
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract(target_state["params"])),
                opt_state=ocp.args.StandardRestore(abstract(target_state["opt_state"])),
                meta=ocp.args.JsonRestore(),
                data=DataStateRestore(),
            ),
        )
        meta = restored["meta"]
        if meta["step"] != step:
            raise UnusableCheckpointError(f"step directory {step} holds step {meta['step']}")
        if meta.get("checksum_version") == CHECKSUM_VERSION:  # steps saved before checksums: not verified
            for item in ("params", "opt_state"):
                # Compared in leaf order (the restored tree has the saved structure; its key spelling
                # may differ, e.g. a namedtuple field vs a dict key).
                saved = list(meta["checksums"][item].items())
                found = list(array_checksums(restored[item]).values())
                bad = [k for i, (k, v) in enumerate(saved) if i >= len(found) or found[i] != v]
                if bad or len(found) != len(saved):
                    raise UnusableCheckpointError(
                        f"{item} array(s) {bad[:3]} do not match the checksums stored when the step was saved "
                        "(damaged on disk)"
                    )
        rng = jax.random.wrap_key_data(np.asarray(meta["rng"], np.uint32))
        state = {**target_state, "step": jax.numpy.asarray(step, jax.numpy.int32), "params": restored["params"],
                 "opt_state": restored["opt_state"], "rng": rng}
        return state, restored["data"]

    def close(self) -> None:
        self.wait()
        self.manager.close()
