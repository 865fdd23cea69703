"""Mechanism diagnostics: weight by trace style and by response position; output style and accuracy by length."""

import json
import math

import numpy as np
import pytest

from dcd_jax.eval.weight_diagnostics import (
    mean_weight_by_group, mean_weight_by_position, output_diagnostics, token_weights,
)
from dcd_jax.objectives.config import DCDConfig, LamSchedule, ObjectiveConfig


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_weight_by_style_and_position_on_a_hand_built_batch():
    # Three traces (rows), padded: two careful, one compressed.
    weights = np.array([[2.0, 1.0, 3.0, 9.0], [1.0, 1.0, 0.0, 0.0], [0.5, 0.25, 0.25, 9.0]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0]], np.float32)
    by_style = mean_weight_by_group(weights, mask, ["careful", "careful", "compressed"])
    assert by_style == {"careful": (2 + 1 + 3 + 1 + 1) / 5, "compressed": 1.0 / 3}
    # Position bins within each response: a 5-token response puts one token in each fifth.
    w5 = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                   [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 5.0, 7.0]])
    m5 = np.array([[1] * 5 + [0] * 5, [1] * 10], np.float32)
    assert mean_weight_by_position(w5, m5) == [1.0, 2.0, 3.0, 4.0, (5 + 5 + 7) / 3]


def test_token_weights_are_the_training_weights():
    """DCD with tau 1, b 0, no normalization, lam 1 is pi_S / (pi_S + pi_T) per token; with
    normalization the mean over all traces' tokens is 1; a student that finds the compressed trace
    unlikely (the teacher does not) gives it less weight than its own careful style."""
    student = [np.log([0.9, 0.8, 0.7]), np.log([0.05, 0.1])]
    teacher = [np.log([0.6, 0.8, 0.7]), np.log([0.7, 0.9])]
    const = LamSchedule(kind="constant")
    raw = ObjectiveConfig(weighting="dcd", dcd=DCDConfig(normalize=False), lam=const)
    w, mask = token_weights(raw, student, teacher)
    for row, (s, t) in enumerate(zip(student, teacher)):
        for i in range(len(s)):
            np.testing.assert_allclose(w[row, i], sigmoid(s[i] - t[i]), rtol=1e-6)
    assert mask.sum() == 5 and w[1, 2] == 1.0  # padding: weight 1, masked out
    norm = ObjectiveConfig(weighting="dcd", lam=const)
    w, mask = token_weights(norm, student, teacher)
    np.testing.assert_allclose((w * mask).sum() / mask.sum(), 1.0, rtol=1e-6)
    by_style = mean_weight_by_group(w, mask, ["careful", "compressed"])
    assert by_style["careful"] > 1.0 > by_style["compressed"]
    # The prefix weighting: the compressed trace's second token keeps the first token's low ratio.
    prefix = ObjectiveConfig(weighting="dcd_prefix", dcd=DCDConfig(normalize=False), lam=const)
    w, _ = token_weights(prefix, student, teacher)
    l = student[1] - teacher[1]
    np.testing.assert_allclose(w[1, :2], [sigmoid(l[0]), sigmoid((l[0] + l[1]) / 2)], rtol=1e-6)


def test_output_diagnostics_accuracy_by_steps_and_style_shares():
    generations = [
        {"id": "a", "response": "Ann starts with 3 apples.\n3 + 2 = 5.\nThe answer is 5.", "correct": True},
        {"id": "b", "response": "3 + 2 * 4 = 11.\nThe answer is 11.", "correct": False},
        {"id": "c", "response": "The answer is 7.", "correct": True},
        {"id": "d", "response": "3 + 2 = 5.\n5 - 1 =", "correct": False},
    ]
    out = output_diagnostics(generations, {"a": 2, "b": 3, "c": 3, "d": 8})
    assert out["accuracy_by_steps"] == {2: 1.0, 3: 0.5, 8: 0.0}
    assert out["style_shares"] == {"answer_only": 0.25, "careful": 0.25, "compressed": 0.25, "other": 0.25}


