"""``dcd-jax demo``: the paper's offline pipeline in miniature, in the regime it is about, with no download.

The paper's claim concerns a *pretrained* student distilled on *long* teacher traces whose style it
cannot always follow: imitating a trace the student would not have written teaches it to produce
confident errors that compound along its own prefixes. The demo builds that regime on CPU:

  (a) assets    embedded arithmetic word problems of 2 to 8 operations, each a small fact (careful
                traces ~30-125 tokens, longer with more operations):
                teacher training data, distillation prompts, validation and eval splits; the
                student's pretraining data (shorter problems of 1-4 operations, careful style
                only); tokenizer; a fresh HF checkpoint for the student
  (b) pretrain  the student's base stage: SFT on its pretraining data, exported as an HF checkpoint
                -- it arrives at distillation with its own (careful) style and partial competence,
                as a real base model does (a random-init student is the cold start, see issue 14)
  (c) teacher   the same base trained further, on the distillation task itself (2-8 operations) in a
                mix of styles: careful one-operation lines, compressed multi-operation lines, terse
                expressions. A curriculum: starting from the base stage's short careful problems, a
                tiny teacher beats the student on long problems within the CPU budget (trained from
                scratch it stayed below 0.3 after twice the steps); the student never sees this stage
  (d) traces    sample the teacher on some prompts, keep the correct traces (rejection sampling)
                and measure their style mix (``traces.done.json``)
  (e) distill   the distillation data: with ``distill_data="sampled"`` the kept teacher traces;
                with ``"standin"`` (the default scales) correct programmatic traces in the teacher's
                style mix -- a tiny teacher writes the compressed style correctly less often than the
                careful one, so rejection sampling would shrink the style mismatch DCD corrects
  (f) scores    score the distillation data once with the teacher (cached per-token and top-k log-probs)
  (g) student   convert the pretrained student's HF checkpoint to a dcd-jax model dir, as for a real one
  (h) select    the product's default recipe, step 1 (``dcd-jax data select``): score the traces once
                with the pretrained student and keep the ``DEFAULT_RECIPE.keep_fraction`` whose mean
                student / teacher log-ratio is highest (the traces it could have written)
  (i) sft, selected  distill it with SFT on all traces and with SFT on the selected ones (the
                default recipe, step 2): same steps, same data order seed
  (j) eval      teacher, undistilled student and both distilled students on held-out problems:
                accuracy, accuracy by number of operations, style of the outputs
  (k) report    comparison table, plot PNG, HF-format students, and how far one seed can be trusted:
                the study over rebuilt stages (``bench/results/study.json``) quoted beside it

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
class Recipe:
    """A distillation recipe the demo trains beside SFT."""

    arm: str  # the demo's arm (stage, run dir and table row)
    study_method: str  # its name in bench/study.py
    objective: dict[str, Any]  # the run's `objective` section
    keep_fraction: float | None = None  # `dcd-jax data select --keep-fraction` first (None: every trace)
    description: str = ""


# The product's default recipe (docs/objectives.md, "Which objective to pick"), chosen on the `val`
# split by bench/study.py over stage builds x seeds: SFT on the traces the pretrained student fits best.
DEFAULT_RECIPE = Recipe("selected", "Select", {"weighting": "none"}, keep_fraction=0.5,
                        description="SFT on the traces the pretrained student fits best (dcd-jax data select)")
# The study whose pooled result the report quotes (present in a source checkout, the README's install).
STUDY_JSON = Path(__file__).resolve().parents[1] / "bench" / "results" / "study.json"


@dataclasses.dataclass(frozen=True)
class DemoScale:
    """Sizes of one demo scale (``--scale``)."""

    task: SyntheticTaskConfig  # the distillation task: difficulty and the teacher's style mix
    pretrain_task: SyntheticTaskConfig  # the student's base-stage data (other template, careful style)
    n_prompts: int  # distillation prompts
    n_eval: int  # held-out evaluation problems (split "eval")
    n_val: int  # validation problems (split "val"; the study tunes on it)
    n_sampled_prompts: int  # prompts the teacher samples to measure the style mix it keeps
    teacher_size: str
    student_size: str
    # "pretrained": the teacher continues from the student's base-stage checkpoint (teacher_size must
    # equal student_size); "scratch": its own random-init checkpoint of teacher_size
    teacher_init: str
    teacher_steps: int
    pretrain_steps: int
    student_steps: int
    batch_size: int
    seq_len: int
    teacher_lr: float
    pretrain_lr: float
    student_lr: float
    samples_per_prompt: int
    temperature: float
    max_new_tokens: int
    topk: int
    keep: str = "correct"  # rejection filtering; "all" at micro scale, a plumbing check whose teacher is too small to be right
    distill_data: str = "standin"  # "standin": correct programmatic traces in the teacher's mix; "sampled": kept samples


# Long problems whose every operation is a small fact (operands <= 9, amounts <= 20): a tiny model
# learns the facts fast, so difficulty comes from the number of operations (errors compound over
# lines), not from multi-digit arithmetic (digits are single tokens; big numbers kept the issue-14
# teacher at floor accuracy). Probe: bench/regime_probe.py, bench/results/regime_probe.json.
_LONG = dict(min_steps=2, max_steps=8, max_start=9, max_operand=9, max_value=20, restate=True)
_MIX = {"careful": 0.5, "compressed": 0.35, "terse": 0.15}
# The student's base stage: shorter problems (1-4 operations) of the same narrative, careful style
# only. Its careful lines are then its own (low NLL on the teacher's careful traces, high on the
# compressed ones): the distribution DCD keeps it near. (Pretraining on another narrative, the
# ``ledger`` template, left every trace style equally foreign, ~5 nats/token: nothing to correct.)
_PRETRAIN = dict(_LONG, min_steps=1, max_steps=4, style_mix={"careful": 1.0})
SCALES = {
    "micro": DemoScale(
        task=SyntheticTaskConfig(n_examples=400, style_mix=_MIX, **dict(_LONG, max_steps=4)),
        pretrain_task=SyntheticTaskConfig(n_examples=200, **dict(_PRETRAIN, max_steps=3)),
        n_prompts=48, n_eval=24, n_val=8, n_sampled_prompts=8, teacher_size="micro", student_size="micro",
        teacher_init="pretrained",
        teacher_steps=20, pretrain_steps=10, student_steps=12, batch_size=8, seq_len=256, teacher_lr=1e-2,
        pretrain_lr=1e-2, student_lr=5e-3, samples_per_prompt=2, temperature=1.0, max_new_tokens=48, topk=4, keep="all",
    ),
    "small": DemoScale(
        task=SyntheticTaskConfig(n_examples=20000, style_mix=_MIX, **_LONG),
        pretrain_task=SyntheticTaskConfig(n_examples=8000, **_PRETRAIN),
        n_prompts=1024, n_eval=200, n_val=100, n_sampled_prompts=64, teacher_size="tiny", student_size="tiny",
        teacher_init="pretrained", teacher_steps=600, pretrain_steps=900, student_steps=240, batch_size=8,
        seq_len=512, teacher_lr=3e-3, pretrain_lr=3e-3, student_lr=2e-3, samples_per_prompt=2, temperature=1.0, max_new_tokens=288, topk=8,
    ),
    "full": DemoScale(
        task=SyntheticTaskConfig(n_examples=60000, style_mix=_MIX, **dict(_LONG, max_steps=12)),
        pretrain_task=SyntheticTaskConfig(n_examples=60000, **_PRETRAIN),
        n_prompts=4096, n_eval=512, n_val=256, n_sampled_prompts=256, teacher_size="small", student_size="tiny",
        teacher_init="scratch",
        teacher_steps=4000, pretrain_steps=1500, student_steps=1200, batch_size=32, seq_len=384, teacher_lr=2e-3,
        pretrain_lr=2e-3, student_lr=1e-3, samples_per_prompt=4, temperature=1.0, max_new_tokens=256, topk=16,
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
           scale: DemoScale, seed: int, val_path: Path | None = None, eval_every: int | None = None,
           eval_limit: int = 64) -> dict[str, Any]:
    """Train ``model`` for ``steps``; with ``val_path``, greedy accuracy on (up to ``eval_limit`` of) its
    problems every ``eval_every`` steps (default: every quarter of the run; the learning curve,
    ``val_curve``; each evaluation's outputs under ``<out_dir>/eval_results/``)."""
    from dcd_jax.config import from_dict
    from dcd_jax.train.config import RunConfig
    from dcd_jax.train.loop import TrainHooks, train
    from dcd_jax.train.metrics import read_metrics

    cfg = from_dict(RunConfig, {
        "model": {"path": model, "dtype": "float32"},
        "data": {"seq_len": scale.seq_len, "batch_size": scale.batch_size, "num_epochs": None, "seed": seed, **data},
        "objective": {"chunk_size": 128, **objective},
        "optim": {"lr": lr, "warmup_steps": max(steps // 20, 1), "schedule": "cosine", "final_lr_ratio": 0.1},
        "checkpoint": {"every_steps": max(steps // 4, 1), "keep": 1},
        "train": {"steps": steps, "out_dir": str(out_dir), "log_every": max(steps // 50, 1), "export_hf": True,
                  "seed": seed},
        "eval": {"every_steps": (eval_every or max(steps // 4, 1)) if val_path else 0, "benchmark": "embedded",
                 "path": str(val_path) if val_path else None, "limit": eval_limit, "max_new_tokens": scale.max_new_tokens,
                 "batch_size": 64},
    })
    hooks = TrainHooks()
    if val_path:
        from dcd_jax.eval.runner import train_eval_hook

        hooks = TrainHooks(evaluate=train_eval_hook(cfg.eval, cfg.data, out_dir))
    result = train(cfg, hooks)
    if result.step < steps:  # stopped early (e.g. SIGTERM after a checkpoint): the stage is not done
        raise RuntimeError(f"training in {out_dir} stopped at step {result.step} of {steps}; rerun to resume")
    rows = [r for r in read_metrics(out_dir / "metrics.jsonl") if "loss" in r]
    tail = rows[-max(len(rows) // 5, 1):]
    mean = lambda key: sum(r.get(key, 0.0) for r in tail) / len(tail)
    curve = [{"step": r["step"], "accuracy": r["eval/embedded/pass@1"]} for r in read_metrics(out_dir / "metrics.jsonl")
             if "eval/embedded/pass@1" in r]
    return {"hf": str(out_dir / "hf"), "steps": result.step, "final_loss": mean("loss"),
            "ess_token_frac": mean("ess_token_frac"), "weight_std": mean("weight_std"),
            "tokens_per_second": mean("tokens_per_second"), **({"val_curve": curve} if curve else {})}


def distill_records(task: SyntheticTaskConfig, n_prompts: int) -> list[dict[str, Any]]:
    """The stand-in distillation data: split ``prompts``, every trace correct, in ``task.style_mix``."""
    from dcd_jax.data.synthetic import generate_problems

    return generate_problems(dataclasses.replace(task, split="prompts", n_examples=n_prompts, error_rate=0.0))


def convert_student(hf_dir: Path, out_dir: Path) -> dict[str, Any]:
    """HF checkpoint -> dcd-jax model dir, exactly as for a real student."""
    from dcd_jax.convert import load_hf_params, open_hf_checkpoint, save_model_dir
    from dcd_jax.models.config import ModelConfig

    ckpt = open_hf_checkpoint(hf_dir)
    cfg = ModelConfig.from_hf_config(ckpt.hf_config)
    save_model_dir(out_dir, load_hf_params(ckpt, cfg), cfg, ckpt.hf_config, side_files_from=hf_dir)
    return {"student_flax": str(out_dir), "student_hf": str(hf_dir), "params": cfg.num_params}


def prepare_student(out: str | Path, scale: "str | DemoScale" = "small", kind: str = "competent",
                    seed: int = 0) -> dict[str, str]:
    """A distillation-ready student for the study, after the demo's shared stages (cached):
    ``competent`` (the demo's pretrained student), ``weak`` (the same base stage with a quarter of
    the steps) or ``random`` (no base stage: the cold start). Returns ``{"flax": model dir, "hf": HF dir}``."""
    out = Path(out).absolute()
    s = SCALES[scale] if isinstance(scale, str) else scale
    run_demo(out, scale, seed, distill=False)
    runs, assets = out / "runs", out / "assets"
    if kind == "competent":
        return {"flax": str(out / "student_flax"), "hf": str(runs / "pretrain" / "hf")}
    if kind == "weak":
        run_stage(out, "pretrain_weak", lambda: _train(
            str(assets / "student_init"), {"path": str(assets / "pretrain.jsonl")}, {"weighting": "none"},
            max(s.pretrain_steps // 4, 1), s.pretrain_lr, runs / "pretrain_weak", s, seed))
        run_stage(out, "student_weak", lambda: convert_student(runs / "pretrain_weak" / "hf", out / "student_flax_weak"))
        return {"flax": str(out / "student_flax_weak"), "hf": str(runs / "pretrain_weak" / "hf")}
    if kind == "random":
        run_stage(out, "student_random", lambda: convert_student(assets / "student_init", out / "student_flax_random"))
        return {"flax": str(out / "student_flax_random"), "hf": str(assets / "student_init")}
    raise ValueError(f"kind={kind!r}; expected competent, weak or random")


def run_demo(out: str | Path = "demo_out", scale: "str | DemoScale" = "small", seed: int = 0,
             distill: bool = True) -> dict[str, Any]:
    """Run (or resume) the demo under ``out``; returns the comparison summary (``distill=False``:
    stop after the student conversion, the stages the study shares, and return ``{}``)."""
    from dcd_jax.data.synthetic import build_tokenizer, generate_problems, write_jsonl
    from dcd_jax.eval.weight_diagnostics import style_counts
    from dcd_jax.tiny_models import make_tiny_student

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    s = SCALES[scale] if isinstance(scale, str) else scale
    assets, traces, runs = out / "assets", out / "traces", out / "runs"
    task = dataclasses.replace(s.task, seed=seed)

    def stage_assets():
        tok = build_tokenizer(assets / "tokenizer", seed=seed)
        write_jsonl(generate_problems(task), assets / "teacher_train.jsonl")
        write_jsonl(generate_problems(dataclasses.replace(s.pretrain_task, seed=seed, split="pretrain")),
                    assets / "pretrain.jsonl")
        write_jsonl(distill_records(task, s.n_prompts), assets / "prompts.jsonl")
        write_jsonl(generate_problems(dataclasses.replace(task, split="val", n_examples=s.n_val)), assets / "val.jsonl")
        write_jsonl(generate_problems(dataclasses.replace(task, split="eval", n_examples=s.n_eval)), assets / "eval.jsonl")
        if s.teacher_init == "scratch":
            make_tiny_student(assets / "teacher_init", tok, size=s.teacher_size, seed=seed + 1,
                              max_position_embeddings=1024)
        make_tiny_student(assets / "student_init", tok, size=s.student_size, seed=seed, max_position_embeddings=1024)
        return {"tokenizer_size": len(tok)}

    def stage_pretrain():
        return _train(str(assets / "student_init"), {"path": str(assets / "pretrain.jsonl")}, {"weighting": "none"},
                      s.pretrain_steps, s.pretrain_lr, runs / "pretrain", s, seed)

    def stage_teacher():
        init = runs / "pretrain" / "hf" if s.teacher_init == "pretrained" else assets / "teacher_init"
        trained = _train(str(init), {"path": str(assets / "teacher_train.jsonl")}, {"weighting": "none"},
                         s.teacher_steps, s.teacher_lr, runs / "teacher", s, seed, val_path=assets / "val.jsonl")
        return {"init": str(init), **trained}

    def stage_traces():
        from dcd_jax.teacher.generate import GenerateConfig, generate_traces

        cfg = GenerateConfig(teacher=str(runs / "teacher" / "hf"), prompts=str(assets / "prompts.jsonl"), split="prompts",
                             out=str(traces / "sampled.jsonl"), n=s.samples_per_prompt, temperature=s.temperature,
                             max_new_tokens=s.max_new_tokens, keep=s.keep, seed=seed, limit=s.n_sampled_prompts)
        stats = generate_traces(cfg)
        kept = [json.loads(line)["response"] for line in open(traces / "sampled.jsonl")]
        return {**stats, "kept_style_counts": style_counts(kept)}

    def stage_distill():
        if s.distill_data == "sampled":
            records = [json.loads(line) for line in open(traces / "sampled.jsonl")]
            if not records:
                raise RuntimeError("the teacher produced no correct trace; train it longer (--scale) or check the data")
        else:
            records = distill_records(task, s.n_prompts)
        write_jsonl(records, traces / "train.jsonl")
        return {"source": s.distill_data, "traces": len(records),
                "style_counts": style_counts(r["response"] for r in records)}

    def stage_scores():
        from dcd_jax.data import DataConfig
        from dcd_jax.teacher.scoring import ScoreConfig, score_teacher

        path = score_teacher(DataConfig(path=str(traces / "train.jsonl")),
                             ScoreConfig(teacher=str(runs / "teacher" / "hf"), topk=s.topk, batch_size=16),
                             progress=False)
        return {"scores": str(path)}

    if s.teacher_init == "pretrained" and s.teacher_size != s.student_size:
        raise ValueError(f"teacher_init='pretrained' needs teacher_size == student_size, got {s.teacher_size} "
                         f"and {s.student_size}")
    run_stage(out, "assets", stage_assets)
    pretrain = run_stage(out, "pretrain", stage_pretrain)
    teacher = run_stage(out, "teacher", stage_teacher)
    sampled = run_stage(out, "traces", stage_traces)
    gen = run_stage(out, "distill", stage_distill)
    run_stage(out, "scores", stage_scores)
    # Exactly as a real student: its HF checkpoint (here the pretrained one) through HF -> Flax.
    student = run_stage(out, "student", lambda: convert_student(runs / "pretrain" / "hf", out / "student_flax"))
    if not distill:
        return {}
    data = {"path": str(traces / "train.jsonl"), "teacher_scores": str(traces / "train.teacher.parquet"), "topk": s.topk}

    def stage_select():
        from dcd_jax.data import DataConfig
        from dcd_jax.eval.weight_diagnostics import style_counts
        from dcd_jax.teacher.scoring import ScoreConfig, score_teacher
        from dcd_jax.teacher.selection import select_traces

        scores = score_teacher(DataConfig(path=data["path"]), ScoreConfig(
            teacher=student["student_flax"], topk=0, batch_size=16, out=str(traces / "train.student.parquet")),
            progress=False)
        kept = select_traces(data["path"], scores, data["teacher_scores"], traces / "train_selected.jsonl",
                             keep_fraction=DEFAULT_RECIPE.keep_fraction)
        responses = [json.loads(line)["response"] for line in open(traces / "train_selected.jsonl")]
        return {**kept, "style_counts": style_counts(responses)}

    recipe = DEFAULT_RECIPE
    selection = run_stage(out, "select", stage_select) if recipe.keep_fraction else None
    arms = {"sft": (data, {"weighting": "none"}),
            recipe.arm: ({**data, "path": str(traces / "train_selected.jsonl")} if selection else data, recipe.objective)}
    trained = {
        name: run_stage(out, name, lambda name=name, arm=arm: _train(
            student["student_flax"], arm[0], arm[1], s.student_steps, s.student_lr, runs / name, s, seed))
        for name, arm in arms.items()
    }

    def stage_eval():
        models = {"teacher": teacher["hf"], "student": student["student_hf"], **{n: r["hf"] for n, r in trained.items()}}
        return evaluate_models(models, assets / "eval.jsonl", out / "results", s.max_new_tokens)

    results = run_stage(out, "eval", stage_eval)
    return report(out, results, {"student": pretrain, **trained}, teacher, gen, sampled, student,
                  scale if isinstance(scale, str) else "custom", selection=selection, seed=seed)


def evaluate_models(models: dict[str, str], eval_path: Path, out: Path, max_new_tokens: int, **eval_options) -> dict:
    """Greedy eval of ``models`` on the embedded problems, plus accuracy by number of operations and
    the style of the greedy outputs (read from the generations the eval writes)."""
    from dcd_jax.eval.runner import EvalConfig, run_eval
    from dcd_jax.eval.weight_diagnostics import output_diagnostics

    cfg = EvalConfig(benchmarks=("embedded",), paths={"embedded": str(eval_path)}, max_new_tokens=max_new_tokens,
                     batch_size=256, **eval_options)
    full = run_eval(models, cfg, out)
    steps = {json.loads(line)["id"]: json.loads(line)["num_steps"] for line in open(eval_path)}
    for name in models:
        greedy = [json.loads(line) for line in open(out / "generations" / name / "generations" / "embedded.jsonl")]
        greedy = [g for g in greedy if g["kind"] == "greedy"]
        full["results"][name]["embedded"].update(output_diagnostics(greedy, steps))
    return full


COLUMNS = ("accuracy", "careful_share", "length_mean", "truncation_rate", "repetition_rate", "format_failure_rate",
           "traces", "final_loss")


def _share_text(counts: dict[str, int]) -> str:
    total = max(sum(counts.values()), 1)
    return ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(counts.items()))


def study_verdict(this_diff: float, seed: int, scale_name: str, study_json: Path = STUDY_JSON,
                  stage_seed: int | None = None, method: str | None = None) -> dict[str, Any] | None:
    """How far this one run can be trusted: the study's pooled paired difference of the default recipe
    (Select) to SFT over stage builds x seeds, the range of its runs' differences, and where this run's
    difference falls in it. None when the study's JSON is not there (an installed package).
    ``seed``: the run's data-order seed; ``stage_seed``: the seed its stages were built with
    (default: the same, as in the demo)."""
    stage_seed = seed if stage_seed is None else stage_seed
    method = method or DEFAULT_RECIPE.study_method
    if not study_json.is_file():
        return None
    study = json.loads(study_json.read_text())
    summary = study.get("regimes", {}).get("pertrace", {}).get("summary", {})
    mine = summary.get("methods", {}).get(method, {}).get("eval", {})
    pooled = mine.get("minus_SFT", {}).get("pooled")
    if not pooled:
        return None
    runs = {(r["build"], r["seed"], r["method"]): r["eval"]["accuracy"] for r in study["runs"]
            if r["regime"] == "pertrace" and r["method"] in ("SFT", method)
            and r["setting"] in ("", summary.get("settings", {}).get(method))}
    diffs = [runs[(b, s, method)] - runs[(b, s, "SFT")] for (b, s, m) in runs if m == "SFT" and (b, s, method) in runs]
    same = None  # the study's own run on these stages: its build 0 is the small demo's stages (seed 0)
    if scale_name == "small" and stage_seed == 0 and (0, seed, method) in runs and (0, seed, "SFT") in runs:
        same = runs[(0, seed, method)] - runs[(0, seed, "SFT")]
    return {"method": method, "pooled": pooled, "undistilled": mine.get("minus_undistilled", {}).get("pooled"),
            "runs": len(diffs), "range": [min(diffs), max(diffs)] if diffs else None, "this_run": this_diff,
            "study_same_stages_and_seed": same, "code": study.get("code")}


def _verdict_text(v: dict[str, Any] | None, this_diff: float, seed: int, arm: str) -> str:
    if v is None:
        return (f"One seed: {arm} - sft = {this_diff:+.3f} on this run. One run is one draw of the data "
                "order; bench/study.py gives the paired difference over stage builds x seeds.\n")
    p, u = v["pooled"], v["undistilled"]
    text = (f"One seed: {arm} - sft = {this_diff:+.3f} on this run. How far one run can be trusted: the study over "
            f"{p['builds']} rebuilt stage builds x seeds (bench/results/study.json, {p['runs']} paired runs) puts the "
            f"default recipe at {p['mean']:+.3f} over SFT, 95% CI [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}] "
            f"(hierarchical bootstrap), its runs' differences ranging {v['range'][0]:+.3f} to {v['range'][1]:+.3f}")
    if u:
        text += f"; over the undistilled student {u['mean']:+.3f} [{u['ci'][0]:+.3f}, {u['ci'][1]:+.3f}]"
    if v["study_same_stages_and_seed"] is not None:
        text += (f". These stages are the study's build 0 and this run its seed {seed}, where it measured "
                 f"{v['study_same_stages_and_seed']:+.3f}")
    return text + ".\n"


def report(out: Path, results: dict, trained: dict, teacher: dict, gen: dict, sampled: dict, student: dict,
           scale_name: str = "custom", selection: dict | None = None, seed: int = 0) -> dict[str, Any]:
    """Print the comparison table; write ``report.md``, ``summary.json`` and ``comparison.png``."""
    from dcd_jax.eval.report import markdown_table

    results = results["results"]
    rows = []
    for name in ("teacher", *trained):
        m = results[name]["embedded"]
        train_info = trained.get(name, teacher)
        rows.append({
            "method": name, "accuracy": m["pass@1"], "accuracy_ci": m.get("pass@1_ci"),
            "careful_share": m["style_shares"].get("careful", 0.0), "style_shares": m["style_shares"],
            "accuracy_by_steps": m["accuracy_by_steps"],
            "length_mean": m.get("length_mean"), "truncation_rate": m.get("truncation_rate"),
            "repetition_rate": m.get("repetition_rate"), "format_failure_rate": m.get("format_failure_rate"),
            "traces": (selection or {}).get("kept") if name == DEFAULT_RECIPE.arm and selection else
            gen["traces"] if name in ("sft", DEFAULT_RECIPE.arm) else None,
            "final_loss": train_info.get("final_loss"),
        })
    table = markdown_table([{k: v for k, v in r.items() if k not in ("style_shares", "accuracy_by_steps")}
                            for r in rows], ["method", *COLUMNS])
    steps = sorted({k for r in rows for k in r["accuracy_by_steps"]}, key=int)
    by_steps = markdown_table([{"method": r["method"], **{f"{k} ops": r["accuracy_by_steps"].get(k) for k in steps}}
                               for r in rows], ["method", *[f"{k} ops" for k in steps]])
    standin = gen["source"] == "standin"
    acc = {r["method"]: r["accuracy"] for r in rows}
    arm = DEFAULT_RECIPE.arm
    this_diff = acc.get(arm, 0.0) - acc.get("sft", 0.0)
    verdict = study_verdict(this_diff, seed, scale_name) if arm in acc else None
    text = (
        f"# dcd-jax demo\n\nTeacher samples kept by rejection sampling: {sampled['traces_in_file']} of "
        f"{sampled['generated']} ({sampled['prompts']} prompts); their styles: "
        f"{_share_text(sampled['kept_style_counts'])}.\n"
        f"Distillation data: {gen['traces']} traces, "
        + ("correct programmatic traces in the teacher's style mix, scored by the teacher (stand-in for a teacher "
           "that writes the compressed style correctly)" if standin else "the kept teacher samples")
        + f"; styles: {_share_text(gen['style_counts'])}.\n"
        + (f"Selected (the default recipe, `dcd-jax data select --keep-fraction {selection['keep_fraction']}`): "
           f"{selection['kept']} of {selection['traces']} traces, the ones the pretrained student fits best; styles: "
           f"{_share_text(selection['style_counts'])}.\n" if selection else "")
        + f"Student: {student['params']:,} parameters, pretrained on other problems (careful style) before "
        f"distillation; `student` is it undistilled; `sft`: SFT on all traces; `{arm}`: the default recipe, "
        f"{DEFAULT_RECIPE.description}, same steps.\n\n{table}\n\n"
        + (_verdict_text(verdict, this_diff, seed, arm) + "\n" if arm in acc else "")
        + f"Accuracy by number of operations:\n\n{by_steps}\n\n"
        "accuracy: greedy pass@1 on held-out problems (95% bootstrap CI); careful_share: share of greedy outputs "
        "with one operation per line; length in tokens; traces: distillation traces trained on; final_loss: mean "
        "training loss over the last 20% of steps.\n"
    )
    atomic_write_text(out / "report.md", text)
    import platform

    stage_seconds = {p.name.removesuffix(".done.json"): json.loads(p.read_text()).get("seconds", 0.0)
                     for p in sorted(out.glob("*.done.json"))}
    summary = {
        "command": f"dcd-jax demo --scale {scale_name}", "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "wall_minutes": sum(stage_seconds.values()) / 60, "stage_seconds": stage_seconds,
        "teacher_val_curve": teacher.get("val_curve", []), "teacher_samples_kept": sampled["traces_in_file"],
        "teacher_samples": sampled["generated"], "kept_style_counts": sampled["kept_style_counts"],
        "distill_source": gen["source"], "distill_traces": gen["traces"], "distill_style_counts": gen["style_counts"],
        "student_params": student["params"], "rows": rows,
        "selection": {k: v for k, v in (selection or {}).items() if k != "seconds"},
        "verdict": verdict, "default_arm": arm, "default_minus_sft": this_diff if arm in acc else None,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    _plot(out, rows, {k: v for k, v in trained.items() if k in ("sft", arm)})
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
    ax1.bar(names, acc, yerr=err, capsize=4, color=["#888888", "#4C72B0", "#55A868", "#DD8452"][: len(names)])
    ax1.set_ylabel("greedy accuracy (held-out)")
    ax1.set_ylim(0, 1)
    ax1.set_title("embedded task")
    for name in trained:
        metrics = [r for r in read_metrics(out / "runs" / name / "metrics.jsonl") if "nll" in r]
        ax2.plot([r["step"] for r in metrics], [r["nll"] for r in metrics], label=f"{name}")
    ax2.set_xlabel("step")
    ax2.set_ylabel("training NLL of its traces")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=120)
    plt.close(fig)
