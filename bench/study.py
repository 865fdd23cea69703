"""The weighting study over rebuilt stages: stage builds x data-order seeds, per distillation regime.

    python bench/study.py [--regime pertrace] [--builds 0,1,2] [--seeds 0,1,2] [--work study_out]
    python bench/study.py --report-only                # rewrite the JSON, plot and tables from the cache
    python bench/study.py --restore-runs bench/results/study.json   # extend the committed study elsewhere

A *build* is every upstream stage of the demo made again with its own seed: the task's problems,
tokenizer and fresh student, the student's pretraining, the teacher, its traces, the distillation
data and the teacher's cached scores (``dcd_jax.demo``; build 0 of the ``pertrace`` regime is the
demo's own stages). A *seed* is the data order of a distillation run. Every method of a build sees
the same cached teacher scores, the same steps and learning rate, and the seed's data order.

Methods (:data:`METHODS`; :data:`DEFAULT_METHODS` run by default): SFT; the style-oracle filter
(SFT on the traces :func:`~dcd_jax.data.synthetic.classify_style` calls careful: an oracle a user
does not have); Select (SFT on the traces the pretrained student fits best by their mean student /
teacher log-ratio, :mod:`dcd_jax.teacher.selection`, ``dcd-jax data select``: what a user can run;
its keep fraction is chosen on ``val`` of build 0, seed 0); the paper's token-level DCD (``dcd``) and
the prefix-mean ``dcd_prefix``. ``DCD-seq`` (``dcd_sequence``: the trace-mean log-ratio of the
*current* student as a weight) is a diagnostic run at build 0, seed 0 only.

Every run is evaluated greedily on ``val`` (the product's default is chosen there) and on ``eval``
(what is reported). Paired differences against SFT and against the undistilled student come with a
hierarchical bootstrap CI (resample builds, then seeds within each drawn build), and per build with
a bootstrap over its seeds. Each build also records what the pretrained student and the teacher
make of the distillation traces at step 0 (NLL by trace style, token-DCD weight by style).

Finished runs are JSON files under ``<work>/runs/`` and are never rerun; several processes may
run different builds at once (``--builds 1`` beside ``--builds 2``): the study JSON is rewritten
from every cached run after each run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from experiment import code_version, line_statistics, merge, score_records, summarize_eval  # noqa: E402

# The distillation regimes: overrides of the demo task (the teacher is trained on, and the
# distillation data drawn from, the regime's task). ``pertrace``: each trace in one style (the demo);
# ``withintrace``: every trace mixes careful and compressed lines (no whole-trace filter removes the hard
# lines); ``errors``: the demo's mix, 30% of traces with one wrong intermediate line that still reach
# the right answer. A regime changes the task only, so the student's base stage (pretrain) is the same
# in every regime of a build and is shared (:func:`share_pretrain`).
REGIMES = {"pertrace": {}, "withintrace": {"style_mix": {"mixed": 1.0}}, "errors": {"intermediate_error_rate": 0.3}}
# The regime whose build-0 val sweeps choose the swept settings of the others (one tuning, on val).
TUNED_ON = "pertrace"
# name -> (objective, data): data "all" = the scored distillation traces, "careful" = the oracle filter.
# "select": SFT on the traces the pretrained student fits best (dcd_jax.teacher.selection; the keep
# fraction is the run's setting, chosen on val).
METHODS = {
    "SFT": ({"loss": "ce", "weighting": "none"}, "all"),
    "Oracle-filter": ({"loss": "ce", "weighting": "none"}, "careful"),
    "Select": ({"loss": "ce", "weighting": "none"}, "select"),
    "DCD-CE": ({"loss": "ce", "weighting": "dcd"}, "all"),
    "DCD-prefix": ({"loss": "ce", "weighting": "dcd_prefix"}, "all"),
    "DCD-seq": ({"loss": "ce", "weighting": "dcd_sequence"}, "all"),
    # What the diagnosis points to (token DCD discounts compressed lines far less than DCD-prefix): a
    # sharper token weight; and the same comparison on the teacher's top-k distribution.
    "DCD-CE-tau0.5": ({"loss": "ce", "weighting": "dcd", "dcd": {"tau": 0.5}}, "all"),
    "KL": ({"loss": "kl", "weighting": "none"}, "all"),
    "DCD-prefix-KL": ({"loss": "kl", "weighting": "dcd_prefix"}, "all"),
    # The on-policy reference: online GKD (the live teacher scores every batch, half of them the
    # student's own samples) for as many steps as fit in an SFT run's wall time (gkd_calibration).
    "GKD-wall": ({"loss": "gkd", "weighting": "none", "gkd": {"lmbda": 0.5, "beta": 0.5, "teacher_dtype": "float32"}},
                 "all"),
}
CALIBRATION_STEPS = 40
DEFAULT_METHODS = ("SFT", "Oracle-filter", "Select", "DCD-CE", "DCD-prefix")
# Validation sweeps (build 0, seed 0, split val), one per method with a setting: the selection's keep
# fraction, and the trace-level weighting's sigmoid temperature (a diagnostic: its weights drift).
SWEEPS = {"Select": {"keep0.3": {}, "keep0.5": {}},
          "DCD-seq": {"tau0.5": {"dcd": {"tau": 0.5}}, "tau1": {}, "tau2": {"dcd": {"tau": 2.0}}}}
REFERENCES = ("SFT", "undistilled")


def hierarchical_bootstrap(diffs: dict[int, list[float]], *, n_boot: int = 10000, seed: int = 0) -> dict:
    """Mean paired difference over builds (each build the mean over its seeds) with a 95% CI from a
    two-level bootstrap: draw builds with replacement, then seeds with replacement within each
    drawn build; the statistic is the mean over drawn builds of their drawn seeds' mean.

    ``diffs``: ``{build: [difference per seed]}``.
    """
    builds = sorted(b for b in diffs if diffs[b])
    if not builds:
        return {}
    rng = random.Random(seed)
    boots = []
    for _ in range(n_boot):
        drawn = rng.choices(builds, k=len(builds))
        boots.append(statistics.fmean(statistics.fmean(rng.choices(diffs[b], k=len(diffs[b]))) for b in drawn))
    boots.sort()
    per_build = {b: statistics.fmean(diffs[b]) for b in builds}
    flat = [d for b in builds for d in diffs[b]]
    return {"mean": statistics.fmean(per_build.values()), "ci": [boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1]],
            "builds": len(builds), "runs": len(flat), "positive": sum(d > 0 for d in flat),
            "builds_positive": sum(v > 0 for v in per_build.values()), "per_build": per_build}


def seed_bootstrap(diffs: list[float], *, n_boot: int = 10000, seed: int = 0) -> dict:
    """Mean of one build's per-seed differences and its 95% bootstrap CI over seeds."""
    return {k: v for k, v in hierarchical_bootstrap({0: diffs}, n_boot=n_boot, seed=seed).items()
            if k in ("mean", "ci", "runs", "positive")}


