"""Blocks: the unit in which corpus-scale data is planned, shared across processes, scored and streamed.

A *block* is up to ``block_records`` consecutive records of one input file. Blocks are numbered
in input order; block ``b`` belongs to process ``b % process_count``, so a process reads only the
bytes of its own blocks (a seek to the block's first byte for JSONL, the overlapping row groups
for Parquet). ``dcd-jax score-teacher`` writes one scores row group per block, in the same order,
and stores the block plan with the scores, so training joins scores to records block by block
(a merge; no index over the whole file) and does not rescan the traces to find the blocks.

Planning: Parquet inputs are planned from their footers (row counts; no data read). JSONL files
are planned by one pass over their lines (all bytes, once), unless a plan stored with the
teacher scores matches the files' sizes and modification times.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dcd_jax import storage
from dcd_jax.data.config import DataConfig
from dcd_jax.data.errors import DataError, Location
from dcd_jax.data.records import TOKENS_FIELDS, decode_json_line, jsonl_files

PLAN_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Block:
    """Records ``[start_record, start_record + num_records)`` of the input, all in ``file``.

    JSONL: ``byte_start`` / ``byte_end`` delimit the block's lines, ``first_line`` is the first
    one's 1-based line number. Parquet: ``file_row`` is the first record's row within ``file``.
    """

    index: int
    file: str
    start_record: int
    num_records: int
    byte_start: int = 0
    first_line: int = 1
    file_row: int = 0
    byte_end: int = 0  # JSONL: the offset just past the last record's line


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """The blocks of an input and what they were planned from (file sizes and mtimes)."""

    kind: str  # "jsonl" | "parquet"
    block_records: int
    blocks: tuple[Block, ...]
    files: dict[str, tuple[int, int]]  # path -> (size, mtime_ns)
    max_records: int | None = None  # data.max_records it was planned with
    bytes_read: int = 0  # bytes read to plan: the JSONL scan or the Parquet footers; 0 from a stored plan
    footers: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)  # Parquet, by file

    def share(self, process_index: int, process_count: int) -> list[Block]:
        """Blocks of process ``process_index``: every ``process_count``-th, starting at its index."""
        return [b for b in self.blocks if b.index % process_count == process_index]

    def to_json(self) -> str:
        return json.dumps({"format": PLAN_FORMAT, "kind": self.kind, "block_records": self.block_records,
                           "files": self.files, "max_records": self.max_records,
                           "blocks": [dataclasses.astuple(b) for b in self.blocks]})

    @classmethod
    def from_json(cls, text: str) -> "BlockPlan":
        d = json.loads(text)
        return cls(d["kind"], d["block_records"], tuple(Block(*b) for b in d["blocks"]),
                   {k: tuple(v) for k, v in d["files"].items()}, d["max_records"])


class CountingFile(io.RawIOBase):
    """A read-only binary file that counts the bytes actually read from it (``bytes_read``)."""

    def __init__(self, path: str):
        self._f = storage.open_read(path)  # on a bucket: ranged reads of just the block
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._f.readinto(buffer)
        self.bytes_read += n or 0
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        self._f.close()
        super().close()


def ragged_column(column: Any) -> tuple[Any, np.ndarray, np.ndarray]:
    """A list<...> Arrow column as (flat Arrow values, row offsets [n+1], row is-null)."""
    import pyarrow.compute as pc

    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    null = ~arr.is_valid().to_numpy(zero_copy_only=False)
    return pc.list_flatten(arr), offsets, null


def _list_rows(column: Any) -> list[np.ndarray | None]:
    """The rows of a list<number> Arrow column as NumPy views of one flat buffer (no Python lists)."""
    flat, offsets, null = ragged_column(column)
    values = flat.to_numpy(zero_copy_only=False)
    return [None if null[i] else values[offsets[i] : offsets[i + 1]] for i in range(len(null))]


def input_kind(cfg: DataConfig) -> str:
    """``jsonl`` or ``parquet``: the inputs blocks can be planned for (else a :class:`DataError`)."""
    path = storage.path(cfg.path)
    if cfg.format in ("auto", "parquet") and path.is_file() and path.suffix == ".parquet":
        return "parquet"
    if cfg.format in ("auto", "parquet") and path.is_dir() and any(path.glob("*.parquet")):
        return "parquet"
    if cfg.format in ("auto", "jsonl") and (path.suffix == ".jsonl" or (path.is_dir() and any(path.glob("*.jsonl")))):
        return "jsonl"
    raise DataError("reading by blocks (data.streaming, score-teacher) needs local JSONL or Parquet files (a file or "
                    "a directory of them); export this input to one of them (or train with data.streaming=false)",
                    location=Location(cfg.path), reason="unreadable")


def _stamps(files: Sequence[Any]) -> dict[str, tuple[int, int]]:
    return {str(f): storage.stamp(f) for f in files}


def _input_files(cfg: DataConfig, kind: str) -> list[Any]:
    path = storage.path(cfg.path)
    if kind == "parquet":
        return sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    return jsonl_files(path)


def plan_blocks(cfg: DataConfig, block_records: int, stored: BlockPlan | None = None) -> BlockPlan:
    """The blocks of ``cfg``'s input; reuses ``stored`` when it was planned from the same files."""
    kind = input_kind(cfg)
    files = _input_files(cfg, kind)
    stamps = _stamps(files)
    limit = cfg.max_records if cfg.max_records is not None else float("inf")
    covers = stored is not None and (stored.max_records is None or stored.max_records >= limit)
    if covers and stored.kind == kind and stored.files == stamps and stored.block_records == block_records:
        blocks = [b for b in stored.blocks if b.start_record < limit]
        if blocks and blocks[-1].start_record + blocks[-1].num_records > limit:
            blocks[-1] = dataclasses.replace(blocks[-1], num_records=int(limit - blocks[-1].start_record))
        return dataclasses.replace(stored, blocks=tuple(blocks), max_records=cfg.max_records)
    blocks: list[Block] = []
    footers: dict[str, Any] = {}
    scanned = 0
    total = 0

    def add(file: Path, n: int, **where: int) -> None:
        nonlocal total
        blocks.append(Block(len(blocks), str(file), total, n, **where))
        total += n

    for file in files:
        if total >= limit:
            break
        if kind == "parquet":
            import pyarrow.parquet as pq

            with CountingFile(str(file)) as f:
                footers[str(file)] = pq.ParquetFile(f).metadata
                rows = footers[str(file)].num_rows
                scanned += f.bytes_read
            for row in range(0, rows, block_records):
                n = int(min(block_records, rows - row, limit - total))
                if n <= 0:
                    break
                add(file, n, file_row=row)
            continue
        with storage.open_read(file) as f:
            if f.read(4096).lstrip().startswith(b"["):
                raise DataError("a JSON array file cannot be streamed; write one record per line (JSONL)",
                                location=Location(str(file)), reason="unreadable")
            f.seek(0)
            offset, n, start, first_line, end = 0, 0, 0, 1, 0
            for line_no, raw in enumerate(f, start=1):
                if total + n >= limit:  # data.max_records reached: the rest is not read
                    break
                scanned += len(raw)
                if raw.strip():
                    if n == 0:
                        start, first_line = offset, line_no
                    n, end = n + 1, offset + len(raw)
                    if n == block_records:
                        add(file, n, byte_start=start, first_line=first_line, byte_end=end)
                        n = 0
                offset += len(raw)
            if n:
                add(file, n, byte_start=start, first_line=first_line, byte_end=end)
    return BlockPlan(kind, block_records, tuple(blocks), stamps, cfg.max_records, bytes_read=scanned, footers=footers)


