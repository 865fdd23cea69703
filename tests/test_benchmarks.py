"""Benchmark adapters, each on a tiny local fixture in that benchmark's public schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dcd_jax.eval import benchmarks as B
from dcd_jax.eval.benchmarks import (
    DEFAULT_PROMPT_TEMPLATE,
    BenchmarkLoadError,
    BenchmarkSpec,
    EvalItem,
    get_spec,
    list_benchmarks,
    load_benchmark,
    read_records,
    fill_prompt_template,
)
from dcd_jax.eval.grading import grade

FIX = Path(__file__).parent / "fixtures" / "benchmarks"

# (benchmark, fixture file, expected ids, expected golds)
CASES = [
    ("gsm8k", "gsm8k.jsonl", ["gsm8k-0", "gsm8k-1", "gsm8k-2", "gsm8k-3"], ["12", "1200", "-3", "3.75"]),
    ("math", "math.jsonl", ["math-0", "math-1", "math-2", "math-3"], [r"\frac{1}{2}", "3", "(1,3)", r"2\sqrt{3}"]),
    (
        "math500",
        "math500.jsonl",
        ["test/prealgebra/001.json", "test/algebra/002.json", "test/number_theory/003.json"],
        [r"\frac{1}{3}", "(3,2)", "6"],
    ),
    ("aime24", "aime24.jsonl", ["60", "61", "62"], ["024", "14", "7"]),
    ("aime24", "aime24_capitalized.jsonl", ["2024-I-1", "2024-I-2", "2024-II-1"], ["81", "120", "20"]),
    ("aime25", "aime25.jsonl", ["0", "1", "2"], ["9", "2025", "10"]),
    ("amc23", "amc23.jsonl", ["0", "1", "2"], ["21", "27", "2.5"]),
    ("olympiadbench", "olympiadbench.json", ["1606", "1607", "1608"], ["2, -2", "6", r"\frac{5}{6}"]),
    ("omni_math", "omni_math.jsonl", ["omni_math-0", "omni_math-1", "omni_math-2"], ["4", "5", r"\frac{3}{4}"]),
    ("embedded", "embedded.jsonl", ["syn-0", "syn-1", "syn-2"], ["11", "21", "-3"]),
]


@pytest.mark.parametrize("name,fname,ids,golds", CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_adapter_on_fixture(name, fname, ids, golds):
    items = load_benchmark(name, path=FIX / fname)
    assert all(isinstance(it, EvalItem) for it in items)
    assert [it.id for it in items] == ids
    assert [it.gold for it in items] == golds
    rows = read_records(FIX / fname)
    spec = get_spec(name)
    for it, row in zip(items, rows):
        problem = B._get(row, spec.problem_field)
        assert it.meta["problem"] == problem
        assert it.meta["benchmark"] == spec.name
        if name == "embedded":
            assert it.prompt == problem  # verbatim
        else:
            assert it.prompt == DEFAULT_PROMPT_TEMPLATE.replace("{problem}", problem)
            assert it.prompt.endswith("within \\boxed{}.")


@pytest.mark.parametrize("name,fname,ids,golds", CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_gold_answers_grade_as_correct(name, fname, ids, golds):
    """The adapter's gold must be gradable: a boxed copy of it is correct, a wrong one is not."""
    for it in load_benchmark(name, path=FIX / fname):
        assert grade(f"... so the result is \\boxed{{{it.gold}}}", it.gold).correct
        assert not grade("... so the result is \\boxed{123456789}", it.gold).correct


def test_meta_fields_are_kept():
    math = load_benchmark("math", path=FIX / "math.jsonl")
    assert math[0].meta["level"] == "Level 1" and math[0].meta["type"] == "Prealgebra"
    ob = load_benchmark("olympiadbench", path=FIX / "olympiadbench.json")
    assert ob[0].meta["is_multiple_answer"] is True and ob[0].meta["subfield"] == "Algebra"
    omni = load_benchmark("omni_math", path=FIX / "omni_math.jsonl")
    assert omni[1].meta["difficulty"] == 3.5 and omni[1].meta["domain"][0].startswith("Mathematics")
    json.dumps([it.to_dict() for it in ob + omni])  # meta must be JSON-serialisable


def test_gsm8k_response_grading_end_to_end():
    items = load_benchmark("gsm8k", path=FIX / "gsm8k.jsonl")
    assert grade("25 * 48 = 1200 cups.\n#### 1,200", items[1].gold).correct
    assert grade("The answer is 1200.", items[1].gold).correct
    assert not grade("#### 1,100", items[1].gold).correct


def test_olympiadbench_multi_answer_is_a_set():
    (item,) = load_benchmark("olympiadbench", path=FIX / "olympiadbench.json", limit=1)
    assert grade(r"\boxed{-2, 2}", item.gold).correct
    assert not grade(r"\boxed{2}", item.gold).correct


def test_aime_leading_zero_gold():
    (item,) = load_benchmark("aime24", path=FIX / "aime24.jsonl", limit=1)
    assert grade(r"\boxed{24}", item.gold).correct


def test_field_and_template_overrides(tmp_path):
    rows = [{"qid": "a", "text": "What is 2+2?", "sol": "4"}, {"qid": "b", "text": "What is 3+3?", "sol": "6"}]
    f = tmp_path / "custom.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    items = load_benchmark(
        "aime25",
        path=f,
        problem_field="text",
        answer_field="sol",
        id_field="qid",
        prompt_template="Problem: {problem}\nAnswer in \\boxed{}:",
    )
    assert [(it.id, it.gold) for it in items] == [("a", "4"), ("b", "6")]
    assert items[0].prompt == "Problem: What is 2+2?\nAnswer in \\boxed{}:"


