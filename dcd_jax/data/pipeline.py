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
import logging
from typing import Any, Iterator

import grain
import numpy as np

from dcd_jax.config import to_dict
from dcd_jax.data.config import DataConfig
from dcd_jax.data.errors import BadRecordPolicy, DataError, Location
from dcd_jax.data.records import load_records
from dcd_jax.data.teacher_scores import ParquetScores, check_scores, open_teacher_scores, tokenizer_fingerprint
from dcd_jax.data.tokenization import TokenizedExample, fit_to_length, tokenize_records

logger = logging.getLogger("dcd_jax.data")

STATE_VERSION = 1
_CHUNK = 512  # records rendered and tokenized per tokenizer call
# Options that may change between a save and a restore without changing the batch order.
_RESUMABLE_CHANGES = ("num_epochs",)


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

    @property
    def packing_efficiency(self) -> float | None:
        """Fraction of emitted token slots holding real tokens (``None`` before the first batch)."""
        return self.real_tokens / self.token_slots if self.token_slots else None

    def summary(self) -> str:
        """One paragraph for the log: counts, then every skip/drop reason with examples."""
        head = f"process {self.process_index}/{self.process_count}: " if self.process_count > 1 else ""
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


def _examples(
    cfg: DataConfig, tokenizer: Any, *, process_index: int, process_count: int, stats: DataStats,
    apply_length: bool = True,
) -> Iterator[TokenizedExample]:
    """Validated, tokenized examples of this process's share in record order (see module doc)."""
    policy = BadRecordPolicy(cfg.on_bad_record)
    scores = open_teacher_scores(cfg)
    student_fp = tokenizer_fingerprint(tokenizer) if scores is not None else ""
    seen_ids: dict[str, Location] = {}
    records = load_records(cfg, process_index=process_index, process_count=process_count, policy=policy)

    def finish(record, result) -> TokenizedExample | None:
        if isinstance(result, DataError):
            raise result
        if isinstance(scores, ParquetScores):  # the join needs unique ids
            if record.id in seen_ids:
                raise DataError(f"duplicate id {record.id!r} (first at {seen_ids[record.id]}): teacher scores are "
                                "joined on ids", location=record.location, field=cfg.id_field, reason="wrong_type")
            seen_ids[record.id] = record.location
        if scores is not None:
            checked = check_scores(
                scores.get(record), record, num_response_tokens=result.num_response_tokens,
                student_fingerprint=student_fp, cfg=cfg, vocab_size=len(tokenizer),
            )
            result = dataclasses.replace(result, teacher=checked)
        if not apply_length:
            return result
        fitted = fit_to_length(result, cfg)
        if fitted is None:
            stats.dropped_too_long += 1
        elif fitted.truncated:
            stats.truncated += 1
        return fitted

    def chunks() -> Iterator[list]:
        chunk = []
        for record in records:
            chunk.append(record)
            if len(chunk) == _CHUNK:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    try:
        for chunk in chunks():
            for record, result in zip(chunk, tokenize_records(chunk, tokenizer, cfg)):
                try:
                    example = finish(record, result)
                except DataError as e:
                    policy.handle(e)
                    continue
                if example is not None:
                    stats.examples += 1
                    stats.tokens += example.num_tokens
                    stats.response_tokens += example.num_response_tokens
                    yield example
    finally:
        stats.skipped = collections.Counter(policy.counts)
        stats.skip_examples = {k: list(v) for k, v in policy.examples.items()}
        stats.records_read = stats.examples + stats.dropped_too_long + sum(policy.counts.values())


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


def _grain_dataset(examples: list[TokenizedExample], cfg: DataConfig, local_batch: int, topk: int) -> grain.IterDataset:
    ds = grain.MapDataset.source(examples)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)  # before repeat: a different permutation in every epoch
    ds = ds.repeat(cfg.num_epochs).map(functools.partial(_features, topk=topk))
    # Examples are in memory: no reader threads (grain's advice; also keeps the order trivial).
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if cfg.packing:
        keys = list(examples[0].features(topk))
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
        self, cfg: DataConfig, examples: list[TokenizedExample], stats: DataStats, *, process_index: int,
        process_count: int, tokenizer_fp: str,
    ):
        self.cfg = cfg
        self.examples = examples
        self.stats = stats
        self.local_batch_size = cfg.local_batch_size(process_count)
        self.topk = cfg.topk if cfg.teacher_scores is not None else 0
        self._identity = {
            "config": {k: v for k, v in to_dict(cfg).items() if k not in _RESUMABLE_CHANGES},
            "process_index": process_index,
            "process_count": process_count,
            "num_examples": len(examples),
            "examples_digest": _digest(examples),
            "tokenizer": tokenizer_fp,
        }
        self._dataset = _grain_dataset(examples, cfg, self.local_batch_size, self.topk)
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
    examples, stats = prepare_examples(cfg, tokenizer, process_index=process_index, process_count=process_count)
    return TrainIterator(
        cfg, examples, stats, process_index=process_index, process_count=process_count,
        tokenizer_fp=tokenizer_fingerprint(tokenizer),
    )

