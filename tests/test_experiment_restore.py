"""bench/experiment.py --restore-runs: a committed study's runs seed an empty cache, and the study
refuses to extend them on base stages that do not reproduce the ones they were made on."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import experiment  # noqa: E402

BASELINE = {"accuracy": 0.575, "length_mean": 90.975, "style_shares": {"careful": 0.995, "other": 0.005},
            "accuracy_by_steps": {"2": 1.0, "8": 0.15384615384615385}}


def _study() -> dict:
    run = lambda method, seed: {"group": "main", "method": method, "student": "competent", "seed": seed,  # noqa: E731
                                "accuracy": 0.5 + seed / 10, "accuracy_by_steps": {"2": 1.0}}
    return {"runs": [run("SFT", 0), run("DCD-CE", 0), run("SFT", 1)],
            "sampled_eval": {"SFT": {"k": 4, "avg@4": 0.32}},
            "baselines": {"teacher": {**BASELINE, "accuracy": 0.845}, "competent": BASELINE},
            "distill_data": {"source": "standin", "traces": 1024, "style_counts": {"compressed": 551, "careful": 473}},
            "teacher_samples": {"kept": 69, "sampled": 128, "kept_style_counts": {"careful": 65, "compressed": 4}}}


def _demo_dir(tmp_path: Path, traces: int = 1024) -> Path:
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "distill.done.json").write_text(json.dumps(
        {"source": "standin", "traces": traces, "style_counts": {"compressed": 551, "careful": 473}, "seconds": 0.1}))
    (demo / "traces.done.json").write_text(json.dumps(
        {"traces_in_file": 69, "generated": 128, "kept_style_counts": {"careful": 65, "compressed": 4}}))
    return demo


def test_restore_writes_each_run_and_sampled_eval_and_keeps_existing_files(tmp_path):
    study_path = tmp_path / "study.json"
    study_path.write_text(json.dumps(_study()))
    root = tmp_path / "cache"
    root.mkdir()
    (root / "main-SFT-competent-seed1.json").write_text('{"mine": true}')  # a run finished here: kept

    study = experiment.restore_runs(study_path, root)

    assert study == _study()
    assert json.loads((root / "main-SFT-competent-seed0.json").read_text()) == _study()["runs"][0]
    assert json.loads((root / "main-DCD-CE-competent-seed0.json").read_text()) == _study()["runs"][1]
    assert json.loads((root / "main-SFT-competent-seed1.json").read_text()) == {"mine": True}
    assert json.loads((root / "sampled-SFT.json").read_text()) == {"k": 4, "avg@4": 0.32}


def test_reproduced_base_stages_pass(tmp_path):
    # baselines as the resumed study holds them: read back from JSON, so int/str keys match; a
    # student the study never evaluated (weak) has no restored runs to mix with
    baselines = json.loads(json.dumps({"teacher": {**BASELINE, "accuracy": 0.845}, "competent": BASELINE,
                                       "weak": {**BASELINE, "accuracy": 0.1}}))
    experiment.check_reproduced(_study(), baselines, _demo_dir(tmp_path))


@pytest.mark.parametrize("change, named", [
    ({"competent": {**BASELINE, "accuracy": 0.57}}, "baseline competent"),
    ({"teacher": BASELINE}, "baseline teacher"),
    (None, "distill_data"),
])
def test_different_base_stages_stop_the_study_with_exit_2(tmp_path, capsys, change, named):
    baselines = {"teacher": {**BASELINE, "accuracy": 0.845}, "competent": BASELINE, **(change or {})}
    demo = _demo_dir(tmp_path, traces=1024 if change else 1000)
    with pytest.raises(SystemExit) as e:
        experiment.check_reproduced(_study(), baselines, demo)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--restore-runs" in err and named in err and "\n" not in err.strip()
