"""The command line as a user runs it: help texts, and each pipeline command on tiny local assets."""

import json

import pytest

from train_fixtures import base_overrides, make_assets

import dcd_jax
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


@pytest.fixture(scope="module")
def gemma(assets, tmp_path_factory):
    """A tiny random Gemma 3 text checkpoint (Gemma's tokenizer layout and chat template, its two
    end-of-turn ids in generation_config.json; tests/hf_fixtures) and 8 of the assets' traces
    (character tokens: about 300 per trace)."""
    from hf_fixtures import save_gemma_checkpoint

    root = tmp_path_factory.mktemp("gemma")
    train = root / "train.jsonl"
    train.write_text("".join(assets["train"].read_text().splitlines(keepends=True)[:8]))
    return {"student": save_gemma_checkpoint(root / "hf"), "train": train}


def _hf_greedy_text(hf_model, tokenizer, prompt: str, max_new: int) -> str:
    """transformers' greedy continuation of a rendered prompt, cut before the first stop id (the
    padded embedding rows past the tokenizer's vocabulary suppressed, as the sampler does)."""
    import torch

    from dcd_jax.stop_tokens import stop_token_ids

    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    assert (ids == tokenizer.bos_token_id).sum() == 1  # the template's BOS, not doubled
    stops = list(stop_token_ids(tokenizer))
    with torch.no_grad():
        out = hf_model.generate(ids, do_sample=False, max_new_tokens=max_new, eos_token_id=stops, pad_token_id=0,
                                suppress_tokens=list(range(len(tokenizer), hf_model.config.vocab_size)))
    new = out[0, ids.shape[1]:].tolist()
    cut = next((i for i, t in enumerate(new) if t in stops), len(new))
    return tokenizer.decode(new[:cut])


def test_gemma3_checkpoint_through_the_commands(gemma, tmp_path):
    """Gemma 3 (gemma3_text) through convert, score-teacher, generate, train and eval, each checked
    against transformers: the HF -> dcd-jax -> HF export reloads with equal logits (and keeps the
    tokenizer, chat template and both stop ids), cached teacher log-probs equal transformers'
    log-softmax, greedy generate / eval write transformers' greedy continuations of the chat-rendered
    prompts, stopped at <eos> / <end_of_turn>, and eval's grades are the grader's."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_fixtures import GEMMA_EOS, GEMMA_END_OF_TURN, hf_logits

    from dcd_jax.data import DataConfig, iter_examples, render_prompt
    from dcd_jax.eval.grading import grade

    src, train = gemma["student"], gemma["train"]
    hf_model = AutoModelForCausalLM.from_pretrained(src).eval()
    tok = AutoTokenizer.from_pretrained(src)

    # convert: HF -> dcd-jax model dir -> HF
    flax, back = tmp_path / "flax", tmp_path / "back"
    assert cli_main(["convert", "hf-to-flax", "--hf", str(src), "--out", str(flax)]) == 0
    assert cli_main(["convert", "flax-to-hf", "--ckpt", str(flax), "--out", str(back)]) == 0
    ids = np.random.RandomState(0).randint(0, len(tok), (2, 24))
    np.testing.assert_array_equal(hf_logits(AutoModelForCausalLM.from_pretrained(back).eval(), ids), hf_logits(hf_model, ids))
    assert json.loads((back / "generation_config.json").read_text())["eos_token_id"] == [GEMMA_EOS, GEMMA_END_OF_TURN]
    assert AutoTokenizer.from_pretrained(back).chat_template == tok.chat_template

    # score-teacher (from the dcd-jax model dir): transformers' log-probs of every response token
    scores = tmp_path / "scores.parquet"
    assert cli_main(["score-teacher", "--teacher", str(flax), "--out", str(scores), "--topk", "4",
                     f"data.path={train}"]) == 0
    scored = DataConfig(path=str(train), teacher_scores=str(scores), topk=4)
    examples = list(iter_examples(scored, tok, apply_length=False))
    assert len(examples) == 8
    for ex in examples[:3]:
        assert ex.input_ids[-1] == GEMMA_END_OF_TURN and list(ex.input_ids).count(tok.bos_token_id) == 1
        logits = torch.tensor(hf_logits(hf_model, ex.input_ids[None])[0, :, : len(tok)], dtype=torch.float64)
        logp = torch.log_softmax(logits, -1).numpy()
        at = ex.response_positions - 1
        np.testing.assert_allclose(ex.teacher.logprobs, logp[at, ex.input_ids[at + 1]], atol=2e-4)

    # generate (greedy): transformers' continuations of the chat-rendered prompts
    traces = tmp_path / "traces.jsonl"
    assert cli_main(["generate", "--teacher", str(src), "--prompts", str(train), "--limit", "3", "--out", str(traces),
                     "--keep", "all", "--temperature", "0", "--max-new-tokens", "8", "--batch-size", "4"]) == 0
    rows = [json.loads(line) for line in traces.open()]
    assert len(rows) == 3
    for r in rows:
        assert r["response"] == _hf_greedy_text(hf_model, tok, render_prompt(r["prompt"], tok, DataConfig()), 8)

    # train (token DCD on the scores, fp32 export) -> the export reloads with the run's logits, changed by training
    run = tmp_path / "run"
    assert cli_main(["train", *base_overrides(gemma, run, **{
        "train.steps": 2, "data.seq_len": 384, "data.batch_size": 4, "objective.weighting": "dcd",
        "data.teacher_scores": scores,
        "train.export_hf": "true"})]) == 0
    exported = AutoModelForCausalLM.from_pretrained(run / "hf").eval()
    got = hf_logits(exported, ids)
    np.testing.assert_allclose(got, np.asarray(dcd_jax.load_hf(run)(ids)), atol=2e-4, rtol=0)
    assert np.abs(got - hf_logits(hf_model, ids)).max() > 1e-3

    # eval of the run: greedy responses as transformers generates them on the export, graded by the grader
    out = tmp_path / "results"
    assert cli_main(["eval", "--model", f"gemma={run}", "--benchmarks", "embedded", "--path", f"embedded={train}",
                     "--limit", "3", "--max-new-tokens", "8", "--batch-size", "4", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())["results"]["gemma"]["embedded"]
    records = [json.loads(line) for line in (out / "generations" / "gemma" / "generations" / "embedded.jsonl").open()]
    assert summary["n_items"] == len(records) == 3
    assert summary["pass@1"] == pytest.approx(sum(r["correct"] for r in records) / 3)
    for r in records:
        assert r["correct"] == grade(r["response"], r["gold"]).correct and r["num_tokens"] <= 8
        assert r["response"] == _hf_greedy_text(exported, tok, render_prompt(r["prompt"], tok, DataConfig()), 8)


def test_bad_config_is_a_clear_error(capsys):
    assert cli_main(["train", "model.path=x", "data.path=y", "optim.lr=fast"]) == 2
    assert "optim.lr: expected a number, got 'fast'" in capsys.readouterr().err
