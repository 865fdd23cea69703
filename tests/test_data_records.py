"""Record formats and validation: every bad-input kind names file, line and field (or is counted)."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dcd_jax.config import ConfigError, from_dict, load_config
from dcd_jax.data import DataConfig, DataError, build_train_iterator, iter_examples, load_records

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "data" / "synthetic_tokenizer"

GOOD = [
    {"id": "g1", "prompt": "Ann has 3 apples. She finds 2 more apples. How many apples does Ann have now?",
     "response": "3 + 2 = 5.\nThe answer is 5.", "answer": "5"},
    {"id": "g2", "messages": [{"role": "user", "content": "Ben has 4 coins. How many coins does Ben have?"},
                              {"role": "assistant", "content": "The answer is 4."}]},
]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def write_lines(path: Path, items) -> Path:
    """JSONL with the given items (dicts are dumped, strings written verbatim), one per line."""
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in items))
    return path


# (bad line, reason, field named in the error). The bad line is written as line 4 (after a blank line).
BAD = {
    "malformed_json": ('{"prompt": "Ann has 3 apples.", "response": ', "malformed_json", None),
    "missing_field": ({"prompt": "Ann has 3 apples."}, "missing_field", "response"),
    "empty_response": ({"prompt": "Ann has 3 apples.", "response": "  \n"}, "empty_response", "response"),
    "wrong_type": ({"prompt": 3, "response": "The answer is 3."}, "wrong_type", "prompt"),
    "wrong_type_message": (
        {"messages": [{"role": "user", "content": ["a list"]}, {"role": "assistant", "content": "ok"}]},
        "wrong_type", "messages[0].content",
    ),
    "not_an_object": ('["prompt", "response"]', "wrong_type", None),
    "non_assistant_final_turn": (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is 1."},
                      {"role": "user", "content": "and now?"}]},
        "bad_final_turn", "messages[2].role",
    ),
    "prompt_longer_than_seq_len": (
        {"prompt": "Ann has 12 apples. " * 40, "response": "The answer is 12."}, "prompt_too_long", "prompt",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_record_error_names_file_line_and_field(tmp_path, tok, kind):
    bad, reason, field = BAD[kind]
    path = write_lines(tmp_path / "traces.jsonl", [GOOD[0], GOOD[1], "", bad, GOOD[0]])
    cfg = DataConfig(path=str(path), seq_len=96, batch_size=2)
    with pytest.raises(DataError) as err:
        build_train_iterator(cfg, tok)
    message = str(err.value)
    assert message.startswith(f"{path}:4: "), message
    assert err.value.reason == reason
    if field is not None:
        assert f"field {field!r}" in message, message


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_record_skip_is_counted_and_reported(tmp_path, tok, kind):
    bad, reason, _ = BAD[kind]
    path = write_lines(tmp_path / "traces.jsonl", [GOOD[0], bad, GOOD[1], bad])
    cfg = DataConfig(path=str(path), seq_len=96, batch_size=2, on_bad_record="skip")
    it = build_train_iterator(cfg, tok)
    assert [ex.id for ex in it.examples] == ["g1", "g2"]
    assert dict(it.stats.skipped) == {reason: 2}
    assert it.stats.records_read == 4
    assert it.stats.skip_examples[reason][0].startswith(f"{path}:2: ")
    summary = it.stats.summary()
    assert f"skipped, {reason}: 2" in summary and f"{path}:4" in summary


def test_all_masked_example_is_an_error(tmp_path, tok):
    # A template that renders nothing for assistant turns leaves no token to learn.
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    )
    path = write_lines(tmp_path / "traces.jsonl", [GOOD[0]])
    with pytest.raises(DataError, match=rf"^{path}:1: field 'response': .*all-masked") as err:
        build_train_iterator(DataConfig(path=str(path), batch_size=1), tok)
    assert err.value.reason == "all_masked"


def test_empty_assistant_turn_in_chat(tmp_path, tok):
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}
    path = write_lines(tmp_path / "t.jsonl", [bad])
    with pytest.raises(DataError, match=rf"^{path}:1: field 'messages\[1\].content': empty"):
        build_train_iterator(DataConfig(path=str(path), batch_size=1), tok)


def test_missing_field_message_suggests_the_option(tmp_path, tok):
    path = write_lines(tmp_path / "t.jsonl", [{"problem": "x", "solution": "y"}])
    with pytest.raises(DataError) as err:
        build_train_iterator(DataConfig(path=str(path), batch_size=1), tok)
    assert "data.prompt_field" in str(err.value) and "'problem'" in str(err.value)


def test_public_dataset_shape_loads_through_datasets_offline(tmp_path, tok):
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"
    rows = [{"problem": f"Kim has {i} cards. How many cards does Kim have?",
             "solution": f"Kim has {i} cards.\nThe answer is {i}.", "answer": i, "level": "easy"}
            for i in range(2, 9)]
    path = write_lines(tmp_path / "public.jsonl", rows)
    cfg = DataConfig(path=str(path), format="hf", cache_dir=str(tmp_path / "hf_cache"), prompt_field="problem",
                     response_field="solution", seq_len=128, batch_size=2, shuffle=False)
    examples = list(iter_examples(cfg, tok))
    assert [ex.answer for ex in examples] == [str(i) for i in range(2, 9)]
    assert [ex.id for ex in examples] == [str(i) for i in range(7)]  # no id field: the record index
    text = tok.decode(examples[3].input_ids)
    assert rows[3]["problem"] in text and rows[3]["solution"] in text
    batch = next(build_train_iterator(cfg, tok))
    assert batch["input_ids"].shape == (2, 128)

    # Errors through `datasets` name the file and the record index.
    rows[4] = {"problem": "Kim has 1 card.", "solution": ""}
    write_lines(path, rows)
    with pytest.raises(DataError, match=rf"^{path} \[record 4\]: field 'solution': empty"):
        list(iter_examples(dataclasses.replace(cfg, cache_dir=str(tmp_path / "hf_cache2")), tok))


def test_sharegpt_shape_via_field_names(tmp_path, tok):
    row = {"conversations": [{"from": "human", "value": "Eva has 2 books."},
                             {"from": "gpt", "value": "The answer is 2."}], "uid": 17}
    path = write_lines(tmp_path / "sharegpt.jsonl", [row])
    cfg = DataConfig(path=str(path), messages_field="conversations", role_key="from", content_key="value",
                     id_field="uid")
    (record,) = load_records(cfg)
    assert record.id == "17"
    assert [(m.role, m.content) for m in record.messages] == [("user", "Eva has 2 books."),
                                                               ("assistant", "The answer is 2.")]


def test_json_array_file_and_directory_and_max_records(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([GOOD[0], GOOD[0]]))
    records = list(load_records(DataConfig(path=str(tmp_path / "a.json"))))
    assert [str(r.location) for r in records] == [f"{tmp_path / 'a.json'} [record {i}]" for i in range(2)]
    d = tmp_path / "dir"
    d.mkdir()
    write_lines(d / "part-0.jsonl", [GOOD[0], GOOD[1]])
    write_lines(d / "part-1.jsonl", [GOOD[1], GOOD[0]])
    records = list(load_records(DataConfig(path=str(d), max_records=3)))
    assert [str(r.location) for r in records] == [f"{d}/part-0.jsonl:1", f"{d}/part-0.jsonl:2", f"{d}/part-1.jsonl:1"]


def test_missing_path_is_a_clear_error(tmp_path, tok):
    with pytest.raises(DataError, match="no such file"):
        list(load_records(DataConfig(path=str(tmp_path / "nope.jsonl"), format="jsonl")))
    with pytest.raises(DataError, match="data.path is empty"):
        list(load_records(DataConfig()))


def test_config_validation(tmp_path):
    cfg = load_config(DataConfig, None, ["path=x.jsonl", "seq_len=512", "pack_strategy=greedy", "num_epochs=null"])
    assert cfg.seq_len == 512 and cfg.pack_strategy == "greedy" and cfg.num_epochs is None
    assert hash(cfg) == hash(load_config(DataConfig, None, ["path=x.jsonl", "seq_len=512", "pack_strategy=greedy",
                                                           "num_epochs=null"]))
    assert hash(cfg) != hash(dataclasses.replace(cfg, role_map={"bot": "assistant"}))
    for overrides, match in [
        (["seq_len=1"], "seq_len"),
        (["pack_strategy=random"], "pack_strategy"),
        (["truncation=cut"], "truncation"),
        (["topk=4"], "teacher_scores"),
        (["role_map={bot: robot}"], "role_map"),
        (["packing=maybe"], "packing"),
        (["prompt_feld=q"], "unknown option"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(DataConfig, None, overrides)
    with pytest.raises(ConfigError, match="not divisible by process_count=3"):
        from_dict(DataConfig, {"batch_size": 8}).local_batch_size(3)
