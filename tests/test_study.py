"""bench/study.py: the two-level bootstrap over builds and seeds, the val-chosen setting, the oracle filter."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import study  # noqa: E402


def test_constant_differences_give_a_point_interval():
    out = study.hierarchical_bootstrap({0: [0.2, 0.2], 1: [0.2, 0.2, 0.2]}, n_boot=500)
    assert out["mean"] == pytest.approx(0.2) and out["ci"] == [pytest.approx(0.2), pytest.approx(0.2)]
    assert out["builds"] == 2 and out["runs"] == 5 and out["positive"] == 5 and out["builds_positive"] == 2


def test_the_pooled_mean_weights_builds_equally_not_runs():
    out = study.hierarchical_bootstrap({0: [1.0], 1: [0.0, 0.0, 0.0]}, n_boot=200)
    assert out["mean"] == pytest.approx(0.5)
    assert out["per_build"] == {0: 1.0, 1: 0.0}


def test_builds_that_disagree_widen_the_interval_to_both_of_them():
    """Two builds with opposite, seed-stable effects: a bootstrap over the six runs alone would give a
    narrow interval around 0; resampling builds first puts both builds' values inside the CI."""
    diffs = {0: [1.0, 1.0, 1.0], 1: [-1.0, -1.0, -1.0]}
    out = study.hierarchical_bootstrap(diffs, n_boot=4000)
    assert out["ci"] == [pytest.approx(-1.0), pytest.approx(1.0)]
    flat = study.seed_bootstrap([1.0, 1.0, 1.0, -1.0, -1.0, -1.0], n_boot=4000)
    assert flat["ci"][1] - flat["ci"][0] < 1.7


def _run(setting, acc, build=0, seed=0):
    return {"regime": "pertrace", "build": build, "seed": seed, "method": "DCD-seq", "setting": setting,
            "val": {"accuracy": acc}}


def test_the_trace_level_setting_is_chosen_on_val_with_ties_to_tau1():
    runs = [_run("tau0.5", 0.7), _run("tau1", 0.6), _run("tau2", 0.5), _run("tau2", 0.99, build=1)]
    assert study.chosen_setting(runs, "pertrace") == "tau0.5"
    runs[1] = _run("tau1", 0.7)
    assert study.chosen_setting(runs, "pertrace") == "tau1"
    assert study.chosen_setting(runs[:2], "pertrace") is None  # the sweep is not finished
    # the other regimes use the setting tuned on the per-trace regime's val split
    assert study.chosen_setting(runs, "withintrace") == "tau1"


def test_regimes_change_the_distillation_task_only():
    base = study.build_scale("pertrace")
    for regime in study.REGIMES:
        scale = study.build_scale(regime)
        assert scale.pretrain_task == base.pretrain_task  # why the base stage can be shared
        assert (scale.task == base.task) == (regime == "pertrace")


def test_a_shared_base_stage_is_copied_once_and_its_inputs_checked(tmp_path):
    src = study.build_dir(tmp_path, "pertrace", 1)
    for f in study.SHARED_INPUTS + ("runs/pretrain/hf/config.json",):
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        (src / f).write_text(f)
    (src / "pretrain.done.json").write_text("{}")
    assert study.share_pretrain(tmp_path, "errors", 1) == src
    dst = study.build_dir(tmp_path, "errors", 1)
    assert (dst / "runs/pretrain/hf/config.json").read_text() == "runs/pretrain/hf/config.json"
    assert study.share_pretrain(tmp_path, "errors", 1) is None  # already there
    assert study.share_pretrain(tmp_path, "pertrace", 1) is None
    for f in study.SHARED_INPUTS:  # what the regime's own assets stage writes
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        (dst / f).write_text(f)
    study.check_shared_pretrain(tmp_path, "errors", 1)
    (dst / "assets/pretrain.jsonl").write_text("other data")
    with pytest.raises(RuntimeError, match="pretrain.jsonl"):
        study.check_shared_pretrain(tmp_path, "errors", 1)


def test_the_oracle_filter_keeps_exactly_the_careful_traces(tmp_path):
    from dcd_jax.data.synthetic import SyntheticTaskConfig, classify_style, generate_problems

    records = generate_problems(SyntheticTaskConfig(n_examples=60, style_mix={"careful": 1, "compressed": 1, "terse": 1}))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    kept = [json.loads(line) for line in open(study.careful_only(tmp_path))]
    expected = [r for r in records if classify_style(r["response"]) == "careful"]
    assert 0 < len(kept) < len(records) and kept == json.loads(json.dumps(expected))


