"""``dcd-jax demo``: the paper's whole offline pipeline in miniature, with no download.

  (a) assets    task data (embedded arithmetic word problems), tokenizer, fresh HF checkpoints
  (b) teacher   train a larger tiny transformer on programmatic traces in a mix of styles
  (c) traces    generate teacher traces with the jitted sampler, keep the correct ones
  (d) scores    score them once with the teacher (cached per-token and top-k log-probs)
  (e) student   convert the fresh tiny HF student to a dcd-jax model dir
  (f) sft, dcd  distill it with SFT and with DCD: same steps, same data order
  (g) eval      evaluate teacher and both students with the eval loop
  (h) report    comparison table, plot PNG, HF-format students

Each stage writes its artifacts under ``--out`` and a ``<stage>.done.json`` marker last, so a
second run reuses finished stages and a killed run resumes at the stage it was in (training
stages also resume from their own checkpoints).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from dcd_jax.atomic_files import atomic_write_text
from dcd_jax.data.synthetic import SyntheticTaskConfig

log = logging.getLogger("dcd_jax.demo")


@dataclasses.dataclass(frozen=True)
class DemoScale:
    """Sizes of one demo scale (``--scale``)."""

    task: SyntheticTaskConfig  # difficulty and style mix of the teacher's training traces
    n_prompts: int  # prompts the teacher answers to make the distillation data
    n_eval: int  # held-out evaluation problems
    teacher_size: str
    student_size: str
    teacher_steps: int
    student_steps: int
    batch_size: int
    seq_len: int
    teacher_lr: float
    student_lr: float
    samples_per_prompt: int
    temperature: float
    max_new_tokens: int
    topk: int
    keep: str = "correct"  # rejection filtering; "all" at micro scale, a plumbing check whose teacher is too small to be right


# Two-step problems with small numbers: a 1M-parameter teacher learns them in a few CPU minutes.
_EASY = dict(min_steps=1, max_steps=2, max_start=12, max_operand=6, max_value=30)
SCALES = {
    "micro": DemoScale(
        task=SyntheticTaskConfig(n_examples=400, **_EASY), n_prompts=48, n_eval=24, teacher_size="micro",
        student_size="micro", teacher_steps=30, student_steps=12, batch_size=8, seq_len=192, teacher_lr=1e-2,
        student_lr=5e-3, samples_per_prompt=2, temperature=1.0, max_new_tokens=48, topk=4, keep="all",
    ),
    "small": DemoScale(
        task=SyntheticTaskConfig(n_examples=20000, **_EASY), n_prompts=1024, n_eval=256, teacher_size="tiny",
        student_size="micro", teacher_steps=400, student_steps=250, batch_size=16, seq_len=256, teacher_lr=3e-3,
        student_lr=3e-3, samples_per_prompt=2, temperature=1.0, max_new_tokens=64, topk=8,
    ),
    "full": DemoScale(
        task=SyntheticTaskConfig(n_examples=60000, **dict(_EASY, max_steps=3)), n_prompts=4096, n_eval=512,
        teacher_size="small", student_size="tiny", teacher_steps=3000, student_steps=1200, batch_size=32, seq_len=256,
        teacher_lr=2e-3, student_lr=2e-3, samples_per_prompt=4, temperature=1.0, max_new_tokens=96, topk=16,
    ),
}


def run_stage(out: Path, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``fn`` unless ``out/<name>.done.json`` exists; the marker is written only on success."""
    marker = out / f"{name}.done.json"
    if marker.is_file():
        log.info("[%s] cached (%s)", name, marker)
        return json.loads(marker.read_text())
    start = time.time()
    log.info("[%s] running ...", name)
    result = {**fn(), "seconds": round(time.time() - start, 1)}
    atomic_write_text(marker, json.dumps(result, indent=2))  # a torn marker would poison the cache
    log.info("[%s] done in %.0fs", name, result["seconds"])
    return result


