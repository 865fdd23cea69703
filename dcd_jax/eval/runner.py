"""The evaluation loop: generate with the jitted sampler, grade, summarize, write a results folder.

``evaluate`` scores one model on several benchmarks: greedy pass@1 and, with ``n_samples > 1``,
sampled avg@n / pass@k (unbiased), each with a bootstrap confidence interval; trace stability
(length, truncation, repetition, answer-format failures); optionally ExAccErr against a teacher
and the IFEval-style instruction check. ``run_eval`` does it for several checkpoints and writes
``results/``: every generation (JSONL), ``summary.json``, a markdown table and a bar chart.
It is separate from training: the train loop calls it through a hook, the CLI through
``dcd-jax eval``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from dcd_jax import storage
from dcd_jax.data import PromptStyle, render_prompts
from dcd_jax.eval import benchmarks as bench_lib
from dcd_jax.eval import metrics as metrics_lib
from dcd_jax.eval import report, stability
from dcd_jax.eval.config import EvalConfig, EvalHookConfig
from dcd_jax.eval.grading import grade
from dcd_jax.infer.sampler import Sampler, SamplingConfig
from dcd_jax.infer.scorer import make_scorer, pad_to_bucket

log = logging.getLogger(__name__)

# ExAccErr scoring: sequences per forward pass, and their lengths padded to a multiple of this.
EXACCERR_BATCH_SIZE = 32
EXACCERR_LENGTH_BUCKET = 64
EVAL_RESULTS = "eval_results"  # under a run's out_dir: a results folder per periodic evaluation


def _sample_cfg(cfg: EvalConfig, *, greedy: bool, n: int = 1) -> SamplingConfig:
    return SamplingConfig(
        max_new_tokens=cfg.max_new_tokens, temperature=0.0 if greedy else cfg.temperature,
        top_p=1.0 if greedy else cfg.top_p, n=n, seed=cfg.seed, batch_size=cfg.batch_size,
    )


def evaluate_benchmark(sampler: Sampler, items: list, cfg: EvalConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary metrics, per-response records) of one benchmark."""
    prompts = render_prompts([it.prompt for it in items], sampler.tokenizer, cfg)
    per_item: list[dict[str, Any]] = [{"id": it.id, "gold": it.gold, "correct": []} for it in items]
    records: list[dict[str, Any]] = []
    responses = []  # (completion, grade) used for stability: greedy if run, else all samples

    def run(kind: str, sampling: SamplingConfig):
        outs = sampler.generate(prompts, sampling)
        for item, state, completions in zip(items, per_item, outs):
            for j, c in enumerate(completions):
                g = grade(c.text, item.gold)
                if kind == "greedy":
                    state["greedy_correct"] = g.correct
                else:
                    state["correct"].append(g.correct)
                records.append({"id": item.id, "kind": kind, "sample": j, "prompt": item.prompt, "gold": item.gold,
                                "response": c.text, "extracted": g.extracted, "correct": g.correct,
                                "finished_by": c.finished_by, "num_tokens": c.num_tokens})
                if kind == "greedy" or not cfg.greedy:
                    responses.append((c, g))

    if cfg.greedy:
        run("greedy", _sample_cfg(cfg, greedy=True))
    if cfg.n_samples > 1:
        run("sampled", _sample_cfg(cfg, greedy=False, n=cfg.n_samples))
    for state in per_item:
        if not state["correct"]:
            state["correct"] = [state["greedy_correct"]]
    summary = metrics_lib.summarize(per_item, seed=cfg.seed)
    summary.update(stability.stability_summary(
        finished=[c.finished_by != "length" for c, _ in responses],
        extracted=[g.extracted for _, g in responses],
        lengths=[c.num_tokens for c, _ in responses],
        sequences=[c.token_ids for c, _ in responses],
    ))
    return summary, records