def test_restore_seeds_the_run_cache_and_refuses_a_build_that_rebuilt_differently(tmp_path, capsys):
    run = {"regime": "pertrace", "build": 1, "method": "Select", "setting": "keep0.5", "seed": 2, "val": {"accuracy": 0.7}}
    record = {"distill_data": {"traces": 1024}, "teacher_samples": {"kept": 70}, "teacher": {"eval": {"accuracy": 0.8}},
              "undistilled": {"eval": {"accuracy": 0.5}}}
    committed = {"runs": [run], "regimes": {"pertrace": {"builds": {"1": record}}}}
    (tmp_path / "study.json").write_text(json.dumps(committed))
    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)
    mine = work / "runs" / "pertrace-b0-SFT-seed0.json"
    mine.write_text("{}")
    study.restore(tmp_path / "study.json", work)
    assert json.loads((work / "runs" / "pertrace-b1-Select-keep0.5-seed2.json").read_text()) == run
    assert mine.read_text() == "{}"  # a run finished here is kept
    study.check_reproduced(committed, {"regime": "pertrace", "build": 1, **record})  # the same stages: fine
    study.check_reproduced(committed, {"regime": "pertrace", "build": 5, **record})  # a build it never had: fine
    with pytest.raises(SystemExit) as exit_info:
        study.check_reproduced(committed, {"regime": "pertrace", "build": 1, **record,
                                           "undistilled": {"eval": {"accuracy": 0.49}}})
    assert exit_info.value.code == 2 and "rebuilt differently (undistilled)" in capsys.readouterr().err


def test_gkd_steps_match_the_sft_runs_wall_time():
    """wall(n) = c + n * s per run (steady step time after step 3); GKD gets the steps that fit in SFT's."""
    sft_rows = [{"step": i, "step_seconds": 5.0 if i == 1 else 0.5, "cost/wall_seconds": 5.0 + 0.5 * (i - 1)}
                for i in range(1, 11)]
    gkd_rows = [{"step": i, "step_seconds": 9.0 if i == 1 else 2.0 if i % 2 else 1.0,
                 "cost/wall_seconds": 0.0} for i in range(1, 11)]
    gkd_rows[-1]["cost/wall_seconds"] = 9.0 + sum(r["step_seconds"] for r in gkd_rows[1:])
    sft, gkd = study.wall_model(sft_rows), study.wall_model(gkd_rows)
    assert sft["step_seconds"] == 0.5 and sft["overhead_seconds"] == pytest.approx(4.5)
    assert gkd["step_seconds"] == pytest.approx(10 / 7)  # steps 4..10: four of 1 s (even), three of 2 s
    matched = study.matched_steps(sft, gkd, 240)
    assert matched["sft_wall_seconds_at_steps"] == pytest.approx(4.5 + 120)
    assert matched["gkd_steps"] == int((124.5 - gkd["overhead_seconds"]) / (10 / 7))
    assert study.matched_steps(sft, {"step_seconds": 1.0, "overhead_seconds": 1e6}, 240)["gkd_steps"] == 1


def test_the_timeline_reads_an_evaluation_as_the_study_reads_outputs(tmp_path):
    """bench/timeline.py: accuracy, careful share, multi-operation lines and the error anatomy of one
    evaluation's greedy outputs (sampled ones ignored), on hand-written outputs."""
    import timeline

    prompt = ("Ivy has 23 cookies. She triples the number of cookies. She gives away 2 jars with 9 cookies in each. "
              "How many cookies does Ivy have now?")
    careful = "Ivy starts with 23 cookies.\n23 * 3 = 69.\n2 * 9 = 18.\n69 - 18 = 51.\nThe answer is 51."
    compressed = "23 * 3 - 2 * 9 = 51.\nThe answer is 51."
    slipped = "Ivy starts with 23 cookies.\n23 * 3 = 69.\n2 * 9 = 18.\n69 - 18 = 41.\nThe answer is 41."
    rows = [{"kind": "greedy", "prompt": prompt, "response": careful, "correct": True},
            {"kind": "greedy", "prompt": prompt, "response": compressed, "correct": True},
            {"kind": "greedy", "prompt": prompt, "response": slipped, "correct": False},
            {"kind": "sampled", "prompt": prompt, "response": slipped, "correct": False}]
    path = tmp_path / "embedded.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = timeline.read_evaluation(path)
    assert got["n"] == 3
    assert got["accuracy"] == pytest.approx(2 / 3) and got["careful_share"] == pytest.approx(2 / 3)
    assert got["multi_op_line_share"] == pytest.approx(1 / 7)  # one of 7 computation lines has 3 operations
    assert got["errors"]["arithmetic"] == pytest.approx(1 / 3) and got["errors"]["wrong_otherwise"] == 0.0
