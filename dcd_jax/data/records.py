"""Reading trace records and checking them field by field.

Two record shapes are accepted (field names are configurable, see :class:`DataConfig`)::

    {"id": "p1", "prompt": "...", "response": "...", "answer": "42"}
    {"id": "c1", "messages": [{"role": "user", "content": "..."},
                              {"role": "assistant", "content": "..."}]}

Both become a :class:`Record`: a conversation whose assistant turns are what the student learns.
A third, *tokenized* shape carries the student's token ids instead of text (no rendering and no
tokenization at training time; the fastest to stream)::

    {"id": "t1", "input_ids": [1, 17, 4, ...], "response_mask": [0, 0, 1, ...],
     "tokenizer_fingerprint": "tok1-..."}

``response_mask[i]`` is 1 iff token ``i`` is learned; the fingerprint must be the student
tokenizer's (:func:`dcd_jax.data.tokenizer_fingerprint`), so ids of another tokenizer are refused.
JSONL is read line by line here (not through `datasets`) so that a bad line is reported with its
file and line number; Parquet files, dataset directories and hub ids go through `datasets`.

Sharding: record ``i`` (0-based over the whole input) belongs to process ``i % process_count``.
A process parses, validates and tokenizes only its own records; the shares of all processes are
disjoint and together cover the input.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterator, Mapping

import numpy as np
from dcd_jax import storage
from dcd_jax.data.config import DataConfig
from dcd_jax.data.errors import BadRecordPolicy, DataError, Location
from dcd_jax.paths import looks_like_hub_id

ROLES = ("system", "user", "assistant")
_HF_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_BOM = b"\xef\xbb\xbf"  # written by common Windows tools at the start of a UTF-8 file


@dataclasses.dataclass(frozen=True)
class Message:
    """One turn of a conversation (``role`` is system, user or assistant)."""

    role: str
    content: str


@dataclasses.dataclass(frozen=True)
class Record:
    """A validated trace: the conversation, its gold answer, its id and where it came from.

    ``inline_scores`` holds the raw inline teacher-score fields (only read when
    ``data.teacher_scores: inline``); they are checked against the tokenization later.
    """

    id: str
    messages: tuple[Message, ...]
    location: Location
    answer: str | None = None
    prompt_field: str = "prompt"  # the field a too-long prompt is reported under
    response_field: str = "response"  # the field an empty / all-masked response is reported under
    inline_scores: Mapping[str, Any] | None = None
    tokens: "RecordTokens | None" = None  # a tokenized record (then ``messages`` is empty)


@dataclasses.dataclass(frozen=True)
class RecordTokens:
    """The token ids a tokenized record carries, its response mask and the fingerprint of their tokenizer."""

    input_ids: np.ndarray  # integer [L]
    response_mask: np.ndarray  # bool [L]
    fingerprint: str


TOKENS_FIELDS = ("input_ids", "response_mask")  # the fields that make a record tokenized


# --------------------------------------------------------------------------- reading raw records


def _resolve_format(cfg: DataConfig) -> str:
    """``jsonl`` (read here, line numbers) or ``hf`` (through `datasets`)."""
    if cfg.format == "parquet":
        return "hf"
    if cfg.format != "auto":
        return cfg.format
    path = storage.path(cfg.path)
    if path.is_file():
        return "jsonl" if path.suffix in (".jsonl", ".json") else "hf"
    if path.is_dir() and any(path.glob("*.jsonl")):
        return "jsonl"
    return "hf"


def jsonl_files(path) -> list:
    """The JSONL files of ``path`` (itself, or the ``*.jsonl`` of a directory, sorted)."""
    if path.is_dir():
        return sorted(path.glob("*.jsonl"))
    if path.is_file():
        return [path]
    raise DataError("no such file or directory", location=Location(str(path)), reason="unreadable")


def _read_json_lines(
    cfg: DataConfig, process_index: int, process_count: int
) -> Iterator[tuple[int, Location, Any]]:
    """Yield ``(record_index, location, parsed object or DataError)`` for this process's share.

    Blank lines are not records. A file whose first character is ``[`` is read as one JSON array
    (records then have indices, not lines). Lines of other processes are not parsed.
    """
    index = 0
    for file in jsonl_files(storage.path(cfg.path)):
        with storage.open_read(file) as f:
            head = f.read(4096).removeprefix(_BOM).lstrip()
            f.seek(0)
            if head.startswith(b"["):
                try:
                    items = json.loads(f.read().decode("utf-8-sig"))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    line = getattr(e, "lineno", None)
                    raise DataError(
                        f"malformed JSON array: {e}", location=Location(str(file), line=line), reason="unreadable"
                    ) from None
                for i, item in enumerate(items):
                    if cfg.max_records is not None and index >= cfg.max_records:
                        return
                    if index % process_count == process_index:
                        yield index, Location(str(file), index=i), item
                    index += 1
                continue
            for line_no, raw in enumerate(f, start=1):
                if line_no == 1:
                    raw = raw.removeprefix(_BOM)
                if not raw.strip():
                    continue
                if cfg.max_records is not None and index >= cfg.max_records:
                    return
                mine = index % process_count == process_index
                index += 1
                if not mine:
                    continue
                location = Location(str(file), line=line_no)
                yield index - 1, location, decode_json_line(raw, location)


def decode_json_line(raw: bytes, location: Location) -> Any:
    """One JSONL line parsed, or the :class:`DataError` (reason ``malformed_json``) saying why it is not JSON."""
    if location.line == 1:
        raw = raw.removeprefix(_BOM)  # the streamed reader decodes line 1 here too
    try:
        return json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        detail = f"{e.msg} (column {e.colno})" if isinstance(e, json.JSONDecodeError) else str(e)
        return DataError(f"malformed JSON: {detail}", location=location, reason="malformed_json")


def _read_hf(cfg: DataConfig, process_index: int, process_count: int) -> Iterator[tuple[int, Location, Any]]:
    """Rows of this process's share through `datasets` (offline: only local files / cache)."""
    import datasets  # deferred: a second of import time that JSONL users never pay

    path = cfg.path
    try:
        if storage.path(path).is_file():  # a gs:// file too: datasets reads fsspec URLs
            builder = _HF_BUILDERS.get(storage.path(path).suffix)
            if builder is None:
                raise ValueError(f"unknown file type {storage.path(path).suffix!r}; expected one of {sorted(_HF_BUILDERS)}")
            ds = datasets.load_dataset(
                builder, data_files={cfg.split: path}, split=cfg.split, cache_dir=cfg.cache_dir
            )
        else:
            ds = datasets.load_dataset(path, split=cfg.split, cache_dir=cfg.cache_dir)
    except Exception as e:  # datasets raises many types; all mean "cannot read this input"
        tried = "" if storage.exists(path) else "not a local path; tried as a hub dataset id: "
        raise DataError(
            f"{tried}could not be loaded with datasets (split {cfg.split!r}): {type(e).__name__}: {e}",
            location=Location(path),
            reason="unreadable",
        ) from e
    n = len(ds) if cfg.max_records is None else min(len(ds), cfg.max_records)
    indices = range(process_index, n, process_count)
    for i, row in zip(indices, ds.select(indices)):
        yield i, Location(path, index=i), row


def read_raw_records(
    cfg: DataConfig, *, process_index: int = 0, process_count: int = 1
) -> Iterator[tuple[int, Location, Any]]:
    """Unvalidated records of this process's share: ``(record_index, location, object)``.

    The object is a :class:`DataError` for a line that is not valid JSON.
    """
    if not cfg.path:
        raise DataError("data.path is empty: set it to a JSONL/Parquet file, a directory or a hub id",
                        location=Location("<config>"), reason="unreadable")
    if not storage.exists(cfg.path) and not looks_like_hub_id(cfg.path):
        raise DataError("no such file or directory (the Hub is tried only for an id like org/name)",
                        location=Location(cfg.path), field="data.path", reason="unreadable")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if _resolve_format(cfg) == "jsonl":
        return _read_json_lines(cfg, process_index, process_count)
    return _read_hf(cfg, process_index, process_count)


# --------------------------------------------------------------------------- validation


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _require_text(raw: Mapping[str, Any], key: str, location: Location, option: str, field: str | None = None) -> str:
    field = field or key
    if key not in raw or raw[key] is None:
        have = sorted(map(str, raw))[:12]
        raise DataError(
            f"missing (set data.{option} if your data names it differently; the record has fields {have})",
            location=location, field=field, reason="missing_field",
        )
    value = raw[key]
    if not isinstance(value, str):
        raise DataError(f"must be a string, got {_type_name(value)}", location=location, field=field, reason="wrong_type")
    return value


def _scalar_text(value: Any, location: Location, field: str) -> str | None:
    """Optional id/answer: a string or a number, returned as a string."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"must be a string or a number, got {_type_name(value)}",
                        location=location, field=field, reason="wrong_type")
    return str(value)


def _chat_messages(raw_messages: Any, location: Location, cfg: DataConfig) -> tuple[Message, ...]:
    field = cfg.messages_field
    if not isinstance(raw_messages, (list, tuple)):
        raise DataError(f"must be a list of messages, got {_type_name(raw_messages)}",
                        location=location, field=field, reason="wrong_type")
    if not raw_messages:
        raise DataError("the conversation is empty; it must end with an assistant turn",
                        location=location, field=field, reason="bad_final_turn")
    messages = []
    for i, message in enumerate(raw_messages):
        where = f"{field}[{i}]"
        if not isinstance(message, Mapping):
            raise DataError(f"must be an object with {cfg.role_key!r} and {cfg.content_key!r}, got {_type_name(message)}",
                            location=location, field=where, reason="wrong_type")
        role = _require_text(message, cfg.role_key, location, "role_key", f"{where}.{cfg.role_key}")
        role = cfg.role_map.get(role, role)
        if role not in ROLES:
            raise DataError(f"unknown role {role!r}; expected one of {list(ROLES)} (or map it with data.role_map)",
                            location=location, field=f"{where}.{cfg.role_key}", reason="wrong_type")
        content = _require_text(message, cfg.content_key, location, "content_key", f"{where}.{cfg.content_key}")
        if role == "assistant" and not content.strip():
            raise DataError("empty assistant turn (nothing to learn)", location=location,
                            field=f"{where}.{cfg.content_key}", reason="empty_response")
        messages.append(Message(role, content))
    if messages[-1].role != "assistant":
        raise DataError(
            f"the last turn has role {messages[-1].role!r}; the final turn must be 'assistant' "
            "(the loss covers assistant turns)",
            location=location, field=f"{field}[{len(messages) - 1}].{cfg.role_key}", reason="bad_final_turn",
        )
    return tuple(messages)


def _record_tokens(raw: Mapping[str, Any], location: Location, cfg: DataConfig) -> RecordTokens:
    """The ``input_ids`` / ``response_mask`` / fingerprint fields of a tokenized record, checked for shape and type."""
    ids_field, mask_field = TOKENS_FIELDS
    arrays = []
    for field in TOKENS_FIELDS:
        if raw.get(field) is None:
            raise DataError(f"missing: a tokenized record needs both {list(TOKENS_FIELDS)}", location=location,
                            field=field, reason="missing_field")
        try:
            value = np.asarray(raw[field])
        except (TypeError, ValueError):  # ragged nesting
            value = np.asarray(None, object)
        if value.ndim != 1 or (value.size and value.dtype.kind not in ("iub" if field == mask_field else "iu")):
            raise DataError("must be a list of integers" + (" 0/1" if field == mask_field else ""),
                            location=location, field=field, reason="wrong_type")
        arrays.append(value)
    ids, mask = arrays
    if ids.size == 0:
        raise DataError("is empty (nothing to learn)", location=location, field=ids_field, reason="empty_response")
    if mask.shape != ids.shape:
        raise DataError(f"has {mask.size} entries for the {ids.size} tokens of {ids_field!r} (one 0/1 per token)",
                        location=location, field=mask_field, reason="wrong_type")
    if np.any((mask != 0) & (mask != 1)):
        raise DataError("holds values other than 0 and 1", location=location, field=mask_field, reason="wrong_type")
    fingerprint = raw.get(cfg.teacher_fingerprint_field)
    if not isinstance(fingerprint, str):
        raise DataError("missing: a tokenized record must name the tokenizer of its ids (dcd_jax.data."
                        "tokenizer_fingerprint of the student tokenizer)", location=location,
                        field=cfg.teacher_fingerprint_field, reason="missing_field")
    return RecordTokens(ids, mask.astype(bool), fingerprint)


def parse_record(raw: Any, index: int, location: Location, cfg: DataConfig) -> Record:
    """Check one raw record against the configured field names and normalize it.

    Raises :class:`DataError` naming the location and field for: a record that is not an object,
    a missing field, a wrong type, an empty response, or a conversation whose last turn is not
    the assistant's.
    """
    if isinstance(raw, DataError):
        raise raw
    if not isinstance(raw, Mapping):
        raise DataError(f"a record must be a JSON object, got {_type_name(raw)}", location=location, reason="wrong_type")
    record_id = _scalar_text(raw.get(cfg.id_field), location, cfg.id_field)
    answer = _scalar_text(raw.get(cfg.answer_field), location, cfg.answer_field)
    tokens = None
    if raw.get(TOKENS_FIELDS[0]) is not None:
        tokens = _record_tokens(raw, location, cfg)
        messages, (prompt_field, response_field) = (), TOKENS_FIELDS
    elif raw.get(cfg.messages_field) is not None:
        messages = _chat_messages(raw[cfg.messages_field], location, cfg)
        prompt_field = response_field = cfg.messages_field
    else:
        prompt = _require_text(raw, cfg.prompt_field, location, "prompt_field")
        response = _require_text(raw, cfg.response_field, location, "response_field")
        if not response.strip():
            raise DataError("empty response (nothing to learn)", location=location,
                            field=cfg.response_field, reason="empty_response")
        messages = (Message("user", prompt), Message("assistant", response))
        prompt_field, response_field = cfg.prompt_field, cfg.response_field
    inline = None
    if cfg.teacher_scores == "inline":
        keys = (cfg.teacher_logprobs_field, cfg.teacher_topk_ids_field, cfg.teacher_topk_logprobs_field,
                cfg.teacher_fingerprint_field)
        inline = {k: raw[k] for k in keys if k in raw}
    return Record(
        id=record_id if record_id is not None else str(index),
        messages=messages,
        location=location,
        answer=answer,
        prompt_field=prompt_field,
        response_field=response_field,
        inline_scores=inline,
        tokens=tokens,
    )


def load_records(
    cfg: DataConfig,
    *,
    process_index: int = 0,
    process_count: int = 1,
    policy: BadRecordPolicy | None = None,
) -> Iterator[Record]:
    """Validated records of this process's share, in input order.

    Invalid records raise :class:`DataError` or, with a ``skip`` policy, are counted in
    ``policy`` and left out. ``policy`` defaults to ``cfg.on_bad_record``.
    """
    policy = policy or BadRecordPolicy(cfg.on_bad_record)
    for index, location, raw in read_raw_records(cfg, process_index=process_index, process_count=process_count):
        try:
            yield parse_record(raw, index, location, cfg)
        except DataError as e:
            policy.handle(e)