def build_dir(work: Path, regime: str, build: int) -> Path:
    return work / f"{regime}-b{build}"


def build_scale(regime: str):
    from dcd_jax.demo import SCALES

    scale = SCALES["small"]
    return dataclasses.replace(scale, task=dataclasses.replace(scale.task, **REGIMES[regime])) if REGIMES[regime] else scale


def share_pretrain(work: Path, regime: str, build: int) -> Path | None:
    """Reuse build ``build``'s student base stage from :data:`TUNED_ON` in another regime: copy its
    ``runs/pretrain`` and stage marker before the stages run (the pretraining data, tokenizer and
    initial student depend on the build's seed only; :func:`check_shared_pretrain` verifies it)."""
    import shutil

    src, dst = build_dir(work, TUNED_ON, build), build_dir(work, regime, build)
    if regime == TUNED_ON or not (src / "pretrain.done.json").is_file() or (dst / "pretrain.done.json").is_file():
        return None
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / "runs" / "pretrain", dst / "runs" / "pretrain", dirs_exist_ok=True)
    shutil.copy2(src / "pretrain.done.json", dst / "pretrain.done.json")
    return src


SHARED_INPUTS = ("assets/pretrain.jsonl", "assets/tokenizer/tokenizer.json", "assets/student_init/model-00001-of-00001.safetensors")


def check_shared_pretrain(work: Path, regime: str, build: int) -> None:
    """Raise unless the inputs of a shared base stage are byte-identical to those it was trained on."""
    import hashlib

    src, dst = build_dir(work, TUNED_ON, build), build_dir(work, regime, build)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    differ = [f for f in SHARED_INPUTS if digest(src / f) != digest(dst / f)]
    if differ:
        raise RuntimeError(f"{dst}: the shared base stage was trained on other inputs ({', '.join(differ)})")


def run_name(regime: str, build: int, method: str, setting: str, seed: int) -> str:
    return f"{regime}-b{build}-{method}{'-' + setting if setting else ''}-seed{seed}"


def careful_only(traces: Path) -> Path:
    """The style-oracle filter: the distillation traces whose style is careful (written once)."""
    from dcd_jax.data.synthetic import classify_style

    out = traces / "train_careful.jsonl"
    if not out.is_file():
        kept = [line for line in open(traces / "train.jsonl") if classify_style(json.loads(line)["response"]) == "careful"]
        tmp = out.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        tmp.rename(out)
    return out


def selected(bdir: Path, brec: dict, keep_fraction: float) -> Path:
    """The traces the pretrained student fits best (:mod:`dcd_jax.teacher.selection`), written once."""
    from dcd_jax.teacher.selection import select_traces

    traces = bdir / "traces"
    out = traces / f"train_select{keep_fraction:g}.jsonl"
    if not out.is_file():
        scores = bdir / "study_select" / "student.parquet"
        if not scores.is_file():
            records = [json.loads(line) for line in open(traces / "train.jsonl")]
            scores = score_records(brec["student_flax"], records, bdir / "study_select")
        select_traces(traces / "train.jsonl", scores, traces / "train.teacher.parquet", out, keep_fraction=keep_fraction)
    return out


def eval_split(model: str, bdir: Path, split: str, out: Path, scale) -> dict:
    from dcd_jax.demo import evaluate_models

    ev = evaluate_models({"m": model}, bdir / "assets" / f"{split}.jsonl", out, scale.max_new_tokens)
    summary = summarize_eval(ev["results"]["m"]["embedded"])
    summary.update(line_statistics(out / "generations" / "m" / "generations" / "embedded.jsonl"))
    return summary


