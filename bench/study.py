"""The weighting study over rebuilt stages: stage builds x data-order seeds, per distillation regime.

    python bench/study.py [--regime pertrace] [--builds 0,1,2] [--seeds 0,1,2] [--work study_out]
    python bench/study.py --report-only                # rewrite the JSON, plot and tables from the cache
    python bench/study.py --restore-runs bench/results/study.json   # extend the committed study elsewhere

A *build* is every upstream stage of the demo made again with its own seed: the task's problems,
tokenizer and fresh student, the student's pretraining, the teacher, its traces, the distillation
data and the teacher's cached scores (``dcd_jax.demo``; build 0 of the ``pertrace`` regime is the
demo's own stages). A *seed* is the data order of a distillation run. Every method of a build sees
the same cached teacher scores, the same steps and learning rate, and the seed's data order.

Methods (:data:`METHODS`): SFT; the style-oracle filter (SFT on the traces
:func:`~dcd_jax.data.synthetic.classify_style` calls careful: an oracle a user does not have);
trace-level DCD (``dcd_sequence``: every token of a trace weighted by the sigmoid of the trace's
mean student / teacher log-ratio, a soft trace selection a user can run; its ``tau`` is chosen on
``val`` of build 0, seed 0); the paper's token-level DCD (``dcd``) and the prefix-mean ``dcd_prefix``.

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
# distillation data drawn from, the regime's task). ``pertrace``: each trace in one style (the demo).
REGIMES = {"pertrace": {}}
# name -> (objective, data): data "all" = the scored distillation traces, "careful" = the oracle filter.
METHODS = {
    "SFT": ({"loss": "ce", "weighting": "none"}, "all"),
    "Oracle-filter": ({"loss": "ce", "weighting": "none"}, "careful"),
    "DCD-seq": ({"loss": "ce", "weighting": "dcd_sequence"}, "all"),
    "DCD-CE": ({"loss": "ce", "weighting": "dcd"}, "all"),
    "DCD-prefix": ({"loss": "ce", "weighting": "dcd_prefix"}, "all"),
}
# Validation sweep of the trace-level weighting (build 0, seed 0, split val): the sigmoid's temperature.
SEQ_SWEEP = {"tau0.5": {"dcd": {"tau": 0.5}}, "tau1": {}, "tau2": {"dcd": {"tau": 2.0}}}
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


def eval_split(model: str, bdir: Path, split: str, out: Path, scale) -> dict:
    from dcd_jax.demo import evaluate_models

    ev = evaluate_models({"m": model}, bdir / "assets" / f"{split}.jsonl", out, scale.max_new_tokens)
    summary = summarize_eval(ev["results"]["m"]["embedded"])
    summary.update(line_statistics(out / "generations" / "m" / "generations" / "embedded.jsonl"))
    return summary


def build_record(work: Path, regime: str, build: int) -> dict:
    """A build's stages, baselines and step-0 diagnostics (cached as ``<build dir>/study_build.json``)."""
    from dcd_jax.config import from_dict
    from dcd_jax.demo import prepare_student
    from dcd_jax.eval.weight_diagnostics import weight_diagnostics
    from dcd_jax.objectives.config import ObjectiveConfig

    bdir = build_dir(work, regime, build)
    marker = bdir / "study_build.json"
    scale = build_scale(regime)
    student = prepare_student(bdir, scale, "competent", seed=build)  # the demo's stages, cached
    if marker.is_file():
        return json.loads(marker.read_text())
    teacher = bdir / "runs" / "teacher" / "hf"
    rec = {"regime": regime, "build": build, "student_flax": student["flax"], "student_hf": student["hf"],
           "teacher_hf": str(teacher)}
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
    # Step 0: the pretrained student's and the teacher's NLL of the traces by style, token-DCD's weights.
    records = [json.loads(line) for line in open(bdir / "traces" / "train.jsonl")][:256]
    scores = score_records(student["flax"], records, bdir / "study_diag")
    diag = weight_diagnostics(from_dict(ObjectiveConfig, {"weighting": "dcd"}), records, scores,
                              bdir / "traces" / "train.teacher.parquet")
    teacher_nll = weight_diagnostics(from_dict(ObjectiveConfig, {"weighting": "none"}), records,
                                     bdir / "traces" / "train.teacher.parquet", bdir / "traces" / "train.teacher.parquet")
    rec["step0"] = {"student_nll_by_style": diag["student_nll_by_style"],
                    "teacher_nll_by_style": teacher_nll["student_nll_by_style"],
                    "dcd_weight_by_style": diag["by_style"], "dcd_weight_by_position": diag["by_position"]}
    marker.write_text(json.dumps(rec, indent=2))
    return rec


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
    objective, data_kind = METHODS[method]
    objective = merge(objective, overrides)
    traces = bdir / "traces"
    data = {"path": str(traces / "train.jsonl"), "teacher_scores": str(traces / "train.teacher.parquet"),
            "topk": scale.topk}
    if data_kind == "careful":
        data = {"path": str(careful_only(traces))}
    run_dir = work / "runs" / name
    t0 = time.time()
    trained = _train(brec["student_flax"], data, objective, steps, lr, run_dir, scale, seed)
    result = {"regime": regime, "build": build, "method": method, "setting": setting, "seed": seed,
              "objective": objective, "data": data_kind, "train": trained,
              "val": eval_split(trained["hf"], bdir, "val", run_dir / "results_val", scale),
              "eval": eval_split(trained["hf"], bdir, "eval", run_dir / "results", scale)}
    result["seconds"] = round(time.time() - t0, 1)
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.rename(marker)
    return json.loads(marker.read_text())


