"""The run configuration: one frozen dataclass per concern, composed into :class:`RunConfig`.

``dcd-jax train --config configs/X.yaml key=value ...`` builds it with
:func:`dcd_jax.config.load_config`; ``configs/base.yaml`` documents every option.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from dcd_jax.config import ConfigError
from dcd_jax.data.config import DataConfig
from dcd_jax.eval.config import EvalHookConfig
from dcd_jax.objectives.config import ObjectiveConfig
from dcd_jax.sharding import check_mesh_sizes
from dcd_jax.train.checkpoint import CheckpointConfig
from dcd_jax.distributed import DistributedConfig
from dcd_jax.train.optimizer import OptimConfig


@dataclasses.dataclass(frozen=True)
class ModelSourceConfig:
    """The student.

    Attributes:
      path: HF model directory, hub id (with network) or a dcd-jax model dir (``convert hf-to-flax``).
      dtype: compute dtype (bf16 matmuls on accelerators; float32 for exactness tests on CPU).
      param_dtype: master-weight dtype (fp32 keeps small updates).
      remat: rematerialization of each layer in the backward pass: none | full | dots_saveable.
      attention: attention kernel of the train step: auto (splash on TPU, einsum elsewhere) |
        einsum (any backend) | xla | cudnn (cuDNN flash attention, NVIDIA GPUs; both through
        ``jax.nn.dot_product_attention``) | splash (Pallas splash attention, TPU).
      trust_remote_code: allow a tokenizer's custom code (off by default: nothing runs from what you load).
    """

    path: str = ""
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: Literal["none", "full", "dots_saveable"] = "none"
    attention: Literal["auto", "einsum", "xla", "cudnn", "splash"] = "auto"
    trust_remote_code: bool = False


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes (product = all devices of all hosts; one may be -1 = the rest).

    The sizes are checked here; that they fit the device count is checked before anything loads.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def validate(self) -> None:
        check_mesh_sizes((self.data, self.fsdp, self.tensor))

    def make(self, devices=None):
        """The jax ``Mesh`` of these sizes (over ``devices``, default all): the one place a config becomes a mesh."""
        from dcd_jax.sharding import make_mesh

        return make_mesh(self.data, self.fsdp, self.tensor, devices=devices)

    @classmethod
    def parse(cls, text: str) -> "MeshConfig":
        """``"1,-1,1"`` (the ``--mesh`` flag) -> ``MeshConfig(data=1, fsdp=-1, tensor=1)``."""
        try:
            data, fsdp, tensor = (int(x) for x in text.split(","))
        except ValueError:
            raise ConfigError(f"--mesh expects three integers data,fsdp,tensor (e.g. 1,-1,1), got {text!r}") from None
        mesh = cls(data, fsdp, tensor)
        mesh.validate()
        return mesh


def make_mesh_or_one_device(mesh: "MeshConfig | None", devices=None):
    """The mesh of a command whose mesh is optional: ``None`` = one device (the first), as
    eval / generate / score-teacher / convert always did; otherwise ``mesh.make()``."""
    return None if mesh is None else mesh.make(devices)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The training loop.

    Attributes:
      steps: optimizer steps in total (a resumed run continues up to this).
      grad_accum: micro-batches per step (data.batch_size is split into this many).
      seed: RNG seed of the run.
      log_every: write metrics every N steps.
      out_dir: run directory: checkpoints, metrics.jsonl, TensorBoard, resolved config, exports. A local
        path or a ``gs://bucket/prefix`` URL (what a multi-host slice shares; docs/failure_modes.md).
      export_hf: write the final student as a HF directory (``<out_dir>/hf``).
      export_dtype: dtype of that export (null: the param dtype).
      tensorboard: also write TensorBoard event files.
      progress: show a progress bar (process 0).
      break_lock: take over ``out_dir``'s lock even if it belongs to a run on another host (you
        vouch that it is gone; a live run on this host is never overridden).
      lock_stale_after_s: a lock from another host whose heartbeat is older than this is reported
        as stale (0 = never).
    """

    steps: int = 100
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    out_dir: str = "runs/default"
    export_hf: bool = False
    export_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    tensorboard: bool = True
    progress: bool = True
    break_lock: bool = False
    lock_stale_after_s: float = 3600.0

    def validate(self) -> None:
        if self.steps <= 0 or self.grad_accum <= 0 or self.log_every <= 0:
            raise ConfigError("train.steps, train.grad_accum and train.log_every must be positive")
        if self.lock_stale_after_s < 0:
            raise ConfigError(f"train.lock_stale_after_s must be >= 0, got {self.lock_stale_after_s}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelSourceConfig = ModelSourceConfig()
    data: DataConfig = DataConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    train: LoopConfig = LoopConfig()
    eval: EvalHookConfig = EvalHookConfig()
    distributed: DistributedConfig = DistributedConfig()

    def require_model(self) -> None:
        """Commands that load the student (train, data inspect) call this."""
        if not self.model.path:
            raise ConfigError("model.path is required (HF directory, hub id or dcd-jax model dir)")

    def validate(self) -> None:
        if not self.data.path:
            raise ConfigError("data.path is required (JSONL / Parquet / dataset directory / hub id)")
        if self.data.batch_size % self.train.grad_accum:
            raise ConfigError(
                f"data.batch_size={self.data.batch_size} must be divisible by train.grad_accum={self.train.grad_accum}"
            )
        if self.objective.loss == "gkd" and self.objective.gkd.max_new_tokens >= self.data.seq_len:
            raise ConfigError(
                f"objective.gkd.max_new_tokens={self.objective.gkd.max_new_tokens} leaves no prompt window in "
                f"data.seq_len={self.data.seq_len} (rollout rows are prompt + max_new_tokens tokens)"
            )
