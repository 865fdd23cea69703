"""Validated examples -> deterministic, checkpointable batches (grain).

Order of work, all before the first batch (so that a bad record fails a run in seconds, not after
hours of compute):

1. read this process's share of the records (record ``i`` -> process ``i % process_count``),
2. validate and tokenize them, attach and check stored teacher scores, apply ``seq_len``,
   counting every skip / drop / truncation by reason (:class:`DataStats`, logged at the end),
3. build the grain graph ``source -> shuffle (new permutation each epoch) -> repeat(num_epochs) ->
   per-example features -> pack (first-fit / best-fit / greedy) or pad -> batch``.

The iterator's state is grain's (an element index plus the packer's position) together with a
fingerprint of everything that decides the order (config, process layout, example count,
tokenizer). Restoring it in a fresh iterator built from the same inputs yields exactly the batch
that would have come next.

Streamed (``data.streaming: true``, corpus scale): the input is cut into blocks
(:mod:`dcd_jax.data.shards`); a process reads only its blocks, one at a time, joins each with the
same block of the scores file, and validates records as they stream. Only the cheap checks run
before compute (scores provenance and layout, every block of the share covered). The graph is
``blocks (a new block order and in-block order each epoch) -> features -> pack or pad -> batch``;
its state is ``(epoch, block position, examples taken)`` plus the packer's, so resume is exact
and host memory is one block, whatever the corpus size.

Batches (``B`` = this host's rows, ``T`` = ``seq_len``): ``input_ids``, ``positions`` (restart at 0
in every packed segment, 0 on padding), ``segment_ids`` (1..n per row, 0 = padding), ``targets``
(next token within the segment, else 0), ``loss_mask`` (1.0 iff the target is a response token)
- int32 except ``loss_mask`` float32 - plus, with stored teacher scores, ``teacher_logprobs``
[B,T] float32 aligned with ``targets`` and, with ``topk > 0``, ``teacher_topk_ids`` int32 /
``teacher_topk_logprobs`` float32 [B,T,K]. Teacher arrays are 0 (ids 0, log-probs 0.0) wherever
``loss_mask`` is 0: no -inf anywhere.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import logging
from typing import Any, Iterator

import grain
import numpy as np

from dcd_jax.config import to_dict
from dcd_jax.data.config import DataConfig
from dcd_jax.data.errors import BadRecordPolicy, DataError, Location
from dcd_jax.data.records import load_records, parse_record
from dcd_jax.data.shards import Block, BlockPlan, plan_blocks, read_block
from dcd_jax.data.teacher_scores import (
    BlockScores,
    InlineScores,
    ScoreRows,
    check_scores,
    content_hash,
    open_teacher_scores,
    tokenizer_fingerprint,
)
from dcd_jax.data.tokenization import TokenizedExample, fit_to_length, tokenize_records

logger = logging.getLogger("dcd_jax.data")

STATE_VERSION = 1
_CHUNK = 512  # records rendered and tokenized per tokenizer call
# Options that may change between a save and a restore without changing the batch order.
_RESUMABLE_CHANGES = ("num_epochs", "read_workers")


@dataclasses.dataclass
class DataStats:
    """What the pipeline read, kept, skipped and packed on this process.

    ``skipped`` counts invalid records by reason (``on_bad_record: skip``) with the first few
    locations in ``skip_examples``; ``dropped_too_long`` / ``truncated`` count the truncation
    policy's work. The batch counters cover the batches emitted so far (restored with the state).
    """

    process_index: int = 0
    process_count: int = 1
    records_read: int = 0
    examples: int = 0
    tokens: int = 0
    response_tokens: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    skip_examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    batches: int = 0
    token_slots: int = 0  # rows * seq_len of emitted batches
    real_tokens: int = 0  # non-padding tokens of emitted batches
    bytes_read: int = 0  # streamed: bytes this process read from the traces and scores files
    streamed: bool = False  # counts grow as blocks are read (data.streaming)

    @property
    def packing_efficiency(self) -> float | None:
        """Fraction of emitted token slots holding real tokens (``None`` before the first batch)."""
        return self.real_tokens / self.token_slots if self.token_slots else None

    def summary(self) -> str:
        """One paragraph for the log: counts, then every skip/drop reason with examples."""
        head = f"process {self.process_index}/{self.process_count}: " if self.process_count > 1 else ""
        head += "streamed, so far: " if self.streamed else ""
        lines = [
            f"{head}{self.records_read} records read, {self.examples} examples kept "
            f"({self.tokens} tokens, {self.response_tokens} in the loss)"
        ]
        if self.truncated:
            lines.append(f"  truncated to seq_len (response cut): {self.truncated}")
        if self.dropped_too_long:
            lines.append(f"  dropped, longer than seq_len (data.truncation=drop): {self.dropped_too_long}")
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  skipped, {reason}: {count}")
            lines.extend(f"    e.g. {where}" for where in self.skip_examples.get(reason, []))
        if self.packing_efficiency is not None:
            lines.append(f"  packing efficiency so far: {self.packing_efficiency:.1%} over {self.batches} batches")
        return "\n".join(lines)


class _Validator:
    """Records -> validated, tokenized (scored, length-fitted) examples, counting into ``stats``.

    Shared by the eager path (chunks of the whole share) and the streamed one (one block at a time).
    ``seen_ids`` spans what one scores join covers: the whole file (eager) or one block (streamed).
    """

    def __init__(self, cfg: DataConfig, tokenizer: Any, stats: DataStats, *, apply_length: bool,
                 policy: BadRecordPolicy | None = None):
        self.cfg, self.tokenizer, self.stats, self.apply_length = cfg, tokenizer, stats, apply_length
        self.policy = policy or BadRecordPolicy(cfg.on_bad_record)
        self._student_fp: str | None = None
        self.seen_ids: dict[str, Location] = {}

    @property
    def student_fp(self) -> str:
        """The student tokenizer's fingerprint, computed once (it serializes the whole vocabulary)."""
        if self._student_fp is None:
            self._student_fp = tokenizer_fingerprint(self.tokenizer)
        return self._student_fp

    def _finish(self, record: Any, result: Any, scores: Any, checked: Any = None) -> TokenizedExample | None:
        cfg = self.cfg
        if isinstance(result, DataError):
            raise result
        if isinstance(scores, ScoreRows):  # the join needs unique ids
            if record.id in self.seen_ids:
                raise DataError(f"duplicate id {record.id!r} (first at {self.seen_ids[record.id]}): teacher scores "
                                "are joined on ids", location=record.location, field=cfg.id_field, reason="wrong_type")
            self.seen_ids[record.id] = record.location
        if scores is not None and checked is None:
            checked = check_scores(
                scores.get(record), record, num_response_tokens=result.num_response_tokens,
                student_fingerprint=self.student_fp, cfg=cfg, vocab_size=len(self.tokenizer),
                example_hash=content_hash(result.input_ids, result.response_mask)
                if isinstance(scores, ScoreRows) else None,
            )
        if checked is not None:
            result = dataclasses.replace(result, teacher=checked)
        if not self.apply_length:
            return result
        fitted = fit_to_length(result, cfg)
        if fitted is None:
            self.stats.dropped_too_long += 1
        elif fitted.truncated:
            self.stats.truncated += 1
        return fitted

    def examples(self, records: list, scores: Any) -> list[TokenizedExample]:
        """The kept examples of ``records`` (already parsed), in order; bad ones go through the policy."""
        out = []
        tokenized = any(record.tokens is not None for record in records)
        results = tokenize_records(records, self.tokenizer, self.cfg, fingerprint=self.student_fp if tokenized else None)
        checked = self._check_run(records, results, scores) or [None] * len(records)
        for record, result, teacher in zip(records, results, checked):
            try:
                example = self._finish(record, result, scores, teacher)
            except DataError as e:
                self.policy.handle(e)
                continue
            if example is not None:
                self.stats.examples += 1
                self.stats.tokens += example.num_tokens
                self.stats.response_tokens += example.num_response_tokens
                out.append(example)
        self.sync()
        return out

    def _check_run(self, records: list, results: list, scores: Any) -> list | None:
        """All records' scores checked at once when they are consecutive rows of ``scores`` (see
        :meth:`ScoreRows.check_run`); ``None`` leaves the checks to :meth:`_finish`, record by record."""
        if not isinstance(scores, ScoreRows) or any(isinstance(r, DataError) for r in results):
            return None
        return scores.check_run(
            records, np.array([r.num_response_tokens for r in results], np.int64),
            [content_hash(r.input_ids, r.response_mask) for r in results],
            student_fingerprint=self.student_fp, vocab_size=len(self.tokenizer))

    def parse(self, raw_records: list) -> list:
        """:class:`Record` s of ``(index, location, raw)`` triples; bad ones go through the policy."""
        records = []
        for index, location, raw in raw_records:
            try:
                records.append(parse_record(raw, index, location, self.cfg))
            except DataError as e:
                self.policy.handle(e)
        return records

    def sync(self) -> None:
        stats, policy = self.stats, self.policy
        stats.skipped = collections.Counter(policy.counts)
        stats.skip_examples = {k: list(v) for k, v in policy.examples.items()}
        stats.records_read = stats.examples + stats.dropped_too_long + sum(policy.counts.values())


