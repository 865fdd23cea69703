"""Trace selection by the pretrained student's fit (dcd_jax.teacher.selection), on hand-built scores."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dcd_jax.teacher.selection import select_by_log_ratio, select_traces, trace_log_ratios


def test_trace_log_ratio_is_the_mean_per_token_difference():
    student = {"a": np.log([0.5, 0.25]), "b": np.log([0.1]), "c": np.log([0.9])}
    teacher = {"a": np.log([0.5, 0.5]), "b": np.log([0.8]), "z": np.log([0.9])}
    r = trace_log_ratios(student, teacher)
    assert set(r) == {"a", "b"}  # only traces both scored
    assert r["a"] == pytest.approx((0.0 + np.log(0.5)) / 2) and r["b"] == pytest.approx(np.log(0.1 / 0.8))
    with pytest.raises(ValueError, match="tokenizers"):
        trace_log_ratios({"a": [0.0, 0.0]}, {"a": [0.0]})


def test_keep_fraction_rounds_up_breaks_ties_by_id_and_threshold_filters():
    ratios = {"d": -0.1, "a": -3.0, "c": -0.1, "b": -5.0, "e": -0.2}
    assert select_by_log_ratio(ratios, keep_fraction=0.5) == ["c", "d", "e"]  # ceil(2.5) = 3, c before d
    assert select_by_log_ratio(ratios, keep_fraction=1.0) == ["c", "d", "e", "a", "b"]
    assert select_by_log_ratio(ratios, min_log_ratio=-1.0) == ["c", "d", "e"]
    assert select_by_log_ratio(ratios, keep_fraction=0.4, min_log_ratio=-0.15) == ["c", "d"]
    with pytest.raises(ValueError):
        select_by_log_ratio(ratios)
    with pytest.raises(ValueError):
        select_by_log_ratio(ratios, keep_fraction=0.0)


def _scores(path, rows):
    pq.write_table(pa.table({"id": [k for k in rows], "teacher_logprobs": [list(map(float, v)) for v in rows.values()]}),
                   path)
    return path


def test_select_traces_writes_the_kept_records_in_order_with_a_report(tmp_path):
    records = [{"id": f"r{i}", "prompt": f"p{i}", "response": f"x{i}", "style": s}
               for i, s in enumerate(["careful", "compressed", "careful", "terse"])]
    traces = tmp_path / "train.jsonl"
    traces.write_text("".join(json.dumps(r) + "\n" for r in records))
    # the student fits the careful traces (log-ratio ~0) and not the others (about -4 nats/token)
    student = _scores(tmp_path / "s.parquet", {"r0": [-0.1, -0.2], "r1": [-5.0], "r2": [-0.3], "r3": [-4.0, -4.0]})
    teacher = _scores(tmp_path / "t.parquet", {"r0": [-0.1, -0.1], "r1": [-0.5], "r2": [-0.1], "r3": [-0.2, -0.2]})
    out = tmp_path / "kept.jsonl"
    report = select_traces(traces, student, teacher, out, keep_fraction=0.5)
    kept = [json.loads(line) for line in open(out)]
    assert [r["id"] for r in kept] == ["r0", "r2"] and kept == records[::2]
    assert report == {"traces": 4, "scored": 4, "kept": 2, "keep_fraction": 0.5, "min_log_ratio": None}
    full = json.loads((tmp_path / "kept.jsonl.selection.json").read_text())
    assert full["log_ratios"]["r1"] == pytest.approx(-4.5)
