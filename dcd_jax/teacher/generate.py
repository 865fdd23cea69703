"""``dcd-jax generate``: teacher traces for a prompt set, with optional rejection filtering.

Prompts come from any benchmark adapter (a local file in that benchmark's schema, or the
``embedded`` task). Each prompt gets ``n`` sampled responses from the teacher; with
``keep: correct`` only responses whose final answer matches the gold answer are written. Records
are training-ready: ``{"id", "source_id", "prompt", "response", "answer", "correct", "finished_by"}``
(``prompt`` is the raw problem: the trainer renders it with the student's chat template).

Resumable: prompts are processed in chunks; after each chunk its kept traces are appended to
``out`` and then its prompt ids to ``out.done`` (both flushed and fsynced). A restarted run drops
traces whose prompt is not in ``out.done`` (an interrupted chunk) and skips every finished
prompt, so it never loses or duplicates a trace. That clean-up rewrites ``out`` atomically (a temp
file renamed over it): a kill during the restart leaves the old file or the cleaned one, whole.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Literal

from dcd_jax import storage
from dcd_jax.atomic_files import atomic_write_text
from dcd_jax.config import ConfigError
from dcd_jax.eval import benchmarks as bench_lib
from dcd_jax.eval.grading import grade
from dcd_jax.data import render_prompts
from dcd_jax.infer.sampler import Sampler, SamplingConfig


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """Options of ``dcd-jax generate``.

    Attributes:
      teacher: teacher model (HF dir, hub id or dcd-jax model dir).
      benchmark: prompt-set adapter (``embedded`` for plain ``{id, prompt, answer}`` JSONL).
      prompts: local prompt file / dir (None: the adapter's default).
      split: split of the prompt set (None: the adapter's default).
      out: output JSONL of traces.
      limit: first N prompts.
      n: sampled responses per prompt.
      temperature, top_p: sampling.
      max_new_tokens: budget per response.
      batch_size: rows per generation batch.
      keep: ``correct`` (rejection sampling on the gold answer) or ``all``.
      template, system_prompt: prompt rendering (see :class:`~dcd_jax.eval.runner.EvalConfig`), as in training.
      chunk_prompts: prompts per resumable chunk.
      seed: sampling seed.
    """

    teacher: str = ""
    benchmark: str = "embedded"
    prompts: str | None = None
    split: str | None = None
    out: str = "traces.jsonl"
    limit: int | None = None
    n: int = 1
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 512
    batch_size: int = 64
    keep: Literal["correct", "all"] = "correct"
    template: Literal["auto", "plain", "raw"] = "auto"
    system_prompt: str | None = None
    chunk_prompts: int = 256
    seed: int = 0

    def validate(self) -> None:
        if not self.teacher:
            raise ConfigError("generate.teacher is required")
        if self.n < 1 or self.chunk_prompts < 1:
            raise ConfigError("generate.n and generate.chunk_prompts must be >= 1")


def _append_lines(path: Path, lines: list[str]) -> None:
    with open(path, "a") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


def _done_ids(out: Path) -> set[str]:
    done_file = out.with_name(out.name + ".done")
    if not done_file.is_file():
        return set()
    # A line is complete only with its newline (a kill mid-write leaves a partial one: ignore it).
    text = done_file.read_text()
    return {line for line in text.split("\n")[: -1 if not text.endswith("\n") else None] if line}


def generate_traces(cfg: GenerateConfig, *, teacher=None, tokenizer=None, mesh=None, progress: bool = True) -> dict[str, int]:
    """Write teacher traces for ``cfg``'s prompts; returns counts (prompts, generated, kept, skipped)."""
    from dcd_jax.convert.model_dir import load_pretrained
    from dcd_jax.models import abstract_model

    # The traces and their ``.done`` ids are appended to; a bucket cannot append, so both live in a
    # working copy (the directory itself when local) uploaded after every chunk, traces first.
    name = str(cfg.out).rstrip("/").rsplit("/", 1)[-1]
    mirror = storage.Mirror(str(cfg.out)[: -len(name)] or ".", files=(name, name + ".done"))
    out = mirror.local / name
    done_file = out.with_name(out.name + ".done")
    items = bench_lib.load_benchmark(cfg.benchmark, cfg.prompts, cfg.split, limit=cfg.limit)
    done = _done_ids(out)
    if out.is_file():
        # Keep only traces of finished chunks: a kill after a chunk's traces were appended but
        # before its ids reached ``.done`` (or in the middle of a line) would otherwise duplicate them.
        kept_lines = []
        for line in out.read_text().split("\n"):
            try:
                if line and json.loads(line)["source_id"] in done:
                    kept_lines.append(line)
            except (json.JSONDecodeError, KeyError):
                continue
        atomic_write_text(out, "".join(line + "\n" for line in kept_lines))
        mirror.sync()
    todo = [it for it in items if it.id not in done]
    stats = {"prompts": len(items), "skipped_done": len(items) - len(todo), "generated": 0, "kept": 0}
    if not todo:
        stats["traces_in_file"] = _count_lines(out)
        mirror.close()
        return stats
    if teacher is None:
        loaded = load_pretrained(cfg.teacher, mesh=mesh)
        teacher, tokenizer = (abstract_model(loaded.cfg)[0], loaded.params), loaded.tokenizer()
    sampler = Sampler(teacher[0], teacher[1], tokenizer, mesh)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              n=cfg.n, seed=cfg.seed, batch_size=cfg.batch_size)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="generate", unit="prompt", dynamic_ncols=True)
    for start in range(0, len(todo), cfg.chunk_prompts):
        chunk = todo[start : start + cfg.chunk_prompts]
        outs = sampler.generate(render_prompts([it.prompt for it in chunk], tokenizer, cfg), sampling)
        lines = []
        for item, completions in zip(chunk, outs):
            for j, c in enumerate(completions):
                g = grade(c.text, item.gold)
                stats["generated"] += 1
                if cfg.keep == "all" or (g.correct and c.finished_by != "length"):
                    lines.append(json.dumps({
                        "id": f"{item.id}-s{j}", "source_id": item.id, "prompt": item.prompt, "response": c.text,
                        "answer": item.gold, "correct": g.correct, "finished_by": c.finished_by,
                    }))
        stats["kept"] += len(lines)
        _append_lines(out, lines)
        _append_lines(done_file, [it.id for it in chunk])
        mirror.sync()
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    stats["traces_in_file"] = _count_lines(out)
    mirror.close()
    return stats


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0