def _examples(
    cfg: DataConfig, tokenizer: Any, *, process_index: int, process_count: int, stats: DataStats,
    apply_length: bool = True,
) -> Iterator[TokenizedExample]:
    """Validated, tokenized examples of this process's share in record order (see module doc)."""
    validator = _Validator(cfg, tokenizer, stats, apply_length=apply_length)
    scores = open_teacher_scores(cfg)
    records = load_records(cfg, process_index=process_index, process_count=process_count, policy=validator.policy)
    chunk: list = []
    try:
        for record in records:
            chunk.append(record)
            if len(chunk) == _CHUNK:
                yield from validator.examples(chunk, scores)
                chunk = []
        if chunk:
            yield from validator.examples(chunk, scores)
    finally:
        validator.sync()


def prepare_examples(
    cfg: DataConfig, tokenizer: Any, *, process_index: int = 0, process_count: int = 1
) -> tuple[list[TokenizedExample], DataStats]:
    """Read, validate and tokenize this process's whole share eagerly; log what was left out.

    Raises :class:`DataError` for the first bad record (``on_bad_record: error``) or when nothing
    usable remains.
    """
    stats = DataStats(process_index=process_index, process_count=process_count)
    examples = list(_examples(cfg, tokenizer, process_index=process_index, process_count=process_count, stats=stats))
    left_out = stats.truncated or stats.dropped_too_long or stats.skipped
    logger.log(logging.WARNING if left_out else logging.INFO, "data: %s", stats.summary())
    if not examples:
        raise DataError(f"no usable examples on process {process_index} of {process_count}:\n{stats.summary()}",
                        location=Location(cfg.path), reason="unreadable")
    return examples, stats


