"""One run per ``out_dir``, and an ``out_dir`` that can take a checkpoint: checked before anything loads.

``claim_run_dir`` (process 0 of a run) creates ``out_dir``, takes the lock file
``<out_dir>/.dcd-jax.lock`` with ``O_CREAT | O_EXCL`` (host, pid, start time; written and fsynced,
which doubles as the writability probe) and checks the free space against one checkpoint. A
background thread refreshes the lock's mtime every ``HEARTBEAT_S`` while the run lives.

On a bucket (``gs://``) the same protocol runs on the object's generation (:mod:`dcd_jax.storage`):
the lock is created with ``ifGenerationMatch=0`` (exactly one starter wins), the heartbeat rewrites
it only if it still has the generation we wrote (a run whose lock was broken notices), and a stale
lock is deleted only at the generation that was judged stale (never a lock a rival just took).

A lock already there belongs to:
  * a live process on this host: refused (``PathError`` naming it), whatever the flags;
  * a dead process on this host (or a pid since reused by a process started later): certainly stale;
    reported with a WARNING and taken over (a crashed or SIGKILLed run must not block its own resume);
  * a process on another host (a shared filesystem): refused while its heartbeat is younger than
    ``train.lock_stale_after_s``; older, it is reported as stale. Either way ``train.break_lock=true``
    takes it over (the user vouches that the other job is gone).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from dcd_jax import storage
from dcd_jax.atomic_files import _pid_alive
from dcd_jax.errors import PathError

log = logging.getLogger(__name__)

LOCK_FILE = ".dcd-jax.lock"
HEARTBEAT_S = 30.0
UNREADABLE_GRACE_S = 10.0  # a lock with no readable content yet is being written by a starter


@dataclasses.dataclass(frozen=True)
class LockHolder:
    """Who holds a run directory (the content of the lock file) and when it last showed life."""

    host: str
    pid: int
    started: float  # unix time
    heartbeat: float  # the lock file's mtime
    version: str | None = None  # what a compare-and-swap on the lock compares (a bucket object's generation)

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"pid {self.pid} on host {self.host}, started {started}, last alive {time.time() - self.heartbeat:.0f} s ago"


def _read_holder(lock) -> LockHolder | None:
    """The holder of ``lock`` (None: no lock); pid -1 for a lock whose content is not readable."""
    try:
        found = storage.read_versioned(lock)
    except OSError:
        return LockHolder("?", -1, 0.0, time.time())
    if found is None:
        return None
    data, version, mtime = found
    try:
        info = json.loads(data)
        return LockHolder(str(info["host"]), int(info["pid"]), float(info["started"]), mtime, version)
    except (ValueError, KeyError, TypeError):  # being written right now, or by a run killed meanwhile
        return LockHolder("?", -1, 0.0, mtime, version)


def _process_start_time(pid: int) -> float | None:
    """Unix time at which process ``pid`` started (Linux ``/proc``); None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _holds(holder: "LockHolder") -> bool:
    """Whether ``holder``'s process (on this host) is alive and is the one that took the lock: a pid
    reused by a process started after the lock was taken is not the holder."""
    if holder.pid <= 0 or not _pid_alive(holder.pid):
        return False
    started = _process_start_time(holder.pid)
    return started is None or started <= holder.started + 1.0


def _write_exclusive(path, data: bytes) -> str:
    """Create ``path`` only if absent (``FileExistsError`` otherwise), with ``data``; returns its version."""
    return storage.create_exclusive(path, data)