def read_block(
    block: Block, cfg: DataConfig, kind: str, footers: dict[str, Any] | None = None
) -> tuple[list[tuple[int, Location, Any]], int]:
    """The raw records of ``block`` as ``(record_index, location, object or DataError)``, and the bytes read.

    ``footers`` caches Parquet footers by file (read once per file, not once per block).
    """
    out: list[tuple[int, Location, Any]] = []
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        footers = {} if footers is None else footers
        with CountingFile(block.file) as raw_file:
            pf = pq.ParquetFile(raw_file, metadata=footers.get(block.file))
            footers[block.file] = meta = pf.metadata
            first, groups = 0, []
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                if first < block.file_row + block.num_records and first + n > block.file_row:
                    groups.append((g, first))
                first += n
            # One thread: parallel reads are data.read_workers (processes).
            table = pf.read_row_groups([g for g, _ in groups], use_threads=False)
            skip = block.file_row - groups[0][1]
            table = table.slice(skip, block.num_records)
            # Token ids stay NumPy views of the column (a tokenized record has thousands of them).
            numeric = [name for name in TOKENS_FIELDS if name in table.column_names
                       and pa.types.is_list(table.schema.field(name).type)
                       and not pa.types.is_nested(table.schema.field(name).type.value_type)]
            rows = table.drop_columns(numeric).to_pylist()
            for name in numeric:
                for row, value in zip(rows, _list_rows(table.column(name))):
                    row[name] = value
            for i, row in enumerate(rows):
                index = block.start_record + i
                out.append((index, Location(block.file, index=block.file_row + i), row))
            return out, raw_file.bytes_read
    with CountingFile(block.file) as raw_file:
        if block.byte_start:
            raw_file.seek(block.byte_start - 1)
            if raw_file.read(1) != b"\n":  # a stale plan: the file changed under it
                raise DataError(f"byte {block.byte_start} is not the start of a line: the file changed since its "
                                "blocks were planned", location=Location(block.file), reason="unreadable")
        raw_file.seek(block.byte_start)
        data = raw_file.read(block.byte_end - block.byte_start)  # exactly the block's lines
        lines = data.split(b"\n")  # lines end at "\n" only, as when the file was planned
        if not lines[-1]:
            lines.pop()
        line_no = block.first_line - 1
        for raw in lines:
            line_no += 1
            if not raw.strip():
                continue
            location = Location(block.file, line=line_no)
            out.append((block.start_record + len(out), location, decode_json_line(raw, location)))
        if len(out) != block.num_records:
            raise DataError(f"lines {block.first_line}-{line_no} hold {len(out)} records, {block.num_records} were "
                            "planned: the file changed since its blocks were planned", location=Location(block.file),
                            reason="unreadable")
        return out, raw_file.bytes_read
