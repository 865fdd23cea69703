"""The one family of errors a user can cause, at the ground of the package (every layer imports it).

Anything a user can fix (a config value, a record, a checkpoint, a model, a path) raises a
:class:`UserError`. The CLI prints ``error: <message>`` (and ``hint: <hint>`` when there is one)
and exits 2 without a traceback; ``--debug`` or ``DCD_JAX_DEBUG=1`` shows it. Everything else is a
bug in dcd-jax and keeps its traceback. Each message names the file, the line/record and the field
where there is one.

The subclasses also derive from the builtin type the code raised before (``ValueError``,
``OSError``), so existing ``except`` clauses keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; ``hint`` is an optional one-line suggestion of how."""

    def __init__(self, message: str = "", *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown, of the wrong type, or impossible on this machine."""


class DataInputError(UserError, ValueError):
    """Input data (training records, benchmark files, stored scores) is missing or invalid."""


class CheckpointError(UserError, ValueError):
    """A checkpoint (HF directory, dcd-jax model dir or training step) is missing, damaged or inconsistent."""


class ModelError(UserError, ValueError):
    """The model's configuration is not supported."""


class PathError(UserError, OSError):
    """A path given by the user cannot be used: missing, not writable, full, or locked by another run."""