def iter_examples(
    cfg: DataConfig, tokenizer: Any, *, process_index: int = 0, process_count: int = 1,
    apply_length: bool = True, stats: DataStats | None = None,
) -> Iterator[TokenizedExample]:
    """Validated, tokenized examples in record order, streamed, never shuffled (eval / scoring).

    With ``apply_length=False`` examples keep their full length (what teacher scoring should use:
    scores of a full response remain valid for any later ``seq_len``). Pass ``stats`` to get the
    counts once the iterator is exhausted.
    """
    stats = stats if stats is not None else DataStats(process_index=process_index, process_count=process_count)
    yield from _examples(cfg, tokenizer, process_index=process_index, process_count=process_count, stats=stats,
                         apply_length=apply_length)


# --------------------------------------------------------------------------- batching

_PACK_CLASSES = {
    "first_fit": grain.experimental.FirstFitPackIterDataset,
    "greedy": grain.experimental.FirstFitPackIterDataset,  # with a single open row
    "best_fit": grain.experimental.BestFitPackIterDataset,
}


def _features(example: TokenizedExample, topk: int) -> dict[str, np.ndarray]:
    return example.features(topk)


def _packed_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename grain's per-feature packing metadata to one ``segment_ids`` / ``positions`` pair."""
    out = {k: v for k, v in row.items() if not k.endswith(("_segment_ids", "_positions"))}
    out["segment_ids"] = row["input_ids_segment_ids"].astype(np.int32)
    out["positions"] = row["input_ids_positions"].astype(np.int32)
    return out


