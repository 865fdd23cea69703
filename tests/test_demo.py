"""`dcd-jax demo --scale micro` end to end: every stage's artifacts, then a cached second run."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


from dcd_jax.demo import DEFAULT_RECIPE  # noqa: E402

ARM = DEFAULT_RECIPE.arm  # the default recipe's arm, trained beside SFT
STAGES = ("assets", "pretrain", "teacher", "traces", "distill", "scores", "student",
          *(("select",) if DEFAULT_RECIPE.keep_fraction else ()), "sft", ARM, "eval")


# `dcd-jax demo ...` in a fresh process, which then lists the modules it imported.
DEMO_THEN_LIST_MODULES = """
import json, sys
from dcd_jax.cli import main
modules_out, sys.argv = sys.argv[1], ["dcd-jax", *sys.argv[2:]]
try:
    main()
finally:
    open(modules_out, "w").write(json.dumps(sorted(sys.modules)))
"""
# Imported by a dependency only when installed (README command 1 installs none of them).
OPTIONAL_IMPORTS = {
    "torch": "tensorboardX and transformers import it when present",
    "attrs": "grain imports it when present",
    "pytz": "pandas imports it when present",
    "setuptools": "the editable install's import hook",
    "libtpu": "jax loads the TPU plugin when present (the test extra installs it for AOT TPU compiles)",
    "chardet": "requests imports it when present (tensorboardX -> google-cloud-storage -> requests; lm-eval's deps install it)",
}


def run_demo(out, modules_out=None):
    """As a user runs it: a fresh process on the machine's one CPU device."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    modules_out = modules_out or out.parent / "modules.json"
    proc = subprocess.run([sys.executable, "-c", DEMO_THEN_LIST_MODULES, str(modules_out), "demo", "--scale", "micro",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def core_dependency_closure() -> set[str]:
    """Distributions that `pip install .` brings: pyproject's dependencies and theirs (no extras of ours)."""
    import importlib.metadata as md
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    todo = [(Requirement(r), frozenset({""})) for r in declared]
    seen = set()
    while todo:
        req, active_extras = todo.pop()
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in active_extras):
            continue
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            subs = md.requires(req.name) or []
        except md.PackageNotFoundError:
            continue
        todo += [(Requirement(s), frozenset({"", *req.extras})) for s in subs]
    return {name for name, _ in seen}


def imported_distributions(modules: list[str]) -> set[str]:
    import importlib.metadata as md

    from packaging.utils import canonicalize_name

    owners = md.packages_distributions()
    tops = {m.split(".")[0] for m in modules} - set(sys.stdlib_module_names)
    return {canonicalize_name(d) for t in tops for d in owners.get(t, [])} - {"dcd-jax"}


def test_demo_micro_runs_every_stage_and_caches(tmp_path):
    out = tmp_path / "demo"
    printed = run_demo(out)
    for stage in STAGES:
        assert (out / f"{stage}.done.json").is_file(), stage
    # (a) task data, tokenizer and fresh HF checkpoints
    for f in ("teacher_train.jsonl", "pretrain.jsonl", "prompts.jsonl", "val.jsonl", "eval.jsonl",
              "tokenizer/tokenizer.json", "student_init/config.json"):
        assert (out / "assets" / f).is_file(), f
    pretrain = [json.loads(line) for line in (out / "assets" / "pretrain.jsonl").open()]
    # the base stage: careful traces of shorter problems than the distillation task, none of its prompts
    assert {r["style"] for r in pretrain} == {"careful"} and max(r["num_steps"] for r in pretrain) <= 3
    held_out = {json.loads(line)["prompt"] for f in ("prompts.jsonl", "eval.jsonl", "val.jsonl")
                for line in (out / "assets" / f).open()}
    assert not held_out & {r["prompt"] for r in pretrain}
    # (b) the student's base stage, exported as an HF checkpoint; (g) converted from it, as a real student
    import numpy as np
    from safetensors.numpy import load_file

    def weights(d):
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}

    pretrained, init = weights(out / "runs" / "pretrain" / "hf"), weights(out / "assets" / "student_init")
    key = "model.embed_tokens.weight"
    assert not np.array_equal(pretrained[key], init[key])  # the base stage really trained it
    from dcd_jax.convert.model_dir import load_pretrained

    student = load_pretrained(str(out / "student_flax"))
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in __import__("jax").tree_util.tree_leaves_with_path(student.params)}
    embed = next(v for k, v in flat.items() if "embed" in k)
    np.testing.assert_array_equal(np.asarray(embed)[: pretrained[key].shape[0]], pretrained[key])
    # (c) the teacher: the student's base stage trained further on the task (a curriculum), exported to HF
    assert json.loads((out / "teacher.done.json").read_text())["init"] == str(out / "runs" / "pretrain" / "hf")
    teacher = weights(out / "runs" / "teacher" / "hf")
    assert not np.array_equal(teacher[key], pretrained[key])
    # (d) its sampled traces and their measured style mix;
    # (e) the distillation data (stand-in: correct programmatic traces in the teacher's style mix)
    assert (out / "runs" / "teacher" / "hf" / "model.safetensors.index.json").is_file()
    sampled = json.loads((out / "traces.done.json").read_text())
    assert sum(sampled["kept_style_counts"].values()) == sampled["traces_in_file"] > 0
    traces = [json.loads(line) for line in (out / "traces" / "train.jsonl").open()]
    assert len(traces) == 48 and all({"prompt", "response", "answer", "style"} <= set(t) for t in traces)
    assert {t["style"] for t in traces} >= {"careful", "compressed"} and all(t["trace_correct"] for t in traces)
    assert (out / "traces" / "train.teacher.parquet").is_file()
    # (h) the default recipe's selection (when it has one): the share of the traces the student fits best,
    # in their order, with every trace's log-ratio
    if DEFAULT_RECIPE.keep_fraction:
        selection = json.loads((out / "select.done.json").read_text())
        kept = [json.loads(line) for line in (out / "traces" / "train_selected.jsonl").open()]
        assert selection["kept"] == len(kept) == round(DEFAULT_RECIPE.keep_fraction * len(traces))
        assert selection["traces"] == 48
        ids = [t["id"] for t in traces]
        assert [k["id"] for k in kept] == [i for i in ids if i in {k["id"] for k in kept}]
        ratios = json.loads((out / "traces" / "train_selected.jsonl.selection.json").read_text())["log_ratios"]
        assert min(ratios[k["id"]] for k in kept) >= max(v for i, v in ratios.items() if i not in {k["id"] for k in kept})
    # (i) SFT on all traces and the default recipe, same steps, exported to HF
    sft = json.loads((out / "sft.done.json").read_text())
    default = json.loads((out / f"{ARM}.done.json").read_text())
    assert sft["steps"] == default["steps"] > 0
    for name in ("sft", ARM):
        assert (out / "runs" / name / "hf" / "config.json").is_file()
    # (i) evaluation of teacher, undistilled student and both distilled ones; (j) table, plot, report
    summary = json.loads((out / "results" / "summary.json").read_text())
    assert set(summary["results"]) == {"teacher", "student", "sft", ARM}
    report = json.loads((out / "summary.json").read_text())
    for row in report["rows"]:
        assert set(row["accuracy_by_steps"]) <= {"2", "3", "4"} and abs(sum(row["style_shares"].values()) - 1) < 1e-9
    assert (out / "comparison.png").stat().st_size > 5000 and (out / "report.md").is_file()
    assert "| method |" in printed and f"| {ARM} |" in printed and "Accuracy by number of operations" in printed
    assert f"One seed: {ARM} - sft" in printed  # the verdict says how far one run can be trusted

    # Every library the demo imported is installed by `pip install -e .` alone (README command 1):
    # a fresh venv once lacked jinja2, which transformers needs for chat templates but does not require.
    used = imported_distributions(json.loads((tmp_path / "modules.json").read_text()))
    undeclared = used - core_dependency_closure() - set(OPTIONAL_IMPORTS)
    assert not undeclared, f"imported by the demo but not installed by pyproject's dependencies: {sorted(undeclared)}"
    assert "jinja2" in used  # the check sees the chat-template path

    markers = {s: (out / f"{s}.done.json").read_text() for s in STAGES}
    run_demo(out)
    assert {s: (out / f"{s}.done.json").read_text() for s in STAGES} == markers  # all reused