# Weightings whose weights the study recomputes offline (by trace style, position and token class).
DIAGNOSED = ("dcd", "dcd_prefix", "dcd_sequence")


def diagnostic_records(bdir: Path, n: int = 256) -> tuple[list[dict], dict, dict]:
    """The first ``n`` distillation traces of a build, the class of each of their response tokens and
    the kind of line each sits on."""
    from transformers import AutoTokenizer

    from dcd_jax.data import DataConfig
    from dcd_jax.eval.weight_diagnostics import record_line_kinds, record_token_classes

    records = [json.loads(line) for line in open(bdir / "traces" / "train.jsonl")][:n]
    tokenizer = AutoTokenizer.from_pretrained(bdir / "assets" / "tokenizer")
    data_cfg = DataConfig(path=str(bdir / "traces" / "train.jsonl"))
    return records, record_token_classes(records, tokenizer, data_cfg), record_line_kinds(records, tokenizer, data_cfg)


def build_record(work: Path, regime: str, build: int) -> dict:
    """A build's stages, baselines and step-0 diagnostics (cached as ``<build dir>/study_build.json``)."""
    from dcd_jax.config import from_dict
    from dcd_jax.demo import prepare_student
    from dcd_jax.eval.weight_diagnostics import weight_diagnostics
    from dcd_jax.objectives.config import ObjectiveConfig

    bdir = build_dir(work, regime, build)
    marker = bdir / "study_build.json"
    scale = build_scale(regime)
    if not marker.is_file() and regime != TUNED_ON:
        if not (build_dir(work, TUNED_ON, build) / "pretrain.done.json").is_file():
            build_record(work, TUNED_ON, build)  # its base stage is shared
        share_pretrain(work, regime, build)
    student = prepare_student(bdir, scale, "competent", seed=build)  # the demo's stages, cached
    if marker.is_file():
        return json.loads(marker.read_text())
    if regime != TUNED_ON:
        check_shared_pretrain(work, regime, build)
    teacher = bdir / "runs" / "teacher" / "hf"
    rec = {"regime": regime, "build": build, "student_flax": student["flax"], "student_hf": student["hf"],
           "teacher_hf": str(teacher), **({"pretrain_shared_with": f"{TUNED_ON}-b{build}"} if regime != TUNED_ON else {})}
    for name, model in (("teacher", str(teacher)), ("undistilled", student["hf"])):
        rec[name] = {split: eval_split(model, bdir, split, bdir / "study_baselines" / f"{name}-{split}", scale)
                     for split in ("eval", "val")}
    distill = json.loads((bdir / "distill.done.json").read_text())
    sampled = json.loads((bdir / "traces.done.json").read_text())
    teacher_done = json.loads((bdir / "teacher.done.json").read_text())
    rec["distill_data"] = {"traces": distill["traces"], "style_counts": distill["style_counts"]}
    rec["teacher_samples"] = {"kept": sampled["traces_in_file"], "sampled": sampled["generated"],
                              "kept_style_counts": sampled["kept_style_counts"]}
    rec["teacher_val_curve"] = teacher_done.get("val_curve", [])
    # Step 0: the pretrained student's and the teacher's NLL of the traces by style and by token class,
    # and the weights of each DCD weighting.
    records, classes, kinds = diagnostic_records(bdir)
    scores = score_records(student["flax"], records, bdir / "study_diag")
    teacher_scores = bdir / "traces" / "train.teacher.parquet"
    teacher_nll = weight_diagnostics(from_dict(ObjectiveConfig, {"weighting": "none"}), records, teacher_scores,
                                     teacher_scores)
    rec["step0"] = {"teacher_nll_by_style": teacher_nll["student_nll_by_style"], "weights": {
        w: weight_diagnostics(from_dict(ObjectiveConfig, {"weighting": w}), records, scores, teacher_scores, classes,
                              kinds)
        for w in DIAGNOSED}}
    marker.write_text(json.dumps(rec, indent=2))
    return rec


def gkd_calibration(work: Path, regime: str, build: int, brec: dict, steps: int, lr: float) -> dict:
    """How many GKD steps take the wall time of ``steps`` SFT steps, measured side by side on this
    host (short SFT and GKD runs back to back, :data:`CALIBRATION_STEPS` each): a run's wall time is
    ``c + n * s`` (``s``: mean step time after the first three steps; ``c``: the rest, compilation
    included), so ``n_GKD = (c_SFT + steps * s_SFT - c_GKD) / s_GKD``. Cached as
    ``<build dir>/gkd_calibration.json``."""
    from dcd_jax.demo import _train
    from dcd_jax.train.metrics import read_metrics

    bdir = build_dir(work, regime, build)
    marker = bdir / "gkd_calibration.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    scale = build_scale(regime)
    out = {"calibration_steps": CALIBRATION_STEPS}
    for name, method in (("SFT", "SFT"), ("GKD", "GKD-wall")):
        objective, data = run_objective(method, bdir, brec, scale)
        run_dir = bdir / "gkd_calibration" / name
        _train(brec["student_flax"], data, objective, CALIBRATION_STEPS, lr, run_dir, scale, 0)
        out[name] = wall_model([r for r in read_metrics(run_dir / "metrics.jsonl") if "cost/wall_seconds" in r])
    out.update(matched_steps(out["SFT"], out["GKD"], steps))
    marker.write_text(json.dumps(out, indent=2))
    return out