def _padded_row(features: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    n = features["input_ids"].shape[0]
    out = {}
    for k, v in features.items():
        padded = np.zeros((seq_len, *v.shape[1:]), v.dtype)
        padded[:n] = v
        out[k] = padded
    out["segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
    out["positions"] = np.where(np.arange(seq_len) < n, np.arange(seq_len), 0).astype(np.int32)
    return out


def _pack_and_batch(it: grain.IterDataset, cfg: DataConfig, local_batch: int, topk: int,
                    scored: bool) -> grain.IterDataset:
    """Feature dicts -> packed (or padded) rows of ``seq_len`` -> batches of ``local_batch`` rows."""
    if cfg.packing:
        keys = ["input_ids", "targets", "loss_mask"] + (["teacher_logprobs"] if scored else [])
        keys += ["teacher_topk_ids", "teacher_topk_logprobs"] if scored and topk else []
        it = _PACK_CLASSES[cfg.pack_strategy](
            it,
            length_struct={k: cfg.seq_len for k in keys},
            num_packing_bins=1 if cfg.pack_strategy == "greedy" else (cfg.pack_bins or local_batch),
            seed=cfg.seed,
            shuffle_bins=cfg.shuffle and cfg.pack_strategy != "greedy",
        ).map(_packed_row)
    else:
        it = it.map(functools.partial(_padded_row, seq_len=cfg.seq_len))
    return it.batch(local_batch, drop_remainder=False)


def _grain_dataset(examples: list[TokenizedExample], cfg: DataConfig, local_batch: int, topk: int) -> grain.IterDataset:
    ds = grain.MapDataset.source(examples)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)  # before repeat: a different permutation in every epoch
    ds = ds.repeat(cfg.num_epochs).map(functools.partial(_features, topk=topk))
    # Examples are in memory: no reader threads (grain's advice; also keeps the order trivial).
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    return _pack_and_batch(it, cfg, local_batch, topk, scored=cfg.teacher_scores is not None)


class BlockStream(grain.IterDataset):
    """Feature dicts of this process's blocks, streamed: one block of examples in memory at a time.

    Epoch ``e`` visits the blocks in the order of a permutation seeded by ``(seed, e)`` and each
    block's examples in a permutation seeded by ``(seed, e, block)`` (identity without shuffle).
    The iterator's state is ``(epoch, position in the block order, examples taken from the block)``;
    restoring it re-reads that one block and skips what was taken, so resume is exact. With
    ``data.read_workers`` > 0, that many worker processes read, validate and tokenize the next
    blocks of this fixed order ahead of time (a cache: the output and the state do not change).
    """

    def __init__(self, plan: BlockPlan, blocks: list[Block], validator: "_Validator", scores: Any, topk: int):
        super().__init__()
        self.blocks, self.kind, self.validator, self.scores, self.topk = blocks, plan.kind, validator, scores, topk
        self._footers = plan.footers
        self.observer: Any = None  # called with each block's examples as it is loaded (data inspect)

    def __iter__(self) -> "_BlockStreamIterator":
        return _BlockStreamIterator(self)

    def block_examples(self, block: Block) -> list[TokenizedExample]:
        """The kept examples of ``block`` in record order, joined with its scores; counts bytes read."""
        validator, stats = self.validator, self.validator.stats
        raw, nbytes = read_block(block, validator.cfg, self.kind, self._footers)
        stats.bytes_read += nbytes
        records = validator.parse(raw)
        scores = self.scores
        if isinstance(scores, BlockScores):
            scores, nbytes = scores.block(block.index)
            stats.bytes_read += nbytes
        validator.seen_ids = {}
        return validator.examples(records, scores)

    def worker_args(self) -> tuple:
        """What a read worker needs to rebuild this stream (see :func:`_init_read_worker`)."""
        scores = self.scores.path if isinstance(self.scores, BlockScores) else self.scores
        return self.validator.cfg, self.validator.tokenizer, self.kind, scores, self.topk, self.validator.apply_length


_WORKER_STREAM: BlockStream | None = None  # in a read worker process


def _init_read_worker(cfg: DataConfig, tokenizer: Any, kind: str, scores: Any, topk: int, apply_length: bool) -> None:
    global _WORKER_STREAM
    if isinstance(scores, str):
        scores = BlockScores(scores, cfg)
    plan = BlockPlan(kind, cfg.block_records, (), {})
    _WORKER_STREAM = BlockStream(plan, [], _Validator(cfg, tokenizer, DataStats(), apply_length=apply_length),
                                 scores, topk)


def _read_in_worker(block: Block) -> tuple[list[TokenizedExample], DataStats, BadRecordPolicy]:
    """One block's examples, with the counts and skips of reading it (merged by the caller)."""
    stream = _WORKER_STREAM
    stream.validator.stats = DataStats()
    stream.validator.policy = BadRecordPolicy(stream.validator.cfg.on_bad_record)
    examples = stream.block_examples(block)
    return examples, stream.validator.stats, stream.validator.policy


class _BlockStreamIterator(grain.DatasetIterator):
    def __init__(self, ds: BlockStream):
        super().__init__()
        self._ds = ds
        self._epoch, self._position, self._taken = 0, 0, 0
        self._examples: list[TokenizedExample] | None = None
        self._pool: Any = None
        self._pending: dict[tuple[int, int], Any] = {}  # (epoch, position) -> future of its block

    def _order(self, epoch: int) -> np.ndarray:
        cfg, n = self._ds.validator.cfg, len(self._ds.blocks)
        return np.random.default_rng([cfg.seed, epoch]).permutation(n) if cfg.shuffle else np.arange(n)

    def _prefetch(self) -> None:
        """Keep ``read_workers`` upcoming blocks in flight (the order is known, so this is only a cache)."""
        ds = self._ds
        cfg = ds.validator.cfg
        if self._pool is None:
            import concurrent.futures
            import multiprocessing

            self._pool = concurrent.futures.ProcessPoolExecutor(
                cfg.read_workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_read_worker,
                initargs=ds.worker_args())
        epoch, position = self._epoch, self._position
        for _ in range(cfg.read_workers + 1):
            if cfg.num_epochs is not None and epoch >= cfg.num_epochs:
                break
            if (epoch, position) not in self._pending:
                block = ds.blocks[int(self._order(epoch)[position])]
                self._pending[(epoch, position)] = self._pool.submit(_read_in_worker, block)
            position += 1
            if position == len(ds.blocks):
                epoch, position = epoch + 1, 0

    def _read(self, block: Block) -> list[TokenizedExample]:
        ds = self._ds
        if not ds.validator.cfg.read_workers:
            return ds.block_examples(block)
        self._prefetch()
        examples, stats, policy = self._pending.pop((self._epoch, self._position)).result()
        main = ds.validator.stats
        for f in ("bytes_read", "examples", "tokens", "response_tokens", "truncated", "dropped_too_long"):
            setattr(main, f, getattr(main, f) + getattr(stats, f))
        ds.validator.policy.counts.update(policy.counts)
        for reason, where in policy.examples.items():
            kept = ds.validator.policy.examples[reason]
            kept.extend(where[: BadRecordPolicy.MAX_EXAMPLES - len(kept)])
        ds.validator.sync()
        return examples

    def _load(self) -> list[TokenizedExample]:
        ds = self._ds
        cfg = ds.validator.cfg
        block = ds.blocks[int(self._order(self._epoch)[self._position])]
        examples = self._read(block)
        if ds.observer is not None:
            ds.observer(examples)
        if cfg.shuffle:
            order = np.random.default_rng([cfg.seed, self._epoch, block.index]).permutation(len(examples))
            examples = [examples[i] for i in order]
        return examples

    def __next__(self) -> dict[str, np.ndarray]:
        ds = self._ds
        num_epochs = ds.validator.cfg.num_epochs
        while ds.blocks and (num_epochs is None or self._epoch < num_epochs):
            if self._examples is None:
                self._examples = self._load()
            if self._taken < len(self._examples):
                self._taken += 1
                return self._examples[self._taken - 1].features(ds.topk)
            self._examples, self._taken, self._position = None, 0, self._position + 1
            if self._position == len(ds.blocks):
                self._epoch, self._position = self._epoch + 1, 0
        raise StopIteration

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "position": self._position, "taken": self._taken}

    def set_state(self, state: dict[str, Any]) -> None:
        self._epoch, self._position, self._taken = state["epoch"], state["position"], state["taken"]
        self._examples = None
        for future in self._pending.values():
            future.cancel()
        self._pending = {}


