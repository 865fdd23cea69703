"""Tokenize a trace corpus once, ahead of training: text records -> tokenized records.

Streaming text records spends most of the data path's time in rendering and tokenization
(bench/data_scale.py); tokenized records (``input_ids``, ``response_mask``,
``tokenizer_fingerprint``) skip both and train bit for bit as their text does, so a corpus read
for many epochs or by a pod is best tokenized once (``dcd-jax data tokenize``). Content hashes
are those of the ids, so teacher scores computed from the text stay valid for the tokenized copy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dcd_jax import storage
from dcd_jax.atomic_files import atomic_file
from dcd_jax.data.config import DataConfig
from dcd_jax.data.pipeline import DataStats, iter_examples
from dcd_jax.data.teacher_scores import tokenizer_fingerprint
from dcd_jax.errors import ConfigError


def _row(example: Any, fingerprint: str) -> dict[str, Any]:
    return {"id": example.id, "input_ids": example.input_ids.tolist(),
            "response_mask": example.response_mask.astype(int).tolist(),
            "tokenizer_fingerprint": fingerprint, "answer": example.answer}


def write_tokenized_records(
    cfg: DataConfig, tokenizer: Any, out: str | Path, *, rows_per_group: int = 1024,
) -> DataStats:
    """Write every valid record of ``cfg.path`` as a tokenized record to ``out`` (``.jsonl`` or
    ``.parquet``, by suffix), in record order, at full length (``seq_len`` is applied when training
    reads them). Streamed in groups of ``rows_per_group`` rows (Parquet row groups), replaced
    atomically; bad records follow ``cfg.on_bad_record``. Returns the data stats of the pass."""
    suffix = storage.path(out).suffix
    if suffix not in (".jsonl", ".parquet"):
        raise ConfigError(f"--out {out}: expected a .jsonl or .parquet file")
    if storage.absolute(out) == storage.absolute(cfg.path):
        raise ConfigError(f"--out {out} is the input data.path: write the tokenized copy elsewhere")
    fingerprint = tokenizer_fingerprint(tokenizer)
    stats = DataStats()
    examples = iter_examples(cfg, tokenizer, apply_length=False, stats=stats)
    with atomic_file(out) as tmp:
        if suffix == ".jsonl":
            with open(tmp, "w", encoding="utf-8") as f:
                for ex in examples:
                    f.write(json.dumps(_row(ex, fingerprint), ensure_ascii=False) + "\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pa.schema([("id", pa.string()), ("input_ids", pa.list_(pa.int32())),
                                ("response_mask", pa.list_(pa.int8())), ("tokenizer_fingerprint", pa.string()),
                                ("answer", pa.string())])
            with pq.ParquetWriter(tmp, schema) as writer:
                group: list[dict[str, Any]] = []
                for ex in examples:
                    group.append(_row(ex, fingerprint))
                    if len(group) == rows_per_group:
                        writer.write_table(pa.Table.from_pylist(group, schema=schema))
                        group = []
                if group:
                    writer.write_table(pa.Table.from_pylist(group, schema=schema))
    return stats