def wall_model(rows: list[dict]) -> dict:
    """``wall(n) = c + n * s`` from a run's logged rows (one per step): ``s`` the mean step time after
    the first three steps, ``c`` the rest of the last row's cumulative wall time."""
    step_s = statistics.fmean(r["step_seconds"] for r in rows if r["step"] > 3)
    return {"step_seconds": step_s, "overhead_seconds": rows[-1]["cost/wall_seconds"] - step_s * rows[-1]["step"],
            "wall_seconds": rows[-1]["cost/wall_seconds"]}


def matched_steps(sft: dict, gkd: dict, steps: int) -> dict:
    """GKD's steps within the wall time of ``steps`` SFT steps, both by :func:`wall_model`."""
    wall = sft["overhead_seconds"] + steps * sft["step_seconds"]
    return {"sft_wall_seconds_at_steps": wall,
            "gkd_steps": max(1, int((wall - gkd["overhead_seconds"]) / gkd["step_seconds"]))}


def run_objective(method: str, bdir: Path, brec: dict, scale) -> tuple[dict, dict]:
    """A method's objective and data in build ``bdir`` (the scored traces; GKD: the traces only, its
    teacher live)."""
    objective, _ = METHODS[method]
    traces = bdir / "traces"
    data = {"path": str(traces / "train.jsonl"), "teacher_scores": str(traces / "train.teacher.parquet"),
            "topk": scale.topk}
    if objective["loss"] == "gkd":
        objective = merge(objective, {"gkd": {"teacher_path": brec["teacher_hf"], "max_new_tokens": scale.max_new_tokens}})
        data = {"path": data["path"]}
    return objective, data


def run_inputs(work: Path, regime: str, build: int, method: str, setting: str, brec: dict, steps: int, lr: float,
               overrides: dict) -> tuple[dict, dict, int]:
    """(objective, data, steps) of one run of the study: its method's objective with the setting's
    overrides, the method's data (all traces, careful only, or the selected ones) and its steps."""
    bdir = build_dir(work, regime, build)
    objective, data = run_objective(method, bdir, brec, build_scale(regime))
    data_kind = METHODS[method][1]
    traces = bdir / "traces"
    if method == "GKD-wall":
        steps = gkd_calibration(work, regime, build, brec, steps, lr)["gkd_steps"]
    if data_kind == "careful":
        data = {"path": str(careful_only(traces))}
    if data_kind == "select":
        data = {**data, "path": str(selected(bdir, brec, float(setting.removeprefix("keep"))))}
    return merge(objective, overrides), data, steps


def train_run(work: Path, regime: str, build: int, method: str, setting: str, seed: int, brec: dict,
              steps: int, lr: float, overrides: dict) -> dict:
    """One distillation run, evaluated on val and eval (cached as ``<work>/runs/<name>.json``)."""
    from dcd_jax.demo import _train

    name = run_name(regime, build, method, setting, seed)
    marker = work / "runs" / f"{name}.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    bdir = build_dir(work, regime, build)
    scale = build_scale(regime)
    objective, data, steps = run_inputs(work, regime, build, method, setting, brec, steps, lr, overrides)
    data_kind = METHODS[method][1]
    traces = bdir / "traces"
    run_dir = work / "runs" / name
    t0 = time.time()
    trained = _train(brec["student_flax"], data, objective, steps, lr, run_dir, scale, seed)
    from dcd_jax.train.cost import run_cost

    result = {"regime": regime, "build": build, "method": method, "setting": setting, "seed": seed,
              "objective": objective, "data": data_kind, "train": trained, "cost": run_cost(run_dir / "metrics.jsonl"),
              "val": eval_split(trained["hf"], bdir, "val", run_dir / "results_val", scale),
              "eval": eval_split(trained["hf"], bdir, "eval", run_dir / "results", scale)}
    if objective["weighting"] in DIAGNOSED:  # what its weights emphasize at the end of training
        from dcd_jax.config import from_dict
        from dcd_jax.eval.weight_diagnostics import weight_diagnostics
        from dcd_jax.objectives.config import ObjectiveConfig

        records, classes, kinds = diagnostic_records(bdir)
        scores = score_records(trained["hf"], records, run_dir / "diag_after")
        result["weights_after"] = weight_diagnostics(from_dict(ObjectiveConfig, objective), records, scores,
                                                     traces / "train.teacher.parquet", classes, kinds)
    result["seconds"] = round(time.time() - t0, 1)
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.rename(marker)
    return json.loads(marker.read_text())


