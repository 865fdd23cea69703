"""Stored teacher scores: per-response-token log-probs and top-k distributions, checked for alignment.

Scores are lists aligned with the *response tokens of the student tokenization* (the tokens where
``TokenizedExample.response_mask`` is true, in order): ``teacher_logprobs`` ``[n]``,
``teacher_topk_ids`` / ``teacher_topk_logprobs`` ``[n][K]``. That alignment only holds if they were
computed with the student's tokenizer, so every score carries :func:`tokenizer_fingerprint` of the
tokenizer used, and scores are refused (never silently misaligned) when the fingerprint differs
or the count does not equal the record's response-token count.

They come either inline in the records (``data.teacher_scores: inline``) or from a Parquet file
with columns :data:`COLUMNS`, joined on the record id (written by ``dcd-jax score-teacher``
through :func:`write_teacher_scores`).

Content addressing (Parquet scores). Each row stores :func:`content_hash` of exactly what it was
computed from (the example's token ids and response mask, untruncated), and the file stores its
:class:`ScoresProvenance` (teacher name and weights fingerprint, dtype, top-k, tokenizer
fingerprint) in the Parquet key-value metadata. A record whose tokens changed after scoring (an
edited or swapped response, even of the same length), a file from another teacher than
``data.teacher`` or with fewer than ``data.topk`` entries is refused, naming the record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from dcd_jax import storage
from dcd_jax.atomic_files import atomic_file
from dcd_jax.data.config import DataConfig
from dcd_jax.data.errors import DataError, Location
from dcd_jax.data.records import Record
from dcd_jax.data.shards import CountingFile, ragged_column

COLUMNS = ("id", "content_hash", "teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs",
           "tokenizer_fingerprint")
# Parquet key-value metadata key holding the file's ScoresProvenance (JSON).
PROVENANCE_KEY = b"dcd_jax.teacher_scores"
# ... and the block layout of a file written block by block (see BlockScores).
LAYOUT_KEY = b"dcd_jax.blocks"
SCORES_FORMAT = 2  # 1: no content hashes / provenance (refused: cannot be checked)
# A stored log-prob may exceed 0 only by float noise.
_MAX_LOGPROB = 1e-3


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Stable hash of what decides token ids: vocabulary, merges, normalization, special tokens.

    Two tokenizers with the same fingerprint split any text into the same ids. Runtime settings
    (padding/truncation state, chat template, post-processor) are left out: they do not change
    ``tokenizer(text, add_special_tokens=False)``.
    """
    parts: dict[str, Any] = {}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        parts.update({k: spec.get(k) for k in ("normalizer", "pre_tokenizer", "model", "added_tokens")})
    else:  # a slow tokenizer: the vocabulary is what we can see
        parts["vocab"] = sorted(tokenizer.get_vocab().items())
    parts["special"] = {k: getattr(tokenizer, k, None) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=True).encode()).hexdigest()
    return f"tok1-{digest[:32]}"


