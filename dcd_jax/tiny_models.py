"""Tiny Hugging Face checkpoints for the embedded task: random-weight Qwen2 / Qwen3 models.

* :func:`make_tiny_student` - a random-weight Qwen2/Qwen3 checkpoint (safetensors) with the
  task's tokenizer (:func:`dcd_jax.data.synthetic.build_tokenizer`), so the demo, the study and
  the tests take the same HF -> Flax path as a real checkpoint.
* :func:`write_synthetic_assets` - tokenizer, checkpoints and data files for a default job.

Kept out of ``dcd_jax.data``: writing a checkpoint needs the converters (a higher layer).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from dcd_jax.data.synthetic import SyntheticTaskConfig, build_tokenizer, generate_problems, write_jsonl

# hidden, layers, heads, kv heads, mlp
STUDENT_SIZES = {
    "micro": (64, 2, 4, 2, 192),
    "tiny": (128, 4, 4, 2, 384),
    "small": (256, 6, 8, 4, 768),
    "base": (512, 8, 8, 4, 1536),
}


def tiny_student_config(tokenizer: Any, *, size: str = "micro", arch: str = "qwen2",
                        max_position_embeddings: int = 2048) -> dict[str, Any]:
    """The HF ``config.json`` of a tiny Qwen2 / Qwen3 student for ``tokenizer`` (tied embeddings,
    vocabulary rounded up to a multiple of 64, like Qwen's padded embedding rows)."""
    if size not in STUDENT_SIZES:
        raise ValueError(f"size={size!r}; expected one of {sorted(STUDENT_SIZES)}")
    if arch not in ("qwen2", "qwen3"):
        raise ValueError(f"arch={arch!r}; expected qwen2 or qwen3")
    hidden, layers, heads, kv_heads, mlp = STUDENT_SIZES[size]
    return {
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "Qwen3ForCausalLM"],
        "model_type": arch,
        "vocab_size": -(-len(tokenizer) // 64) * 64,
        "hidden_size": hidden,
        "intermediate_size": mlp,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "max_position_embeddings": max_position_embeddings,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def make_tiny_student(
    out_dir: str | Path, tokenizer: Any, *, size: str = "micro", arch: str = "qwen2", seed: int = 0,
    max_position_embeddings: int = 2048,
) -> Path:
    """Save a random-weight Qwen2 / Qwen3 HF checkpoint (safetensors) and ``tokenizer`` to ``out_dir``.

    Sizes: :data:`STUDENT_SIZES` (``micro`` ~0.1M parameters ... ``base`` ~25M). The weights are
    drawn in JAX and written by the HF exporter, so no PyTorch is needed; the checkpoint then
    loads through the same HF -> Flax path as a real one (and in ``transformers``).
    """
    from dcd_jax.convert.flax_to_hf import new_hf_checkpoint

    config = tiny_student_config(tokenizer, size=size, arch=arch, max_position_embeddings=max_position_embeddings)
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(str(out_dir))
    new_hf_checkpoint(config, out_dir, seed=seed)
    gen = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2))
    _check_tokenizer_round_trip(out_dir, tokenizer)
    return out_dir


def _check_tokenizer_round_trip(directory: Path, tokenizer: Any) -> None:
    """Refuse a checkpoint whose saved tokenizer loads back (``AutoTokenizer``) as a different one.

    transformers picks the tokenizer class from the model type for some architectures and rebuilds
    it from the vocabulary, dropping a custom normalizer / pre-tokenizer; data tokenized with the
    original would then not match what the trainer and sampler see.
    """
    from transformers import AutoTokenizer

    from dcd_jax.data.teacher_scores import tokenizer_fingerprint

    loaded = AutoTokenizer.from_pretrained(str(directory))
    if tokenizer_fingerprint(loaded) != tokenizer_fingerprint(tokenizer):
        raise ValueError(
            f"{directory}: the saved tokenizer loads back as {type(loaded).__name__}, which tokenizes differently "
            f"from the given {type(tokenizer).__name__}; use a tokenizer of the class transformers assigns to this "
            "architecture (build_tokenizer does) or another arch"
        )


def write_synthetic_assets(
    out_dir: str | Path, task: SyntheticTaskConfig = SyntheticTaskConfig(), *, n_eval: int = 500,
    student_size: str = "micro", teacher_size: str = "small",
) -> dict[str, Path]:
    """Everything the default job needs, under ``out_dir``.

    ``tokenizer/``; ``student/`` (random ``student_size`` checkpoint); ``teacher_init/`` (random
    ``teacher_size`` checkpoint to train on the solutions); ``train.jsonl`` (teacher traces in the
    configured style mix); ``teacher_sft.jsonl`` (canonical solutions, same problems);
    ``eval.jsonl`` (``n_eval`` problems of split ``eval``). Returns the paths by those names.
    """
    out = Path(out_dir)
    tokenizer = build_tokenizer(out / "tokenizer", seed=task.seed)
    train = generate_problems(task)
    paths = {
        "tokenizer": out / "tokenizer",
        "student": make_tiny_student(out / "student", tokenizer, size=student_size, seed=task.seed),
        "teacher_init": make_tiny_student(out / "teacher_init", tokenizer, size=teacher_size, seed=task.seed + 1),
        "train": write_jsonl(train, out / "train.jsonl"),
        "teacher_sft": write_jsonl(
            [dict(r, response=r["solution"], style="careful", trace_correct=True) for r in train],
            out / "teacher_sft.jsonl",
        ),
        "eval": write_jsonl(
            generate_problems(dataclasses.replace(task, split="eval", n_examples=n_eval, error_rate=0.0)),
            out / "eval.jsonl",
        ),
    }
    return paths