def _check_block_scores(plan: BlockPlan, scores: BlockScores, blocks: list[Block]) -> None:
    """Before compute: every block of this share has its scores, and no more rows than records."""
    for block in blocks:
        first = Location(block.file, line=block.first_line) if plan.kind == "jsonl" else \
            Location(block.file, index=block.file_row)
        if block.index >= scores.num_blocks:
            raise DataError(
                f"no teacher scores for this record and the rest of block {block.index} ({scores.path} has "
                f"{scores.num_blocks} blocks of {scores.block_records} records, the traces {len(plan.blocks)}): the "
                "traces grew since scoring; rescore with dcd-jax score-teacher", location=first, field="id",
                reason="stale_teacher_scores")
        if scores.block_rows[block.index] > block.num_records:
            raise DataError(
                f"block {block.index} has {scores.block_rows[block.index]} rows of scores in {scores.path} but "
                f"{block.num_records} records: the traces changed since scoring; rescore with dcd-jax score-teacher",
                location=first, field="id", reason="stale_teacher_scores")


BATCH_DTYPES = {  # dtype of every batch field (the planner builds abstract batches from it)
    "input_ids": np.int32, "targets": np.int32, "positions": np.int32, "segment_ids": np.int32,
    "loss_mask": np.float32, "teacher_logprobs": np.float32, "teacher_topk_ids": np.int32,
    "teacher_topk_logprobs": np.float32,
}