def _train(model: str, data: dict[str, Any], objective: dict[str, Any], steps: int, lr: float, out_dir: Path,
           scale: DemoScale, seed: int) -> dict[str, Any]:
    from dcd_jax.config import from_dict
    from dcd_jax.train.config import RunConfig
    from dcd_jax.train.loop import train
    from dcd_jax.train.metrics import read_metrics

    cfg = from_dict(RunConfig, {
        "model": {"path": model, "dtype": "float32"},
        "data": {"seq_len": scale.seq_len, "batch_size": scale.batch_size, "num_epochs": None, "seed": seed, **data},
        "objective": {"chunk_size": 128, **objective},
        "optim": {"lr": lr, "warmup_steps": max(steps // 20, 1), "schedule": "cosine", "final_lr_ratio": 0.1},
        "checkpoint": {"every_steps": max(steps // 4, 1), "keep": 1},
        "train": {"steps": steps, "out_dir": str(out_dir), "log_every": max(steps // 50, 1), "export_hf": True,
                  "seed": seed},
    })
    result = train(cfg)
    rows = [r for r in read_metrics(out_dir / "metrics.jsonl") if "loss" in r]
    tail = rows[-max(len(rows) // 5, 1):]
    mean = lambda key: sum(r.get(key, 0.0) for r in tail) / len(tail)
    return {"hf": str(out_dir / "hf"), "steps": result.step, "final_loss": mean("loss"),
            "ess_token_frac": mean("ess_token_frac"), "weight_std": mean("weight_std"),
            "tokens_per_second": mean("tokens_per_second")}


def run_demo(out: str | Path = "demo_out", scale: "str | DemoScale" = "small", seed: int = 0) -> dict[str, Any]:
    """Run (or resume) the demo under ``out``; returns the comparison summary."""
    from dcd_jax.data.synthetic import build_tokenizer, generate_problems, make_tiny_student, write_jsonl

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    s = SCALES[scale] if isinstance(scale, str) else scale
    assets, traces, runs = out / "assets", out / "traces", out / "runs"

    def stage_assets():
        tok = build_tokenizer(assets / "tokenizer", seed=seed)
        task = dataclasses.replace(s.task, seed=seed)
        write_jsonl(generate_problems(task), assets / "teacher_train.jsonl")
        prompts = dataclasses.replace(task, split="prompts", n_examples=s.n_prompts)
        write_jsonl(generate_problems(prompts), assets / "prompts.jsonl")
        write_jsonl(generate_problems(dataclasses.replace(task, split="eval", n_examples=s.n_eval)), assets / "eval.jsonl")
        make_tiny_student(assets / "teacher_init", tok, size=s.teacher_size, seed=seed + 1, max_position_embeddings=1024)
        make_tiny_student(assets / "student", tok, size=s.student_size, seed=seed, max_position_embeddings=1024)
        return {"tokenizer_size": len(tok)}

    def stage_teacher():
        return _train(str(assets / "teacher_init"), {"path": str(assets / "teacher_train.jsonl")},
                      {"weighting": "none"}, s.teacher_steps, s.teacher_lr, runs / "teacher", s, seed)

    def stage_traces():
        from dcd_jax.teacher.generate import GenerateConfig, generate_traces

        cfg = GenerateConfig(teacher=str(runs / "teacher" / "hf"), prompts=str(assets / "prompts.jsonl"), split="prompts",
                             out=str(traces / "train.jsonl"), n=s.samples_per_prompt, temperature=s.temperature,
                             max_new_tokens=s.max_new_tokens, keep=s.keep, seed=seed)
        stats = generate_traces(cfg)
        if stats["traces_in_file"] == 0:
            raise RuntimeError("the teacher produced no correct trace; train it longer (--scale) or check the data")
        return stats

    def stage_scores():
        from dcd_jax.data import DataConfig
        from dcd_jax.teacher.scoring import ScoreConfig, score_teacher

        path = score_teacher(DataConfig(path=str(traces / "train.jsonl")),
                             ScoreConfig(teacher=str(runs / "teacher" / "hf"), topk=s.topk, batch_size=16))
        return {"scores": str(path)}

    def stage_student():
        from dcd_jax.convert import load_hf_params, open_hf_checkpoint, save_model_dir
        from dcd_jax.models.config import ModelConfig

        ckpt = open_hf_checkpoint(assets / "student")
        cfg = ModelConfig.from_hf_config(ckpt.hf_config)
        save_model_dir(out / "student_flax", load_hf_params(ckpt, cfg), cfg, ckpt.hf_config, side_files_from=assets / "student")
        return {"student_flax": str(out / "student_flax"), "params": cfg.num_params}

    run_stage(out, "assets", stage_assets)
    teacher = run_stage(out, "teacher", stage_teacher)
    gen = run_stage(out, "traces", stage_traces)
    run_stage(out, "scores", stage_scores)
    student = run_stage(out, "student", stage_student)
    data = {"path": str(traces / "train.jsonl"), "teacher_scores": str(traces / "train.teacher.parquet"), "topk": s.topk}
    methods = {"sft": {"weighting": "none"}, "dcd": {"weighting": "dcd", "lam": {"warmup_steps": s.student_steps // 5}}}
    trained = {
        name: run_stage(out, name, lambda name=name, obj=obj: _train(
            student["student_flax"], data, obj, s.student_steps, s.student_lr, runs / name, s, seed))
        for name, obj in methods.items()
    }

    def stage_eval():
        from dcd_jax.eval.runner import EvalConfig, run_eval

        cfg = EvalConfig(benchmarks=("embedded",), paths={"embedded": str(assets / "eval.jsonl")},
                         max_new_tokens=s.max_new_tokens, batch_size=64)
        models = {"teacher": teacher["hf"], **{name: r["hf"] for name, r in trained.items()}}
        return run_eval(models, cfg, out / "results")

    results = run_stage(out, "eval", stage_eval)["results"]
    return report(out, results, trained, teacher, gen, student, scale if isinstance(scale, str) else "custom")


COLUMNS = ("accuracy", "length_mean", "truncation_rate", "repetition_rate", "format_failure_rate",
           "weight_ess", "final_loss")


def report(out: Path, results: dict, trained: dict, teacher: dict, gen: dict, student: dict,
           scale_name: str = "custom") -> dict[str, Any]:
    """Print the comparison table; write ``report.md``, ``summary.json`` and ``comparison.png``."""
    from dcd_jax.eval.report import markdown_table

    rows = []
    for name in ("teacher", *trained):
        m = results[name]["embedded"]
        train_info = trained.get(name, teacher)
        rows.append({
            "method": name, "accuracy": m["pass@1"], "accuracy_ci": m.get("pass@1_ci"),
            "length_mean": m.get("length_mean"), "truncation_rate": m.get("truncation_rate"),
            "repetition_rate": m.get("repetition_rate"), "format_failure_rate": m.get("format_failure_rate"),
            "weight_ess": train_info.get("ess_token_frac"), "final_loss": train_info.get("final_loss"),
        })
    table = markdown_table(rows, ["method", *COLUMNS])
    text = (
        f"# dcd-jax demo\n\nTeacher traces kept: {gen['traces_in_file']} of {gen['generated']} sampled "
        f"({gen['prompts']} prompts). Student: {student['params']:,} parameters.\n\n{table}\n\n"
        "accuracy: greedy pass@1 on held-out problems (95% bootstrap CI); length in tokens; weight_ess: "
        "effective sample size of the token weights / tokens (1 = uniform, SFT); final_loss: mean training loss "
        "over the last 20% of steps (DCD's is weighted, so not comparable to SFT's).\n"
    )
    atomic_write_text(out / "report.md", text)
    import platform

    stage_seconds = sum(json.loads(p.read_text()).get("seconds", 0.0) for p in out.glob("*.done.json"))
    summary = {
        "command": f"dcd-jax demo --scale {scale_name}", "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "wall_minutes": stage_seconds / 60, "traces_kept": gen["traces_in_file"], "traces_sampled": gen["generated"],
        "student_params": student["params"], "rows": rows,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    _plot(out, rows, trained)
    print(text)
    return summary


def _plot(out: Path, rows: list[dict], trained: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dcd_jax.train.metrics import read_metrics

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [r["method"] for r in rows]
    acc = [r["accuracy"] for r in rows]
    err = [[a - r["accuracy_ci"][0] for a, r in zip(acc, rows)], [r["accuracy_ci"][1] - a for a, r in zip(acc, rows)]]
    ax1.bar(names, acc, yerr=err, capsize=4, color=["#888888", "#4C72B0", "#DD8452"][: len(names)])
    ax1.set_ylabel("greedy accuracy (held-out)")
    ax1.set_ylim(0, 1)
    ax1.set_title("embedded task")
    for name in trained:
        metrics = [r for r in read_metrics(out / "runs" / name / "metrics.jsonl") if "nll" in r]
        ax2.plot([r["step"] for r in metrics], [r["nll"] for r in metrics], label=f"{name} (unweighted NLL)")
    ax2.set_xlabel("step")
    ax2.set_ylabel("training NLL of teacher traces")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=120)
    plt.close(fig)
