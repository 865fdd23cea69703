"""Multi-host initialization, driven by the environment.

* explicit: ``distributed.coordinator_address`` / ``num_processes`` / ``process_id`` in the config,
  or the ``DCD_COORDINATOR_ADDRESS`` / ``DCD_NUM_PROCESSES`` / ``DCD_PROCESS_ID`` variables
  (``launch/local_multiprocess.sh`` uses these);
* SLURM: ``SLURM_NTASKS > 1`` -> ``jax.distributed.initialize()`` reads the SLURM variables;
* TPU VM pods: a TPU worker environment (``TPU_WORKER_HOSTNAMES`` with several hosts, as set on
  multi-host slices) -> ``jax.distributed.initialize()`` discovers the slice.

Otherwise the run is single-process. Must run before anything touches a JAX device.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Literal

import jax

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host setup.

    Attributes:
      mode: ``auto`` (detect from the environment, see module doc), ``off`` (single process) or
        ``explicit`` (use the fields below / DCD_* variables; fail if they are missing).
      coordinator_address: ``host:port`` of process 0.
      num_processes: total processes.
      process_id: this process's index.
      cpu_collectives: collective backend for multi-process CPU runs (tests, local launcher).
    """

    mode: Literal["auto", "off", "explicit"] = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    cpu_collectives: Literal["gloo", "mpi"] = "gloo"


def _explicit_settings(cfg: DistributedConfig) -> tuple[str, int, int] | None:
    address = cfg.coordinator_address or os.environ.get("DCD_COORDINATOR_ADDRESS")
    if not address:
        return None
    num = cfg.num_processes if cfg.num_processes is not None else os.environ.get("DCD_NUM_PROCESSES")
    pid = cfg.process_id if cfg.process_id is not None else os.environ.get("DCD_PROCESS_ID")
    if num is None or pid is None:
        raise ValueError("a coordinator address needs num_processes and process_id (or DCD_NUM_PROCESSES / DCD_PROCESS_ID)")
    return address, int(num), int(pid)


def initialize_distributed(cfg: DistributedConfig) -> None:
    """Call ``jax.distributed.initialize`` when the environment asks for several processes."""
    if cfg.mode == "off" or jax.distributed.is_initialized():
        return
    explicit = _explicit_settings(cfg)
    if explicit is not None:
        address, num, pid = explicit
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or os.environ.get("DCD_CPU_COLLECTIVES"):
            jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
    elif cfg.mode == "explicit":
        raise ValueError("distributed.mode=explicit needs distributed.coordinator_address (or DCD_COORDINATOR_ADDRESS)")
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()
    elif len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        jax.distributed.initialize()
    else:
        return
    log.info("jax.distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
