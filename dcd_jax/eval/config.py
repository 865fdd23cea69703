"""Options of evaluation: ``dcd-jax eval`` (:class:`EvalConfig`) and the train loop's periodic
evaluation (:class:`EvalHookConfig`, the ``eval:`` section of a run config)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from dcd_jax.config import ConfigError, hash_by_value
from dcd_jax.eval import benchmarks as bench_lib


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how.

    Attributes:
      benchmarks: benchmark names (``embedded``, ``gsm8k``, ``math``, ``math500``, ``amc23``, ``aime24``,
        ``aime25``, ``olympiadbench``, ``omni_math``).
      paths: benchmark -> local file/dir (otherwise its default hub id, which needs network).
      split: split override for every benchmark (None: each benchmark's default).
      limit: first N problems of each benchmark.
      max_new_tokens: generation budget per response.
      batch_size: rows per generation batch.
      greedy: run greedy decoding (pass@1).
      n_samples: sampled responses per problem for avg@n / pass@k (0 or 1: none).
      temperature, top_p: sampling settings of those samples.
      seed: sampling seed.
      template: prompt rendering: ``auto`` (the tokenizer's chat template if it has one, as in
        training), ``plain`` (the plain training template) or ``raw`` (the prompt text as is).
      system_prompt: system message for chat rendering (use the one the student was trained with).
      ifeval: also run the IFEval-style instruction check (needs the ``ifeval`` extra).
      exaccerr_teacher: teacher model for ExAccErr (opt-in; samples at temperature 1 from both).
      exaccerr_prompts: prompts used for ExAccErr.
    """

    benchmarks: tuple[str, ...] = ("embedded",)
    paths: dict[str, str] = dataclasses.field(default_factory=dict)
    split: str | None = None
    limit: int | None = None
    max_new_tokens: int = 512
    batch_size: int = 64
    greedy: bool = True
    n_samples: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    template: Literal["auto", "plain", "raw"] = "auto"
    system_prompt: str | None = None
    ifeval: bool = False
    exaccerr_teacher: str | None = None
    exaccerr_prompts: int = 64

    def validate(self) -> None:
        if not self.greedy and self.n_samples < 1:
            raise ConfigError("eval: nothing to do (greedy is off and n_samples is 0)")
        unknown = sorted(set(self.benchmarks) - set(bench_lib.list_benchmarks()))
        if unknown:
            raise ConfigError(f"eval.benchmarks: unknown {unknown}; known: {bench_lib.list_benchmarks()}")

    __hash__ = hash_by_value  # frozen, but `paths` is a dict


@dataclasses.dataclass(frozen=True)
class EvalHookConfig:
    """Periodic evaluation during training (through the separate jitted eval loop).

    Attributes:
      every_steps: evaluate every N steps (0 = never during training).
      benchmark: benchmark name (``embedded``, ``gsm8k``, ``math500``, ...).
      path: local file or directory of that benchmark (None: the default location/hub id).
      limit: evaluate on the first N problems.
      max_new_tokens: generation budget per problem.
      batch_size: prompts per generation batch.
      save_generations: also write each evaluation's outputs (prompt, response, grade) and summary to
        ``<train.out_dir>/eval_results/step_<N>/``, to read how the outputs change over training.
    """

    every_steps: int = 0
    benchmark: str = "embedded"
    path: str | None = None
    limit: int | None = 64
    max_new_tokens: int = 256
    batch_size: int = 32
    save_generations: bool = True
