"""Probe: how fast does a tiny teacher learn the embedded long-problem task on this CPU?

    python bench/regime_probe.py [--runs tiny:3e-3,small:2e-3] [--steps 1200] [--eval-every 200]

Sizes the demo's regime from evidence before building it: trains fresh teachers of the given
sizes and learning rates on the distillation task (2-8 operations, small operands, the teacher's
style mix) and evaluates greedy accuracy on held-out problems every ``--eval-every`` steps (the
train loop's own eval hook), with the wall seconds per step. The schedule is constant after
warmup, so the accuracy at step N is what a run of N steps would roughly reach (a cosine decay
to the same N usually does a bit better). Writes ``bench/results/regime_probe.json`` after every
run and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="tiny:3e-3,small:2e-3")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--n-eval", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=288)
    parser.add_argument("--mix", default=None, help='teacher style mix as JSON, e.g. {"careful": 0.6, "compressed": 0.4}')
    parser.add_argument("--work", default="probe_out")
    parser.add_argument("--out", default="bench/results/regime_probe.json")
    args = parser.parse_args()

    from dcd_jax.config import from_dict
    from dcd_jax.data.synthetic import build_tokenizer, generate_problems, write_jsonl
    from dcd_jax.demo import SCALES
    from dcd_jax.eval.runner import train_eval_hook
    from dcd_jax.tiny_models import make_tiny_student
    from dcd_jax.train.config import RunConfig
    from dcd_jax.train.loop import TrainHooks, train
    from dcd_jax.train.metrics import read_metrics

    task = SCALES["small"].task
    if args.mix:
        task = dataclasses.replace(task, style_mix=json.loads(args.mix))
    work = Path(args.work).absolute()
    tok = build_tokenizer(work / "tokenizer")
    write_jsonl(generate_problems(task), work / "train.jsonl")
    eval_records = generate_problems(dataclasses.replace(task, split="val", n_examples=args.n_eval))
    write_jsonl(eval_records, work / "val.jsonl")
    lengths = [len(tok(r["response"])["input_ids"]) for r in generate_problems(task)[:2000]]
    result = {"command": "python bench/regime_probe.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                                     vars(args).items()),
              "task": {k: v for k, v in dataclasses.asdict(task).items() if k != "n_examples"},
              "response_tokens": {"min": min(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths)},
              "runs": {}}
    out = Path(args.out)
    for run in args.runs.split(","):
        size, lr = run.split(":")
        init = make_tiny_student(work / f"init_{size}", tok, size=size, seed=1, max_position_embeddings=1024)
        run_dir = work / f"run_{size}_{lr}"
        cfg = from_dict(RunConfig, {
            "model": {"path": str(init), "dtype": "float32"},
            "data": {"path": str(work / "train.jsonl"), "seq_len": args.seq_len, "batch_size": args.batch_size,
                     "num_epochs": None, "seed": 0},
            "objective": {"chunk_size": 128, "weighting": "none"},
            "optim": {"lr": float(lr), "warmup_steps": 50, "schedule": "constant"},
            "checkpoint": {"every_steps": args.steps, "keep": 1},
            "eval": {"every_steps": args.eval_every, "benchmark": "embedded", "path": str(work / "val.jsonl"),
                     "limit": args.n_eval, "max_new_tokens": args.max_new_tokens, "batch_size": args.n_eval},
            "train": {"steps": args.steps, "out_dir": str(run_dir), "log_every": 25, "export_hf": False},
        })
        start = time.time()
        train(cfg, TrainHooks(evaluate=train_eval_hook(cfg.eval, cfg.data)))
        rows = read_metrics(run_dir / "metrics.jsonl")
        curve = [{"step": r["step"], "accuracy": r["eval/embedded/pass@1"]} for r in rows if "eval/embedded/pass@1" in r]
        step_s = [r["step_seconds"] for r in rows if "step_seconds" in r][1:]
        result["runs"][run] = {"size": size, "lr": float(lr), "wall_s": time.time() - start, "curve": curve,
                               "median_step_seconds": sorted(step_s)[len(step_s) // 2] if step_s else None}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(run, json.dumps(result["runs"][run]), flush=True)


if __name__ == "__main__":
    main()
