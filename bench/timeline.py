"""How a run's outputs change over training: when token DCD's outputs go wrong, and how.

Retrains runs of the study (``bench/study.py``: same build, seed, method and setting, so the same
training) with a greedy evaluation of the whole ``val`` split every ``steps / points`` steps, each
evaluation's outputs kept (``eval.save_generations``), and reads every evaluation as the study reads
its final one: accuracy, the share of careful outputs (one operation per line), the share of
multi-operation lines, and the error anatomy (:func:`~dcd_jax.eval.weight_diagnostics.error_shares`:
an arithmetic slip, a skipped sentence, ...). Step 0 is the undistilled student's own val outputs.

The last evaluation is the trained model's: its accuracy is checked against the study's cached val
result of the same run (``reproduces_study``), so the timeline is the study's run, not a new one.

    python bench/timeline.py                      # pertrace build 0 seed 0: SFT, Select, DCD-CE, DCD-CE-tau0.5, DCD-prefix
    python bench/timeline.py --report-only        # table and plot from the cached runs

Writes ``bench/results/timeline.json`` and ``timeline.png``; runs cached under ``<work>/timeline/``.
Needs the study's stages (``python bench/study.py`` builds them, or ``--restore-runs``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study  # noqa: E402
from experiment import code_version, line_statistics  # noqa: E402

DEFAULT_METHODS = ("SFT", "Select", "DCD-CE", "DCD-CE-tau0.5", "DCD-prefix")


def read_evaluation(generations: Path) -> dict:
    """Accuracy, careful share, multi-op line share and error anatomy of one evaluation's greedy outputs."""
    from dcd_jax.data.synthetic import classify_style
    from dcd_jax.eval.weight_diagnostics import error_shares

    records = [r for r in (json.loads(line) for line in generations.open()) if r.get("kind", "greedy") == "greedy"]
    return {"n": len(records), "accuracy": statistics.fmean(bool(r["correct"]) for r in records),
            "careful_share": statistics.fmean(classify_style(r["response"]) == "careful" for r in records),
            "multi_op_line_share": line_statistics(generations)["multi_op_line_share"],
            "errors": error_shares(records)}


def timeline_run(work: Path, regime: str, build: int, method: str, seed: int, steps: int, lr: float,
                 points: int) -> dict:
    """One study run retrained with ``points`` evaluations on val (cached as ``<work>/timeline/<name>.json``)."""
    from dcd_jax.demo import _train

    runs = study.collect(work)[0]
    setting, override = "", {}
    if method in study.SWEEPS:
        setting = study.chosen_setting(runs, regime, method)
        override = study.SWEEPS[method][setting]
    name = study.run_name(regime, build, method, setting, seed)
    marker = work / "timeline" / f"{name}.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    brec = study.build_record(work, regime, build)
    bdir = study.build_dir(work, regime, build)
    objective, data, steps = study.run_inputs(work, regime, build, method, setting, brec, steps, lr, override)
    val = bdir / "assets" / "val.jsonl"
    run_dir = work / "timeline" / name
    _train(brec["student_flax"], data, objective, steps, lr, run_dir, study.build_scale(regime), seed, val_path=val,
           eval_every=steps // points, eval_limit=sum(1 for _ in val.open()))
    generations = Path("generations") / "embedded.jsonl"
    timeline = [{"step": 0, **read_evaluation(bdir / "study_baselines" / "undistilled-val" / "generations" / "m"
                                              / "generations" / "embedded.jsonl")}]
    for folder in sorted((run_dir / "eval_results").glob("step_*")):
        timeline.append({"step": int(folder.name.removeprefix("step_")), **read_evaluation(folder / generations)})
    cached = next((r for r in runs if study.run_name(r["regime"], r["build"], r["method"], r["setting"], r["seed"])
                   == name), None)
    result = {"regime": regime, "build": build, "method": method, "setting": setting, "seed": seed, "steps": steps,
              "timeline": timeline, "study_val_accuracy": cached["val"]["accuracy"] if cached else None,
              "reproduces_study": cached is not None and abs(cached["val"]["accuracy"] - timeline[-1]["accuracy"]) < 1e-9}
    marker.write_text(json.dumps(result, indent=1))
    return result


def plot(result: dict, path: Path) -> None:
    """Val accuracy, careful share and two error shares against the training step, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("accuracy", "val accuracy"), ("careful_share", "careful outputs"),
              ("skipped", "outputs skipping a sentence"), ("arithmetic", "outputs with an arithmetic slip")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), sharex=True)
    for ax, (key, title) in zip(axes, panels):
        for run in result["runs"]:
            xs = [p["step"] for p in run["timeline"]]
            ys = [p[key] if key in p else p["errors"].get(key, float("nan")) for p in run["timeline"]]
            ax.plot(xs, ys, marker="o", ms=3, label=run["method"])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result['regime']} regime, build {result['build']}, seed {result['seed']}: greedy val outputs "
                 "during training (step 0: the undistilled student)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regime", default="pertrace", choices=sorted(study.REGIMES))
    parser.add_argument("--build", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--steps", type=int, default=240, help="the study's steps (so the runs are the study's)")
    parser.add_argument("--lr", type=float, default=2e-3, help="the study's learning rate")
    parser.add_argument("--points", type=int, default=8, help="evaluations per run")
    parser.add_argument("--work", default="study_out")
    parser.add_argument("--out", default="bench/results/timeline.json")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    work, out = Path(args.work).absolute(), Path(args.out)
    runs = []
    for method in args.methods.split(","):
        if args.report_only:
            found = sorted((work / "timeline").glob(f"{args.regime}-b{args.build}-{method}-*seed{args.seed}.json"))
            runs += [r for r in (json.loads(p.read_text()) for p in found) if r["method"] == method]
        else:
            runs.append(timeline_run(work, args.regime, args.build, method, args.seed, args.steps, args.lr, args.points))
    code = code_version()
    if args.report_only and out.is_file():  # the runs' provenance, not the reporting commit's
        code = json.loads(out.read_text()).get("code", code)
    result = {"regime": args.regime, "build": args.build, "seed": args.seed, "code": code, "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    for run in runs:
        print(run["method"], "reproduces the study's val accuracy:", run["reproduces_study"])
        for p in run["timeline"]:
            print(f"  step {p['step']:4d}  acc {p['accuracy']:.2f}  careful {p['careful_share']:.2f}  "
                  + "  ".join(f"{k} {v:.2f}" for k, v in p["errors"].items()))


if __name__ == "__main__":
    main()