class RunLock:
    """The lock of one run directory, held until :meth:`release` (also a context manager)."""

    def __init__(self, out_dir):
        self.path = storage.path(out_dir) / LOCK_FILE
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._version: str | None = None
        self._content = b""

    def acquire(self, *, stale_after_s: float, break_lock: bool) -> None:
        self._content = json.dumps({"host": self.host, "pid": self.pid, "started": self.started}).encode()
        for _ in range(3):  # a lost race with another starter re-reads the new holder
            try:
                self._version = _write_exclusive(self.path, self._content)
                break
            except FileExistsError:
                holder = _read_holder(self.path)
                if holder is not None:
                    self._take_over(holder, stale_after_s, break_lock)
        else:
            raise PathError(f"train.out_dir: could not take the lock {self.path} (another run keeps taking it)")
        self._thread = threading.Thread(target=self._heartbeat, name="dcd-jax-lock-heartbeat", daemon=True)
        self._thread.start()

    def _take_over(self, holder: LockHolder, stale_after_s: float, break_lock: bool) -> None:
        """Remove the lock of ``holder`` if it is stale (or ``break_lock``); raise if it is in use."""
        here = holder.host == self.host
        if holder.pid < 0 and time.time() - holder.heartbeat < UNREADABLE_GRACE_S:
            raise PathError(f"train.out_dir {self.path.parent} is being claimed by another run right now "
                            f"(lock {self.path})", hint="wait for that run to end, or give this run another train.out_dir")
        if here and _holds(holder):
            raise PathError(
                f"train.out_dir {self.path.parent} is in use by another run: {holder.describe()} (lock {self.path})",
                hint="wait for that run to end, or give this run another train.out_dir",
            )
        dead_here = here or holder.pid < 0
        age = time.time() - holder.heartbeat
        stale = dead_here or (stale_after_s > 0 and age > stale_after_s)
        if not (dead_here or break_lock):
            state = f"stale: no sign of life for {age:.0f} s" if stale else "in use"
            raise PathError(
                f"train.out_dir {self.path.parent} is locked by a run on another host ({state}): "
                f"{holder.describe()} (lock {self.path})",
                hint="if that job is gone, rerun with train.break_lock=true",
            )
        why = "its process is gone" if dead_here else "train.break_lock=true"
        log.warning("breaking the stale lock of %s (%s): %s", self.path.parent, why, holder.describe())
        # Only the lock judged stale: if a rival replaced it meanwhile, its new generation survives.
        storage.delete_if(self.path, holder.version if storage.is_remote(self.path) else None)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._version = storage.rewrite_if(self.path, self._content, self._version)
            except FileExistsError:  # replaced by a breaker (train.break_lock): it is theirs now
                log.warning("the lock %s was taken over by another run", self.path)
                return
            except OSError:
                pass

    def release(self) -> None:
        """Remove the lock if it is still ours (a breaker may have taken it over)."""
        self._stop.set()
        if self._thread is not None:  # a heartbeat in flight would change the generation under the delete
            self._thread.join(timeout=60)
        holder = _read_holder(self.path)
        if holder is not None and (holder.host, holder.pid, holder.started) == (self.host, self.pid, self.started):
            storage.delete_if(self.path, holder.version if storage.is_remote(self.path) else None)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def checkpoint_bytes(num_params: int, param_bytes: int) -> int:
    """Estimated size of one checkpoint: params + the two Adam moments, each of ``param_bytes`` per value.

    bytes = 3 * num_params * param_bytes
    """
    return 3 * num_params * param_bytes


def claim_run_dir(out_dir: str | os.PathLike, *, needed_bytes: int | None, stale_after_s: float, break_lock: bool) -> RunLock:
    """Create ``out_dir``, take its lock and check it has room for ``needed_bytes`` (None: unknown).

    Raises :class:`~dcd_jax.errors.PathError` (naming ``train.out_dir``) when the directory cannot be
    created or written, is full, or is locked by another run.
    """
    out = storage.path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)  # on a bucket: nothing to create (prefixes need no mkdir)
    except OSError as e:
        raise PathError(f"train.out_dir: cannot create {out}: {e.strerror}") from None
    lock = RunLock(out)
    try:
        lock.acquire(stale_after_s=stale_after_s, break_lock=break_lock)
    except OSError as e:
        if isinstance(e, PathError):
            raise
        why = "no space left on device" if e.errno == errno.ENOSPC else e.strerror
        raise PathError(f"train.out_dir: {out} is not writable: {why}",
                        hint="choose a writable train.out_dir with room for the checkpoints") from None
    free = _free_bytes(out)
    if needed_bytes is not None and free is not None and free < needed_bytes:
        lock.release()
        raise PathError(
            f"train.out_dir: {out} has {free / 2**20:.1f} MiB free, but one checkpoint needs about "
            f"{needed_bytes / 2**20:.1f} MiB",
            hint="free some space or choose another train.out_dir",
        )
    return lock


def _free_bytes(out) -> int | None:
    return storage.free_bytes(out)
