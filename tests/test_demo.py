"""`dcd-jax demo --scale micro` end to end: every stage's artifacts, then a cached second run."""

import json
import os
import subprocess
import sys


STAGES = ("assets", "teacher", "traces", "scores", "student", "sft", "dcd", "eval")


def run_demo(out):
    """As a user runs it: a fresh process on the machine's one CPU device."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-m", "dcd_jax.cli", "demo", "--scale", "micro", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_demo_micro_runs_every_stage_and_caches(tmp_path):
    out = tmp_path / "demo"
    printed = run_demo(out)
    for stage in STAGES:
        assert (out / f"{stage}.done.json").is_file(), stage
    # (a) task data, tokenizer and fresh HF checkpoints
    for f in ("teacher_train.jsonl", "prompts.jsonl", "eval.jsonl", "tokenizer/tokenizer.json",
              "student/config.json", "teacher_init/model.safetensors.index.json"):
        assert (out / "assets" / f).is_file(), f
    # (b) the trained teacher exported to HF format; (c) its traces; (d) their cached scores
    assert (out / "runs" / "teacher" / "hf" / "model.safetensors.index.json").is_file()
    traces = [json.loads(line) for line in (out / "traces" / "train.jsonl").open()]
    assert traces and all({"prompt", "response", "answer", "correct"} <= set(t) for t in traces)
    assert (out / "traces" / "train.teacher.parquet").is_file()
    # (e) the student converted; (f) SFT and DCD students, same steps, exported to HF
    assert (out / "student_flax" / "model.json").is_file()
    sft = json.loads((out / "sft.done.json").read_text())
    dcd = json.loads((out / "dcd.done.json").read_text())
    assert sft["steps"] == dcd["steps"] > 0
    assert sft["ess_token_frac"] == 1.0 and 0 < dcd["ess_token_frac"] <= 1.0  # DCD really re-weights
    for name in ("sft", "dcd"):
        assert (out / "runs" / name / "hf" / "config.json").is_file()
    # (g) evaluation of all three; (h) table, plot, report
    summary = json.loads((out / "results" / "summary.json").read_text())
    assert set(summary["results"]) == {"teacher", "sft", "dcd"}
    assert (out / "comparison.png").stat().st_size > 5000 and (out / "report.md").is_file()
    assert "| method |" in printed and "| dcd |" in printed

    markers = {s: (out / f"{s}.done.json").read_text() for s in STAGES}
    run_demo(out)
    assert {s: (out / f"{s}.done.json").read_text() for s in STAGES} == markers  # all reused
