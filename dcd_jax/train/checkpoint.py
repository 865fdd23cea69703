"""Orbax checkpoints of a training run: params, optimizer state, step, RNG and data position.

Layout under ``<out_dir>/checkpoints/<step>/``: ``params`` and ``opt_state`` (sharded arrays,
restored straight into the current mesh's shardings, whatever mesh saved them), ``meta`` (step,
RNG key data, process count, eval metrics) and ``data`` (one JSON iterator state per process).

Safety: Orbax writes each step into a temporary directory and renames it only when every item
is complete, so a step being written when the process dies is never listed. A step directory
that is listed but unreadable (disk corruption, a file removed by hand) is skipped with a
warning in favour of the previous one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN

from dcd_jax.config import ConfigError

log = logging.getLogger(__name__)


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
        self.directory = Path(directory).absolute()
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

    def save(self, step: int, state: dict[str, Any], data_state: Any, metrics: dict[str, float] | None = None,
             force: bool = False) -> bool:
        """Start saving ``state`` at ``step`` (asynchronous unless configured otherwise)."""
        meta = {
            "step": int(step),
            "rng": np.asarray(jax.random.key_data(state["rng"])).tolist(),
            "process_count": jax.process_count(),
        }
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            opt_state=ocp.args.StandardSave(state["opt_state"]),
            meta=ocp.args.JsonSave(meta),
            data=DataStateSave(data_state),
        )
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        if self.cfg.best_metric and self.cfg.best_metric not in metrics:
            metrics = None  # not an eval step: LatestN decides
        return self.manager.save(int(step), args=args, metrics=metrics, force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, target_state: dict[str, Any]) -> tuple[dict[str, Any], Any] | None:
        """Restore the newest readable checkpoint onto the shardings of ``target_state`` (abstract or
        concrete arrays); returns (state, data_state) or None when there is none."""
        for step in reversed(self.steps()):
            try:
                return self.restore(step, target_state)
            except ConfigError:
                raise
            except Exception as e:  # unreadable: skip to the previous one
                log.warning("checkpoint %s/%d is unreadable (%s: %s); trying the previous one",
                            self.directory, step, type(e).__name__, str(e).splitlines()[0][:200])
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
            raise ValueError(f"step directory {step} holds step {meta['step']}")
        rng = jax.random.wrap_key_data(np.asarray(meta["rng"], np.uint32))
        state = {**target_state, "step": jax.numpy.asarray(step, jax.numpy.int32), "params": restored["params"],
                 "opt_state": restored["opt_state"], "rng": rng}
        return state, restored["data"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
