"""Streamed data (data.streaming): disjoint shares read by bytes, exact resume, block-joined scores refused when stale."""

import collections
import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from dcd_jax.data import (
    DataConfig,
    DataError,
    Location,
    ScoresProvenance,
    build_train_iterator,
    content_hash,
    iter_examples,
    tokenizer_fingerprint,
    write_teacher_scores,
)
from dcd_jax.data.pretokenize import write_tokenized_records
from dcd_jax.data.shards import plan_blocks, read_block
from dcd_jax.data.synthetic import STYLES, SyntheticTaskConfig, generate_problems, write_jsonl
from dcd_jax.teacher.scoring import merge_parts

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "data" / "synthetic_tokenizer"
N, BLOCK, K = 100, 8, 3


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    records = generate_problems(SyntheticTaskConfig(seed=4, n_examples=N, max_steps=5,
                                                    style_mix={s: 1.0 for s in STYLES}))
    jsonl = write_jsonl(records, root / "train.jsonl")
    table = pa.Table.from_pylist([{k: r[k] for k in ("id", "prompt", "response", "answer")} for r in records])
    parquet = root / "train.parquet"
    pq.write_table(table, parquet, row_group_size=BLOCK)
    return root, jsonl, parquet


def stream_cfg(path, **kw):
    return DataConfig(**{"path": str(path), "seq_len": 256, "batch_size": 4, "seed": 7, "streaming": True,
                         "block_records": BLOCK, **kw})


def segment_tokens(batches):
    """Token sequences of every example placed in the batches."""
    for batch in batches:
        for b in range(batch["segment_ids"].shape[0]):
            for s in np.unique(batch["segment_ids"][b]):
                if s:
                    yield batch["input_ids"][b, batch["segment_ids"][b] == s].tobytes()


def fake_scores(cfg, tok):
    """Made-up scores unique to each token of each record, keyed by id."""
    rng = np.random.default_rng(0)
    out = {}
    plain = dataclasses.replace(cfg, streaming=False, teacher_scores=None, topk=0)
    for i, ex in enumerate(iter_examples(plain, tok, apply_length=False)):
        n = ex.num_response_tokens
        out[ex.id] = {"id": ex.id, "content_hash": content_hash(ex.input_ids, ex.response_mask),
                      "teacher_logprobs": -(i + 1 + np.arange(n)) / 1000.0,
                      "teacher_topk_ids": rng.integers(0, len(tok), (n, K)),
                      "teacher_topk_logprobs": -np.tile(np.arange(K, dtype=float), (n, 1)) - 0.5}
    return out


def write_block_scores(cfg, tok, scores, out, drop=()):
    """What score-teacher writes (block parts merged in order), without running a teacher."""
    plan = plan_blocks(cfg, cfg.block_records)
    provenance = ScoresProvenance("t", "w-t", "float32", K, tokenizer_fingerprint(tok))
    parts = out.with_name(out.name + ".parts")
    for block in plan.blocks:
        ids = [str(raw["id"]) for _, _, raw in read_block(block, cfg, plan.kind)[0]]
        write_teacher_scores(parts / f"part-b{block.index:07d}.parquet",
                             [scores[i] for i in ids if i not in drop], provenance)
    merge_parts(parts, plan, provenance, out)
    return out


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_two_processes_read_disjoint_shares_of_the_bytes_that_cover_all(tok, corpus, kind):
    root, jsonl, parquet = corpus
    path = jsonl if kind == "jsonl" else parquet
    everything = [ex.input_ids.tobytes() for ex in iter_examples(stream_cfg(path, streaming=False), tok)]
    shares, read = [], []
    for p in range(2):
        it = build_train_iterator(stream_cfg(path), tok, process_index=p, process_count=2)
        assert it.examples is None and it.local_batch_size == 2
        shares.append(collections.Counter(segment_tokens(it)))
        read.append(it.stats.bytes_read - plan_blocks(stream_cfg(path), BLOCK).bytes_read)  # blocks, not planning
        assert it.stats.records_read == sum(shares[-1].values())  # only its own blocks were read
    assert not set(shares[0]) & set(shares[1])
    assert shares[0] + shares[1] == collections.Counter(everything)
    if kind == "parquet":  # planned from the footer: each process then reads its row groups only
        size = parquet.stat().st_size
        assert all(0.3 * size < r < 0.7 * size for r in read), (read, size)


