"""Local path or Hugging Face Hub id: the one rule every loader follows.

A name is a local path if it exists. Otherwise it is sent to the Hub only if it *looks like a hub
id*: ``org/name`` with exactly one slash, no leading ``/``, ``./``, ``../`` or ``~``, and no file
suffix of a local file (``.jsonl``, ``.parquet``, ...). Anything else that does not exist is a
"no such file or directory" error, so a typo in a local path never turns into a network request.
"""

from __future__ import annotations

import re
from pathlib import Path

from dcd_jax import storage
from dcd_jax.errors import PathError

# Suffixes of local files: a missing "data/train.jsonl" is a typo, never a hub dataset.
LOCAL_FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".arrow", ".safetensors", ".yaml", ".yml",
                       ".txt", ".bin", ".pt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]$")


def looks_like_hub_id(name: str | Path) -> bool:
    """True for ``org/name`` (see the module docstring); False for anything path-like."""
    text = str(name)
    if not _HUB_ID.match(text) or ".." in text:
        return False
    return not text.lower().endswith(LOCAL_FILE_SUFFIXES)


def require_local_or_hub(name: str | Path, what: str) -> bool:
    """Whether ``name`` is a local path (True) or a hub id (False); raise :class:`PathError` if neither.

    ``what`` names the option in the message (e.g. ``data.path``). A ``gs://`` URL counts as local
    (it is read through :mod:`dcd_jax.storage`) and must exist.
    """
    if storage.is_remote(name):
        if storage.exists(name):
            return True
        raise PathError(f"{what}: no such file or directory: {name}", hint="check the bucket and the object name")
    if Path(name).expanduser().exists():
        return True
    if looks_like_hub_id(name):
        return False
    raise PathError(f"{what}: no such file or directory: {name}",
                    hint="a hub id looks like org/name; a local path must exist")
