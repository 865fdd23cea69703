"""Atomic replacement of files and directories: a kill at any instant leaves the old or the new, whole.

A file is written under a temporary name in the same directory, flushed and fsynced, then renamed
over the target with ``os.replace`` (atomic on POSIX filesystems); the directory is fsynced so the
rename itself survives a power cut. A directory (an exported HF model) is built under a temporary
name and swapped in with two renames; see :func:`atomic_directory` for the one narrow window.

Temporary names start with ``.`` and carry the pid, so leftovers of a killed writer never collide
with a live one and are swept by the next write of the same target.

On a bucket (``gs://``, see :mod:`dcd_jax.storage`) there is no rename: the file or directory is
built in a private local temporary and uploaded. An object appears only once its upload is
complete, so a file is replaced whole. A directory is uploaded file by file: each file is whole, but
a kill during the upload leaves a mix of old and new files at the target (docs/failure_modes.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from dcd_jax import storage

TMP_TAG = ".tmp-"


def _crash_point(name: str) -> None:
    """Test hook: tests replace this to simulate a kill at ``write``, ``fsync`` or ``rename``."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sweep_leftovers(path: Path) -> None:
    """Remove temporaries of ``path`` left by writers that were killed (never those of a live process)."""
    prefix = f".{path.name}{TMP_TAG}"
    for leftover in path.parent.glob(prefix + "*"):
        pid = leftover.name[len(prefix):].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Write a file under a temporary name (yielded: a writer opens it itself, e.g. a streamed
    Parquet writer) and rename it over ``path`` once the block ends; an exception leaves ``path``
    as it was and removes the temporary. On a bucket the temporary is local and is uploaded."""
    if storage.is_remote(path):
        with storage.local_staging() as staging:
            tmp = staging / f".{str(path).rsplit('/', 1)[-1]}{TMP_TAG}{os.getpid()}"
            yield tmp
            _crash_point("fsync")
            _crash_point("rename")
            storage.upload_file(tmp, path)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_leftovers(path)
    tmp = path.with_name(f".{path.name}{TMP_TAG}{os.getpid()}")
    try:
        yield tmp
        _crash_point("fsync")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _crash_point("rename")
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: readers (and a restart after a kill) see the old or the new file."""
    with atomic_file(path) as tmp:
        _crash_point("write")
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name (yielded) and swap it in for ``path`` on success.

    An exception leaves ``path`` as it was. The swap is two renames (old aside, new in), so a kill
    between them leaves the complete new directory under its temporary name and the old one aside
    (both kept; nothing half-written ever sits at ``path``).

    On a bucket the directory is built locally, then uploaded file by file, and objects of the old
    directory that the new one does not have are deleted last.
    """
    if storage.is_remote(path):
        with storage.local_staging() as staging:
            tmp = staging / f".{str(path).rstrip('/').rsplit('/', 1)[-1]}{TMP_TAG}{os.getpid()}"
            tmp.mkdir()
            yield tmp
            _crash_point("rename")
            old = set(storage.list_files(path))
            new = set(storage.upload_tree(tmp, path))
            for rel in sorted(old - new):
                storage.delete_if(f"{str(path).rstrip('/')}/{rel}", None)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_leftovers(path)
    tmp = path.with_name(f".{path.name}{TMP_TAG}{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}{TMP_TAG}{os.getpid()}.old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)