def check_weights(work: Path, regime: str, build: int, brec: dict, batches: int = 3) -> dict:
    """Rule out a defect in the weights: on the build's real distillation batches, the statistics of
    the token-DCD weights the jitted train step computes (its metrics, on the parameters it starts
    from: the pretrained student's, then after one and two updates) equal a float64 recomputation
    from the model's full logits and the batch's cached teacher log-probs (``w = sigmoid(l)``, ``l = log p_S(y_t) - log p_T(y_t)``, divided
    by its mean over the batch's response tokens). Cached as ``<build dir>/weight_check.json``."""
    import jax
    import numpy as np

    from dcd_jax.config import from_dict
    from dcd_jax.models import bind
    from dcd_jax.train.batch import to_global_batch
    from dcd_jax.train.config import RunConfig
    from dcd_jax.train.loop import build_run

    bdir = build_dir(work, regime, build)
    marker = bdir / "weight_check.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    scale = build_scale(regime)
    traces = bdir / "traces"
    cfg = from_dict(RunConfig, {
        "model": {"path": brec["student_flax"], "dtype": "float32"},
        "data": {"seq_len": scale.seq_len, "batch_size": scale.batch_size, "num_epochs": None, "seed": 0,
                 "path": str(traces / "train.jsonl"), "teacher_scores": str(traces / "train.teacher.parquet"),
                 "topk": scale.topk},
        "objective": {"chunk_size": 128, "weighting": "dcd"},
        "train": {"steps": 10, "out_dir": str(bdir / "weight_check_run"), "progress": False},
    })
    mesh = cfg.mesh.make()
    run = build_run(cfg, mesh, {})
    out = []
    with jax.set_mesh(mesh):
        for _ in range(batches):
            local = next(run.data_iter)
            model = bind(run.graphdef, run.state["params"])  # the parameters this step's weights are computed with
            logits = np.asarray(model(local["input_ids"], local["positions"], local["segment_ids"]), np.float64)
            run.state, metrics = run.step_fn(run.state, to_global_batch(local, mesh, 1))  # the state is donated
            logits = logits[..., : run.true_vocab]
            logp = logits - logits.max(-1, keepdims=True)
            logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
            target = np.take_along_axis(logp, local["targets"][..., None].astype(np.int64), -1)[..., 0]
            mask = (local["loss_mask"] > 0) & (local["segment_ids"] > 0)
            ratio = target - local["teacher_logprobs"].astype(np.float64)
            w = 1.0 / (1.0 + np.exp(-ratio[mask]))
            w = w / w.mean()
            ref = {"log_ratio_mean": ratio[mask].mean(), "weight_std": w.std(), "weight_min": w.min(),
                   "weight_max": w.max(), "nll": -target[mask].mean(), "tokens": float(mask.sum())}
            got = {k: float(metrics[k]) for k in ref}
            out.append({"jitted": got, "float64": {k: float(v) for k, v in ref.items()},
                        "max_rel_diff": max(abs(got[k] - ref[k]) / max(abs(ref[k]), 1e-6) for k in ref)})
    result = {"batches": out, "max_rel_diff": max(b["max_rel_diff"] for b in out)}
    marker.write_text(json.dumps(result, indent=2))
    return result


