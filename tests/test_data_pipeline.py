"""Batching: packing invariants, padded mode, exact resume, process sharding, epochs."""

import collections
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from dcd_jax.config import ConfigError
from dcd_jax.data import DataConfig, build_train_iterator, inspect_data, iter_examples
from dcd_jax.data.synthetic import STYLES, SyntheticTaskConfig, generate_problems, write_jsonl

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "data" / "synthetic_tokenizer"
N = 157  # not a multiple of any batch size used below


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    task = SyntheticTaskConfig(seed=3, n_examples=N, max_steps=5, style_mix={s: 1.0 for s in STYLES})
    return write_jsonl(generate_problems(task), tmp_path_factory.mktemp("data") / "train.jsonl")


def base_cfg(path, **kw):
    return DataConfig(**{"path": str(path), "seq_len": 256, "batch_size": 4, "seed": 11, **kw})


def segments(batch):
    """(row, segment id, token indices) of every example placed in the batch."""
    for b in range(batch["segment_ids"].shape[0]):
        for s in np.unique(batch["segment_ids"][b]):
            if s:
                yield b, int(s), np.flatnonzero(batch["segment_ids"][b] == s)


def check_batches(batches, examples, seq_len, rows):
    """Every example appears exactly once, intact, with its own positions, targets and loss mask."""
    by_tokens = collections.defaultdict(list)
    for ex in examples:
        by_tokens[ex.input_ids.tobytes()].append(ex)
    seen = collections.Counter()
    for batch in batches:
        assert batch["input_ids"].shape == (rows, seq_len)
        assert {k: v.dtype for k, v in batch.items()} == {
            "input_ids": np.int32, "positions": np.int32, "segment_ids": np.int32, "targets": np.int32,
            "loss_mask": np.float32,
        }
        pad = batch["segment_ids"] == 0
        for k in ("input_ids", "positions", "targets", "loss_mask"):
            assert not batch[k][pad].any(), k
        for b, s, idx in segments(batch):
            assert np.all(np.diff(idx) == 1), "a segment must be contiguous"
            ids = batch["input_ids"][b, idx]
            matches = by_tokens.get(ids.tobytes())
            assert matches, "a packed segment is not an example"
            ex = matches[0]
            seen[ids.tobytes()] += 1
            np.testing.assert_array_equal(batch["positions"][b, idx], np.arange(len(idx)))
            # Targets: the next token of the same segment, 0 after its last token.
            np.testing.assert_array_equal(batch["targets"][b, idx[:-1]], ids[1:])
            assert batch["targets"][b, idx[-1]] == 0
            # The loss covers exactly the targets that are response tokens of this example.
            np.testing.assert_array_equal(batch["loss_mask"][b, idx[:-1]], ex.response_mask[1:])
            assert batch["loss_mask"][b, idx[-1]] == 0
        # Segment ids in a row are 1..n without gaps.
        for b in range(rows):
            ids = np.unique(batch["segment_ids"][b])
            ids = ids[ids > 0]
            np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
    assert seen == collections.Counter({k: len(v) for k, v in by_tokens.items()})


@pytest.mark.parametrize("packing,strategy", [(True, "first_fit"), (True, "best_fit"), (True, "greedy"),
                                              (False, "first_fit")])
def test_every_token_once_positions_restart_mask_is_response(tok, data_path, packing, strategy):
    cfg = base_cfg(data_path, packing=packing, pack_strategy=strategy)
    it = build_train_iterator(cfg, tok)
    batches = list(it)
    assert len(it.examples) == N
    check_batches(batches, it.examples, cfg.seq_len, cfg.batch_size)
    eff = it.stats.packing_efficiency
    real = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    assert eff == pytest.approx(real / (len(batches) * cfg.batch_size * cfg.seq_len))
    if packing:
        assert max(s for b in batches for _, s, _ in segments(b)) > 1  # rows really hold several examples
        assert eff > 0.6
    else:
        assert len(batches) == -(-N // cfg.batch_size)


@pytest.mark.parametrize("packing,strategy,where", [(True, "first_fit", 0.25), (True, "first_fit", 0.5),
                                                    (True, "first_fit", 0.8), (True, "best_fit", 0.4),
                                                    (False, "first_fit", 0.6)])
def test_resume_gives_the_same_next_batch(tok, data_path, packing, strategy, where):
    # Two epochs: stops inside the first, around the epoch boundary, and in the second.
    cfg = base_cfg(data_path, packing=packing, pack_strategy=strategy, num_epochs=2)
    _, fresh = assert_resume_is_exact(cfg, tok, where)
    assert fresh.stats.batches == len(list(build_train_iterator(cfg, tok)))


def assert_resume_is_exact(cfg, tok, where: float):
    """Stop an iterator ``where`` of the way through, restore its (JSON round-tripped) state into a
    fresh one: the rest is bitwise the reference's. Returns the reference batches and the fresh iterator."""
    reference = list(build_train_iterator(cfg, tok))
    stop = int(where * len(reference))
    assert 0 < stop < len(reference) - 1
    interrupted = build_train_iterator(cfg, tok)
    for _ in range(stop):
        next(interrupted)
    state = json.loads(json.dumps(interrupted.get_state()))  # as stored in a checkpoint
    fresh = build_train_iterator(cfg, tok)
    fresh.set_state(state)
    resumed = list(fresh)
    assert len(resumed) == len(reference) - stop
    for a, b in zip(resumed, reference[stop:]):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].tobytes() == b[k].tobytes(), k
    return reference, fresh


