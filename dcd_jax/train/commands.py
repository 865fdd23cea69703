"""The configs of the commands that run a model but do not train: ``eval``, ``generate``, ``score-teacher``.

Each is a frozen dataclass loaded by the one loader, :func:`dcd_jax.config.load_config` (``--config
YAML`` files, then the command's flags, then ``key=value`` overrides), and validated for what that
command needs. The command's own options live in its section (``eval:``, ``generate:``, ``score:``;
see ``configs/commands/*.yaml``), next to ``mesh:`` (``teacher_mesh:`` for score-teacher).

``mesh`` differs from :class:`~dcd_jax.train.config.RunConfig`'s on purpose: these commands run on
ONE device unless a mesh is given (``mesh: null``, the default), whereas training defaults to all
devices (``data=1 fsdp=-1 tensor=1``). ``--mesh 1,-1,1`` is sugar for ``mesh.data=1 mesh.fsdp=-1
mesh.tensor=1``; :meth:`MeshConfig.make` builds the jax mesh everywhere.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from dcd_jax.config import ConfigError, hash_by_value
from dcd_jax.eval.config import EvalConfig
from dcd_jax.teacher.generate import GenerateConfig
from dcd_jax.teacher.scoring import ScoreConfig
from dcd_jax.train.config import MeshConfig, RunConfig


@dataclasses.dataclass(frozen=True)
class EvalCommandConfig:
    """``dcd-jax eval``.

    Attributes:
      models: name -> checkpoint (HF dir, hub id, dcd-jax model dir or run dir); at least one.
      out: results folder.
      dtype: compute dtype.
      mesh: data/fsdp/tensor sizes (null: one device).
      eval: what to evaluate and how (:class:`~dcd_jax.eval.config.EvalConfig`).
    """

    models: dict[str, str] = dataclasses.field(default_factory=dict)
    out: str = "results"
    dtype: Literal["float32", "bfloat16"] = "float32"
    mesh: MeshConfig | None = None
    eval: EvalConfig = EvalConfig()

    __hash__ = hash_by_value

    def validate(self) -> None:
        if not self.models:
            raise ConfigError("models is required: give at least one --model NAME=PATH (or models.NAME=PATH)")
        bad = sorted(k for k, v in self.models.items() if not isinstance(v, str) or not v)
        if bad:
            raise ConfigError(f"models.{bad[0]}: expected a checkpoint path")
        self.eval.validate()


@dataclasses.dataclass(frozen=True)
class GenerateCommandConfig:
    """``dcd-jax generate``.

    Attributes:
      mesh: data/fsdp/tensor sizes (null: one device).
      generate: the generation options (:class:`~dcd_jax.teacher.generate.GenerateConfig`).
    """

    mesh: MeshConfig | None = None
    generate: GenerateConfig = GenerateConfig()

    def validate(self) -> None:
        self.generate.validate()  # generate.teacher is required


@dataclasses.dataclass(frozen=True)
class ScoreCommandConfig(RunConfig):
    """``dcd-jax score-teacher``: the run config (its ``data`` section says which traces, tokenized as
    training will) plus ``score:`` and ``teacher_mesh:``, the teacher's mesh (null: one device; ``--mesh``
    sets it). The run's ``mesh:`` is the TRAINING mesh, which every config states through base.yaml;
    scoring does not use it, so a train config keeps scoring on one device as before."""

    teacher_mesh: MeshConfig | None = None
    score: ScoreConfig = ScoreConfig()

    def validate(self) -> None:
        super().validate()  # data.path is required
        self.score.validate()  # score.teacher is required