def test_output_styles_of_restated_careful_traces():
    """The demo regime's careful traces restate each sentence of the problem on its own line: the
    restated sentences (words, no ``=``) do not count as computation lines, so the trace stays
    ``careful``; a multi-operation line anywhere makes it ``compressed``; no answer is ``other``."""
    from dcd_jax.data.synthetic import SyntheticTaskConfig, classify_style, generate_problems

    cfg = SyntheticTaskConfig(n_examples=40, min_steps=3, max_steps=6, max_start=9, max_operand=9, max_value=20,
                              restate=True, style_mix={"careful": 1.0, "compressed": 1.0})
    for r in generate_problems(cfg):
        sentences = r["prompt"].split(". ")[1:-1]
        assert all(s.rstrip(".") + "." in r["solution"].split("\n") for s in sentences)
        assert classify_style(r["solution"]) == "careful"
        assert classify_style(r["response"]) == ("careful" if r["style"] == "careful" else "compressed")
        assert classify_style(r["solution"].rsplit("\n", 1)[0]) == "other"
    generations = [
        {"id": "a", "response": "Ann starts with 3 apples.\nShe finds 2 more apples.\n3 + 2 = 5.\nThe answer is 5.",
         "correct": True},
        {"id": "b", "response": "Ann starts with 3 apples.\nShe finds 2 more apples.\n3 + 2 * 4 = 11.\nThe answer is 11.",
         "correct": False},
    ]
    assert output_diagnostics(generations, {"a": 2, "b": 2}) == {"accuracy_by_steps": {2: 0.5},
                                                                  "style_shares": {"careful": 0.5, "compressed": 0.5}}


def test_weight_diagnostics_from_two_scores_files(tmp_path):
    """From the scores files of two models on the same traces: when the student is the teacher every
    log-ratio is 0, so normalized DCD weights are 1 for every style and position; the student's NLL
    by style is the mean of its stored per-token log-probs."""
    from train_fixtures import make_assets

    from dcd_jax.data import DataConfig
    from dcd_jax.eval.weight_diagnostics import read_logprobs, weight_diagnostics
    from dcd_jax.teacher.scoring import ScoreConfig, score_teacher

    assets = make_assets(tmp_path / "assets", n_examples=12)
    records = [json.loads(line) for line in assets["train"].open()]
    scores = score_teacher(DataConfig(path=str(assets["train"])),
                           ScoreConfig(teacher=str(assets["student"]), topk=0, out=str(tmp_path / "s.parquet")),
                           progress=False)
    cfg = ObjectiveConfig(weighting="dcd", lam=LamSchedule(kind="constant"))
    out = weight_diagnostics(cfg, records, scores, scores)
    styles = {r["style"] for r in records}
    assert set(out["by_style"]) == styles and len(styles) > 1
    assert all(abs(w - 1.0) < 1e-5 for w in [*out["by_style"].values(), *out["by_position"]])
    lp = read_logprobs(scores)
    careful = np.concatenate([lp[str(r["id"])] for r in records if r["style"] == "careful"])
    assert abs(out["student_nll_by_style"]["careful"] + careful.mean()) < 1e-4


