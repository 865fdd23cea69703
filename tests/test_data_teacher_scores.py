"""Stored teacher scores: aligned with the student's response tokens, or refused."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from dcd_jax.data import (
    DataConfig,
    DataError,
    ScoresProvenance,
    build_train_iterator,
    content_hash,
    iter_examples,
    tokenizer_fingerprint,
    write_teacher_scores,
)
from dcd_jax.data.synthetic import SyntheticTaskConfig, generate_problems, write_jsonl

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "data" / "synthetic_tokenizer"
K_STORED, K = 5, 3


def provenance(tok_or_fp, teacher="teacher-a", topk=K_STORED):
    fp = tok_or_fp if isinstance(tok_or_fp, str) else tokenizer_fingerprint(tok_or_fp)
    return ScoresProvenance(teacher=teacher, teacher_weights=f"w-{teacher}", dtype="float32", topk=topk,
                            tokenizer_fingerprint=fp)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tok):
    """Problems, their full-length tokenization, and made-up scores unique to each token."""
    root = tmp_path_factory.mktemp("scores")
    path = write_jsonl(generate_problems(SyntheticTaskConfig(seed=5, n_examples=40)), root / "train.jsonl")
    cfg = DataConfig(path=str(path), seq_len=256, batch_size=4, seed=1)
    rng = np.random.default_rng(0)
    scores = {}
    for i, ex in enumerate(iter_examples(cfg, tok, apply_length=False)):
        n = ex.num_response_tokens
        scores[ex.id] = {
            "id": ex.id,
            "content_hash": content_hash(ex.input_ids, ex.response_mask),
            "teacher_logprobs": -(i + 1 + np.arange(n)) / 1000.0,
            # Stored unsorted, K_STORED wide: the loader must keep the K best per position.
            "teacher_topk_ids": rng.integers(0, len(tok), (n, K_STORED)),
            "teacher_topk_logprobs": -rng.permuted(np.tile(np.arange(K_STORED, dtype=float), (n, 1)), axis=1) - 0.5,
        }
    return cfg, scores, root


def check_alignment(it, scores):
    """Every learned target carries its token's stored scores; everything else is 0."""
    by_tokens = {ex.input_ids.tobytes(): ex for ex in it.examples}
    n_segments = 0
    for batch in it:
        assert batch["teacher_logprobs"].dtype == np.float32 and batch["teacher_topk_ids"].dtype == np.int32
        assert batch["teacher_topk_ids"].shape == batch["input_ids"].shape + (K,)
        off = batch["loss_mask"] == 0
        assert not batch["teacher_logprobs"][off].any() and not batch["teacher_topk_ids"][off].any()
        assert not batch["teacher_topk_logprobs"][off].any()
        for b in range(batch["input_ids"].shape[0]):
            for s in np.unique(batch["segment_ids"][b])[1:]:
                idx = np.flatnonzero(batch["segment_ids"][b] == s)
                ex = by_tokens[batch["input_ids"][b, idx].tobytes()]
                stored = scores[ex.id]
                learned = idx[batch["loss_mask"][b, idx] == 1]
                n = len(learned)
                np.testing.assert_allclose(batch["teacher_logprobs"][b, learned], stored["teacher_logprobs"][:n],
                                           rtol=1e-6)
                order = np.argsort(-stored["teacher_topk_logprobs"][:n], axis=1)[:, :K]
                np.testing.assert_array_equal(batch["teacher_topk_ids"][b, learned],
                                              np.take_along_axis(stored["teacher_topk_ids"][:n], order, 1))
                np.testing.assert_allclose(batch["teacher_topk_logprobs"][b, learned],
                                           np.take_along_axis(stored["teacher_topk_logprobs"][:n], order, 1))
                n_segments += 1
    assert n_segments == len(it.examples)


def test_parquet_scores_line_up_with_targets(tok, data):
    cfg, scores, root = data
    path = root / "scores.parquet"
    write_teacher_scores(path, scores.values(), provenance(tok))
    it = build_train_iterator(dataclasses.replace(cfg, teacher_scores=str(path), topk=K), tok)
    check_alignment(it, scores)


def test_inline_scores_line_up_with_targets(tok, data):
    cfg, scores, root = data
    records = [json.loads(line) for line in open(cfg.path)]
    for r in records:
        r.update({k: np.asarray(v).tolist() for k, v in scores[r["id"]].items() if k != "id"})
        r["tokenizer_fingerprint"] = tokenizer_fingerprint(tok)
    path = write_jsonl(records, root / "inline.jsonl")
    it = build_train_iterator(dataclasses.replace(cfg, path=str(path), teacher_scores="inline", topk=K), tok)
    check_alignment(it, scores)