def chosen_setting(runs: list[dict], regime: str, method: str = "DCD-seq") -> str | None:
    """The ``SWEEPS[method]`` entry with the best val accuracy on build 0, seed 0 of :data:`TUNED_ON`
    (every regime uses that choice; ties: the middle entry, i.e. ``tau1`` / ``keep0.5``); None until
    the sweep has run."""
    regime = TUNED_ON
    sweep = {r["setting"]: r["val"]["accuracy"] for r in runs
             if r["regime"] == regime and r["build"] == 0 and r["seed"] == 0 and r["method"] == method}
    if set(sweep) != set(SWEEPS[method]):
        return None
    middle = list(SWEEPS[method])[len(SWEEPS[method]) // 2]
    best = max(sweep.values())
    return middle if sweep[middle] == best else max(sweep, key=sweep.get)



def main_runs(runs: list[dict], regime: str, settings: dict) -> list[dict]:
    """The runs of the comparison: every method, a swept method at its chosen setting only."""
    return [r for r in runs if r["regime"] == regime and (r["method"] not in SWEEPS or r["setting"] == settings.get(r["method"]))]


def summarize(runs: list[dict], builds: dict, regime: str) -> dict:
    """Per method: mean of every metric; paired differences (eval and val) against SFT and against
    the undistilled student, pooled over builds (hierarchical bootstrap) and per build."""
    settings = {m: chosen_setting(runs, regime, m) for m in SWEEPS}
    rows = main_runs(runs, regime, settings)
    out: dict = {"settings": settings, "sweeps": {m: {r["setting"]: r["val"]["accuracy"] for r in runs
                                                      if r["regime"] == regime and r["build"] == 0 and r["seed"] == 0
                                                      and r["method"] == m} for m in SWEEPS},
                 "methods": {}}
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        m: dict = {"runs": len(mine)}
        for split in ("eval", "val"):
            m[split] = {k: statistics.fmean(r[split][k] for r in mine)
                        for k in ("accuracy", "careful_share", "length_mean", "truncation_rate", "lines_per_output",
                                  "multi_op_line_share")}
            m[split]["accuracy_sd"] = statistics.pstdev(r[split]["accuracy"] for r in mine) if len(mine) > 1 else 0.0
            for ref in REFERENCES:
                diffs: dict[int, list[float]] = {}
                for r in mine:
                    if ref == "undistilled":
                        base = builds.get(r["build"], {}).get("undistilled", {}).get(split, {}).get("accuracy")
                    else:
                        base = next((s[split]["accuracy"] for s in rows if s["method"] == ref and s["build"] == r["build"]
                                     and s["seed"] == r["seed"]), None)
                    if base is not None and not (ref == method):
                        diffs.setdefault(r["build"], []).append(r[split]["accuracy"] - base)
                if diffs:
                    m[split][f"minus_{ref}"] = {"pooled": hierarchical_bootstrap(diffs),
                                                "by_build": {b: seed_bootstrap(d) for b, d in sorted(diffs.items())}}
        m["by_build"] = {b: {"eval": statistics.fmean(r["eval"]["accuracy"] for r in mine if r["build"] == b),
                             "val": statistics.fmean(r["val"]["accuracy"] for r in mine if r["build"] == b),
                             "per_seed_eval": {r["seed"]: r["eval"]["accuracy"] for r in mine if r["build"] == b},
                             "careful_share": statistics.fmean(r["eval"]["careful_share"] for r in mine
                                                               if r["build"] == b)}
                         for b in sorted({r["build"] for r in mine})}
        out["methods"][method] = m
    ranked = sorted(out["methods"], key=lambda k: out["methods"][k]["val"]["accuracy"], reverse=True)
    out["ranking_by_val"] = ranked
    out["decision"] = decide(rows, out["methods"])
    return out


# What a user can run (the oracle reads style labels a user does not have).
CANDIDATES = ("SFT", "Select", "DCD-CE", "DCD-prefix")
DECISION_RULE = ("the candidate (not the oracle) with the largest pooled paired val difference to SFT (each run paired "
                 "with SFT's run of the same build and seed, builds weighted equally); when its paired val difference "
                 "to the runner-up (on the runs both have) has a 95% CI that includes 0, the one of the two whose "
                 "worst run on val is better")


def decide(rows: list[dict], methods: dict) -> dict:
    """The product's default by :data:`DECISION_RULE`, on the val split only."""
    def paired_val(a: str, b: str) -> dict:
        diffs: dict[int, list[float]] = {}
        for r in rows:
            if r["method"] == a:
                other = next((x for x in rows if x["method"] == b and x["build"] == r["build"] and x["seed"] == r["seed"]),
                             None)
                if other is not None:
                    diffs.setdefault(r["build"], []).append(r["val"]["accuracy"] - other["val"]["accuracy"])
        return hierarchical_bootstrap(diffs)

    over_sft = {m: paired_val(m, "SFT") for m in CANDIDATES if m in methods and m != "SFT"}
    means = {m: p["mean"] for m, p in over_sft.items() if p}
    means["SFT"] = 0.0
    if len(means) < 2:
        return {}
    first, second = sorted(means, key=means.get, reverse=True)[:2]
    paired = paired_val(first, second)
    worst = {m: min(r["val"]["accuracy"] for r in rows if r["method"] == m) for m in (first, second)}
    tie = bool(paired) and paired["ci"][0] <= 0.0 <= paired["ci"][1]
    pick = (first if worst[first] >= worst[second] else second) if tie else first
    return {"rule": DECISION_RULE, "val_minus_sft": means, "first": first, "runner_up": second,
            "first_minus_runner_up_val": paired, "worst_val": worst, "tie": tie, "pick": pick}


def diagnose(work: Path) -> dict:
    """Token-DCD's weights by trace style x token class and by kind of line, recomputed from the
    cached per-token scores: the pretrained student's (step 0, each build) and each DCD-CE and
    DCD-prefix run's final student's (each with its own weighting). Written to
    ``<work>/diagnostics.json``, which :func:`write_results` merges into the study JSON."""
    from dcd_jax.config import from_dict
    from dcd_jax.eval.weight_diagnostics import weight_diagnostics
    from dcd_jax.objectives.config import ObjectiveConfig

    cfg = from_dict(ObjectiveConfig, {"weighting": "dcd"})
    runs, builds = collect(work)
    out: dict = {}
    for regime, recs in builds.items():
        for build in recs:
            bdir = build_dir(work, regime, build)
            records, classes, kinds = diagnostic_records(bdir)
            teacher = bdir / "traces" / "train.teacher.parquet"
            key = f"{regime}-b{build}"
            out[key] = {"step0": weight_diagnostics(cfg, records, bdir / "study_diag" / "student.parquet", teacher,
                                                    classes, kinds)}
            for r in runs:
                scores = work / "runs" / run_name(regime, build, r["method"], r["setting"], r["seed"]) / "diag_after" / \
                    "student.parquet"
                if r["regime"] == regime and r["build"] == build and r["method"] in ("DCD-CE", "DCD-prefix") \
                        and scores.is_file():
                    out[key][f"{r['method']} seed {r['seed']}"] = {
                        **weight_diagnostics(from_dict(ObjectiveConfig, r["objective"]), records, scores, teacher,
                                             classes, kinds),
                        "eval_accuracy": r["eval"]["accuracy"], "careful_share": r["eval"]["careful_share"]}
    (work / "diagnostics.json").write_text(json.dumps(out, indent=1))
    return out


def anatomy(work: Path) -> dict:
    """Where each run's (and each build's teacher's and undistilled student's) greedy eval outputs go
    wrong (:func:`~dcd_jax.eval.weight_diagnostics.error_shares`), from their cached generations.
    Written to ``<work>/anatomy.json``, which :func:`write_results` merges into the study JSON."""
    from dcd_jax.eval.weight_diagnostics import error_shares

    def shares(path: Path) -> dict | None:
        return error_shares([json.loads(line) for line in open(path)]) if path.is_file() else None

    generations = Path("generations") / "m" / "generations" / "embedded.jsonl"
    out: dict = {"runs": {}, "baselines": {}}
    for p in sorted((work / "runs").glob("*.json")):
        found = shares(work / "runs" / p.stem / "results" / generations)
        if found is not None:
            out["runs"][p.stem] = found
    for p in sorted(work.glob("*-b*/study_build.json")):
        for who in ("teacher", "undistilled"):
            found = shares(p.parent / "study_baselines" / f"{who}-eval" / generations)
            if found is not None:
                out["baselines"][f"{p.parent.name}-{who}"] = found
    (work / "anatomy.json").write_text(json.dumps(out, indent=1))
    return out


def collect(work: Path) -> tuple[list[dict], dict]:
    runs = [json.loads(p.read_text()) for p in sorted((work / "runs").glob("*.json"))]
    builds = {}
    for p in sorted(work.glob("*-b*/study_build.json")):
        rec = json.loads(p.read_text())
        if (p.parent / "weight_check.json").is_file():
            rec["weight_check"] = json.loads((p.parent / "weight_check.json").read_text())
        builds.setdefault(rec["regime"], {})[rec["build"]] = rec
    return runs, builds


def study_command(runs: list[dict]) -> str:
    """The invocations that make the cached runs (one per group of builds planned alike; the build-0
    val sweeps of the methods that have one come with them)."""
    plans: dict = {}
    for reg in sorted({r["regime"] for r in runs}):
        for build in sorted({r["build"] for r in runs if r["regime"] == reg}):
            by_seeds: dict = {}
            for method in METHODS:
                seeds = tuple(sorted({r["seed"] for r in runs if r["regime"] == reg and r["build"] == build
                                      and r["method"] == method and (method != "DCD-seq")}))
                if seeds:
                    by_seeds.setdefault(seeds, []).append(method)
            for seeds, methods in by_seeds.items():
                plans.setdefault((reg, seeds, tuple(methods)), []).append(build)
    return " && ".join(
        f"python bench/study.py --regime {reg} --builds {','.join(map(str, builds))} --seeds {','.join(map(str, seeds))}"
        + ("" if methods == DEFAULT_METHODS else f" --methods {','.join(methods)}")
        for (reg, seeds, methods), builds in plans.items())


def write_results(out: Path, work: Path, args, code: str) -> dict:
    runs, builds = collect(work)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    result = {
        "command": study_command(runs) or f"python bench/study.py --regime {args.regime}",
        "code": previous.get("code") if previous.get("code", "").endswith(code) else
        (f"{previous['code']}, resumed at {code}" if previous.get("code") else code),
        "steps": args.steps, "lr": args.lr, "sweeps": SWEEPS,
        "methods": {k: {"objective": v[0], "data": v[1]} for k, v in METHODS.items()},
        "regimes": {reg: {"task_overrides": REGIMES.get(reg, {}),
                          "builds": {str(b): {k: v for k, v in rec.items() if k not in ("student_flax", "student_hf",
                                                                                           "teacher_hf")}
                                     for b, rec in sorted(builds.get(reg, {}).items())},
                          "summary": summarize(runs, builds.get(reg, {}), reg)}
                    for reg in sorted({r["regime"] for r in runs} | set(builds))},
        # recomputed by --diagnose from files this machine caches; else kept from the study JSON
        **{key: json.loads((work / f"{key}.json").read_text()) if (work / f"{key}.json").is_file()
           else previous.get(key, {}) for key in ("diagnostics", "anatomy")},
        "runs": [{k: v for k, v in r.items()} for r in runs],
        "run_seconds": round(sum(r.get("seconds", 0.0) for r in runs), 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.rename(out)
    plot(result, out.with_suffix(".png"))
    return result


def restore(study_json: Path, work: Path) -> dict:
    """Seed ``<work>/runs`` with the runs of a committed study (existing files kept)."""
    study = json.loads(study_json.read_text())
    (work / "runs").mkdir(parents=True, exist_ok=True)
    written = 0
    for r in study["runs"]:
        path = work / "runs" / f"{run_name(r['regime'], r['build'], r['method'], r['setting'], r['seed'])}.json"
        if not path.is_file():
            path.write_text(json.dumps(r, indent=2))
            written += 1
    print(f"restored {written} runs from {study_json}")
    return study


def check_reproduced(study: dict, rec: dict) -> None:
    """Exit 2 unless a rebuilt build's data and undistilled baselines equal what ``study`` recorded."""
    was = study["regimes"].get(rec["regime"], {}).get("builds", {}).get(str(rec["build"]))
    if was is None:
        return
    keys = ("distill_data", "teacher_samples", "teacher", "undistilled")
    differ = [k for k in keys if json.loads(json.dumps(rec[k])) != was[k]]
    if differ:
        print(f"error: --restore-runs: build {rec['build']} of {rec['regime']} rebuilt differently ({', '.join(differ)}); "
              "its runs cannot be mixed with new ones: rerun the study without --restore-runs", file=sys.stderr)
        raise SystemExit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regime", default="pertrace", choices=sorted(REGIMES))
    parser.add_argument("--builds", default="0,1,2")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--work", default="study_out")
    parser.add_argument("--out", default="bench/results/study.json")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--diagnose", action="store_true",
                        help="recompute the weights by style x token class x kind of line from the cached scores and "
                             "the outputs' error anatomy from the cached generations, then report")
    parser.add_argument("--restore-runs", metavar="JSON")
    args = parser.parse_args()
    work, out = Path(args.work).absolute(), Path(args.out)
    code = code_version()
    if args.diagnose:
        diagnose(work)
        anatomy(work)
    if args.report_only or args.diagnose:
        print(json.dumps(write_results(out, work, args, code)["regimes"], indent=1)[:4000])
        return
    study = restore(Path(args.restore_runs), work) if args.restore_runs else None
    builds = [int(b) for b in args.builds.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    for build in builds:
        brec = build_record(work, args.regime, build)
        if study is not None:
            check_reproduced(study, brec)
        brec["weight_check"] = check_weights(work, args.regime, build, brec)
        write_results(out, work, args, code)
        for method in (m for m in methods if m in SWEEPS and build == 0 and args.regime == TUNED_ON):  # val sweeps
            for setting, override in SWEEPS[method].items():
                train_run(work, args.regime, 0, method, setting, 0, brec, args.steps, args.lr, override)
                write_results(out, work, args, code)
        for seed in seeds:
            for method in methods:
                setting, override = "", {}
                if method in SWEEPS:
                    setting = chosen_setting(collect(work)[0], args.regime, method)
                    if setting is None:
                        print(f"skip {method} of build {build}: its val sweep (build 0, seed 0) has not run yet")
                        continue
                    override = SWEEPS[method][setting]
                train_run(work, args.regime, build, method, setting, seed, brec, args.steps, args.lr, override)
                write_results(out, work, args, code)
    print(json.dumps(write_results(out, work, args, code)["regimes"][args.regime]["summary"], indent=1)[:3000])


def plot(result: dict, path: Path) -> None:
    """Top: eval accuracy per method (dots: runs, coloured by build; bar: mean; dashed: the undistilled
    student of each build). Bottom: token DCD's mean weight by token class, at step 0 (bars, one per
    build) and at the end of its runs (dots), next to the trace-level weighting's at step 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dcd_jax.eval.weight_diagnostics import TOKEN_CLASSES

    regimes = list(result["regimes"])
    if not regimes:
        return
    fig, axes = plt.subplots(2, len(regimes), figsize=(8 * len(regimes), 8), squeeze=False)
    for col, reg in enumerate(regimes):
        ax = axes[0, col]
        summary = result["regimes"][reg]["summary"]
        names = list(summary["methods"])
        for i, name in enumerate(names):
            m = summary["methods"][name]
            for b, rec in m["by_build"].items():
                ys = list(rec["per_seed_eval"].values())
                ax.scatter([i + 0.08 * (int(b) - 1)] * len(ys), ys, s=14, alpha=0.7, color=f"C{int(b) % 10}",
                           label=f"build {b}" if i == 0 else None)
            ax.plot([i - 0.25, i + 0.25], [m["eval"]["accuracy"]] * 2, color="k", lw=2)
        for b, rec in result["regimes"][reg]["builds"].items():
            ax.axhline(rec["undistilled"]["eval"]["accuracy"], color=f"C{int(b) % 10}", ls="--", lw=0.8)
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_ylim(0, 1)
        ax.set_ylabel("greedy accuracy, eval split (dots: runs; bar: mean)")
        ax.set_title(f"regime {reg}: dashed = undistilled student per build")
        ax.legend(fontsize=7)
        ax = axes[1, col]
        builds = result["regimes"][reg]["builds"]
        width = 0.8 / max(len(builds), 1)
        for j, (b, rec) in enumerate(builds.items()):
            w0 = rec.get("step0", {}).get("weights", {}).get("dcd", {}).get("by_token_class", {})
            xs = [k + j * width for k in range(len(TOKEN_CLASSES))]
            ax.bar(xs, [w0.get(c, 0.0) for c in TOKEN_CLASSES], width, color=f"C{int(b) % 10}", alpha=0.5,
                   label=f"build {b}, step 0")
            for run in (r for r in result["runs"] if r["regime"] == reg and r["build"] == int(b)
                        and r["method"] == "DCD-CE" and "weights_after" in r):
                wa = run["weights_after"].get("by_token_class", {})
                ax.scatter(xs, [wa.get(c, float("nan")) for c in TOKEN_CLASSES], s=10, color=f"C{int(b) % 10}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(TOKEN_CLASSES))], TOKEN_CLASSES, rotation=20)
        ax.set_ylabel("token DCD: mean weight of the class's tokens")
        ax.set_title("which tokens token-level DCD down-weights (bars: step 0; dots: end of each run)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