def test_token_classes_of_a_hand_built_trace():
    """Each response token of a careful trace gets its class from the text it starts with, aligned
    with the training tokenization (one class per response token, the end-of-turn token last)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from dcd_jax.data import DataConfig
    from dcd_jax.eval.weight_diagnostics import record_token_classes, response_token_classes
    from dcd_jax.data.tokenization import tokenize_example

    response = "Ann starts with 4 coins.\nShe finds 3 more coins.\n4 + 3 = 7.\nThe answer is 7."
    text_of = lambda s: [response.index(s)]  # noqa: E731
    # by hand, on character offsets: first token, sentence copy, operand, operator, result, answer, end
    starts = [0, *text_of("She"), *text_of("finds"), response.index("4 +"), response.index("+"),
              response.index("= 7") , response.index("7."), response.index("The answer"), len(response)]
    assert response_token_classes(response, starts) == ["first", "restated", "restated", "operand", "operator",
                                                        "operator", "result", "answer", "end"]
    tok = AutoTokenizer.from_pretrained(Path(__file__).parent / "fixtures" / "data" / "synthetic_tokenizer")
    record = {"id": "r0", "prompt": "Ann has 4 coins. She finds 3 more coins. How many?", "response": response}
    classes = record_token_classes([record], tok, DataConfig(path="unused.jsonl"))["r0"]
    example = tokenize_example(record, tok, DataConfig(path="unused.jsonl"))
    targets = example.input_ids[example.response_positions]
    assert len(classes) == len(targets) and classes[0] == "first" and classes[-1] == "end"
    pieces = [tok.decode([int(t)]) for t in targets]
    for piece, cls in zip(pieces, classes):
        if cls == "result":
            assert piece.strip() == "7"
        if cls == "operator":
            assert piece.strip() in "+-*/="
        if cls == "restated":
            assert piece.strip() and piece.strip() in "She finds 3 more coins."
    assert classes.count("result") == 1 and classes.count("operator") == 2
    assert {"restated", "operand", "answer"} <= set(classes)


def test_weight_by_token_class_is_the_token_mean_per_class():
    from dcd_jax.eval.weight_diagnostics import mean_by_token_class

    weights = np.array([[2.0, 1.0, 4.0, 9.0], [0.5, 3.0, 0.0, 0.0]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
    classes = [["first", "result", "result", "end"], ["first", "operand"]]
    assert mean_by_token_class(weights, mask, classes) == {"first": 1.25, "operand": 3.0, "result": 2.5}


def test_weight_by_style_and_token_class_on_hand_built_scores(tmp_path):
    """weight_diagnostics with token classes: the training weight of each token, averaged per class
    within each trace style (here DCD at tau 1 without normalization: pi_S / (pi_S + pi_T))."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dcd_jax.eval.weight_diagnostics import weight_diagnostics

    def write(path, rows):
        pq.write_table(pa.table({"id": list(rows), "teacher_logprobs": [list(map(float, v)) for v in rows.values()]}),
                       path)
        return path

    student = {"a": np.log([0.9, 0.5, 0.2]), "b": np.log([0.1, 0.4])}
    teacher = {"a": np.log([0.9, 0.5, 0.6]), "b": np.log([0.9, 0.4])}
    records = [{"id": "a", "style": "careful"}, {"id": "b", "style": "compressed"}]
    classes = {"a": ["first", "result", "result"], "b": ["first", "result"]}
    cfg = ObjectiveConfig(weighting="dcd", dcd=DCDConfig(normalize=False), lam=LamSchedule(kind="constant"))
    out = weight_diagnostics(cfg, records, write(tmp_path / "s.parquet", student), write(tmp_path / "t.parquet", teacher),
                             classes)
    w = lambda s, t: s / (s + t)  # noqa: E731
    expected = {"careful": {"first": 0.5, "result": (0.5 + w(0.2, 0.6)) / 2},
                "compressed": {"first": w(0.1, 0.9), "result": 0.5}}
    for style, per_class in expected.items():
        assert out["by_style_and_token_class"][style] == pytest.approx(per_class, rel=1e-5)
    assert out["by_token_class"]["first"] == pytest.approx((0.5 + w(0.1, 0.9)) / 2, rel=1e-5)


def test_line_kinds_of_a_hand_built_mixed_trace_with_a_slip():
    """Each token gets the kind of the line it starts on; the record's error line is ``wrong``."""
    from dcd_jax.eval.weight_diagnostics import response_line_kinds

    response = "She finds 3 coins.\n4 + 3 = 7.\n7 - 2 + 5 = 10.\n10 - 1 = 8.\nThe answer is 9."
    lines = response.split("\n")
    starts = [0, response.index("4 +"), response.index("= 7"), response.index("7 - 2"), response.index("+ 5"),
              response.index("10 - 1"), response.index("The answer"), None]
    kinds = response_line_kinds(response, starts)
    assert kinds == ["text", "one-op", "one-op", "multi-op", "multi-op", "one-op", "text", "end"]
    assert response_line_kinds(response, starts, error_line=lines.index("10 - 1 = 8.")) == \
        ["text", "one-op", "one-op", "multi-op", "multi-op", "wrong", "text", "end"]


