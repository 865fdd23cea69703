"""Tokenization: the loss mask covers exactly the assistant tokens, as transformers renders them."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from dcd_jax.data import (
    DataConfig,
    DataError,
    build_train_iterator,
    fit_to_length,
    render_prompt,
    tokenize_example,
)

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "data" / "synthetic_tokenizer"
PROMPT = "Ann has 12 apples. She buys 3 bags with 5 apples in each. How many apples does Ann have now?"
RESPONSE = "3 * 5 = 15.\n12 + 15 = 27.\nThe answer is 27."


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def reference(tok, messages):
    """transformers' own rendering and assistant mask (the template marks assistant turns)."""
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return np.array(out["input_ids"]), np.array(out["assistant_masks"], bool)


CHATS = {
    "prompt_response_with_system_prompt": (
        {"prompt": PROMPT, "response": RESPONSE},
        "Solve it.",
        [{"role": "system", "content": "Solve it."}, {"role": "user", "content": PROMPT},
         {"role": "assistant", "content": RESPONSE}],
    ),
    "multi_turn_chat": (
        {"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Ben has 4 coins. How many coins?"},
            {"role": "assistant", "content": "The answer is 4."},
            {"role": "user", "content": "He finds 3 more coins. How many now?"},
            {"role": "assistant", "content": "4 + 3 = 7.\nThe answer is 7."},
        ]},
        "ignored: the chat has a system turn",
        None,
    ),
}


@pytest.mark.parametrize("name", sorted(CHATS))
def test_mask_matches_transformers_chat_template(tok, name):
    record, system_prompt, messages = CHATS[name]
    messages = messages or record["messages"]
    ex = tokenize_example(record, tok, DataConfig(system_prompt=system_prompt))
    ref_ids, ref_mask = reference(tok, messages)
    n = ex.num_tokens
    # Same tokens; only the template's trailing whitespace after the final turn is cut.
    np.testing.assert_array_equal(ex.input_ids, ref_ids[:n])
    assert tok.decode(ref_ids[n:]).strip() == ""
    np.testing.assert_array_equal(ex.response_mask, ref_mask[:n])
    assert ex.input_ids[-1] == tok.eos_token_id and ex.response_mask[-1]  # EOS ends the response, in the loss
    # The loss covers each assistant turn's content and its end-of-turn token, nothing else.
    learned = tok.decode(ex.input_ids[ex.response_mask])
    expected = "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
    assert learned == expected


def test_features_shift_targets_and_mask(tok):
    ex = tokenize_example({"prompt": PROMPT, "response": RESPONSE}, tok, DataConfig())
    f = ex.features()
    np.testing.assert_array_equal(f["targets"][:-1], ex.input_ids[1:])
    assert f["targets"][-1] == 0 and f["loss_mask"][-1] == 0
    np.testing.assert_array_equal(f["loss_mask"][:-1], ex.response_mask[1:].astype(np.float32))
    assert f["loss_mask"].sum() == ex.num_response_tokens


def test_render_prompt_is_the_training_prefix(tok):
    cfg = DataConfig(system_prompt="Solve it.")
    ex = tokenize_example({"prompt": PROMPT, "response": RESPONSE}, tok, cfg)
    prompt_ids = tok(render_prompt(PROMPT, tok, cfg), add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(prompt_ids, ex.input_ids[: ex.prompt_length])


def test_plain_template_without_chat_template(tok):
    plain = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    plain.chat_template = None
    for tokenizer, cfg in ((plain, DataConfig()), (tok, DataConfig(template="plain"))):
        ex = tokenize_example({"prompt": PROMPT, "response": RESPONSE}, tokenizer, cfg)
        text = tokenizer.decode(ex.input_ids)
        assert text == f"<|bos|>### User:\n{PROMPT}\n\n### Assistant:\n{RESPONSE}<|im_end|>"
        assert tokenizer.decode(ex.input_ids[ex.response_mask]) == RESPONSE + "<|im_end|>"
        prompt_ids = tokenizer(render_prompt(PROMPT, tokenizer, cfg), add_special_tokens=False)["input_ids"]
        np.testing.assert_array_equal(prompt_ids, ex.input_ids[: ex.prompt_length])


def test_eos_is_appended_when_the_template_does_not_end_with_it(tok):
    other = AutoTokenizer.from_pretrained(TOKENIZER_DIR, eos_token="<|endoftext|>")
    ex = tokenize_example({"prompt": PROMPT, "response": RESPONSE}, other, DataConfig())
    assert ex.input_ids[-1] == other.convert_tokens_to_ids("<|endoftext|>")
    assert other.decode(ex.input_ids[ex.response_mask]) == RESPONSE + "<|im_end|><|endoftext|>"


def test_prefix_inconsistent_template_is_refused(tmp_path):
    # Renders earlier assistant turns differently from the last one (like templates that strip reasoning).
    odd = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    odd.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and not loop.last %}"
        "(earlier){% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    record = CHATS["multi_turn_chat"][0]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:1: field 'messages': the chat template is not prefix-consistent"):
        build_train_iterator(DataConfig(path=str(path), batch_size=1), odd)


def test_truncation_policies(tmp_path, tok):
    short = {"prompt": "Kim has 2 cards.", "response": "The answer is 2."}
    long = {"prompt": "Kim has 2 cards.", "response": "2 + 0 = 2.\n" * 30 + "The answer is 2."}
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (short, long, short)))
    base = DataConfig(path=str(path), seq_len=48, batch_size=1, shuffle=False)

    dropped = build_train_iterator(base, tok)
    assert len(dropped.examples) == 2 and dropped.stats.dropped_too_long == 1 and dropped.stats.truncated == 0
    assert "dropped, longer than seq_len (data.truncation=drop): 1" in dropped.stats.summary()

    cut = build_train_iterator(dataclasses.replace(base, truncation="truncate_response"), tok)
    assert len(cut.examples) == 3 and cut.stats.truncated == 1 and cut.stats.dropped_too_long == 0
    full = tokenize_example(long, tok, base)
    ex = cut.examples[1]
    assert ex.truncated and ex.num_tokens == 48
    np.testing.assert_array_equal(ex.input_ids, full.input_ids[:48])  # the prompt is kept whole
    np.testing.assert_array_equal(ex.response_mask, full.response_mask[:48])
    assert ex.prompt_length == full.prompt_length

    assert fit_to_length(full, dataclasses.replace(base, seq_len=full.num_tokens)) is full
    with pytest.raises(DataError, match="leaves no room for the response") as err:
        fit_to_length(full, dataclasses.replace(base, seq_len=full.prompt_length))
    assert err.value.reason == "prompt_too_long"
