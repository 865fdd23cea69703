"""``dcd-jax score-teacher``: run the teacher once over a trace dataset and cache its log-probs.

For every example (tokenized exactly as training will tokenize it, with the teacher's tokenizer,
which must be the student's) it stores, per response token, the teacher's log-prob of that token
and its top-k next-token distribution, in the Parquet layout that ``data.teacher_scores`` reads
(:func:`dcd_jax.data.write_teacher_scores`).

Resumable and sharded by blocks of ``chunk_examples`` records (:mod:`dcd_jax.data.shards`):
process ``p`` scores blocks ``b % process_count == p``, each finished block is written atomically
to ``<out>.parts/part-b<b>.parquet``, a restarted run (with any process count) skips the blocks
already there, and process 0 merges the parts in block order (the traces' order) into ``<out>``,
one row group per block, with the block plan in its metadata: training then streams each block's
scores next to its records. An interrupted-and-resumed run writes the same file as an
uninterrupted one. Inputs must be local JSONL or Parquet files.

Content addressing: every row carries the :func:`~dcd_jax.data.content_hash` of the example it
was computed from, and every file (parts included) the :class:`~dcd_jax.data.ScoresProvenance`
of the run (teacher name, :func:`weights_fingerprint`, dtype, top-k, tokenizer fingerprint). A
resumed run reuses a part only if its provenance and its rows' ids and hashes equal what it
would compute now; otherwise it stops, naming the first record that differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from dcd_jax import storage
from dcd_jax.atomic_files import atomic_file
from dcd_jax.config import ConfigError
from dcd_jax.data import (
    DataConfig,
    DataError,
    DataStats,
    Location,
    ScoresProvenance,
    content_hash,
    tokenizer_fingerprint,
    write_teacher_scores,
)
from dcd_jax.data.pipeline import open_block_stream
from dcd_jax.data.shards import BlockPlan
from dcd_jax.data.teacher_scores import LAYOUT_KEY
from dcd_jax.infer.scorer import make_scorer, pad_to_bucket

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """Options of ``dcd-jax score-teacher``.

    Attributes:
      teacher: teacher model (HF dir, hub id or dcd-jax model dir); its tokenizer must be the student's.
      out: output Parquet file (default: ``<data.path stem>.teacher.parquet`` next to the data).
      topk: top-k teacher log-probs stored per response token (0: per-token log-probs only).
      batch_size: sequences per forward pass.
      length_bucket: sequences are padded to a multiple of this (bounded number of compilations).
      chunk_examples: records per block: the resumable part, the scores file's row group, and
        the unit training streams (block ``b`` is scored by process ``b % process_count``).
      chunk_size: sequence chunk of the memory-light log-softmax.
      dtype: compute dtype of the teacher.
    """

    teacher: str = ""
    out: str | None = None
    topk: int = 20
    batch_size: int = 8
    length_bucket: int = 128
    chunk_examples: int = 256
    chunk_size: int = 512
    dtype: str = "float32"

    def validate(self) -> None:
        if not self.teacher:
            raise ConfigError("score.teacher is required (the teacher model directory or hub id)")
        if self.topk < 0 or self.batch_size < 1 or self.length_bucket < 1 or self.chunk_examples < 1:
            raise ConfigError("score: topk >= 0, batch_size, length_bucket and chunk_examples >= 1")


def default_scores_path(data_path: str):
    p = storage.path(data_path)
    return p.with_name(p.stem + ".teacher.parquet")


def weights_fingerprint(params: Any) -> str:
    """Exact, mesh-independent fingerprint of parameter values: ``w-`` + SHA-256 over the arrays of
    ``(path, shape, dtype, c)`` with ``c = sum_i bits(x_i) * (2 i + 1) mod 2^32``.

    ``bits`` is each element's bit pattern as an unsigned integer; integer sums are exact, so ``c``
    does not depend on how the array is sharded or reduced. Computed on device (one pass over the
    weights, one scalar per array back to the host).
    """
    import hashlib

    def checksum(x):
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[jnp.dtype(x.dtype).itemsize]
        bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)
        odd = jnp.arange(bits.shape[0], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
        return jnp.sum(bits * odd, dtype=jnp.uint32)

    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    sums = jax.device_get(jax.jit(lambda xs: [checksum(x) for x in xs])([x for _, x in leaves]))
    h = hashlib.sha256()
    for (path, x), c in zip(leaves, sums):
        h.update(f"{jax.tree_util.keystr(path)}|{tuple(x.shape)}|{x.dtype}|{int(c)};".encode())
    return "w-" + h.hexdigest()[:32]


def _batches(examples: list, batch_size: int, bucket: int) -> Iterator[tuple[list, np.ndarray, np.ndarray]]:
    for start in range(0, len(examples), batch_size):
        group = examples[start : start + batch_size]
        yield (group, *pad_to_bucket([ex.input_ids for ex in group], batch_size, bucket))


def score_examples(scorer, params, examples: list, cfg: ScoreConfig) -> list[dict[str, Any]]:
    """Scores rows (``id``, ``teacher_logprobs`` and top-k) for ``examples``, aligned with their response tokens."""
    rows = []
    for group, ids, seg in _batches(examples, cfg.batch_size, cfg.length_bucket):
        logp, topk_lp, topk_ids = jax.device_get(scorer(params, ids, seg))
        for row, ex in enumerate(group):
            at = ex.response_positions - 1  # the position whose next-token distribution scores it
            out = {"id": ex.id, "content_hash": content_hash(ex.input_ids, ex.response_mask),
                   "teacher_logprobs": logp[row, at]}
            if cfg.topk:
                out["teacher_topk_ids"] = topk_ids[row, at]
                out["teacher_topk_logprobs"] = topk_lp[row, at]
            rows.append(out)
    return rows


def _atomic_write(path: Path, rows: list, provenance: ScoresProvenance) -> None:
    with atomic_file(path) as tmp:
        write_teacher_scores(tmp, rows, provenance)


def check_part(part: Path, chunk: list, provenance: ScoresProvenance, parts: Path) -> None:
    """Refuse to reuse a part file made by another teacher / top-k / tokenizer or from other tokens.

    Raises :class:`DataError` naming the first record of ``chunk`` whose stored id or content hash
    differs, and how to rescore.
    """
    import pyarrow.parquet as pq

    how = f"rescore: delete {parts} and rerun"
    first = chunk[0].location if chunk else Location(str(part))
    with storage.open_read(part) as f:
        stored = ScoresProvenance.from_metadata(pq.read_schema(f).metadata)
    if stored != provenance:
        diff = "; ".join(provenance.differences(stored)) if stored else "no provenance (older dcd-jax)"
        raise DataError(f"part {part.name} was scored differently (now vs then: {diff}); {how}",
                        location=first, field="teacher", reason="stale_teacher_scores")
    with storage.open_read(part) as f:
        table = pq.read_table(f, columns=["id", "content_hash"])
    ids, hashes = table.column("id").to_pylist(), table.column("content_hash").to_pylist()
    for row, ex in enumerate(chunk):
        now = content_hash(ex.input_ids, ex.response_mask)
        if row >= len(ids) or ids[row] != ex.id or hashes[row] != now:
            then = f"id {ids[row]!r}, hash {hashes[row][:12]}..." if row < len(ids) else "no row"
            raise DataError(
                f"the traces changed since part {part.name} was scored (row {row}: then {then}; now id {ex.id!r}, "
                f"hash {now[:12]}...); {how}", location=ex.location, field="content_hash",
                reason="stale_teacher_scores")
    if len(ids) != len(chunk):
        raise DataError(f"part {part.name} has {len(ids)} rows but the chunk now has {len(chunk)} records; {how}",
                        location=chunk[-1].location if chunk else first, field="id", reason="stale_teacher_scores")


def merge_parts(parts: Path, plan: BlockPlan, provenance: ScoresProvenance, out: Path) -> int:
    """Concatenate the block parts in block order into ``out`` (atomically), one row group per block,
    with the provenance and the block layout (row count per block, the plan) in its metadata.
    Reads one part at a time; returns the row count."""
    import pyarrow.parquet as pq

    block_rows = []
    for block in plan.blocks:
        part = parts / f"part-b{block.index:07d}.parquet"
        if not part.is_file():
            raise RuntimeError(f"{part} is missing: a process did not finish its blocks")
        with storage.open_read(part) as f:
            block_rows.append(pq.ParquetFile(f).metadata.num_rows)
    layout = {"block_records": plan.block_records, "block_rows": block_rows, "plan": plan.to_json()}
    metadata = {**provenance.to_metadata(), LAYOUT_KEY: json.dumps(layout).encode()}
    wrote = False
    with atomic_file(out) as tmp:
        with contextlib.ExitStack() as stack:
            writer = None
            for block, n in zip(plan.blocks, block_rows):
                if n == 0:  # every record of the block was skipped: no row group
                    continue
                with storage.open_read(parts / f"part-b{block.index:07d}.parquet") as f:
                    table = pq.read_table(f).replace_schema_metadata(metadata)
                if writer is None:
                    writer = stack.enter_context(pq.ParquetWriter(tmp, table.schema))
                writer.write_table(table)
                wrote = True
        if not wrote:
            raise DataError("no record could be scored",
                            location=Location(plan.blocks[0].file if plan.blocks else "?"), reason="unreadable")
    return sum(block_rows)


def score_teacher(data_cfg: DataConfig, cfg: ScoreConfig, *, mesh=None, progress: bool = True) -> Path:
    """Score ``data_cfg``'s traces with ``cfg.teacher``; returns the Parquet file written."""
    from dcd_jax.convert.model_dir import load_pretrained
    from dcd_jax.models import abstract_model

    out = storage.path(cfg.out) if cfg.out else default_scores_path(data_cfg.path)
    parts = out.with_name(out.name + ".parts")
    teacher = load_pretrained(cfg.teacher, mesh=mesh, dtype=cfg.dtype, param_dtype=cfg.dtype)
    tokenizer = teacher.tokenizer()
    provenance = ScoresProvenance(
        teacher=cfg.teacher, teacher_weights=weights_fingerprint(teacher.params), dtype=cfg.dtype, topk=cfg.topk,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )
    # Scores must cover whole responses, whatever seq_len training later uses.
    data_cfg = dataclasses.replace(data_cfg, teacher_scores=None, topk=0, block_records=cfg.chunk_examples)
    pid, nproc = jax.process_index(), jax.process_count()
    stats = DataStats(process_index=pid, process_count=nproc)
    plan, blocks, stream = open_block_stream(data_cfg, tokenizer, process_index=pid, process_count=nproc,
                                             stats=stats, apply_length=False)
    parts.mkdir(parents=True, exist_ok=True)
    scorer = make_scorer(abstract_model(teacher.cfg)[0], teacher.cfg.tokenizer_vocab_size, cfg.topk, cfg.chunk_size)
    bar = None
    if progress and pid == 0:
        from tqdm import tqdm

        bar = tqdm(total=sum(b.num_records for b in blocks), desc="score-teacher", unit="trace", dynamic_ncols=True)
    for block in blocks:
        part = parts / f"part-b{block.index:07d}.parquet"
        examples = stream.block_examples(block)
        if part.is_file():
            check_part(part, examples, provenance, parts)
        else:
            _atomic_write(part, score_examples(scorer, teacher.params, examples, cfg), provenance)
        if bar is not None:
            bar.update(block.num_records)
    if bar is not None:
        bar.close()
    if nproc > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("score-teacher parts written")
    if pid == 0:
        rows = merge_parts(parts, plan, provenance, out)
        storage.remove_tree(parts)
        log.info("teacher scores for %d traces -> %s", rows, out)
    return out