def test_limit_and_missing_gold(tmp_path):
    rows = [{"problem": "p0", "answer": "1"}, {"problem": "p1", "answer": None}, {"problem": "p2", "answer": "3"}]
    f = tmp_path / "x.json"
    f.write_text(json.dumps(rows))
    with pytest.warns(UserWarning, match="dropped 1 row"):
        items = load_benchmark("aime25", path=f)
    assert [it.gold for it in items] == ["1", "3"]
    assert len(load_benchmark("aime25", path=f, limit=1)) == 1


def test_unknown_column_is_a_clear_error(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"prob": "x", "answer": "1"}))
    with pytest.raises(BenchmarkLoadError, match="problem_field"):
        load_benchmark("aime25", path=f)


def test_parquet_and_hub_style_directory(tmp_path):
    """A hub snapshot layout: data/{train,test}-00000-of-00001.parquet; only the split is read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = read_records(FIX / "amc23.jsonl")
    d = tmp_path / "amc23" / "data"
    d.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), d / "test-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:1]), d / "train-00000-of-00001.parquet")
    items = load_benchmark("amc23", path=tmp_path / "amc23")
    assert [it.gold for it in items] == ["21", "27", "2.5"]
    assert len(load_benchmark("amc23", path=tmp_path / "amc23", split="train")) == 1


def test_directory_never_mixes_splits(tmp_path):
    """The synthetic task's asset folder: train.jsonl, teacher_sft.jsonl, eval.jsonl."""
    d = tmp_path / "synthetic"
    d.mkdir()
    rec = {"id": "x", "prompt": "p", "answer": "1"}
    for name in ("train", "teacher_sft"):
        (d / f"{name}.jsonl").write_text(json.dumps({**rec, "id": name}) + "\n")
    with pytest.raises(BenchmarkLoadError, match="split"):
        load_benchmark("embedded", path=d)
    (d / "eval.jsonl").write_text((FIX / "embedded.jsonl").read_text())
    assert [it.id for it in load_benchmark("embedded", path=d)] == ["syn-0", "syn-1", "syn-2"]
    assert [it.id for it in load_benchmark("embedded", path=d, split="train")] == ["train"]
    single = tmp_path / "single"
    single.mkdir()
    (single / "whatever.jsonl").write_text(json.dumps(rec))
    assert len(load_benchmark("embedded", path=single)) == 1


def test_json_variants_and_csv(tmp_path):
    cols = {"problem": ["a", "b"], "answer": ["1", "2"]}
    (tmp_path / "cols.json").write_text(json.dumps(cols))
    assert [it.gold for it in load_benchmark("aime25", path=tmp_path / "cols.json")] == ["1", "2"]
    (tmp_path / "split.json").write_text(json.dumps({"test": [{"problem": "a", "answer": "5"}]}))
    assert load_benchmark("aime25", path=tmp_path / "split.json")[0].gold == "5"
    (tmp_path / "x.csv").write_text("Problem,Answer\nfind x,7\n")
    assert load_benchmark("aime25", path=tmp_path / "x.csv")[0].gold == "7"


def test_math_gold_falls_back_to_answer_column(tmp_path):
    f = tmp_path / "m.jsonl"
    row = {"problem": "p", "solution": "no box here", "answer": "42", "level": "Level 1", "type": "Algebra"}
    f.write_text(json.dumps(row))
    assert load_benchmark("math", path=f)[0].gold == "42"


def test_registry_and_errors(tmp_path):
    for name in ["gsm8k", "math", "math500", "aime24", "aime25", "amc23", "olympiadbench", "omni_math", "embedded"]:
        assert name in list_benchmarks()
    assert get_spec("AIME-2024").name == "aime24"
    assert get_spec("Omni-MATH").name == "omni_math"
    with pytest.raises(KeyError):
        get_spec("nope")
    with pytest.raises(BenchmarkLoadError):
        load_benchmark("gsm8k", path=tmp_path / "missing.jsonl")
    with pytest.raises(BenchmarkLoadError, match="no hub dataset"):
        load_benchmark("embedded")
    with pytest.raises(ValueError):
        fill_prompt_template("no placeholder", "x")
    with pytest.raises(ValueError):
        B.register_benchmark(get_spec("gsm8k"))


def test_hub_load_offline_gives_actionable_error(monkeypatch):
    """No network at test time: a hub id not in the cache must fail with a hint to pass path=."""
    import datasets

    def fake_load(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    with pytest.raises(BenchmarkLoadError, match="pass path="):
        load_benchmark("gsm8k")


def test_hub_load_uses_spec_defaults(monkeypatch):
    import datasets

    calls = []

    def fake_load(hub_id, config, split):
        calls.append((hub_id, config, split))
        return [{"question": "q", "answer": "x\n#### 5"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    items = load_benchmark("gsm8k")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert items[0].gold == "5"


def test_register_custom_spec():
    spec = BenchmarkSpec(
        name="my_bench_for_test",
        hub_id=None,
        split="test",
        problem_field="q",
        answer_field="a",
        gold_extractor=B.gold_from_field,
    )
    B.register_benchmark(spec)
    try:
        assert get_spec("my-bench-for-test") is spec
    finally:
        B.BENCHMARKS.pop("my_bench_for_test")
