"""What a run has spent, for every method: generated tokens, teacher forward FLOPs, wall time.

Logged with each metrics row (``metrics.jsonl``):

* ``generated_tokens``: tokens the student sampled in this step (online GKD rollouts; 0 offline),
* ``teacher_forward_flops``: FLOPs of the live teacher's forward passes in this step
  (``2 N_teacher + attention`` per token of the batch, :func:`teacher_forward_flops_per_token`;
  0 for methods that read cached teacher scores, whose one-off scoring cost is paid offline),
* ``step_seconds``: mean wall time per step since the last row (already logged by the loop),
* ``cost/generated_tokens``, ``cost/teacher_forward_flops``, ``cost/wall_seconds``: running
  totals over the run, carried over a resume from the last logged row at or before the restored
  step (steps between that row and the checkpoint are not re-counted: with ``log_every = 1``
  the totals are exact).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dcd_jax import storage
from dcd_jax.models import ModelConfig
from dcd_jax.train.metrics import read_metrics

TOTAL_KEYS = ("cost/generated_tokens", "cost/teacher_forward_flops", "cost/wall_seconds")


def teacher_forward_flops_per_token(teacher_cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of a model: a third of its training FLOPs (6N -> 2N, attention alike)."""
    return teacher_cfg.flops_per_token(seq_len) / 3.0


@dataclasses.dataclass
class RunCost:
    """Running totals; ``teacher_flops_per_step`` is 0 for methods without a live teacher."""

    teacher_flops_per_step: float = 0.0
    generated_tokens: float = 0.0
    teacher_forward_flops: float = 0.0
    wall_seconds: float = 0.0

    def add_step(self, generated_tokens: float, seconds: float) -> None:
        self.generated_tokens += generated_tokens
        self.teacher_forward_flops += self.teacher_flops_per_step
        self.wall_seconds += seconds

    def step_metrics(self, generated_tokens: float) -> dict[str, float]:
        return {
            "generated_tokens": generated_tokens,
            "teacher_forward_flops": self.teacher_flops_per_step,
            "cost/generated_tokens": self.generated_tokens,
            "cost/teacher_forward_flops": self.teacher_forward_flops,
            "cost/wall_seconds": self.wall_seconds,
        }

    def resume_from(self, metrics_path: Path, step: int) -> None:
        """Continue the totals of the last row logged at or before ``step`` (a resumed run)."""
        if not storage.path(metrics_path).is_file():
            return
        rows = [r for r in read_metrics(metrics_path) if r["step"] <= step and TOTAL_KEYS[0] in r]
        if rows:
            last = rows[-1]
            self.generated_tokens, self.teacher_forward_flops, self.wall_seconds = (float(last[k]) for k in TOTAL_KEYS)


def run_cost(metrics_path: str | Path) -> dict[str, float]:
    """A finished run's spending from its ``metrics.jsonl`` (the study's cost columns): the totals
    of the last row, the number of steps, and the mean wall time per step."""
    rows = [r for r in read_metrics(metrics_path) if TOTAL_KEYS[0] in r]
    if not rows:
        raise ValueError(f"{metrics_path}: no cost columns (a run from before cost accounting?)")
    last = rows[-1]
    out = {key.split("/", 1)[1]: float(last[key]) for key in TOTAL_KEYS}
    out["steps"] = float(last["step"])
    out["step_seconds_mean"] = out["wall_seconds"] / max(out["steps"], 1.0)
    return out


def steps_within_wall_budget(metrics_path: str | Path, wall_seconds: float) -> int:
    """The last logged step whose cumulative wall time is within ``wall_seconds`` (0 if none):
    where to read a run's checkpoint / eval for a comparison at matched wall time."""
    within = [r["step"] for r in read_metrics(metrics_path) if TOTAL_KEYS[0] in r and r["cost/wall_seconds"] <= wall_seconds]
    return int(within[-1]) if within else 0
