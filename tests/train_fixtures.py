"""A tiny student + tokenizer + embedded-task traces on disk, for training tests (no torch needed)."""

from __future__ import annotations

from pathlib import Path

from dcd_jax.data.synthetic import SyntheticTaskConfig, build_tokenizer, generate_problems, write_jsonl
from dcd_jax.tiny_models import make_tiny_student


def make_assets(root: Path, n_examples: int = 400) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    make_tiny_student(root / "student", build_tokenizer(), size="micro", max_position_embeddings=512)
    task = SyntheticTaskConfig(n_examples=n_examples, max_steps=3)
    write_jsonl(generate_problems(task), root / "train.jsonl")
    return {"student": root / "student", "train": root / "train.jsonl"}


def base_overrides(assets: dict[str, Path], out_dir: Path, **extra) -> list[str]:
    """A small, exact (fp32) run: packed batches of 8 x 128 tokens, no progress bar.

    The learning rate is constant after warmup, so runs of different lengths compile the very same
    train step (XLA programs are cached in-process by their HLO): most tests then pay one compile.
    """
    values = {
        "model.path": assets["student"], "model.dtype": "float32", "data.path": assets["train"],
        "data.seq_len": 128, "data.batch_size": 8, "data.num_epochs": "null", "optim.lr": 1e-2,
        "optim.warmup_steps": 2, "optim.schedule": "constant", "train.out_dir": out_dir, "train.log_every": 1, "train.progress": "false",
        "train.tensorboard": "false", "checkpoint.async_save": "false", "objective.chunk_size": 64,
        "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]
