"""The seeded comparison of DCD against the offline baselines on the embedded task.

    python bench/experiment.py [--scale small] [--seeds 0,1,2] [--demo-dir demo_out]

Reuses the demo's teacher, traces and cached teacher scores (running the demo stages first if
needed), then trains the same fresh student with each objective for the same number of steps on
the same data (the seed sets the data order), and evaluates each on the held-out problems:
greedy accuracy, avg@8 (temperature 1), trace stability, and ExAccErr against the teacher. A
DCD sweep over tau and b (seed 0) shows the sensitivity to its two knobs. Writes
``bench/results/experiment.json`` and ``bench/results/experiment.png``; ``bench/update_readme.py``
puts the table into the README. Every training run is cached under ``<demo-dir>/experiment/``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

METHODS = {
    "SFT": {"loss": "ce", "weighting": "none"},
    "KL": {"loss": "kl", "weighting": "none"},
    "DFT": {"loss": "ce", "weighting": "dft"},
    "iw-SFT": {"loss": "ce", "weighting": "iw_sft"},
    "ToDi": {"loss": "kl", "weighting": "todi"},
    "DCD-CE": {"loss": "ce", "weighting": "dcd"},
    "DCD-KL": {"loss": "kl", "weighting": "dcd"},
}
SWEEP = [{"tau": t, "b": 0.0} for t in (0.5, 2.0, 4.0)] + [{"tau": 1.0, "b": b} for b in (-2.0, -1.0, 1.0)]
METRICS = ("accuracy", "avg@8", "length_mean", "truncation_rate", "repetition_rate", "format_failure_rate",
           "exaccerr_pct")


def evaluate(model_dir: Path, teacher_dir: str, eval_path: Path, scale, out: Path) -> dict:
    from dcd_jax.eval.runner import EvalConfig, run_eval

    cfg = EvalConfig(benchmarks=("embedded",), paths={"embedded": str(eval_path)}, max_new_tokens=scale.max_new_tokens,
                     batch_size=128, n_samples=8, temperature=1.0, exaccerr_teacher=teacher_dir, exaccerr_prompts=64)
    full = run_eval({"m": str(model_dir)}, cfg, out)
    m = full["results"]["m"]["embedded"]
    ex = full["results"]["m"].get("exaccerr", {})
    pct = ex.get("ex_acc_err_pct")
    return {
        "accuracy": m["pass@1"], "avg@8": m.get("avg@8"), "length_mean": m.get("length_mean"),
        "truncation_rate": m.get("truncation_rate"), "repetition_rate": m.get("repetition_rate"),
        "format_failure_rate": m.get("format_failure_rate"),
        # %ExAccErr at the longest prefix length both generations reach (the curve is in the results dir).
        "exaccerr_pct": next((v for v in reversed(pct or []) if v is not None), None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="small")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--demo-dir", default="demo_out")
    parser.add_argument("--out", default="bench/results/experiment.json")
    parser.add_argument("--no-sweep", action="store_true")
    args = parser.parse_args()

    from dcd_jax.demo import SCALES, _train, run_demo

    start = time.time()
    demo_dir = Path(args.demo_dir).absolute()
    run_demo(demo_dir, args.scale)  # cached stages: teacher, traces, scores, student
    scale = SCALES[args.scale]
    teacher = str(demo_dir / "runs" / "teacher" / "hf")
    traces = demo_dir / "traces"
    data = {"path": str(traces / "train.jsonl"), "teacher_scores": str(traces / "train.teacher.parquet"),
            "topk": scale.topk}
    student = str(demo_dir / "student_flax")
    root = demo_dir / "experiment"
    root.mkdir(exist_ok=True)

    def run(name: str, objective: dict, seed: int) -> dict:
        marker = root / f"{name}-seed{seed}.json"
        if marker.is_file():
            return json.loads(marker.read_text())
        run_dir = root / f"{name}-seed{seed}"
        obj = dict(objective)
        if obj["weighting"] == "dcd":
            obj.setdefault("lam", {"warmup_steps": scale.student_steps // 5})
        trained = _train(student, data, obj, scale.student_steps, scale.student_lr, run_dir, scale, seed)
        result = {"method": name, "seed": seed, "objective": obj, "train": trained,
                  **evaluate(run_dir / "hf", teacher, demo_dir / "assets" / "eval.jsonl", scale, run_dir / "results")}
        marker.write_text(json.dumps(result, indent=2))
        return result

    seeds = [int(s) for s in args.seeds.split(",")]
    runs = [run(name, obj, seed) for name, obj in METHODS.items() for seed in seeds]
    sweep = [] if args.no_sweep else [
        run(f"DCD-CE-tau{p['tau']}-b{p['b']}", {"loss": "ce", "weighting": "dcd", "dcd": p}, seeds[0]) for p in SWEEP
    ]

    def aggregate(rows: list[dict]) -> dict:
        out = {}
        for key in METRICS:
            vals = [r[key] for r in rows if r.get(key) is not None]
            if vals:
                out[key] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
                            "n": len(vals)}
        return out

    table = {name: aggregate([r for r in runs if r["method"] == name]) for name in METHODS}
    demo = json.loads((demo_dir / "traces.done.json").read_text())
    result = {
        "command": f"python bench/experiment.py --scale {args.scale} --seeds {args.seeds}",
        "scale": args.scale, "seeds": seeds, "student_steps": scale.student_steps,
        "teacher_traces": demo.get("traces_in_file"), "teacher_samples": demo.get("generated"),
        "methods": table, "runs": runs,
        "sweep": [{"tau": r["objective"]["dcd"]["tau"], "b": r["objective"]["dcd"]["b"],
                   **{k: r.get(k) for k in METRICS}} for r in sweep],
        "wall_seconds": round(time.time() - start, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    plot(result, Path(args.out).with_suffix(".png"))
    print(json.dumps(table, indent=2))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["methods"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key, label in ((axes[0], "accuracy", "greedy accuracy"), (axes[1], "avg@8", "avg@8 (T=1)")):
        means = [result["methods"][n].get(key, {}).get("mean", 0.0) for n in names]
        stds = [result["methods"][n].get(key, {}).get("std", 0.0) for n in names]
        ax.bar(names, means, yerr=stds, capsize=3, color=["#4C72B0" if "DCD" not in n else "#DD8452" for n in names])
        ax.set_ylabel(label + f" (mean ± sd, {len(result['seeds'])} seeds)")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
