"""The embedded reasoning task: correct, seeded problems; teacher styles; tokenizer; tiny student."""

import ast
import collections
import dataclasses
import json
import operator
import re
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from dcd_jax.config import ConfigError, from_dict
from dcd_jax.data import DataConfig, build_train_iterator, tokenizer_fingerprint
from dcd_jax.data.synthetic import (
    STYLES,
    SyntheticTaskConfig,
    build_tokenizer,
    classify_style,
    extract_answer,
    generate_problems,
    teacher_training_records,
)
from dcd_jax.tiny_models import make_tiny_student, write_synthetic_assets

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "data" / "synthetic_tokenizer"
ALL_STYLES = {s: 1.0 for s in STYLES}
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate(expr: str) -> float:
    """Value of an arithmetic expression of integers and + - * / (no eval)."""

    def walk(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise ValueError(f"unexpected {ast.dump(node)}")

    return walk(ast.parse(expr, mode="eval").body)


# (sentence pattern, update of the amount from the sentence's numbers), first match wins.
STORY_RULES = [("finds", lambda x, n: x + n[0]), ("buys", lambda x, n: x + n[0] * n[1]),
               ("gives away", lambda x, n: x - n[0] * n[1]), ("gives", lambda x, n: x - n[0]),
               ("doubles", lambda x, n: 2 * x), ("triples", lambda x, n: 3 * x), ("splits", None)]
LEDGER_RULES = [("gets", lambda x, n: x + n[0]), ("delivery", lambda x, n: x + n[0] * n[1]),
                ("sends out", lambda x, n: x - n[0] * n[1]), ("sells", lambda x, n: x - n[0]),
                ("doubles", lambda x, n: 2 * x), ("triples", lambda x, n: 3 * x), ("among", None)]


def recomputed_answer(prompt: str, start: str, sentence: str, rules) -> int:
    """The gold answer recomputed from the problem text alone (``None`` rule: exact division)."""
    x = int(re.match(start, prompt).group(1))
    for text in re.findall(sentence, prompt):
        nums = list(map(int, re.findall(r"\d+", text)))
        update = next((f for key, f in rules if key in text), "unknown")
        assert update != "unknown", text
        if update is None:
            assert x % nums[0] == 0
            x //= nums[0]
        else:
            x = update(x, nums)
    return x


def story_answer(prompt: str) -> int:
    return recomputed_answer(prompt, r"\w+ has (\d+) ", r"(?:She|He) [^.]*\.", STORY_RULES)


def ledger_answer(prompt: str) -> int:
    return recomputed_answer(prompt, r"The \w+ has (\d+) ", r"(?:The \w+ gets|It |Its |A delivery)[^.]*\.",
                             LEDGER_RULES)


@pytest.fixture(scope="module")
def problems():
    return generate_problems(SyntheticTaskConfig(seed=7, n_examples=600, max_steps=6, style_mix=ALL_STYLES))


def test_gold_answers_and_every_trace_are_correct(problems):
    assert {r["style"] for r in problems} == set(STYLES)
    for r in problems:
        answer = int(r["answer"])
        assert answer == story_answer(r["prompt"]) and 0 <= answer <= 999
        assert r["response"].endswith(f"The answer is {answer}.") and extract_answer(r["response"]) == r["answer"]
        assert r["trace_correct"] and r["solution"].endswith(f"The answer is {answer}.")
        lines = r["response"].split("\n")[:-1]
        for line in lines:  # every stated computation is right
            if "=" in line:
                lhs, rhs = line.rstrip(".").split(" = ")
                assert evaluate(lhs) == int(rhs), (r["id"], line)
        if r["style"] == "terse":
            assert len(lines) == 1 and lines[0] == f"{lines[0].split(' = ')[0]} = {answer}."
        if r["style"] == "answer_only":
            assert lines == []
        if r["style"] == "careful":
            assert r["response"] == r["solution"]
            # One operation per line: only the careful style states every intermediate result.
            assert all(len(re.findall(r" [-+*/] ", line)) == 1 for line in lines[1:])
    by_style = collections.defaultdict(list)
    for r in problems:
        by_style[r["style"]].append(r["response"].count("="))
    assert np.mean(by_style["careful"]) > np.mean(by_style["compressed"]) > np.mean(by_style["terse"]) == 1


def test_seeded_prefix_stable():
    cfg = SyntheticTaskConfig(seed=1, n_examples=10_000)
    big = generate_problems(cfg)
    assert generate_problems(dataclasses.replace(cfg, n_examples=50)) == big[:50]
    assert generate_problems(dataclasses.replace(cfg, seed=2, n_examples=50)) != big[:50]
    eval_prompts = {r["prompt"] for r in generate_problems(dataclasses.replace(cfg, split="eval", n_examples=500))}
    assert len(eval_prompts & {r["prompt"] for r in big}) < 5
    counts = collections.Counter(r["style"] for r in big)
    for style, weight in cfg.style_mix.items():
        assert abs(counts[style] / len(big) - weight) < 0.03
    assert len({r["id"] for r in big}) == len(big)


def test_difficulty_error_rate_and_teacher_records():
    hard = generate_problems(SyntheticTaskConfig(n_examples=200, min_steps=5, max_steps=5))
    assert all(r["num_steps"] == 5 for r in hard)
    noisy = generate_problems(SyntheticTaskConfig(n_examples=200, error_rate=1.0))
    assert not any(r["trace_correct"] for r in noisy)
    assert all(extract_answer(r["response"]) != r["answer"] and extract_answer(r["solution"]) == r["answer"]
               for r in noisy)
    only = generate_problems(SyntheticTaskConfig(n_examples=100, style_mix={"terse": 1.0}))
    assert {r["style"] for r in only} == {"terse"}
    teacher = teacher_training_records(SyntheticTaskConfig(n_examples=20, error_rate=1.0))
    assert all(r["response"] == r["solution"] and r["style"] == "careful" for r in teacher)
    with pytest.raises(ConfigError, match="style_mix"):
        from_dict(SyntheticTaskConfig, {"style_mix": {"sloppy": 1.0}})
    with pytest.raises(ConfigError, match="min_steps"):
        from_dict(SyntheticTaskConfig, {"min_steps": 3, "max_steps": 2})


def test_tokenizer_is_reproducible_small_and_splits_digits(problems):
    built = build_tokenizer()
    fixture = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    assert tokenizer_fingerprint(built) == tokenizer_fingerprint(fixture)  # seeded, and the fixture is current
    assert 256 < len(built) <= 512
    assert (built.bos_token, built.eos_token, built.pad_token) == ("<|bos|>", "<|im_end|>", "<|endoftext|>")
    for r in problems[:100]:
        for text in (r["prompt"], r["response"]):
            ids = built(text, add_special_tokens=False)["input_ids"]
            assert built.decode(ids) == text  # lossless
            for piece in built.convert_ids_to_tokens(ids):
                assert not re.search(r"\d", piece) or re.fullmatch(r"\d", piece), piece
    assert built.decode(built("Zoë: 12€ {x}", add_special_tokens=False)["input_ids"]) == "Zoë: 12€ {x}"
    rendered = built.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|bos|><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_assets_and_tiny_student_load_as_hf_checkpoints(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    paths = write_synthetic_assets(tmp_path, SyntheticTaskConfig(n_examples=30), n_eval=10,
                                   student_size="micro", teacher_size="micro")
    assert [json.loads(line)["response"] for line in open(paths["teacher_sft"])] == [
        json.loads(line)["solution"] for line in open(paths["train"])]
    assert sum(1 for _ in open(paths["eval"])) == 10
    tok = AutoTokenizer.from_pretrained(paths["student"])
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(AutoTokenizer.from_pretrained(paths["tokenizer"]))
    assert (paths["student"] / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(paths["student"])
    assert model.config.model_type == "qwen2" and model.config.vocab_size % 64 == 0
    assert model.config.vocab_size >= len(tok)
    batch = next(build_train_iterator(DataConfig(path=str(paths["train"]), seq_len=256, batch_size=2), tok))
    with torch.no_grad():
        logits = model(torch.tensor(batch["input_ids"][:1], dtype=torch.long)).logits
    assert logits.shape == (1, 256, model.config.vocab_size) and torch.isfinite(logits).all()
    # Seeded: the same size and seed give the same weights.
    again = make_tiny_student(tmp_path / "again", tok, size="micro", seed=0)  # the seed write_synthetic_assets used
    w1 = AutoModelForCausalLM.from_pretrained(again).state_dict()
    w0 = model.state_dict()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    # The project's own HF config reader accepts the checkpoint.
    from dcd_jax.models.config import ModelConfig

    cfg = ModelConfig.from_pretrained_dir(paths["student"])
    assert cfg.qkv_bias and cfg.tie_word_embeddings and cfg.num_layers == 2


def test_long_problems_ledger_template_and_output_styles():
    """The demo's regime: 2..8 operations whose every step is a small fact (every number <= 20);
    careful traces restate each sentence, then compute it (~45-215 tokens, growing with the number
    of operations); the ``ledger`` template (the student's pretraining data) tells other stories
    about the same numbers; the style classifier reads careful (one operation per line) vs
    compressed lines from text alone."""
    from dcd_jax.demo import SCALES

    regime = SCALES["small"].task
    long = dict(min_steps=regime.min_steps, max_steps=regime.max_steps, max_start=regime.max_start,
                max_operand=regime.max_operand, max_value=regime.max_value, restate=regime.restate,
                style_mix=ALL_STYLES)
    story = generate_problems(SyntheticTaskConfig(seed=3, n_examples=400, **long))
    ledger = generate_problems(SyntheticTaskConfig(seed=3, n_examples=400, template="ledger", **long))
    assert {r["num_steps"] for r in story} == set(range(2, 9))
    expected = {"careful": "careful", "compressed": "compressed", "terse": "compressed", "answer_only": "answer_only"}
    for s, l in zip(story, ledger):
        # Same draws except the narrative: answers, steps and styles agree.
        assert (s["answer"], s["num_steps"], s["style"]) == (l["answer"], l["num_steps"], l["style"])
        assert l["prompt"].startswith("The ") and ledger_answer(l["prompt"]) == int(l["answer"]) <= 20
        assert story_answer(s["prompt"]) == int(s["answer"])
        assert l["solution"].startswith(l["prompt"].split(" has ")[0] + " starts with")
        lines = l["solution"].split("\n")[1:-1]
        sentences = l["prompt"].split(". ")[1:-1]  # the problem's sentences are restated, in order
        assert [x for x in lines if " = " not in x] == [x.rstrip(".") + "." for x in sentences]
        for line in (x for x in lines if " = " in x):  # every computation line: one small fact
            a, op, b, _, c = line.rstrip(".").split(" ")
            assert max(int(a), int(b), int(c)) <= 20 and int(c) >= 0, line
        for line in l["response"].split("\n")[:-1]:
            if " = " in line:
                lhs, rhs = line.rstrip(".").split(" = ")
                assert evaluate(lhs) == int(rhs), (l["id"], line)
        for r in (s, l):
            if r["style"] == "mixed":  # careful unless some line holds two operations
                two = any(len(re.findall(r" [-+*/] ", x.split(" = ")[0])) >= 2 for x in _computation_lines(r["response"]))
                assert classify_style(r["response"]) == ("compressed" if two else "careful"), r["response"]
                continue
            assert classify_style(r["response"]) == expected[r["style"]], r["response"]
            assert classify_style(r["solution"]) == "careful"
    assert classify_style("12 + 3 = 15.") == "other" and classify_style("7 + 2 * 3 = 13.\nThe answer is 13.") == "compressed"
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    lengths = collections.defaultdict(list)
    for r in story:
        lengths[r["num_steps"]].append(len(tok(r["solution"])["input_ids"]))
    assert 40 <= min(lengths[2]) and max(lengths[8]) <= 240 and np.mean(lengths[8]) >= 2.5 * np.mean(lengths[2])
    with pytest.raises(ConfigError, match="template"):
        from_dict(SyntheticTaskConfig, {"template": "novel"})


def _computation_lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if " = " in line]


def test_mixed_traces_mix_careful_and_compressed_lines_within_one_trace():
    """The within-trace regime: every line right, the answer right, and most long traces hold both a
    careful (one-operation) and a compressed (two-operation) line; rate 0 is the careful solution,
    rate 1 pairs every two operations."""
    base = dict(n_examples=300, min_steps=4, max_steps=8, max_start=9, max_operand=9, max_value=20, restate=True,
                style_mix={"mixed": 1.0})
    records = generate_problems(SyntheticTaskConfig(**base))
    both = 0
    for r in records:
        assert r["style"] == "mixed" and extract_answer(r["response"]) == r["answer"]
        ops = []
        for line in _computation_lines(r["response"]):
            lhs, rhs = line.rstrip(".").split(" = ")
            assert evaluate(lhs) == int(rhs), (r["id"], line)
            ops.append(len(re.findall(r" [-+*/] ", lhs)))
        assert min(ops) >= 1 and max(ops) <= 4  # a compressed line: two operations (a group counts two)
        both += 1 in ops and max(ops) >= 2
    assert both > 0.6 * len(records)
    assert {classify_style(r["response"]) for r in records} == {"careful", "compressed"}
    careful = generate_problems(SyntheticTaskConfig(**{**base, "mixed_line_rate": 0.0}))
    assert all(r["response"] == r["solution"] for r in careful)
    paired = generate_problems(SyntheticTaskConfig(**{**base, "mixed_line_rate": 1.0}))
    for r in paired:
        sentences_restated = sum(line.endswith(".") and " = " not in line for line in r["response"].split("\n")[1:-1])
        assert sentences_restated == r["num_steps"] % 2  # only an odd last operation is written carefully


def test_intermediate_errors_leave_the_answer_right():
    """The teacher-error regime: one line before the last computation states a wrong value, the
    trace still ends at the gold answer, and the share of such traces follows the rate."""
    mix = {"careful": 0.5, "compressed": 0.35, "terse": 0.15}
    all_wrong = generate_problems(SyntheticTaskConfig(n_examples=200, min_steps=2, max_steps=8, style_mix=mix,
                                                      intermediate_error_rate=1.0))
    clean = generate_problems(SyntheticTaskConfig(n_examples=200, min_steps=2, max_steps=8, style_mix=mix))
    for r, c in zip(all_wrong, clean):
        lines = _computation_lines(c["response"])
        if len(lines) < 2:  # terse traces have one computation line: nothing before the last
            assert "error_line" not in r and r["response"] == c["response"]
            continue
        wrong = [i for i, (x, y) in enumerate(zip(r["response"].split("\n"), c["response"].split("\n"))) if x != y]
        assert wrong == [r["error_line"]]
        bad = r["response"].split("\n")[r["error_line"]]
        lhs, rhs = bad.rstrip(".").split(" = ")
        assert evaluate(lhs) != int(rhs) and 1 <= abs(evaluate(lhs) - int(rhs)) <= 3 or int(rhs) == evaluate(lhs) + 1
        assert bad != _computation_lines(r["response"])[-1]
        assert extract_answer(r["response"]) == r["answer"] and r["trace_correct"]
        assert {k: v for k, v in r.items() if k not in ("response", "error_line")} == \
            {k: v for k, v in c.items() if k != "response"}
    some = generate_problems(SyntheticTaskConfig(n_examples=2000, style_mix={"careful": 1.0}, min_steps=3,
                                                 intermediate_error_rate=0.3))
    assert abs(sum("error_line" in r for r in some) / len(some) - 0.3) < 0.04
    with pytest.raises(ConfigError, match="intermediate_error_rate"):
        from_dict(SyntheticTaskConfig, {"intermediate_error_rate": 1.5})


def test_trace_errors_of_generated_traces_are_exactly_their_slips():
    """The generator's traces in every style have no error, except the slips it was asked for: an
    intermediate slip is one arithmetic error (later lines go on from the right value), a final slip
    one too (the answer repeats the slipped value)."""
    from dcd_jax.data.synthetic import STYLES, SyntheticTaskConfig, generate_problems, trace_errors

    clean = generate_problems(SyntheticTaskConfig(n_examples=60, style_mix={s: 1.0 for s in STYLES}, restate=True,
                                                  min_steps=2, max_steps=8, max_start=9, max_operand=9, max_value=20))
    assert {r["style"] for r in clean} == set(STYLES)
    for r in clean:
        assert trace_errors(r["prompt"], r["response"]) == {"arithmetic": 0, "misquoted": 0, "skipped": 0, "answer": 0}
        assert trace_errors(r["prompt"], r["solution"])["skipped"] == 0
    slips = generate_problems(SyntheticTaskConfig(n_examples=40, style_mix={"careful": 1.0, "mixed": 1.0}, restate=True,
                                                  intermediate_error_rate=0.5, error_rate=0.3, seed=1))
    assert any("error_line" in r for r in slips) and any(not r["trace_correct"] for r in slips)
    for r in slips:
        errors = trace_errors(r["prompt"], r["response"])
        assert errors["arithmetic"] == ("error_line" in r) + (not r["trace_correct"]), r["response"]
        assert errors["misquoted"] == errors["skipped"] == errors["answer"] == 0


def test_trace_errors_of_hand_built_collapsed_outputs():
    from dcd_jax.data.synthetic import trace_errors

    prompt = ("Jon has 3 pencils. He buys 3 boxes with 3 pencils in each. He finds 4 more pencils. "
              "How many pencils does Jon have now?")
    # restates a sentence with the wrong number, then adds wrong
    out = ("Jon starts with 3 pencils.\nHe buys 3 boxes with 3 pencils in each.\n3 * 3 = 9.\n3 + 9 = 12.\n"
           "He finds 1 more pencils.\n12 + 1 = 14.\nThe answer is 14.")
    assert trace_errors(prompt, out) == {"arithmetic": 1, "misquoted": 1, "skipped": 1, "answer": 0}
    # careful-looking lines with no restatement, wrong sums, an answer that is not the last value
    out = "7 coins.\n5 + 8 = 10.\n9 / 0 = 1.\nThe answer is 10."
    assert trace_errors(prompt, out) == {"arithmetic": 2, "misquoted": 0, "skipped": 2, "answer": 1}
    # a compressed line stands for its sentences; precedence and parentheses are evaluated
    out = "3 + 3 * 3 = 12.\n(12 + 4) / 2 = 8.\nThe answer is 8."
    assert trace_errors(prompt, out) == {"arithmetic": 0, "misquoted": 0, "skipped": 0, "answer": 0}
    assert trace_errors(prompt, "3 + x = 4.\nThe answer is 4.")["arithmetic"] == 1  # does not parse


def test_a_restatement_that_names_another_person_or_container_is_not_misquoted():
    from dcd_jax.data.synthetic import trace_errors

    prompt = "Eva has 7 shells. She gives 5 shells to Jon. How many shells does Eva have now?"
    out = "Eva starts with 7 shells.\nShe gives 5 shells to Dan.\n7 - 5 = 2.\nThe answer is 2."
    boxes = "Eva has 7 shells. She buys 2 boxes with 3 shells in each. How many shells does Eva have now?"
    assert trace_errors(boxes, "Eva starts with 7 shells.\nShe buys 2 jars with 3 shells in each.\n2 * 3 = 6.\n"
                               "7 + 6 = 13.\nThe answer is 13.")["misquoted"] == 0
    assert trace_errors(prompt, out) == {"arithmetic": 0, "misquoted": 0, "skipped": 0, "answer": 0}
    assert trace_errors(prompt, out.replace("gives 5", "gives 4"))["misquoted"] == 1
    assert trace_errors(prompt, out.replace("gives 5", "finds 5"))["misquoted"] == 1