def test_weight_by_line_kind_on_generated_records(tmp_path):
    """On generated mixed traces with slips: the kinds cover every response token, the wrong line is
    exactly the record's ``error_line``, and the weight by line kind is the token mean per kind."""
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from dcd_jax.data import DataConfig
    from dcd_jax.data.synthetic import SyntheticTaskConfig, generate_problems
    from dcd_jax.data.tokenization import tokenize_example
    from dcd_jax.eval.weight_diagnostics import record_line_kinds, weight_diagnostics

    records = generate_problems(SyntheticTaskConfig(n_examples=12, style_mix={"mixed": 1.0}, min_steps=4, max_steps=6,
                                                    intermediate_error_rate=0.5, seed=3))
    assert any("error_line" in r for r in records) and any("error_line" not in r for r in records)
    tok = AutoTokenizer.from_pretrained(Path(__file__).parent / "fixtures" / "data" / "synthetic_tokenizer")
    data_cfg = DataConfig(path="unused.jsonl")
    kinds = record_line_kinds(records, tok, data_cfg)
    for r in records:
        example = tokenize_example(r, tok, data_cfg)
        k = kinds[r["id"]]
        assert len(k) == int(example.response_mask.sum()) and k[-1] == "end"
        assert ("wrong" in k) == ("error_line" in r)
    assert {"one-op", "multi-op"} <= {x for k in kinds.values() for x in k}
    # weights: student log-prob -1 on wrong-line tokens, 0 elsewhere; teacher 0 everywhere
    student = {r["id"]: [(-1.0 if x == "wrong" else 0.0) for x in kinds[r["id"]]] for r in records}
    teacher = {r["id"]: [0.0] * len(kinds[r["id"]]) for r in records}
    write = lambda path, rows: pq.write_table(pa.table({"id": list(rows), "teacher_logprobs": list(rows.values())}),  # noqa: E731
                                              path) or path
    cfg = ObjectiveConfig(weighting="dcd", dcd=DCDConfig(normalize=False), lam=LamSchedule(kind="constant"))
    out = weight_diagnostics(cfg, records, write(tmp_path / "s.parquet", student), write(tmp_path / "t.parquet", teacher),
                             line_kinds=kinds)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    assert out["by_line_kind"]["wrong"] == pytest.approx(sig(-1.0), rel=1e-5)
    assert out["by_line_kind"]["one-op"] == pytest.approx(0.5, rel=1e-5)
    assert out["student_nll_by_line_kind"]["wrong"] == pytest.approx(1.0, rel=1e-5)
    assert out["teacher_nll_by_line_kind"]["multi-op"] == pytest.approx(0.0, abs=1e-6)


def test_error_shares_count_outputs_by_kind_of_error():
    from dcd_jax.eval.weight_diagnostics import error_shares

    prompt = "Ann has 4 coins. She finds 3 more coins. How many coins does Ann have now?"
    right = "Ann starts with 4 coins.\nShe finds 3 more coins.\n4 + 3 = 7.\nThe answer is 7."
    gens = [{"prompt": prompt, "response": right, "correct": True, "kind": "greedy"},
            {"prompt": prompt, "response": right.replace("= 7.\nThe answer is 7", "= 8.\nThe answer is 8"),
             "correct": False, "kind": "greedy"},
            {"prompt": prompt, "response": right.replace("4 + 3", "4 + 4").replace("7", "8"), "correct": False,
             "kind": "greedy"},
            {"prompt": prompt, "response": right.replace("finds 3", "finds 5"), "correct": True, "kind": "greedy"},
            {"prompt": prompt, "response": "The answer is 1.", "correct": False, "kind": "sample"}]
    assert error_shares(gens) == {"arithmetic": 0.25, "misquoted": 0.25, "skipped": 0.25, "answer": 0.0,
                                  "wrong_otherwise": 0.25}
