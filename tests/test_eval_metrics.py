"""Metrics (pass@k, avg@k, bootstrap CI, summaries), trace stability, ExAccErr and the report writer."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from dcd_jax.eval.metrics import avg_at_k, bootstrap_ci, default_ks, pass_at_k, summarize
from dcd_jax.eval.report import bar_chart, markdown_table, summary_rows, to_jsonable, write_results
from dcd_jax.eval.stability import (
    exaccerr,
    exaccerr_from_losses,
    format_failure_rate,
    kl_estimate_student_samples,
    kl_estimate_teacher_samples,
    length_stats,
    repetition_detected,
    repetition_rate,
    stability_summary,
    truncation_rate,
)

# ---------------------------------------------------------------------------------------------
# pass@k
# ---------------------------------------------------------------------------------------------


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Enumerate every k-subset of n samples (c of them correct): share with >= 1 correct."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 10])
def test_pass_at_k_matches_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)
            assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_properties_and_errors():
    assert pass_at_k(16, 4, 1) == pytest.approx(avg_at_k(16, 4)) == 0.25
    assert pass_at_k(200, 0, 100) == 0.0 and pass_at_k(200, 1, 200) == 1.0
    vals = [pass_at_k(64, 5, k) for k in range(1, 65)]
    assert all(a <= b + 1e-15 for a, b in zip(vals, vals[1:]))  # monotone in k
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 2, 5)
    with pytest.raises(ValueError):
        avg_at_k(0, 0)
    assert default_ks(8) == [1, 2, 4, 8] and default_ks(6) == [1, 2, 4, 6] and default_ks(1) == [1]


# ---------------------------------------------------------------------------------------------
# bootstrap
# ---------------------------------------------------------------------------------------------


def test_bootstrap_ci_seeded_and_contains_mean():
    rng = np.random.default_rng(123)
    values = (rng.random(300) < 0.6).astype(float)
    lo, hi = bootstrap_ci(values, n_boot=1000, alpha=0.05, seed=7)
    assert lo < values.mean() < hi
    assert (lo, hi) == bootstrap_ci(values, n_boot=1000, alpha=0.05, seed=7)  # deterministic
    assert (lo, hi) != bootstrap_ci(values, n_boot=1000, alpha=0.05, seed=8)
    # roughly the normal-approximation width 2 * 1.96 * sd / sqrt(n)
    sd = values.std() / math.sqrt(values.size)
    assert (hi - lo) == pytest.approx(2 * 1.96 * sd, rel=0.2)
    # a 50 % interval is narrower than a 95 % one
    lo50, hi50 = bootstrap_ci(values, n_boot=1000, alpha=0.5, seed=7)
    assert hi50 - lo50 < hi - lo


def test_bootstrap_ci_degenerate_cases():
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)
    assert bootstrap_ci([0.3]) == (0.3, 0.3)
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    with pytest.raises(ValueError):
        bootstrap_ci([0, 1], alpha=0.0)


# ---------------------------------------------------------------------------------------------
# summarize
# ---------------------------------------------------------------------------------------------


def test_summarize_greedy_run():
    items = [{"correct": [True]}, {"correct": [False]}, {"correct": True}, {"correct": [True]}]
    s = summarize(items, n_boot=200, seed=0)
    assert s["n_items"] == 4 and s["n_samples"] == 1
    assert s["pass@1"] == 0.75
    lo, hi = s["pass@1_ci"]
    assert lo <= 0.75 <= hi


def test_summarize_sampled_run():
    items = [
        {"correct": [True, True, False, False]},
        {"correct": [False, False, False, False]},
        {"correct": [True, False, False, False]},
    ]
    s = summarize(items, n_boot=200)
    assert s["n_samples"] == 4
    assert s["avg@4"] == pytest.approx((0.5 + 0.0 + 0.25) / 3)
    assert s["pass@1"] == pytest.approx(s["avg@4"])
    assert s["pass@2"] == pytest.approx((pass_at_k(4, 2, 2) + 0 + pass_at_k(4, 1, 2)) / 3)
    assert s["pass@4"] == pytest.approx(2 / 3)
    assert set(k for k in s if k.startswith("pass@") and not k.endswith("_ci")) == {"pass@1", "pass@2", "pass@4"}
    s2 = summarize(items, ks=[3], n_boot=50)
    assert "pass@3" in s2 and "pass@2" not in s2


def test_summarize_greedy_plus_samples_and_objects():
    class R:
        def __init__(self, correct, greedy_correct):
            self.correct, self.greedy_correct = correct, greedy_correct

    s = summarize([R([True, False], True), R([False, False], False)], n_boot=50)
    assert s["pass@1"] == 0.5  # greedy, not the sampled 0.25
    assert s["avg@2"] == 0.25
    assert summarize([{"greedy_correct": True, "correct": []}], n_boot=10)["pass@1"] == 1.0
    with pytest.raises(ValueError):
        summarize([{"correct": [True], "greedy_correct": True}, {"correct": [True]}])
    assert summarize([]) == {"n_items": 0, "n_samples": 0}


# ---------------------------------------------------------------------------------------------
# trace stability
# ---------------------------------------------------------------------------------------------

_RNG = np.random.default_rng(0)
NON_LOOP = _RNG.integers(0, 30_000, size=2000).tolist()


def test_repetition_detected_on_constructed_loops():
    prefix = NON_LOOP[:300]
    unit = [11, 22, 33, 44, 55]
    assert repetition_detected(prefix + unit * 10)  # short-period loop at the end
    assert repetition_detected(prefix + [7] * 40)  # one token repeated
    long_unit = NON_LOOP[500:540]  # period 40 > ngram
    assert repetition_detected(prefix + long_unit * 3 + NON_LOOP[600:700])  # loop in the middle
    assert not repetition_detected(NON_LOOP)  # random tokens: no loop
    assert not repetition_detected(prefix + long_unit * 2)  # only twice
    assert not repetition_detected(prefix + unit * 3)  # 15 tokens < ngram
    assert repetition_detected(prefix + unit * 3, ngram=5, min_repeats=3)
    assert not repetition_detected([])


def test_repetition_detected_on_text():
    sentence = "Wait, let me recompute the sum of the first two terms again carefully. "
    loop = "We start by computing the product. " + sentence * 8
    assert repetition_detected(loop)
    normal = " ".join(f"Step {i}: multiply {i} by {i + 1} to get {i * (i + 1)}." for i in range(60))
    assert not repetition_detected(normal)
    assert repetition_rate([loop, normal]) == 0.5


def test_stability_summary_and_parts():
    loop = NON_LOOP[:100] + [5, 6] * 30
    seqs = [NON_LOOP[:200], loop, NON_LOOP[300:350], NON_LOOP[:10]]
    finished = [True, False, True, False]
    extracted = ["3", None, "", "4"]
    s = stability_summary(finished=finished, extracted=extracted, sequences=seqs)
    assert s["n_responses"] == 4
    assert s["truncation_rate"] == 0.5
    assert s["format_failure_rate"] == 0.5
    assert s["repetition_rate"] == 0.25
    assert s["loop_truncation_rate"] == 0.25
    assert s["length_max"] == 200 and s["length_min"] == 10
    s2 = stability_summary(finished=finished, extracted=extracted, lengths=[1, 2, 3, 4])
    assert s2["length_mean"] == 2.5 and "repetition_rate" not in s2
    with pytest.raises(ValueError):
        stability_summary(finished=[True], extracted=[])
    assert length_stats([1, 2, 3, 4, 100])["median"] == 3
    assert truncation_rate([True, True]) == 0.0 and format_failure_rate([None]) == 1.0


# ---------------------------------------------------------------------------------------------
# ExAccErr
# ---------------------------------------------------------------------------------------------


def test_kl_estimators_are_unbiased():
    """Monte Carlo check of both single-sample estimators against the exact KL(p_T || p_S)."""
    rng = np.random.default_rng(0)
    p_t = np.array([0.5, 0.3, 0.15, 0.05])
    p_s = np.array([0.25, 0.25, 0.25, 0.25])
    exact = float(np.sum(p_t * np.log(p_t / p_s)))
    xs = rng.choice(4, size=200_000, p=p_s)
    est_s = kl_estimate_student_samples(np.log(p_t[xs]), np.log(p_s[xs]))
    xt = rng.choice(4, size=200_000, p=p_t)
    est_t = kl_estimate_teacher_samples(np.log(p_t[xt]), np.log(p_s[xt]))
    assert est_s.mean() == pytest.approx(exact, rel=0.03)
    assert est_t.mean() == pytest.approx(exact, rel=0.03)
    assert (est_s >= -1e-12).all() and (est_t >= -1e-12).all()
    assert kl_estimate_student_samples([-np.inf], [-1.0])[0] == 1.0  # teacher prob 0: limit value
    with pytest.raises(ValueError):
        kl_estimate_teacher_samples([0.0, 0.0], [0.0])


def test_exaccerr_formula_on_known_losses():
    # constant per-step error eps on teacher prefixes; student error grows linearly (compounding)
    eps = 0.1
    teacher = [np.full(10, eps)] * 3
    student = [eps * (1 + 0.5 * np.arange(10))] * 2
    r = exaccerr_from_losses(student, teacher)
    ls = np.arange(1, 11)
    regret = np.cumsum(eps * (1 + 0.5 * np.arange(10)))
    np.testing.assert_allclose(r.regret, regret)
    np.testing.assert_allclose(r.per_step_error, eps)
    np.testing.assert_allclose(r.acc_err, regret / eps)
    np.testing.assert_allclose(r.ex_acc_err_pct, 100 * (regret - ls * eps) / (ls * eps), atol=1e-9)
    assert r.at(1) == pytest.approx(0.0) and r.at(10) > 100
    assert np.all(np.diff(r.ex_acc_err_pct) > 0)
    # no exposure bias: same error on both prefixes -> 0 %, AccErr(l) = l
    r0 = exaccerr_from_losses(teacher, teacher)
    np.testing.assert_allclose(r0.ex_acc_err_pct, 0.0, atol=1e-12)
    np.testing.assert_allclose(r0.acc_err, ls)
    json.dumps(r.to_dict())


def test_exaccerr_ragged_lengths_and_min_count():
    student = [np.ones(5), np.ones(2) * 3]
    teacher = [np.ones(4)]
    r = exaccerr_from_losses(student, teacher, max_len=5, min_count=1)
    assert r.n_student.tolist() == [2, 2, 1, 1, 1] and r.n_teacher.tolist() == [1, 1, 1, 1, 0]
    assert r.regret[0] == pytest.approx(2.0)  # mean of 1 and 3
    assert r.regret[2] == pytest.approx(3.0)  # only the long sequence reaches l=3
    assert math.isnan(r.ex_acc_err_pct[4])  # no teacher sequence reaches l=5
    r2 = exaccerr_from_losses(student, teacher, min_count=2)
    assert math.isnan(r2.ex_acc_err_pct[2]) and not math.isnan(r2.regret[1])


def test_exaccerr_from_logprobs_end_to_end():
    """Student identical to the teacher -> every estimate is exactly 0 error: ExAccErr undefined.

    Student that drifts on its own prefixes -> positive excess error."""
    rng = np.random.default_rng(1)
    L = 50
    t_logp = [np.log(rng.uniform(0.2, 0.9, L)) for _ in range(20)]
    # on teacher prefixes the student is close to the teacher ...
    s_on_t = [lp + rng.normal(0, 0.05, L) for lp in t_logp]
    # ... on its own prefixes it is increasingly off (the teacher dislikes its tokens more and more)
    s_logp = [np.log(rng.uniform(0.2, 0.9, L)) for _ in range(20)]
    t_on_s = [lp - 0.02 * np.arange(L) for lp in s_logp]
    r = exaccerr(t_on_s, s_logp, t_logp, s_on_t)
    assert r.prefix_len.size == L
    assert r.at(L) > r.at(10) > 0
    with pytest.raises(ValueError):
        exaccerr(t_on_s[:2], s_logp[:3], t_logp, s_on_t)


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def _results():
    return {
        "teacher": {
            "gsm8k": {"pass@1": 0.8, "pass@1_ci": [0.75, 0.85], "n_items": 100},
            "math500": {"pass@1": 0.6, "pass@1_ci": [0.55, 0.65], "n_items": 500},
        },
        "student-dcd": {
            "gsm8k": {"pass@1": 0.7, "pass@1_ci": [0.64, 0.76], "n_items": 100},
            "math500": {"pass@1": float("nan"), "n_items": 500},
        },
    }


def test_write_results_files(tmp_path):
    gens = {
        "gsm8k": [{"id": "gsm8k-0", "response": "#### 3", "correct": np.bool_(True), "n_tokens": np.int32(5)}],
        "aime/24": [{"id": 1, "response": "\\boxed{7}", "logp": np.array([-0.1, -0.2])}],
    }
    summary = {"run": {"seed": 0}, "results": _results()}
    paths = write_results(tmp_path / "run1", gens, summary)
    assert (tmp_path / "run1" / "generations" / "gsm8k.jsonl").exists()
    assert paths["generations/aime/24"].name == "aime_24.jsonl"
    lines = paths["generations/gsm8k"].read_text().splitlines()
    assert json.loads(lines[0]) == {"id": "gsm8k-0", "response": "#### 3", "correct": True, "n_tokens": 5}
    loaded = json.loads(paths["summary"].read_text())  # strict JSON: NaN became null
    assert loaded["results"]["student-dcd"]["math500"]["pass@1"] is None
    assert loaded["results"]["teacher"]["gsm8k"]["pass@1_ci"] == [0.75, 0.85]
    assert to_jsonable({"a": (1, np.float32(0.5))}) == {"a": [1, 0.5]}


def test_markdown_table():
    rows = summary_rows(_results())
    table = markdown_table(rows)
    lines = table.splitlines()
    assert lines[0] == "| method | benchmark | pass@1 | n_items |"
    assert len(lines) == 2 + 4
    assert "| teacher | gsm8k | 0.800 [0.750, 0.850] | 100 |" in lines
    assert "| student-dcd | math500 | - | 500 |" in lines
    pct = markdown_table(rows, columns=["method", "benchmark", "pass@1"], float_fmt="{:.1f}", percent=True)
    assert "| teacher | math500 | 60.0 [55.0, 65.0] |" in pct.splitlines()


def test_bar_chart_png(tmp_path):
    out = bar_chart(_results(), tmp_path / "charts" / "pass1.png", metric="pass@1", title="pass@1")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError):
        bar_chart(_results(), tmp_path / "x.png", metric="pass@64")
    with pytest.raises(ValueError):
        bar_chart({}, tmp_path / "x.png")