def test_resume_refuses_a_state_for_other_data(tok, data_path):
    cfg = base_cfg(data_path)
    it = build_train_iterator(cfg, tok)
    next(it)
    state = it.get_state()
    with pytest.raises(ValueError, match=r"config \(seed\)"):
        build_train_iterator(dataclasses.replace(cfg, seed=12), tok).set_state(state)
    with pytest.raises(ValueError, match="num_examples"):
        build_train_iterator(dataclasses.replace(cfg, max_records=100), tok).set_state(state)
    # More epochs is allowed: the order of the epochs already planned does not change.
    build_train_iterator(dataclasses.replace(cfg, num_epochs=3), tok).set_state(state)


def test_two_processes_read_disjoint_shares_that_cover_all(tok, data_path):
    cfg = base_cfg(data_path)
    all_ids = [json.loads(line)["id"] for line in open(data_path)]
    shares = []
    for p in range(2):
        it = build_train_iterator(cfg, tok, process_index=p, process_count=2)
        assert it.local_batch_size == 2
        assert it.stats.records_read == len(it.examples) == (N + 1 - p) // 2  # only its own records are read
        batches = list(it)
        check_batches(batches, it.examples, cfg.seq_len, 2)
        shares.append({ex.id for ex in it.examples})
    assert not shares[0] & shares[1]
    assert shares[0] | shares[1] == set(all_ids)
    with pytest.raises(ConfigError, match="not divisible"):
        build_train_iterator(cfg, tok, process_index=0, process_count=3)


def test_epochs_are_reshuffled_deterministically(tok, data_path):
    cfg = base_cfg(data_path, packing=False, batch_size=1, num_epochs=2)

    def order(c):
        it = build_train_iterator(c, tok)
        key = {ex.input_ids.tobytes(): ex.id for ex in it.examples}
        return [key[b["input_ids"][0, b["segment_ids"][0] > 0].tobytes()] for b in it]

    a = order(cfg)
    assert len(a) == 2 * N
    assert sorted(a[:N]) == sorted(a[N:]) and len(set(a[:N])) == N  # each epoch is a permutation
    assert a[:N] != a[N:]  # with a new order
    assert order(cfg) == a
    assert order(dataclasses.replace(cfg, seed=12)) != a
    unshuffled = order(dataclasses.replace(cfg, shuffle=False, num_epochs=1))
    assert unshuffled == [json.loads(line)["id"] for line in open(data_path)]


def test_last_batch_is_completed_with_padding_rows(tok, data_path):
    cfg = base_cfg(data_path, packing=False, batch_size=8)
    batches = list(build_train_iterator(cfg, tok))
    last = batches[-1]
    real_rows = N % 8
    assert last["input_ids"].shape == (8, cfg.seq_len)
    assert (last["segment_ids"][:real_rows] > 0).any(axis=1).all()
    assert not last["segment_ids"][real_rows:].any() and not last["loss_mask"][real_rows:].any()


def test_infinite_epochs(tok, data_path):
    it = build_train_iterator(base_cfg(data_path, num_epochs=None), tok)
    for _ in range(3 * N // 4 + 5):  # well past one epoch of rows
        next(it)


def test_iter_examples_streams_in_record_order(tok, data_path):
    ids = [ex.id for ex in iter_examples(base_cfg(data_path), tok)]
    assert ids == [json.loads(line)["id"] for line in open(data_path)]


def test_inspect_report(tok, data_path):
    report = inspect_data(base_cfg(data_path), tok)
    assert f"{N} records read, {N} examples kept" in report
    assert "p50" in report and "p99" in report
    assert "efficiency" in report and "batches" in report
    headers = [line for line in report.splitlines() if line.startswith("--- ")]
    assert len(headers) == 3 and headers[0].startswith(f"--- train-3-0 ({data_path}:1)")
    first = json.loads(open(data_path).readline())
    assert f"«{first['response']}<|im_end|>»" in report  # the response, and only it, is marked as learned
    assert first["prompt"] in report and f"«{first['prompt']}" not in report
