"""``DataError`` (an invalid record, located precisely) and the skip-or-raise policy for it.

Every problem found in the data names where it is: the file and 1-based line for JSONL, the record
index otherwise, and the field. ``on_bad_record: skip`` turns those errors into counted skips whose
first few locations are reported, so a user can fix the data instead of guessing.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Literal

from dcd_jax.errors import DataInputError

# Why a record was rejected (keys of the skip counts).
REASONS = (
    "malformed_json",
    "missing_field",
    "wrong_type",
    "empty_response",
    "bad_final_turn",
    "template",
    "all_masked",
    "prompt_too_long",
    "teacher_scores",
)
# Problems with the whole input rather than one record: never skipped, whatever the policy.
FATAL_REASONS = ("unreadable", "teacher_fingerprint", "stale_teacher_scores")


@dataclasses.dataclass(frozen=True)
class Location:
    """Where a record came from: ``file`` plus a 1-based ``line`` (JSONL) or a 0-based ``index``."""

    file: str
    line: int | None = None
    index: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.file}:{self.line}"
        if self.index is not None:
            return f"{self.file} [record {self.index}]"
        return self.file


class DataError(DataInputError):
    """A record (or stored teacher score) is invalid.

    The message reads ``<file>:<line>: field '<field>': <what is wrong>`` (``<file> [record <i>]``
    when there are no lines). ``reason`` is one of :data:`REASONS` or :data:`FATAL_REASONS`.
    """

    def __init__(self, message: str, *, location: Location, field: str | None = None, reason: str):
        self.location = location
        self.field = field
        self.reason = reason
        self.detail = message
        where = f"field {field!r}: " if field else ""
        super().__init__(f"{location}: {where}{message}")

    def __reduce__(self):  # keyword-only arguments: rebuild explicitly (errors cross read-worker processes)
        return _rebuild_data_error, (type(self), self.detail, self.location, self.field, self.reason)


def _rebuild_data_error(cls: type, message: str, location: Location, field: str | None, reason: str) -> DataError:
    return cls(message, location=location, field=field, reason=reason)


class BadRecordPolicy:
    """Applies ``on_bad_record``: re-raise the error, or count it by reason and keep going."""

    MAX_EXAMPLES = 3  # locations kept per reason for the report

    def __init__(self, mode: Literal["error", "skip"]):
        self.mode = mode
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)

    def handle(self, error: DataError) -> None:
        """Raise ``error`` (mode ``error``) or record it as a skip (mode ``skip``)."""
        if self.mode == "error" or error.reason in FATAL_REASONS:
            raise error
        self.counts[error.reason] += 1
        if len(self.examples[error.reason]) < self.MAX_EXAMPLES:
            self.examples[error.reason].append(str(error))
