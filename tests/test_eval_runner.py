"""The eval loop and the teacher-trace generator: metrics, files, resumption (scripted and real sampler)."""

import json

import numpy as np
import pytest

from dcd_jax.cli import main as cli_main
from dcd_jax.teacher import generate as generate_mod
from dcd_jax.eval import runner
from dcd_jax.teacher.generate import GenerateConfig, generate_traces
from dcd_jax.eval.runner import EvalConfig, evaluate
from dcd_jax.infer.sampler import Completion


def _write_problems(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n")


class ScriptedSampler:
    """Stands in for the jitted sampler: answers problem i correctly when script(i, sample) says so."""

    calls = 0

    def __init__(self, graphdef, params, tokenizer=None, mesh=None, **kw):
        self.tokenizer = tokenizer

    @staticmethod
    def script(i, j):
        return (i + j) % 3 != 0

    def generate(self, prompts, cfg):
        ScriptedSampler.calls += 1
        out = []
        for p in prompts:
            i = int(p.split("What is ")[1].split(" ")[0])
            row = []
            for j in range(cfg.n):
                sample = 0 if cfg.greedy else j + 1
                answer = i + 1 if self.script(i, sample) else i + 7
                text = f"{i} plus 1. The answer is {answer}." if i % 5 else "I keep going and going"
                row.append(Completion(text, [1, 2, 3], "eos" if i % 5 else "length", 3))
            out.append(row)
        return out


class Tok:
    chat_template = None
    eos_token = "</s>"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1] * len(text.split())}


def test_metrics_and_results_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "Sampler", ScriptedSampler)
    _write_problems(tmp_path / "eval.jsonl", 10)
    cfg = EvalConfig(benchmarks=("embedded",), paths={"embedded": str(tmp_path / "eval.jsonl")}, n_samples=4, template="raw")
    summary, gens = evaluate(None, None, Tok(), cfg)
    s = summary["embedded"]
    greedy = [(i % 5 != 0) and ScriptedSampler.script(i, 0) for i in range(10)]
    sampled = [[(i % 5 != 0) and ScriptedSampler.script(i, j + 1) for j in range(4)] for i in range(10)]
    assert s["pass@1"] == pytest.approx(np.mean(greedy))
    assert s["avg@4"] == pytest.approx(np.mean(sampled))
    assert s["pass@4"] == pytest.approx(np.mean([any(r) for r in sampled]))
    assert s["truncation_rate"] == pytest.approx(0.2) and s["format_failure_rate"] == pytest.approx(0.2)
    assert len(gens["embedded"]) == 10 * 5 and {g["kind"] for g in gens["embedded"]} == {"greedy", "sampled"}
    lo, hi = s["pass@1_ci"]
    assert lo <= s["pass@1"] <= hi

    full = runner.run_eval({"a": "unused-a", "b": "unused-b"}, cfg, tmp_path / "results", loader=lambda *a, **k: (None, None, Tok(), None))
    assert set(full["results"]) == {"a", "b"}
    assert (tmp_path / "results" / "summary.json").is_file() and (tmp_path / "results" / "chart.png").stat().st_size > 1000
    lines = (tmp_path / "results" / "generations" / "a" / "generations" / "embedded.jsonl").read_text().splitlines()
    assert len(lines) == 50


def test_generate_keeps_correct_traces_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(generate_mod, "Sampler", ScriptedSampler)
    _write_problems(tmp_path / "prompts.jsonl", 12)
    cfg = GenerateConfig(teacher="unused", prompts=str(tmp_path / "prompts.jsonl"), out=str(tmp_path / "a.jsonl"),
                         n=3, chunk_prompts=5, template="raw")
    stats = generate_traces(cfg, teacher=(None, None), tokenizer=Tok(), progress=False)
    straight = (tmp_path / "a.jsonl").read_text()
    rows = [json.loads(line) for line in straight.splitlines()]
    assert stats["generated"] == 36 and stats["kept"] == len(rows) > 0
    assert all(r["correct"] and r["response"].endswith(f"The answer is {r['answer']}.") for r in rows)

    # Interrupted after the first chunk's traces were appended but before it was marked done.
    resumed_cfg = GenerateConfig(**{**cfg.__dict__, "out": str(tmp_path / "b.jsonl")})
    real_append = generate_mod._append_lines
    calls = []

    def dying_append(path, lines):
        calls.append(path)
        real_append(path, lines)
        if len(calls) == 3:  # traces of chunk 2 written, its .done not
            raise KeyboardInterrupt

    monkeypatch.setattr(generate_mod, "_append_lines", dying_append)
    with pytest.raises(KeyboardInterrupt):
        generate_traces(resumed_cfg, teacher=(None, None), tokenizer=Tok(), progress=False)
    monkeypatch.setattr(generate_mod, "_append_lines", real_append)
    again = generate_traces(resumed_cfg, teacher=(None, None), tokenizer=Tok(), progress=False)
    assert again["skipped_done"] == 5
    assert (tmp_path / "b.jsonl").read_text() == straight


def test_eval_cli_with_the_real_sampler(tmp_path):
    from train_fixtures import make_assets

    from transformers import AutoTokenizer

    from dcd_jax.tiny_models import make_tiny_student

    assets = make_assets(tmp_path / "assets", n_examples=8)
    other = make_tiny_student(tmp_path / "other", AutoTokenizer.from_pretrained(assets["student"]), size="micro", seed=1)
    out = tmp_path / "results"
    code = cli_main(["eval", "--model", f"micro={assets['student']}", "--benchmarks", "embedded",
                     "--path", f"embedded={assets['train']}", "--limit", "6", "--max-new-tokens", "8",
                     "--batch-size", "8", "--out", str(out), "--exaccerr-teacher", str(other)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    emb = summary["results"]["micro"]["embedded"]
    assert emb["n_items"] == 6 and 0.0 <= emb["pass@1"] <= 1.0
    records = [json.loads(line) for line in (out / "generations" / "micro" / "generations" / "embedded.jsonl").open()]
    assert len(records) == 6 and all(r["num_tokens"] <= 8 for r in records)
    assert (out / "chart.png").is_file()
    # ExAccErr of one random model against another: a finite curve over prefix lengths 1..8.
    ex = summary["results"]["micro"]["exaccerr"]
    assert len(ex["prefix_len"]) == 8 and all(v is not None and v >= 0 for v in ex["regret"])