def content_hash(input_ids: np.ndarray, response_mask: np.ndarray) -> str:
    """What a row of scores was computed from: ``h = BLAKE2b-128(int32_le(input_ids) || uint8(response_mask))``.

    Any change of a token, of the loss mask, or of the length changes ``h`` (up to 2^-128 collisions).
    Computed on the untruncated example, so it does not depend on ``seq_len``.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(input_ids, "<i4").tobytes())
    h.update(np.asarray(response_mask, np.uint8).tobytes())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class ScoresProvenance:
    """Who computed a file of scores and how: stored once per file (Parquet key-value metadata).

    ``teacher`` is the name given to ``score-teacher`` (path or hub id), ``teacher_weights`` an
    exact fingerprint of its parameters as scored (see ``dcd_jax.teacher.scoring.weights_fingerprint``).
    """

    teacher: str
    teacher_weights: str
    dtype: str
    topk: int
    tokenizer_fingerprint: str
    format: int = SCORES_FORMAT

    def to_metadata(self) -> dict[bytes, bytes]:
        return {PROVENANCE_KEY: json.dumps(dataclasses.asdict(self), sort_keys=True).encode()}

    @classmethod
    def from_metadata(cls, metadata: Mapping[bytes, bytes] | None) -> "ScoresProvenance | None":
        raw = (metadata or {}).get(PROVENANCE_KEY)
        if raw is None:
            return None
        fields = json.loads(raw)
        return cls(**{f.name: fields[f.name] for f in dataclasses.fields(cls) if f.name in fields})

    def differences(self, other: "ScoresProvenance") -> list[str]:
        """``name: mine != other's`` for every field that differs."""
        return [f"{f.name} {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


@dataclasses.dataclass(frozen=True)
class TeacherScores:
    """Validated scores of one example, aligned with its response tokens (``n`` of them)."""

    logprobs: np.ndarray  # float32 [n]
    topk_ids: np.ndarray | None = None  # int32 [n, K]
    topk_logprobs: np.ndarray | None = None  # float32 [n, K], sorted descending per row

    def __len__(self) -> int:
        return int(self.logprobs.shape[0])

    def head(self, n: int) -> "TeacherScores":
        """Scores of the first ``n`` response tokens (for a truncated response)."""
        return TeacherScores(
            self.logprobs[:n],
            None if self.topk_ids is None else self.topk_ids[:n],
            None if self.topk_logprobs is None else self.topk_logprobs[:n],
        )


@dataclasses.dataclass(frozen=True)
class RawScores:
    """Scores of one record as stored, before checking. ``where`` names their origin."""

    logprobs: Any
    topk_ids: Any
    topk_logprobs: Any
    fingerprint: str | None
    where: str
    content_hash: str | None = None  # of the tokens they were computed from (Parquet scores); None: inline


def _array(value: Any, dtype: Any, ndim: int, name: str, record: Record, where: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.ndim != ndim:
        shape = "a list of numbers" if ndim == 1 else "a list of equal-length lists of numbers"
        raise DataError(f"must be {shape} ({where})", location=record.location, field=name, reason="teacher_scores")
    return arr


def _valid_logprobs(values: np.ndarray) -> bool:
    """All finite and ``<= 0`` (up to float noise, :data:`_MAX_LOGPROB`)."""
    return bool(np.all(np.isfinite(values)) and not np.any(values > _MAX_LOGPROB))


def check_scores(
    raw: RawScores, record: Record, *, num_response_tokens: int, student_fingerprint: str, cfg: DataConfig,
    vocab_size: int, example_hash: str | None = None,
) -> TeacherScores:
    """Validate stored scores against the student tokenization of ``record``; refuse on mismatch.

    Raises :class:`DataError` with reason ``teacher_fingerprint`` (never skipped) when the scoring
    tokenizer is unknown or is not the student's, ``stale_teacher_scores`` (never skipped) when
    the scores were computed from other tokens than ``example_hash`` (:func:`content_hash` of the
    record's untruncated tokenization), and ``teacher_scores`` for a wrong count, shape, or value.
    """
    if raw.fingerprint is None:
        raise DataError(
            f"no tokenizer fingerprint is stored with the teacher scores ({raw.where}), so their alignment "
            f"with the student's tokens cannot be checked; store '{cfg.teacher_fingerprint_field}' per record or "
            "set data.teacher_fingerprint",
            location=record.location, field=cfg.teacher_fingerprint_field, reason="teacher_fingerprint",
        )
    if raw.fingerprint != student_fingerprint:
        raise DataError(
            f"teacher scores ({raw.where}) were computed with a different tokenizer (fingerprint {raw.fingerprint}) "
            f"than the student's ({student_fingerprint}); per-token scores would be misaligned, so they are refused. "
            "Re-score the traces with the student tokenizer (dcd-jax score-teacher) or train without stored scores",
            location=record.location, field=cfg.teacher_fingerprint_field, reason="teacher_fingerprint",
        )
    if raw.content_hash is not None and example_hash is not None and raw.content_hash != example_hash:
        raise DataError(
            f"the teacher scores ({raw.where}) were computed from other tokens than this record has now (content hash "
            f"{raw.content_hash[:12]}... != {example_hash[:12]}...): the record was edited after scoring, or the scores "
            f"belong to another record. Rescore: dcd-jax score-teacher (writes {raw.where.split(' row ')[0]} anew)",
            location=record.location, field="content_hash", reason="stale_teacher_scores",
        )
    name = cfg.teacher_logprobs_field
    if raw.logprobs is None:
        raise DataError(f"missing ({raw.where})", location=record.location, field=name, reason="teacher_scores")
    logprobs = _array(raw.logprobs, np.float32, 1, name, record, raw.where)
    if logprobs.shape[0] != num_response_tokens:
        raise DataError(
            f"has {logprobs.shape[0]} entries but the response has {num_response_tokens} tokens in the student "
            f"tokenization ({raw.where}); the scores do not line up with the student's tokens",
            location=record.location, field=name, reason="teacher_scores",
        )
    if not _valid_logprobs(logprobs):
        raise DataError(f"holds values that are not finite log-probabilities <= 0 ({raw.where})",
                        location=record.location, field=name, reason="teacher_scores")
    if cfg.topk == 0:
        return TeacherScores(logprobs)
    ids_name, lp_name = cfg.teacher_topk_ids_field, cfg.teacher_topk_logprobs_field
    for value, field in ((raw.topk_ids, ids_name), (raw.topk_logprobs, lp_name)):
        if value is None:
            raise DataError(f"missing, but data.topk={cfg.topk} ({raw.where})",
                            location=record.location, field=field, reason="teacher_scores")
    ids = _array(raw.topk_ids, np.int64, 2, ids_name, record, raw.where)
    lps = _array(raw.topk_logprobs, np.float32, 2, lp_name, record, raw.where)
    if ids.shape != lps.shape or ids.shape[0] != num_response_tokens:
        raise DataError(
            f"top-k arrays have shapes {ids.shape} and {lps.shape}; expected [{num_response_tokens}, K] each "
            f"(one row per response token) ({raw.where})",
            location=record.location, field=ids_name, reason="teacher_scores",
        )
    if ids.shape[1] < cfg.topk:
        raise DataError(f"stores top-{ids.shape[1]} but data.topk={cfg.topk} ({raw.where})",
                        location=record.location, field=ids_name, reason="teacher_scores")
    if np.any(ids < 0) or np.any(ids >= vocab_size):
        raise DataError(f"holds token ids outside the student vocabulary [0, {vocab_size}) ({raw.where})",
                        location=record.location, field=ids_name, reason="teacher_scores")
    if not _valid_logprobs(lps):
        raise DataError(f"holds values that are not finite log-probabilities <= 0 ({raw.where})",
                        location=record.location, field=lp_name, reason="teacher_scores")
    order = np.argsort(-lps, axis=1, kind="stable")[:, : cfg.topk]
    return TeacherScores(
        logprobs,
        np.take_along_axis(ids, order, axis=1).astype(np.int32),
        np.take_along_axis(lps, order, axis=1),
    )


class InlineScores:
    """Scores stored as fields of each record (``data.teacher_scores: inline``)."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    def get(self, record: Record) -> RawScores:
        fields = record.inline_scores or {}
        cfg = self.cfg
        return RawScores(
            logprobs=fields.get(cfg.teacher_logprobs_field),
            topk_ids=fields.get(cfg.teacher_topk_ids_field),
            topk_logprobs=fields.get(cfg.teacher_topk_logprobs_field),
            fingerprint=fields.get(cfg.teacher_fingerprint_field) or cfg.teacher_fingerprint,
            where="inline",
        )


def _open_scores_file(path: str | Path, cfg: DataConfig) -> tuple[Any, "ScoresProvenance", list[str]]:
    """``(pyarrow schema, provenance, columns to read)`` of a scores file; refuses what cannot be checked."""
    import pyarrow.parquet as pq

    location = Location(str(path))
    if not storage.path(path).is_file():
        raise DataError("teacher scores file not found (data.teacher_scores)", location=location, reason="unreadable")
    needed = ["id", "content_hash", "teacher_logprobs", "tokenizer_fingerprint"]
    if cfg.topk:
        needed += ["teacher_topk_ids", "teacher_topk_logprobs"]
    try:
        with storage.open_read(path) as f:
            schema = pq.read_schema(f)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"cannot be read as Parquet: {e}", location=location, reason="unreadable") from e
    provenance = ScoresProvenance.from_metadata(schema.metadata)
    if provenance is None or "content_hash" not in schema.names:
        raise DataError(
            "holds no provenance or per-row content hashes (written by an older dcd-jax), so it cannot be "
            "checked that its scores belong to these records and this teacher; rescore with "
            "dcd-jax score-teacher", location=location, field="content_hash", reason="unreadable")
    missing = [c for c in needed if c not in schema.names]
    if missing:
        raise DataError(f"missing column(s) {missing}; it has {schema.names}", location=location, reason="unreadable")
    return schema, provenance, needed


def check_provenance(provenance: "ScoresProvenance", cfg: DataConfig, path: str, first_id: str | None) -> None:
    """File-level checks (cheap, before compute): the teacher ``data.teacher`` names, enough top-k."""
    where = Location(path, index=0)
    first = f" (first record {first_id!r})" if first_id is not None else ""
    if cfg.teacher is not None and cfg.teacher not in (provenance.teacher, provenance.teacher_weights):
        raise DataError(
            f"scores were computed by teacher {provenance.teacher!r} (weights {provenance.teacher_weights}), not by "
            f"data.teacher={cfg.teacher!r}{first}; rescore: dcd-jax score-teacher --teacher {cfg.teacher}",
            location=where, field="teacher", reason="stale_teacher_scores")
    if provenance.topk < cfg.topk:
        raise DataError(
            f"scores store top-{provenance.topk} but data.topk={cfg.topk}{first}; rescore: dcd-jax score-teacher "
            f"--topk {cfg.topk}", location=where, field="topk", reason="stale_teacher_scores")


class ScoreRows:
    """Rows of a scores table as flat NumPy arrays, joined on the record id (ids unique within it).

    ``first_row`` is the table's first row within ``path`` (for messages).
    """

    def __init__(self, table: Any, cfg: DataConfig, path: str, first_row: int = 0):
        self.path, self.cfg = path, cfg
        self._ids = ids = [str(i) for i in table.column("id").to_pylist()]
        self.first_row = first_row
        self._hashes = table.column("content_hash").to_pylist()
        self._row: dict[str, int] = {}
        for row, record_id in enumerate(ids):
            if record_id in self._row:
                raise DataError(f"id {record_id!r} appears twice (rows {first_row + self._row[record_id]} and "
                                f"{first_row + row})", location=Location(path), field="id", reason="unreadable")
            self._row[record_id] = row
        self._fingerprints = table.column("tokenizer_fingerprint").to_pylist()
        flat, self._lp_offsets, self._lp_null = ragged_column(table.column("teacher_logprobs"))
        self._lp = flat.to_numpy(zero_copy_only=False).astype(np.float32)
        if cfg.topk:
            self._topk = {}
            for name in ("teacher_topk_ids", "teacher_topk_logprobs"):
                inner, offsets, null = ragged_column(table.column(name))  # rows -> positions
                values, inner_offsets, _ = ragged_column(inner)  # positions -> K entries
                self._topk[name] = (values.to_numpy(zero_copy_only=False), offsets, null, inner_offsets)

    def __len__(self) -> int:
        return len(self._row)

    def _topk_rows(self, name: str, row: int) -> Any:
        values, offsets, null, inner = self._topk[name]
        if null[row]:
            return None
        start, stop = offsets[row], offsets[row + 1]
        widths = np.diff(inner[start : stop + 1])
        if stop > start and np.all(widths == widths[0]):
            return values[inner[start] : inner[stop]].reshape(stop - start, widths[0])
        return [values[inner[i] : inner[i + 1]] for i in range(start, stop)]  # ragged: rejected by check

    def check_run(self, records: list[Record], num_response_tokens: np.ndarray, example_hashes: list[str], *,
                  student_fingerprint: str, vocab_size: int) -> list[TeacherScores] | None:
        """:func:`check_scores` of consecutive rows at once: the scores of ``records``, or ``None``.

        The fast path of a block (or chunk) whose records are rows ``r0, r0 + 1, ...`` of this table
        in order (``score-teacher``'s layout: the join is a merge). Every check of
        :func:`check_scores` runs over the whole run's flat arrays, and the top-k rows are sorted with
        one stable argsort of the run's ``[N, K]`` matrix (none when stored sorted), so the result is
        identical to checking record by record. ``None`` when the rows are not consecutive or any
        check fails: the caller then checks record by record, which names the offending record.
        """
        n = len(records)
        if n == 0:
            return []
        r0 = self._row.get(records[0].id)
        if r0 is None or r0 + n > len(self._row) or any(
                self._ids[r0 + i] != record.id for i, record in enumerate(records)):
            return None
        rows = slice(r0, r0 + n)
        counts = np.asarray(num_response_tokens, np.int64)
        if any(f != student_fingerprint for f in self._fingerprints[rows]) or self._hashes[rows] != example_hashes:
            return None
        lp_off = self._lp_offsets[r0 : r0 + n + 1]
        if self._lp_null[rows].any() or not np.array_equal(np.diff(lp_off), counts):
            return None
        logprobs = self._lp[lp_off[0] : lp_off[-1]]
        if not _valid_logprobs(logprobs):
            return None
        bounds = lp_off - lp_off[0]  # of each record's rows within the run
        if not self.cfg.topk:
            return [TeacherScores(logprobs[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        matrices = []
        for name in ("teacher_topk_ids", "teacher_topk_logprobs"):
            values, offsets, null, inner = self._topk[name]
            off = offsets[r0 : r0 + n + 1]
            if null[rows].any() or not np.array_equal(np.diff(off), counts):
                return None
            widths = np.diff(inner[off[0] : off[-1] + 1])
            width = int(widths[0])
            if width < self.cfg.topk or np.any(widths != width):
                return None
            matrices.append(values[inner[off[0]] : inner[off[-1]]].reshape(-1, width))
        ids, lps = matrices
        if np.any(ids < 0) or np.any(ids >= vocab_size) or not _valid_logprobs(lps):
            return None
        if np.all(lps[:, :-1] >= lps[:, 1:]):  # stored sorted (score-teacher): the stable sort is the identity
            ids, lps = ids[:, : self.cfg.topk].astype(np.int32), lps[:, : self.cfg.topk].astype(np.float32)
        else:
            order = np.argsort(-lps.astype(np.float32), axis=1, kind="stable")[:, : self.cfg.topk]
            ids = np.take_along_axis(ids, order, axis=1).astype(np.int32)
            lps = np.take_along_axis(lps.astype(np.float32), order, axis=1)
        return [TeacherScores(logprobs[a:b], ids[a:b], lps[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    def get(self, record: Record) -> RawScores:
        row = self._row.get(record.id)
        if row is None:
            raise DataError(f"no teacher scores for id {record.id!r} in {self.path}", location=record.location,
                            field=self.cfg.id_field, reason="teacher_scores")
        lp = None if self._lp_null[row] else self._lp[self._lp_offsets[row] : self._lp_offsets[row + 1]]
        return RawScores(
            logprobs=lp,
            topk_ids=self._topk_rows("teacher_topk_ids", row) if self.cfg.topk else None,
            topk_logprobs=self._topk_rows("teacher_topk_logprobs", row) if self.cfg.topk else None,
            fingerprint=self._fingerprints[row],
            where=f"{self.path} row {self.first_row + row}",
            content_hash=self._hashes[row],
        )




class ParquetScores(ScoreRows):
    """Scores in a columnar Parquet file (columns :data:`COLUMNS`), joined on the record id.

    The whole file is read once into flat NumPy arrays (``data.streaming: false``; the streamed
    path reads :class:`BlockScores` instead). Before any row is used, the file's
    :class:`ScoresProvenance` is checked against ``data.teacher`` and ``data.topk``.
    """

    def __init__(self, path: str | Path, cfg: DataConfig):
        import pyarrow.parquet as pq

        _, self.provenance, needed = _open_scores_file(path, cfg)
        try:
            with storage.open_read(path) as f:
                table = pq.read_table(f, columns=needed)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise DataError(f"cannot be read as Parquet: {e}", location=Location(str(path)), reason="unreadable") from e
        check_provenance(self.provenance, cfg, str(path), str(table.column("id")[0]) if table.num_rows else None)
        super().__init__(table, cfg, str(path))


class BlockScores:
    """A scores file written block by block (``score-teacher``): reads only the rows of one block at a time.

    The file's layout metadata (:data:`LAYOUT_KEY`) holds the row count of every block and the
    block plan of the traces it was scored from; block ``b``'s rows follow block ``b - 1``'s.
    Opening reads the footer only; :meth:`block` reads the row groups overlapping one block.
    """

    def __init__(self, path: str | Path, cfg: DataConfig):
        import pyarrow.parquet as pq

        self.path, self.cfg = str(path), cfg
        schema, self.provenance, self._columns = _open_scores_file(path, cfg)
        layout = (schema.metadata or {}).get(LAYOUT_KEY)
        if layout is None:
            raise DataError("has no block layout (not written by dcd-jax score-teacher), so it cannot be streamed; "
                            "set data.streaming=false or rescore", location=Location(self.path), reason="unreadable")
        layout = json.loads(layout)
        self.block_records: int = layout["block_records"]
        self.plan_json: str = layout["plan"]
        self.block_rows: list[int] = layout["block_rows"]
        self.row_offsets = np.concatenate([[0], np.cumsum(self.block_rows)]).astype(np.int64)
        with storage.open_read(self.path) as f:
            self._footer = meta = pq.ParquetFile(f).metadata
        self._groups = np.concatenate([[0], np.cumsum([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])])
        if self._groups[-1] != self.row_offsets[-1]:
            raise DataError(f"holds {self._groups[-1]} rows but its layout says {self.row_offsets[-1]}",
                            location=Location(self.path), reason="unreadable")
        check_provenance(self.provenance, cfg, self.path, None)

    @property
    def num_blocks(self) -> int:
        return len(self.block_rows)

    def block(self, index: int) -> tuple[ScoreRows, int]:
        """The rows of block ``index`` and the bytes read to get them."""
        import pyarrow.parquet as pq

        lo, hi = int(self.row_offsets[index]), int(self.row_offsets[index + 1])
        groups = [g for g in range(len(self._groups) - 1) if self._groups[g] < hi and self._groups[g + 1] > lo]
        with CountingFile(self.path) as f:
            pf = pq.ParquetFile(f, metadata=self._footer)
            if groups:
                # One thread: parallel reads are data.read_workers (processes).
                table = pf.read_row_groups(groups, columns=self._columns, use_threads=False)
                table = table.slice(lo - int(self._groups[groups[0]]), hi - lo)
            else:
                table = pf.schema_arrow.empty_table().select(self._columns)
            rows = ScoreRows(table, self.cfg, self.path, first_row=lo)
            return rows, f.bytes_read


def open_teacher_scores(cfg: DataConfig) -> InlineScores | ParquetScores | None:
    """The score source ``data.teacher_scores`` names, or ``None`` when scores are not used."""
    if cfg.teacher_scores is None:
        return None
    if cfg.teacher_scores == "inline":
        return InlineScores(cfg)
    return ParquetScores(cfg.teacher_scores, cfg)


def write_teacher_scores(path: str | Path, rows: Iterable[Mapping[str, Any]], provenance: ScoresProvenance) -> int:
    """Write scores as the Parquet file ``data.teacher_scores`` reads; returns the row count.

    Each row: ``id``, ``content_hash`` (:func:`content_hash` of the example scored),
    ``teacher_logprobs`` ``[n]`` and optionally ``teacher_topk_ids`` / ``teacher_topk_logprobs``
    ``[n][K]``, aligned with the response tokens of :func:`dcd_jax.data.tokenize_example` under
    the tokenizer of ``provenance.tokenizer_fingerprint``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(rows)
    has_topk = provenance.topk > 0

    def nested(values: list[np.ndarray], dtype: Any, value_type: Any) -> Any:
        # list<value> (1-d rows) or list<list<value>> (2-d rows) built from flat buffers, no Python loops.
        values = [np.asarray(v, dtype) for v in values]
        two_d = [v for v in values if v.ndim == 2]
        if two_d:  # an empty row reads as 1-d: give it the 2-d shape [0, K]
            values = [v.reshape(-1, two_d[0].shape[1]) if v.size == 0 else v for v in values]
        lengths = np.array([len(v) for v in values], np.int64)
        row_offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        flat = np.concatenate([v.reshape(-1) for v in values]) if values else np.zeros(0, dtype)
        if two_d:
            widths = np.repeat([v.shape[1] for v in values], lengths)
            inner_offsets = pa.array(np.concatenate([[0], np.cumsum(widths)]).astype(np.int32))
            inner = pa.ListArray.from_arrays(inner_offsets, pa.array(flat, value_type))
            return pa.ListArray.from_arrays(row_offsets, inner)
        return pa.ListArray.from_arrays(row_offsets, pa.array(flat, value_type))

    columns: dict[str, Any] = {
        "id": pa.array([str(r["id"]) for r in rows], pa.string()),
        "content_hash": pa.array([str(r["content_hash"]) for r in rows], pa.string()),
        "teacher_logprobs": nested([r["teacher_logprobs"] for r in rows], np.float32, pa.float32()),
    }
    if has_topk:
        columns["teacher_topk_ids"] = nested([r["teacher_topk_ids"] for r in rows], np.int32, pa.int32())
        columns["teacher_topk_logprobs"] = nested(
            [r["teacher_topk_logprobs"] for r in rows], np.float32, pa.float32()
        )
    columns["tokenizer_fingerprint"] = pa.array([provenance.tokenizer_fingerprint] * len(rows), pa.string())
    with atomic_file(path) as tmp:
        pq.write_table(pa.table(columns).replace_schema_metadata(provenance.to_metadata()), tmp)
    return len(rows)