@pytest.mark.parametrize("where", [0.3, 0.7])
def test_kill_and_resume_mid_epoch_is_bitwise_equal(tok, corpus, where, tmp_path):
    root, jsonl, _ = corpus
    cfg = stream_cfg(jsonl, num_epochs=2, teacher_scores=str(tmp_path / "s.parquet"), topk=K)
    write_block_scores(cfg, tok, fake_scores(cfg, tok), tmp_path / "s.parquet")
    from test_data_pipeline import assert_resume_is_exact

    reference, _ = assert_resume_is_exact(cfg, tok, where)
    # Two epochs hold every example exactly twice.
    one = collections.Counter(segment_tokens(build_train_iterator(dataclasses.replace(cfg, num_epochs=1), tok)))
    assert collections.Counter(segment_tokens(reference)) == one + one and sum(one.values()) == N


def test_block_scores_line_up_and_stale_or_missing_ones_are_refused(tok, corpus, tmp_path):
    root, jsonl, _ = corpus
    cfg = stream_cfg(jsonl, teacher_scores=str(tmp_path / "s.parquet"), topk=K, shuffle=False, packing=False)
    scores = fake_scores(cfg, tok)
    write_block_scores(cfg, tok, scores, tmp_path / "s.parquet")
    plain = dataclasses.replace(cfg, streaming=False, teacher_scores=None, topk=0)
    examples = {ex.input_ids.tobytes(): ex for ex in iter_examples(plain, tok)}
    for batch in build_train_iterator(cfg, tok):
        for b in range(batch["input_ids"].shape[0]):
            row = batch["segment_ids"][b] > 0
            if not row.any():
                continue
            ex = examples[batch["input_ids"][b, row].tobytes()]
            learned = batch["loss_mask"][b] > 0
            np.testing.assert_allclose(batch["teacher_logprobs"][b, learned], scores[ex.id]["teacher_logprobs"],
                                       rtol=1e-6)
    lines = open(jsonl).read().splitlines()
    records = [json.loads(line) for line in lines]
    # Swap two responses inside the same block: counts and ids still match; the hash does not.
    by_length = collections.defaultdict(list)
    for i, ex in enumerate(examples.values()):
        by_length[(i // BLOCK, ex.num_response_tokens)].append(i)
    i, j = next(v for v in by_length.values() if len(v) >= 2 and records[v[0]]["response"] != records[v[1]]["response"])[:2]
    records[i]["response"], records[j]["response"] = records[j]["response"], records[i]["response"]
    swapped = write_jsonl(records, tmp_path / "swapped.jsonl")
    it = build_train_iterator(dataclasses.replace(cfg, path=str(swapped), on_bad_record="skip"), tok)
    with pytest.raises(DataError, match=rf"^{swapped}:{i + 1}: field 'content_hash': .*other tokens"):
        list(it)
    # A record without a row of scores (streamed, named when its block is read).
    dropped = write_block_scores(cfg, tok, scores, tmp_path / "dropped.parquet", drop={records[13]["id"]})
    with pytest.raises(DataError, match=rf"^{jsonl}:14: field 'id': no teacher scores for id"):
        list(build_train_iterator(dataclasses.replace(cfg, teacher_scores=str(dropped)), tok))
    # Traces that grew after scoring: refused before compute, naming the first unscored record.
    grown = tmp_path / "grown.jsonl"
    grown.write_text("\n".join(lines + lines[:BLOCK + 1]) + "\n")
    with pytest.raises(DataError, match=rf"^{grown}:{-(-N // BLOCK) * BLOCK + 1}: field 'id': no teacher scores "
                       "for this record and the rest of block"):
        build_train_iterator(dataclasses.replace(cfg, path=str(grown)), tok)


def test_inspect_streams_a_limited_look_and_reports_bytes_per_process(tok, corpus):
    import re

    from dcd_jax.data import inspect_data

    root, jsonl, parquet = corpus
    eager = inspect_data(stream_cfg(jsonl, streaming=False), tok).splitlines()
    streamed = inspect_data(stream_cfg(jsonl), tok, processes=2).splitlines()
    for key in (f"{N} records read, {N} examples kept", "  example   p50", "  response  p50"):
        assert [line for line in eager if key in line] == [line for line in streamed if key in line] != []
    report = inspect_data(stream_cfg(jsonl, streaming=False), tok, limit=20, processes=2)
    assert "20 records read, 20 examples kept" in report
    read = [(int(p), int(b.replace(",", "")), int(r))
            for p, b, r in re.findall(r"process (\d): ([\d,]+) bytes, (\d+) records", report)]
    assert [(p, r) for p, _, r in read] == [(0, 12), (1, 8)]  # blocks 0 and 2 (8 + 4 records), block 1
    assert all(0 < b < jsonl.stat().st_size / 2 for _, b, _ in read)  # the first 20 records, not the file


def test_read_workers_change_nothing_but_who_reads(tok, corpus, tmp_path):
    """Blocks prepared ahead by 2 worker processes: the same batches after a resume, errors intact."""
    import pickle

    root, jsonl, _ = corpus
    cfg = stream_cfg(jsonl, num_epochs=2, teacher_scores=str(tmp_path / "s.parquet"), topk=K)
    write_block_scores(cfg, tok, fake_scores(cfg, tok), tmp_path / "s.parquet")
    reference = build_train_iterator(cfg, tok)
    head = [next(reference) for _ in range(9)]
    state = json.loads(json.dumps(reference.get_state()))
    rest = list(reference)
    assert head and rest
    resumed = build_train_iterator(dataclasses.replace(cfg, read_workers=2), tok)
    resumed.set_state(state)  # one worker pool: resumes mid-epoch, prefetches across the epoch boundary
    got = list(resumed)
    assert len(got) == len(rest)
    for a, b in zip(got, rest):
        assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert resumed.stats.records_read > 0 and resumed.stats.bytes_read > 0  # counted in the workers, merged
    # A record's error crosses the process boundary whole.
    err = DataError("missing", location=Location(str(jsonl), line=21), field="response", reason="missing_field")
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.location, back.field, back.reason) == (str(err), err.location, "response", "missing_field")


def test_streamed_training_resumes_bitwise_through_the_checkpoint(tmp_path):
    """The train engine checkpoints the streamed iterator's position: stop at step 2, rerun to 4 == straight to 4."""
    from train_fixtures import base_overrides, make_assets

    from dcd_jax.config import load_config
    from dcd_jax.train.config import RunConfig
    from dcd_jax.train.loop import train
    from dcd_jax.train.metrics import read_metrics

    assets = make_assets(tmp_path / "assets", n_examples=120)

    def run(out_dir, steps):
        overrides = base_overrides(assets, out_dir, **{"train.steps": steps, "checkpoint.every_steps": 2,
                                                         "data.streaming": "true", "data.block_records": 16,
                                                         "mesh.data": 8, "mesh.fsdp": 1, "mesh.tensor": 1})
        result = train(load_config(RunConfig, None, overrides))
        return result, read_metrics(out_dir / "metrics.jsonl")

    _, straight = run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    result, resumed = run(tmp_path / "resumed", 4)
    assert result.step == 4 and len(straight) == 4
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]  # bitwise, every step