def test_truncated_response_keeps_the_head_of_its_scores(tok, data):
    cfg, scores, root = data
    path = root / "scores.parquet"
    write_teacher_scores(path, scores.values(), provenance(tok))
    it = build_train_iterator(dataclasses.replace(cfg, teacher_scores=str(path), seq_len=80,
                                                  truncation="truncate_response"), tok)
    assert it.stats.truncated > 0
    for ex in it.examples:
        np.testing.assert_allclose(ex.teacher.logprobs, scores[ex.id]["teacher_logprobs"][: ex.num_response_tokens],
                                   rtol=1e-6)


def test_other_tokenizer_is_refused_even_when_skipping(tok, data):
    cfg, scores, root = data
    path = root / "other.parquet"
    write_teacher_scores(path, scores.values(), provenance("tok1-someone-elses-tokenizer"))
    for policy in ("error", "skip"):
        with pytest.raises(DataError, match=rf"^{cfg.path}:1: .*different tokenizer.*refused") as err:
            build_train_iterator(dataclasses.replace(cfg, teacher_scores=str(path), on_bad_record=policy), tok)
        assert err.value.reason == "teacher_fingerprint"


def test_inline_scores_without_fingerprint_are_refused(tok, data):
    cfg, scores, root = data
    records = [json.loads(line) for line in open(cfg.path)]
    for r in records:
        r["teacher_logprobs"] = scores[r["id"]]["teacher_logprobs"].tolist()
    path = write_jsonl(records, root / "nofp.jsonl")
    inline = dataclasses.replace(cfg, path=str(path), teacher_scores="inline")
    with pytest.raises(DataError, match="cannot be checked"):
        build_train_iterator(inline, tok)
    # Declaring the fingerprint in the config is enough.
    build_train_iterator(dataclasses.replace(inline, teacher_fingerprint=tokenizer_fingerprint(tok)), tok)


def test_count_mismatch_names_record_and_field(tok, data):
    cfg, scores, root = data
    rows = [dict(r) for r in scores.values()]
    rows[2]["teacher_logprobs"] = rows[2]["teacher_logprobs"][:-1]
    path = root / "short.parquet"
    write_teacher_scores(path, rows, provenance(tok))
    scored = dataclasses.replace(cfg, teacher_scores=str(path))
    with pytest.raises(DataError, match=rf"^{cfg.path}:3: field 'teacher_logprobs': has \d+ entries but the response"):
        build_train_iterator(scored, tok)
    it = build_train_iterator(dataclasses.replace(scored, on_bad_record="skip"), tok)
    assert it.stats.skipped == {"teacher_scores": 1} and len(it.examples) == len(scores) - 1


def test_missing_id_and_bad_values(tok, data):
    cfg, scores, root = data
    rows = [dict(r) for r in scores.values()]
    missing = root / "missing.parquet"
    write_teacher_scores(missing, rows[:-1], provenance(tok))
    with pytest.raises(DataError, match=rf"^{cfg.path}:{len(rows)}: .*no teacher scores for id"):
        build_train_iterator(dataclasses.replace(cfg, teacher_scores=str(missing)), tok)
    rows[0]["teacher_logprobs"] = -rows[0]["teacher_logprobs"]  # positive: not log-probabilities
    bad = root / "bad.parquet"
    write_teacher_scores(bad, rows, provenance(tok))
    with pytest.raises(DataError, match=rf"^{cfg.path}:1: field 'teacher_logprobs': .*log-probabilities"):
        build_train_iterator(dataclasses.replace(cfg, teacher_scores=str(bad)), tok)
    with pytest.raises(DataError, match=r"field 'topk': scores store top-5 but data.topk=8 \(first record"):
        write_teacher_scores(bad, scores.values(), provenance(tok))
        build_train_iterator(dataclasses.replace(cfg, teacher_scores=str(bad), topk=8), tok)


def test_fingerprint_is_stable_and_sensitive(tok):
    same = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    same("warm the cache, set state", padding=False, truncation=True, max_length=4)
    assert tokenizer_fingerprint(same) == tokenizer_fingerprint(tok)
    other_eos = AutoTokenizer.from_pretrained(TOKENIZER_DIR, eos_token="<|endoftext|>")
    assert tokenizer_fingerprint(other_eos) != tokenizer_fingerprint(tok)
    grown = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    grown.add_tokens(["<|new|>"])
    assert tokenizer_fingerprint(grown) != tokenizer_fingerprint(tok)


def test_swapped_same_length_responses_are_refused_naming_the_record(tok, data, tmp_path):
    """Counts still match after the swap; only the content hash can tell the scores are someone else's."""
    cfg, scores, root = data
    path = root / "scores.parquet"
    write_teacher_scores(path, scores.values(), provenance(tok))
    records = [json.loads(line) for line in open(cfg.path)]
    lengths = {}
    for i, ex in enumerate(iter_examples(cfg, tok, apply_length=False)):
        lengths.setdefault(ex.num_response_tokens, []).append(i)
    i, j = next(v for v in lengths.values() if len(v) >= 2 and records[v[0]]["response"] != records[v[1]]["response"])[:2]
    records[i]["response"], records[j]["response"] = records[j]["response"], records[i]["response"]
    swapped = write_jsonl(records, tmp_path / "swapped.jsonl")
    for policy in ("error", "skip"):  # stale scores are never skipped
        with pytest.raises(DataError, match=rf"^{swapped}:{i + 1}: field 'content_hash': the teacher scores "
                           rf"\({path} row {i}\) were computed from other tokens.*Rescore") as err:
            build_train_iterator(dataclasses.replace(cfg, path=str(swapped), teacher_scores=str(path), topk=K,
                                                     on_bad_record=policy), tok)
        assert err.value.reason == "stale_teacher_scores"