def evaluate(
    graphdef: Any, params: Any, tokenizer: Any, cfg: EvalConfig, *, mesh=None, items: Mapping[str, list] | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Evaluate one model on ``cfg.benchmarks``: ({benchmark: metrics}, {benchmark: generations})."""
    sampler = Sampler(graphdef, params, tokenizer, mesh)
    items = items if items is not None else load_items(cfg)
    summary, generations = {}, {}
    for name, bench_items in items.items():
        start = time.time()
        summary[name], generations[name] = evaluate_benchmark(sampler, bench_items, cfg)
        summary[name]["seconds"] = round(time.time() - start, 2)
        log.info("eval %s: pass@1 %.3f on %d problems (%.0fs)", name, summary[name]["pass@1"], len(bench_items),
                 summary[name]["seconds"])
    if cfg.ifeval:
        from dcd_jax.eval.ifeval import ifeval_prompts, score_ifeval

        prompts = ifeval_prompts()
        rendered = render_prompts([p["prompt"] for p in prompts], tokenizer, cfg)
        outs = sampler.generate(rendered, _sample_cfg(cfg, greedy=True))
        responses = [o[0].text for o in outs]
        scores = score_ifeval(prompts, responses)
        summary["ifeval"] = {k: v for k, v in scores.items() if isinstance(v, (int, float))}
        generations["ifeval"] = [{"prompt": p["prompt"], "response": r} for p, r in zip(prompts, responses)]
    return summary, generations


def load_items(cfg: EvalConfig) -> dict[str, list]:
    return {
        name: bench_lib.load_benchmark(name, cfg.paths.get(name), cfg.split, limit=cfg.limit)
        for name in cfg.benchmarks
    }


def exaccerr_metrics(student: Any, teacher: Any, tokenizer: Any, prompts: Sequence[str], cfg: EvalConfig) -> dict[str, Any]:
    """ExAccErr of ``student`` against ``teacher`` (both (graphdef, params, cfg) triples) on ``prompts``.

    Both sample continuations at temperature 1; each continuation is scored by both models.
    """
    rendered = render_prompts(prompts, tokenizer, cfg)
    sampling = dataclasses.replace(_sample_cfg(cfg, greedy=False), temperature=1.0, top_p=1.0)
    scorers = {
        name: make_scorer(m[0], m[2].tokenizer_vocab_size, topk=0, chunk_size=256) for name, m in
        (("student", student), ("teacher", teacher))
    }

    def logps(model_name: str, gens) -> list[np.ndarray]:
        """Per-token log-probs of each continuation under one model (batched, lengths bucketed)."""
        graphdef, params, _ = student if model_name == "student" else teacher
        seqs = []
        for prompt, completions in zip(rendered, gens):
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            seqs.append((p_ids, completions[0].token_ids))
        out: list[np.ndarray] = []
        batch = EXACCERR_BATCH_SIZE
        for start in range(0, len(seqs), batch):
            group = seqs[start : start + batch]
            ids, seg = pad_to_bucket([p + c for p, c in group], batch, EXACCERR_LENGTH_BUCKET)
            logp = np.asarray(scorers[model_name](params, ids, seg)[0])
            for row, (p, c) in enumerate(group):
                out.append(logp[row, len(p) - 1 : len(p) - 1 + len(c)])
        return out

    student_gens = Sampler(student[0], student[1], tokenizer).generate(rendered, sampling)
    teacher_gens = Sampler(teacher[0], teacher[1], tokenizer).generate(rendered, sampling)
    result = stability.exaccerr(
        logps("teacher", student_gens), logps("student", student_gens),
        logps("teacher", teacher_gens), logps("student", teacher_gens),
    )
    return report.to_jsonable(result)


def load_for_eval(path: str, mesh=None, dtype: str = "float32") -> tuple[Any, Any, Any, Any]:
    """(graphdef, params, tokenizer, model config) of a checkpoint (HF dir, hub id or dcd-jax dir)."""
    from dcd_jax.convert.model_dir import load_pretrained
    from dcd_jax.models import abstract_model

    loaded = load_pretrained(path, mesh=mesh, dtype=dtype, param_dtype=dtype)
    return abstract_model(loaded.cfg)[0], loaded.params, loaded.tokenizer(), loaded.cfg


def run_eval(
    models: Mapping[str, str], cfg: EvalConfig, out_dir: str | Path, *, mesh=None, dtype: str = "float32",
    primary_metric: str = "pass@1", loader=load_for_eval,
) -> dict[str, Any]:
    """Evaluate checkpoints ``{name: path}``; write ``out_dir/{generations/<name>/, summary.json, chart.png}``."""
    out_dir = storage.path(out_dir)
    items = load_items(cfg)
    results: dict[str, Any] = {}
    teacher = None
    if cfg.exaccerr_teacher:
        graphdef, params, _, model_cfg = loader(cfg.exaccerr_teacher, None, dtype)
        teacher = (graphdef, params, model_cfg)
    for name, path in models.items():
        graphdef, params, tokenizer, model_cfg = loader(path, mesh, dtype)
        summary, generations = evaluate(graphdef, params, tokenizer, cfg, mesh=mesh, items=items)
        if teacher is not None:
            first = next(iter(items.values()))[: cfg.exaccerr_prompts]
            summary["exaccerr"] = exaccerr_metrics((graphdef, params, model_cfg), teacher, tokenizer,
                                                   [it.prompt for it in first], cfg)
        report.write_results(out_dir / "generations" / name, generations, {"results": {name: summary}})
        results[name] = summary
    full = {"results": results, "config": {"benchmarks": list(cfg.benchmarks), "limit": cfg.limit,
                                           "max_new_tokens": cfg.max_new_tokens, "n_samples": cfg.n_samples}}
    report.write_results(out_dir, {}, full)
    flat = {m: {b: v for b, v in r.items() if isinstance(v, dict) and primary_metric in v} for m, r in results.items()}
    report.bar_chart(flat, out_dir / "chart.png", metric=primary_metric)
    return full


def summary_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]], columns: Sequence[str]) -> str:
    rows = report.summary_rows({m: {b: v for b, v in r.items() if isinstance(v, dict) and "pass@1" in v}
                                for m, r in results.items()})
    return report.markdown_table(rows, ["method", "benchmark", *columns])


def train_eval_hook(hook_cfg: EvalHookConfig, style: PromptStyle, out_dir: str | Path | None = None):
    """The periodic-evaluation hook of the train loop (``eval:`` section of a run config).

    Prompts are rendered with the run's own template and system prompt (``style``: the run's
    :class:`~dcd_jax.data.DataConfig`); returns flat metrics ``eval/<benchmark>/<metric>`` for
    metrics.jsonl, TensorBoard and best-checkpoint selection. With ``out_dir`` and
    ``hook_cfg.save_generations``, each evaluation also writes a results folder (as ``dcd-jax eval``
    does) to ``<out_dir>/eval_results/step_<N>/``: ``generations/<benchmark>.jsonl`` and ``summary.json``.
    """
    cfg = EvalConfig(
        benchmarks=(hook_cfg.benchmark,), paths={hook_cfg.benchmark: hook_cfg.path} if hook_cfg.path else {},
        limit=hook_cfg.limit, max_new_tokens=hook_cfg.max_new_tokens, batch_size=hook_cfg.batch_size,
        template=style.template, system_prompt=style.system_prompt,
    )
    items = load_items(cfg)

    def hook(ctx) -> dict[str, float]:
        summary, generations = evaluate(ctx.graphdef, ctx.params, ctx.tokenizer, cfg, mesh=ctx.mesh, items=items)
        if out_dir is not None and hook_cfg.save_generations and jax.process_index() == 0:
            report.write_results(storage.path(out_dir) / EVAL_RESULTS / f"step_{ctx.step:07d}", generations,
                                 {"step": ctx.step, "results": summary})
        return {f"eval/{bench}/{k}": float(v) for bench, metrics in summary.items() for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}

    return hook