def tokenized_copy(tok, path, out):
    """The records of ``path`` as tokenized records (the student's ids and mask), JSONL or Parquet by suffix,
    written by the product's pretokenizer (``dcd-jax data tokenize``)."""
    stats = write_tokenized_records(stream_cfg(path, streaming=False), tok, out, rows_per_group=BLOCK)
    assert stats.examples == N
    return out


def test_pretokenizing_a_bad_corpus_names_the_record_and_leaves_no_file(tok, tmp_path):
    records = [{"id": f"r{i}", "prompt": f"{i} + 1?", "response": f"{i + 1}"} for i in range(5)]
    records[3] = {"id": "r3", "prompt": "3 + 1?"}
    path = write_jsonl(records, tmp_path / "bad.jsonl")
    out = tmp_path / "tokens.parquet"
    with pytest.raises(DataError, match=rf"^{path}:4: .*'response'"):
        write_tokenized_records(stream_cfg(path), tok, out, rows_per_group=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # no partial output, no temporary
    stats = write_tokenized_records(stream_cfg(path, on_bad_record="skip"), tok, out, rows_per_group=2)
    assert stats.examples == 4 and pq.read_table(out).column("id").to_pylist() == ["r0", "r1", "r2", "r4"]


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_tokenized_records_give_exactly_the_batches_of_their_text(tok, corpus, kind, tmp_path):
    """Token ids carried by the records (no tokenization while streaming) join the same block scores and
    yield bitwise the batches of the text records, streamed and eager."""
    root, jsonl, parquet = corpus
    text = jsonl if kind == "jsonl" else parquet
    tokenized = tokenized_copy(tok, text, tmp_path / f"tokens.{kind}")
    cfg = stream_cfg(text, num_epochs=1, teacher_scores=str(tmp_path / "s.parquet"), topk=K, seq_len=96,
                     truncation="truncate_response")
    write_block_scores(cfg, tok, fake_scores(cfg, tok), tmp_path / "s.parquet")
    for streaming in (True, False):
        want = list(build_train_iterator(dataclasses.replace(cfg, streaming=streaming), tok))
        it = build_train_iterator(dataclasses.replace(cfg, path=str(tokenized), streaming=streaming), tok)
        got = list(it)
        assert len(got) == len(want) > 1 and it.stats.truncated > 0
        for a, b in zip(got, want):
            assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_bad_tokenized_records_are_named_by_line_and_field(tok, corpus, tmp_path):
    root, jsonl, _ = corpus
    good = [json.loads(line) for line in open(tokenized_copy(tok, jsonl, tmp_path / "t.jsonl"))]
    cases = {
        "response_mask": (dict(response_mask=[1, 0]), r"has 2 entries for the \d+ tokens of 'input_ids'"),
        "input_ids": (dict(input_ids=[len(tok)] * len(good[4]["input_ids"])), "holds ids outside the student vocabulary"),
        "tokenizer_fingerprint": (dict(tokenizer_fingerprint=None), "missing: a tokenized record must name the tokenizer"),
    }
    for field, (change, message) in cases.items():
        records = [dict(r) for r in good]
        records[4].update(change)
        path = write_jsonl(records, tmp_path / f"bad_{field}.jsonl")
        with pytest.raises(DataError, match=rf"^{path}:5: field '{field}': {message}"):
            list(build_train_iterator(stream_cfg(path), tok))
        skipped = build_train_iterator(stream_cfg(path, on_bad_record="skip"), tok)
        assert sum(1 for _ in segment_tokens(skipped)) == N - 1 and sum(skipped.stats.skipped.values()) == 1
    records = [dict(r) for r in good]
    records[6]["tokenizer_fingerprint"] = "tok1-another-tokenizer"
    path = write_jsonl(records, tmp_path / "other.jsonl")
    with pytest.raises(DataError, match=rf"^{path}:7: field 'tokenizer_fingerprint': the token ids come from another"):
        list(build_train_iterator(stream_cfg(path, on_bad_record="skip"), tok))  # never skipped