def chosen_seq_setting(runs: list[dict], regime: str) -> str | None:
    """The ``SEQ_SWEEP`` entry with the best val accuracy on build 0, seed 0 (ties: ``tau1``, the paper's)."""
    sweep = {r["setting"]: r["val"]["accuracy"] for r in runs
             if r["regime"] == regime and r["build"] == 0 and r["seed"] == 0 and r["method"] == "DCD-seq"}
    if set(sweep) != set(SEQ_SWEEP):
        return None
    best = max(sweep.values())
    return "tau1" if sweep["tau1"] == best else max(sweep, key=sweep.get)


def main_runs(runs: list[dict], regime: str, setting: str | None) -> list[dict]:
    """The runs of the comparison: every method, DCD-seq at its chosen setting only."""
    return [r for r in runs if r["regime"] == regime and (r["method"] != "DCD-seq" or r["setting"] == setting)]


def summarize(runs: list[dict], builds: dict, regime: str) -> dict:
    """Per method: mean of every metric; paired differences (eval and val) against SFT and against
    the undistilled student, pooled over builds (hierarchical bootstrap) and per build."""
    setting = chosen_seq_setting(runs, regime)
    rows = main_runs(runs, regime, setting)
    out: dict = {"dcd_seq_setting": setting, "methods": {}}
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
    return out


def collect(work: Path) -> tuple[list[dict], dict]:
    runs = [json.loads(p.read_text()) for p in sorted((work / "runs").glob("*.json"))]
    builds = {}
    for p in sorted(work.glob("*-b*/study_build.json")):
        rec = json.loads(p.read_text())
        builds.setdefault(rec["regime"], {})[rec["build"]] = rec
    return runs, builds


def write_results(out: Path, work: Path, args, code: str) -> dict:
    runs, builds = collect(work)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    result = {
        "command": "python bench/study.py --regime {} --builds {} --seeds {}".format(args.regime, args.builds, args.seeds),
        "code": previous.get("code") if previous.get("code", "").endswith(code) else
        (f"{previous['code']}, resumed at {code}" if previous.get("code") else code),
        "steps": args.steps, "lr": args.lr, "seq_sweep": SEQ_SWEEP,
        "methods": {k: {"objective": v[0], "data": v[1]} for k, v in METHODS.items()},
        "regimes": {reg: {"task_overrides": REGIMES.get(reg, {}),
                          "builds": {str(b): {k: v for k, v in rec.items() if k not in ("student_flax", "student_hf",
                                                                                           "teacher_hf")}
                                     for b, rec in sorted(builds.get(reg, {}).items())},
                          "summary": summarize(runs, builds.get(reg, {}), reg)}
                    for reg in sorted({r["regime"] for r in runs} | set(builds))},
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
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--work", default="study_out")
    parser.add_argument("--out", default="bench/results/study.json")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--restore-runs", metavar="JSON")
    args = parser.parse_args()
    work, out = Path(args.work).absolute(), Path(args.out)
    code = code_version()
    if args.report_only:
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
        write_results(out, work, args, code)
        if build == 0 and "DCD-seq" in methods:  # the validation sweep of the trace-level temperature
            for setting, override in SEQ_SWEEP.items():
                train_run(work, args.regime, 0, "DCD-seq", setting, 0, brec, args.steps, args.lr, override)
            write_results(out, work, args, code)
        for seed in seeds:
            for method in methods:
                setting, override = "", {}
                if method == "DCD-seq":
                    setting = chosen_seq_setting(collect(work)[0], args.regime)
                    if setting is None:
                        print(f"skip DCD-seq of build {build}: the val sweep (build 0, seed 0) has not run yet")
                        continue
                    override = SEQ_SWEEP[setting]
                train_run(work, args.regime, build, method, setting, seed, brec, args.steps, args.lr, override)
                write_results(out, work, args, code)
    print(json.dumps(write_results(out, work, args, code)["regimes"][args.regime]["summary"], indent=1)[:3000])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = list(result["regimes"])
    if not regimes:
        return
    fig, axes = plt.subplots(1, len(regimes), figsize=(7 * len(regimes), 4.2), squeeze=False)
    for ax, reg in zip(axes[0], regimes):
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
        ax.set_ylabel("greedy accuracy, eval split (dots: seeds; bar: mean)")
        ax.set_title(f"regime {reg}: dashed = undistilled student per build")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
