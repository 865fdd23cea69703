"""``dcd-jax demo``: the offline distillation pipeline in miniature, with no download.

Each stage writes its artifacts under ``--out`` and a ``<stage>.done.json`` marker last, so a
second run reuses finished stages and a killed run resumes at the stage it was in.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class DemoScale:
    """Sizes of one demo scale."""

    student_hidden: int
    student_layers: int
    student_heads: int
    vocab_size: int


SCALES = {
    "micro": DemoScale(student_hidden=32, student_layers=2, student_heads=4, vocab_size=256),
    "small": DemoScale(student_hidden=64, student_layers=2, student_heads=4, vocab_size=256),
    "full": DemoScale(student_hidden=128, student_layers=4, student_heads=4, vocab_size=256),
}


def run_stage(out: Path, name: str, fn: Callable[[], dict[str, Any]], log=print) -> dict[str, Any]:
    """Run ``fn`` unless ``out/<name>.done.json`` exists; the marker is written only on success."""
    marker = out / f"{name}.done.json"
    if marker.is_file():
        log(f"[{name}] cached ({marker})")
        return json.loads(marker.read_text())
    start = time.time()
    log(f"[{name}] running ...")
    result = fn()
    result = {**result, "seconds": round(time.time() - start, 2)}
    marker.write_text(json.dumps(result, indent=2))
    log(f"[{name}] done in {result['seconds']:.1f}s")
    return result


def tiny_student_hf_config(scale: DemoScale) -> dict[str, Any]:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": scale.vocab_size,
        "hidden_size": scale.student_hidden,
        "intermediate_size": 3 * scale.student_hidden,
        "num_hidden_layers": scale.student_layers,
        "num_attention_heads": scale.student_heads,
        "num_key_value_heads": max(1, scale.student_heads // 2),
        "max_position_embeddings": 1024,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
    }


def run_demo(out: str | Path, scale: str = "small", log=print) -> dict[str, Any]:
    from dcd_jax.convert import load_hf, load_model_dir, save_hf, save_model_dir
    from dcd_jax.convert.flax_to_hf import new_hf_checkpoint
    from dcd_jax.convert.hf_to_flax import open_hf_checkpoint

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = SCALES[scale]

    def make_student():
        new_hf_checkpoint(tiny_student_hf_config(sizes), out / "student_hf", seed=0)
        return {"student_hf": str(out / "student_hf")}

    run_stage(out, "student", make_student, log)

    def convert_student():
        from flax import nnx

        model = load_hf(out / "student_hf")
        params = nnx.to_pure_dict(nnx.split(model)[1])
        hf_config = open_hf_checkpoint(out / "student_hf").hf_config
        save_model_dir(out / "student_flax", params, model.cfg, hf_config, side_files_from=out / "student_hf")
        cfg, hf_config, restored, _ = load_model_dir(out / "student_flax")
        save_hf(restored, cfg, hf_config, out / "student_roundtrip_hf")
        ids = np.arange(16, dtype=np.int32)[None] % cfg.vocab_size
        diff = float(np.abs(np.asarray(load_hf(out / "student_roundtrip_hf")(ids)) - np.asarray(model(ids))).max())
        if diff != 0.0:
            raise RuntimeError(f"round trip changed the logits (max abs diff {diff})")
        return {"student_flax": str(out / "student_flax"), "params": cfg.num_params, "roundtrip_max_abs_diff": diff}

    result = run_stage(out, "convert", convert_student, log)
    log(f"student: {result['params']:,} parameters; HF -> Flax -> HF round trip exact")
    return result