def test_scores_of_another_teacher_or_topk_or_without_hashes_are_refused(tok, data):
    cfg, scores, root = data
    path = root / "teacher_a.parquet"
    write_teacher_scores(path, scores.values(), provenance(tok, teacher="teacher-a", topk=2))
    first = next(iter(scores))
    scored = dataclasses.replace(cfg, teacher_scores=str(path), topk=2)
    with pytest.raises(DataError, match=rf"^{path} \[record 0\]: field 'teacher': scores were computed by teacher "
                       rf"'teacher-a'.*not by data.teacher='teacher-b' \(first record '{first}'\); rescore"):
        build_train_iterator(dataclasses.replace(scored, teacher="teacher-b"), tok)
    for name in ("teacher-a", "w-teacher-a"):  # the name or the weights fingerprint
        build_train_iterator(dataclasses.replace(scored, teacher=name), tok)
    # The file says top-2 even though its rows are 5 wide: the provenance is what is trusted.
    with pytest.raises(DataError, match=r"field 'topk': scores store top-2 but data.topk=3"):
        build_train_iterator(dataclasses.replace(scored, topk=3), tok)
    import pyarrow.parquet as pq

    old = root / "old.parquet"
    pq.write_table(pq.read_table(path).drop(["content_hash"]).replace_schema_metadata({}), old)
    with pytest.raises(DataError, match=r"field 'content_hash': holds no provenance or per-row content hashes"):
        build_train_iterator(dataclasses.replace(cfg, teacher_scores=str(old)), tok)


def test_content_hash_sees_every_token_and_the_mask():
    ids, mask = np.arange(6, dtype=np.int32), np.array([0, 0, 1, 1, 1, 1], bool)
    h = content_hash(ids, mask)
    assert h == content_hash(ids.astype(np.int64), mask.astype(np.int8))  # same values, any dtype
    assert len({h, content_hash(ids[::-1], mask), content_hash(ids, ~mask), content_hash(ids[:-1], mask[:-1])}) == 4


def test_checking_a_run_of_rows_at_once_equals_checking_each_record(tok, data):
    """The block fast path (one vectorized check and one sort per block) gives exactly the per-record
    result, ties in the top-k included, and declines (so that the record is named) on any bad row."""
    from dcd_jax.data import load_records, tokenize_records
    from dcd_jax.data.teacher_scores import ParquetScores, check_scores

    cfg, scores, root = data
    rows = [dict(r, teacher_topk_logprobs=np.floor(r["teacher_topk_logprobs"] / 2)) for r in scores.values()]  # ties
    path = root / "ties.parquet"
    write_teacher_scores(path, rows, provenance(tok))
    scored = dataclasses.replace(cfg, teacher_scores=str(path), topk=K)
    table = ParquetScores(path, scored)
    records = list(load_records(scored))[5:25]
    examples = tokenize_records(records, tok, scored)
    counts = np.array([ex.num_response_tokens for ex in examples])
    hashes = [content_hash(ex.input_ids, ex.response_mask) for ex in examples]
    fast = table.check_run(records, counts, hashes, student_fingerprint=tokenizer_fingerprint(tok), vocab_size=len(tok))
    assert fast is not None and len(fast) == len(records)
    for record, ex, got in zip(records, examples, fast):
        want = check_scores(table.get(record), record, num_response_tokens=ex.num_response_tokens,
                            student_fingerprint=tokenizer_fingerprint(tok), cfg=scored, vocab_size=len(tok),
                            example_hash=content_hash(ex.input_ids, ex.response_mask))
        for name in ("logprobs", "topk_ids", "topk_logprobs"):
            assert getattr(got, name).dtype == getattr(want, name).dtype
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    fp = tokenizer_fingerprint(tok)
    declined = [
        table.check_run(records[::-1], counts[::-1], hashes[::-1], student_fingerprint=fp, vocab_size=len(tok)),
        table.check_run(records, counts + 1, hashes, student_fingerprint=fp, vocab_size=len(tok)),
        table.check_run(records, counts, hashes[:3] + ["0" * 32] + hashes[4:], student_fingerprint=fp,
                        vocab_size=len(tok)),
        table.check_run(records, counts, hashes, student_fingerprint="tok1-other", vocab_size=len(tok)),
        table.check_run(records, counts, hashes, student_fingerprint=fp, vocab_size=3),
    ]
    assert declined == [None] * len(declined)
