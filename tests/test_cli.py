"""The command line as a user runs it: help texts, and each pipeline command on tiny local assets."""

import json

import pytest

from train_fixtures import base_overrides, make_assets

from dcd_jax.cli import build_parser
from dcd_jax.cli import main as cli_main

COMMANDS = [["convert", "hf-to-flax"], ["convert", "flax-to-hf"], ["train"], ["score-teacher"], ["generate"], ["eval"],
            ["data", "inspect"], ["data", "tokenize"], ["data", "select"], ["demo"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, "--help"])
    assert exit_info.value.code == 0
    assert len(capsys.readouterr().out) > 200


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("cli_assets"), n_examples=24)


def test_pipeline_commands(assets, tmp_path, capsys):
    # data inspect: counts, length percentiles and rendered examples with the loss mask
    assert cli_main(["data", "inspect", f"model.path={assets['student']}", f"data.path={assets['train']}", "data.seq_len=256"]) == 0
    report = capsys.readouterr().out
    assert "24 records read, 24 examples kept" in report and "efficiency" in report and "«" in report

    # generate: teacher traces for a prompt file (keep all: the random model is never right)
    traces = tmp_path / "traces.jsonl"
    assert cli_main(["generate", "--teacher", str(assets["student"]), "--prompts", str(assets["train"]), "--limit", "6",
                     "--out", str(traces), "--keep", "all", "--max-new-tokens", "6", "--batch-size", "8"]) == 0
    rows = [json.loads(line) for line in traces.open()]
    assert len(rows) == 6 and all(r["response"] is not None for r in rows)

    # score-teacher over the training data of a run config
    scores = tmp_path / "scores.parquet"
    assert cli_main(["score-teacher", "--teacher", str(assets["student"]), "--out", str(scores), "--topk", "4",
                     f"data.path={assets['train']}"]) == 0
    assert scores.is_file()

    # data select: the half of the traces the student fits best (here the scorer is the teacher itself, so
    # every trace's log-ratio is ~0: the two scoring passes agree), kept in their order
    kept = tmp_path / "kept.jsonl"
    select = ["data", "select", "--out", str(kept), f"model.path={assets['student']}", f"data.path={assets['train']}",
              f"data.teacher_scores={scores}"]
    assert cli_main([*select, "--keep-fraction", "0.5"]) == 0
    assert "kept 12 of 24 traces" in capsys.readouterr().out
    every = [json.loads(line)["id"] for line in assets["train"].open()]
    chosen = [json.loads(line)["id"] for line in kept.open()]
    assert len(chosen) == 12 and chosen == [i for i in every if i in set(chosen)]
    ratios = json.loads((tmp_path / "kept.jsonl.selection.json").read_text())["log_ratios"]
    assert sorted(ratios) == sorted(every) and max(abs(v) for v in ratios.values()) < 1e-3
    assert cli_main([*select, "--keep-fraction", "1.5"]) == 2
    assert "--keep-fraction must be in (0, 1]" in capsys.readouterr().err

    # data tokenize: the traces as tokenized records; the scores of the text stay valid for them
    tokens = tmp_path / "tokens.parquet"
    assert cli_main(["data", "tokenize", "--out", str(tokens), f"model.path={assets['student']}",
                     f"data.path={assets['train']}"]) == 0
    assert "24 tokenized records" in capsys.readouterr().out

    # train with DCD-KL on the scored (tokenized) data, then export to HF
    out = tmp_path / "run"
    overrides = base_overrides(assets, out, **{"train.steps": 2, "objective.loss": "kl", "objective.weighting": "dcd",
                                               "data.path": tokens, "data.teacher_scores": scores, "data.topk": 4,
                                               "train.export_hf": "true"})
    assert cli_main(["train", *overrides]) == 0
    assert (out / "hf" / "config.json").is_file() and (out / "config.yaml").is_file()
    assert cli_main(["train", *overrides]) == 0  # already complete: resumes at step 2 and stops
    assert "completed at step 2" in capsys.readouterr().out


def test_bad_config_is_a_clear_error(capsys):
    assert cli_main(["train", "model.path=x", "data.path=y", "optim.lr=fast"]) == 2
    assert "optim.lr: expected a number, got 'fast'" in capsys.readouterr().err