class TrainIterator:
    """Batches for one process: ``next(it)`` -> dict of NumPy arrays (see module doc).

    ``get_state()`` returns a JSON-serializable dict to save with the model checkpoint;
    ``set_state(state)`` on an iterator built from the same config, data, tokenizer and process
    layout resumes at exactly the next batch (``num_epochs`` may differ). The last batch of a
    finite run is completed with all-padding rows so every batch has ``local_batch_size`` rows.
    """

    def __init__(
        self, cfg: DataConfig, examples: list[TokenizedExample] | None, stats: DataStats, *, process_index: int,
        process_count: int, tokenizer_fp: str, stream: tuple[BlockStream, str] | None = None,
    ):
        self.cfg = cfg
        self.examples = examples  # None when streamed
        self.stats = stats
        self.local_batch_size = cfg.local_batch_size(process_count)
        self.topk = cfg.topk if cfg.teacher_scores is not None else 0
        self._identity = {
            "config": {k: v for k, v in to_dict(cfg).items() if k not in _RESUMABLE_CHANGES},
            "process_index": process_index,
            "process_count": process_count,
            "tokenizer": tokenizer_fp,
        }
        if stream is None:
            self._identity.update(num_examples=len(examples), examples_digest=_digest(examples))
            self._dataset = _grain_dataset(examples, cfg, self.local_batch_size, self.topk)
        else:
            source, blocks_digest = stream
            self.source = source
            self._identity.update(num_blocks=len(source.blocks), blocks_digest=blocks_digest)
            self._dataset = _pack_and_batch(source, cfg, self.local_batch_size, self.topk,
                                            scored=cfg.teacher_scores is not None)
        self._iter = iter(self._dataset)

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iter)
        rows = batch["input_ids"].shape[0]
        out = {}
        for k, v in batch.items():
            v = np.asarray(v, BATCH_DTYPES.get(k, v.dtype))
            if rows < self.local_batch_size:  # last batch of a finite run
                v = np.concatenate([v, np.zeros((self.local_batch_size - rows, *v.shape[1:]), v.dtype)])
            out[k] = v
        self.stats.batches += 1
        self.stats.token_slots += out["segment_ids"].size
        self.stats.real_tokens += int(np.count_nonzero(out["segment_ids"]))
        return out

    def get_state(self) -> dict[str, Any]:
        """Position in the data stream plus what it is valid for; JSON-serializable."""
        return {
            "version": STATE_VERSION,
            "grain": self._iter.get_state(),
            "identity": self._identity,
            "batches": self.stats.batches,
            "token_slots": self.stats.token_slots,
            "real_tokens": self.stats.real_tokens,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`get_state`'s output; refuses a state saved for other data or layout."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state has version {state.get('version')!r}; expected {STATE_VERSION}")
        saved = state["identity"]
        if saved != self._identity:
            diff = sorted(k for k in self._identity if saved.get(k) != self._identity[k])
            if "config" in diff:
                changed = sorted(k for k in self._identity["config"]
                                 if saved["config"].get(k) != self._identity["config"][k])
                diff[diff.index("config")] = f"config ({', '.join(changed)})"
            raise ValueError(
                "the data iterator state was saved for different data and cannot resume this iterator exactly; "
                f"differences: {', '.join(diff)}"
            )
        self._iter.set_state(state["grain"])
        self.stats.batches = state["batches"]
        self.stats.token_slots = state["token_slots"]
        self.stats.real_tokens = state["real_tokens"]


def _digest(examples: list[TokenizedExample]) -> str:
    """Hash of the examples' ids and lengths: detects changed data under an unchanged config."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(ex.id.encode())
        h.update(np.int64(ex.num_tokens).tobytes())
        h.update(np.int64(ex.num_response_tokens).tobytes())
    return h.hexdigest()[:24]


def build_train_iterator(
    cfg: DataConfig, tokenizer: Any, *, process_index: int = 0, process_count: int = 1
) -> TrainIterator:
    """The training batches of process ``process_index`` of ``process_count``.

    Validates and tokenizes this process's share of the records first (errors name file, line
    and field), then iterates ``batch_size // process_count`` rows of ``seq_len`` tokens per batch.
    """
    cfg.local_batch_size(process_count)  # a global batch that does not split fails before any work
    if cfg.streaming:
        return streamed_iterator(cfg, tokenizer, process_index=process_index, process_count=process_count)
    examples, stats = prepare_examples(cfg, tokenizer, process_index=process_index, process_count=process_count)
    return TrainIterator(
        cfg, examples, stats, process_index=process_index, process_count=process_count,
        tokenizer_fp=tokenizer_fingerprint(tokenizer),
    )


def open_block_stream(
    cfg: DataConfig, tokenizer: Any, *, process_index: int, process_count: int, stats: DataStats,
    apply_length: bool = True,
) -> tuple[BlockPlan, list[Block], BlockStream]:
    """Plan the blocks, check what is cheap to check (scores provenance, layout, coverage), and
    return the plan, this process's blocks and their (lazy) example stream."""
    scores: Any = None
    stored = None
    block_records = cfg.block_records
    if cfg.teacher_scores == "inline":
        scores = InlineScores(cfg)
    elif cfg.teacher_scores is not None:
        scores = BlockScores(cfg.teacher_scores, cfg)
        block_records, stored = scores.block_records, BlockPlan.from_json(scores.plan_json)
    plan = plan_blocks(cfg, block_records, stored)
    stats.bytes_read += plan.bytes_read
    blocks = plan.share(process_index, process_count)
    if isinstance(scores, BlockScores):
        _check_block_scores(plan, scores, blocks)
    validator = _Validator(cfg, tokenizer, stats, apply_length=apply_length)
    topk = cfg.topk if cfg.teacher_scores is not None else 0
    return plan, blocks, BlockStream(plan, blocks, validator, scores, topk)


def streamed_iterator(cfg: DataConfig, tokenizer: Any, *, process_index: int, process_count: int) -> TrainIterator:
    stats = DataStats(process_index=process_index, process_count=process_count, streamed=True)
    plan, blocks, source = open_block_stream(cfg, tokenizer, process_index=process_index,
                                             process_count=process_count, stats=stats)
    if not blocks:
        raise DataError(f"no records for process {process_index} of {process_count}: the input has "
                        f"{len(plan.blocks)} block(s) of {plan.block_records} records; lower data.block_records",
                        location=Location(cfg.path), reason="unreadable")
    # What the order depends on: the share's blocks and the sizes of their files (content is checked per record).
    layout = [[*dataclasses.astuple(b), plan.files[b.file][0]] for b in blocks]
    digest = hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:24]
    return TrainIterator(cfg, None, stats, process_index=process_index, process_count=process_count,
                         tokenizer_fp=tokenizer_fingerprint(tokenizer), stream=(source, digest))
