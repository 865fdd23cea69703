"""Where run artifacts live: a local path or a ``gs://`` bucket, through one path type.

Every run artifact (``out_dir`` and what is in it, data and teacher scores, model directories,
``generate`` / ``score-teacher`` / ``eval`` outputs) is named by a string that is either a local
path or a URL such as ``gs://bucket/run``. :func:`path` turns it into an ``etils.epath.Path``:
the path type Orbax itself takes, with one pathlib API over both (``/``, ``exists``, ``glob``,
``open``, ``read_text``); on a bucket it reaches GCS through fsspec's ``gcsfs``.

What a bucket cannot do as a filesystem does is here, once:
  * no rename: :mod:`dcd_jax.atomic_files` builds a file or directory locally and uploads it (an
    object appears only once its upload completes, so a reader sees the old or the new one);
  * no ``O_EXCL`` and no append: :func:`create_exclusive`, :func:`rewrite_if` and
    :func:`delete_if` are compare-and-swap on the object's *generation* (GCS
    ``ifGenerationMatch``), the run lock's primitives; :class:`Mirror` keeps appended files
    (``metrics.jsonl``, TensorBoard events) in a local working copy and uploads them on ``sync``;
  * no local file for libraries that need one (tokenizers, ``config.json`` readers):
    :func:`localize` downloads a file or directory once into a cache keyed by its generations.

Local paths take the same functions (each has a local branch), so a run on a laptop exercises the
code that runs against a bucket.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from etils import epath

PathLike = str | os.PathLike


def is_remote(name: PathLike) -> bool:
    """Whether ``name`` is a URL (``gs://...``) rather than a local path."""
    return "://" in str(name)


def path(name: PathLike) -> "epath.Path":
    """``name`` as the one path type (``~`` expanded for local paths)."""
    from etils import epath  # deferred: the CLI imports this module; most commands never build a path

    text = str(name)
    return epath.Path(text if is_remote(text) else os.path.expanduser(text))


def absolute(name: PathLike) -> "epath.Path":
    """:func:`path`, made absolute when local (Orbax wants absolute directories)."""
    p = path(name)
    return p if is_remote(p) else path(os.path.abspath(str(p)))


def exists(name: PathLike) -> bool:
    return path(name).exists()


def open_read(name: PathLike) -> IO[bytes]:
    """A seekable binary reader (on a bucket: ranged reads, so a reader of one block fetches only it)."""
    if is_remote(name):
        return path(name).open("rb")
    return open(os.path.expanduser(str(name)), "rb")


def stamp(name: PathLike) -> tuple[int, int]:
    """``(size, mtime in ns)`` of a file: what changes when it is rewritten."""
    if is_remote(name):
        info = _gcs().info(str(name))
        return int(info["size"]), int(info.get("generation") or 0)
    st = os.stat(os.path.expanduser(str(name)))
    return st.st_size, st.st_mtime_ns


def free_bytes(name: PathLike) -> int | None:
    """Free space under a local directory; None on a bucket (it does not fill up)."""
    return None if is_remote(name) else shutil.disk_usage(str(name)).free


_FS: dict[int, Any] = {}


def _gcs() -> Any:
    """This process's own gcsfs client, on fsspec's I/O thread: not the shared cached instance, which
    Orbax may have created inside an event loop it has since closed."""
    import fsspec  # deferred: only bucket paths need gcsfs

    if os.getpid() not in _FS:
        _FS[os.getpid()] = fsspec.filesystem("gs", skip_instance_cache=True)
    return _FS[os.getpid()]


def _bucket_key(name: PathLike) -> tuple[str, str]:
    text = str(name)
    if not text.startswith("gs://"):
        raise ValueError(f"{text}: compare-and-swap is implemented for gs:// buckets and local paths only")
    bucket, _, key = text[len("gs://"):].partition("/")
    return bucket, key


# ------------------------------------------------------------------ compare-and-swap (the run lock)

# A version is what changes on every write: the object's generation on a bucket, the mtime locally
# (local callers rely on O_EXCL and the pid check, not on the version).
Version = str


def create_exclusive(name: PathLike, data: bytes) -> Version:
    """Create ``name`` with ``data`` only if it does not exist (``FileExistsError`` otherwise)."""
    if is_remote(name):
        bucket, key = _bucket_key(name)
        return _upload(bucket, key, data, if_generation="0")
    local = os.path.expanduser(str(name))
    fd = os.open(local, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        Path(local).unlink(missing_ok=True)
        raise
    os.close(fd)
    return str(os.stat(local).st_mtime_ns)


def read_versioned(name: PathLike) -> tuple[bytes, Version, float] | None:
    """``(content, version, last-modified unix time)`` of ``name``; None if it does not exist."""
    if is_remote(name):
        fs = _gcs()
        try:
            fs.invalidate_cache(str(name))  # another host may have replaced it: never a cached answer
            info = fs.info(str(name))
            generation = str(info["generation"])
            data = fs.cat_file(str(name), generation=generation)
        except FileNotFoundError:
            return None
        updated = info.get("mtime") or info.get("updated")
        mtime = updated.timestamp() if hasattr(updated, "timestamp") else time.time()
        return data, generation, mtime
    local = os.path.expanduser(str(name))
    try:
        st = os.stat(local)
        with open(local, "rb") as f:
            return f.read(), str(st.st_mtime_ns), st.st_mtime
    except FileNotFoundError:
        return None


def rewrite_if(name: PathLike, data: bytes, version: Version) -> Version:
    """Replace ``name`` only if it is still at ``version`` (``FileExistsError`` otherwise); a heartbeat
    that notices a lock taken over by someone else."""
    if is_remote(name):
        bucket, key = _bucket_key(name)
        return _upload(bucket, key, data, if_generation=version)
    local = os.path.expanduser(str(name))
    os.utime(local)  # local: only the mtime matters (the pid check guards the rest)
    return str(os.stat(local).st_mtime_ns)


def delete_if(name: PathLike, version: Version | None) -> bool:
    """Delete ``name`` if it is still at ``version`` (None: whatever it holds); False if it was not."""
    if not is_remote(name):
        try:
            Path(os.path.expanduser(str(name))).unlink()
            return True
        except FileNotFoundError:
            return False
    bucket, key = _bucket_key(name)
    fs = _gcs()
    kw = {} if version is None else {"ifGenerationMatch": version}
    try:
        fs.call("DELETE", "b/{}/o/{}", bucket, key, **kw)
    except (FileNotFoundError, FileExistsError):  # gone, or replaced since (412 reads as FileExistsError)
        return False
    fs.invalidate_cache(str(name))
    return True


def _upload(bucket: str, key: str, data: bytes, *, if_generation: str) -> Version:
    """One-request upload with a generation precondition (412 -> ``FileExistsError``)."""
    fs = _gcs()
    out = fs.call("POST", f"{fs._location}/upload/storage/v1/b/{{}}/o", bucket, uploadType="media", name=key,
                  ifGenerationMatch=if_generation, data=data, json_out=True,
                  headers={"Content-Type": "application/octet-stream"})
    fs.invalidate_cache(f"{bucket}/{key}")
    return str(out["generation"])


# ------------------------------------------------------------------ uploads, downloads

def upload_file(local: PathLike, name: PathLike) -> None:
    """Put a finished local file at ``name`` (one object, visible only once complete)."""
    if is_remote(name):
        fs = _gcs()
        fs.put_file(str(local), str(name))
        fs.invalidate_cache(str(name))
    else:
        shutil.copyfile(str(local), os.path.expanduser(str(name)))


def upload_tree(local: PathLike, name: PathLike) -> list[str]:
    """Upload every file under the local directory ``local`` to the prefix ``name``; returns their
    relative names."""
    local = Path(local)
    names = sorted(str(f.relative_to(local)) for f in local.rglob("*") if f.is_file())
    for rel in names:
        upload_file(local / rel, f"{str(name).rstrip('/')}/{rel}")
    return names


def remove_tree(name: PathLike) -> None:
    """Remove a directory (or a prefix of a bucket) and all it holds; nothing if absent."""
    if is_remote(name):
        fs = _gcs()
        if fs.exists(str(name)):
            fs.rm(str(name), recursive=True)
        fs.invalidate_cache(str(name))
    else:
        shutil.rmtree(os.path.expanduser(str(name)), ignore_errors=True)


def move_tree(src: PathLike, dst: PathLike) -> None:
    """Rename a directory; on a bucket, copy its objects then delete them (not atomic: used only to set
    an unusable checkpoint aside, where a partial move leaves it unusable either way)."""
    if is_remote(src):
        fs = _gcs()
        fs.mv(str(src), str(dst), recursive=True)
        fs.invalidate_cache(str(src))
        fs.invalidate_cache(str(dst))
    else:
        os.rename(os.path.expanduser(str(src)), os.path.expanduser(str(dst)))


def list_files(name: PathLike) -> list[str]:
    """Every file under a directory or prefix, recursively, as names relative to it (sorted)."""
    if not is_remote(name):
        root = Path(os.path.expanduser(str(name)))
        return sorted(str(f.relative_to(root)) for f in root.rglob("*") if f.is_file()) if root.is_dir() else []
    prefix = _gcs_name(str(name).rstrip("/")) + "/"
    found = _gcs().find(prefix)
    return sorted(f[len(prefix):] for f in found if f.startswith(prefix) and not f.endswith("/"))


def list_names(name: PathLike) -> list[str]:
    """Names directly under a directory or prefix (empty if absent); never a cached listing."""
    if not is_remote(name):
        p = Path(os.path.expanduser(str(name)))
        return sorted(child.name for child in p.iterdir()) if p.is_dir() else []
    try:
        found = _gcs().ls(str(name).rstrip("/"), refresh=True)
    except FileNotFoundError:
        return []
    return sorted({f.rstrip("/").rsplit("/", 1)[-1] for f in found})


def cache_root() -> Path:
    return Path(os.environ.get("DCD_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dcd-jax")))


def localize(name: PathLike) -> Path:
    """A local path holding ``name``'s content: ``name`` itself when local; for a bucket, a copy
    downloaded once into ``$DCD_JAX_CACHE/gcs/`` (keyed by the objects' generations, so a rewritten
    model is fetched again) for readers that need a local file (tokenizers, HF configs)."""
    if not is_remote(name):
        return Path(os.path.expanduser(str(name)))
    fs = _gcs()
    text = str(name).rstrip("/")
    if fs.isdir(text):
        objects = {k: v for k, v in fs.find(text, detail=True).items() if v.get("type") == "file"}
    else:
        info = fs.info(text)
        objects = {info["name"]: info}
    if not objects:
        raise FileNotFoundError(text)
    key = hashlib.sha256(json.dumps(sorted((k, str(v.get("generation"))) for k, v in objects.items())).encode()).hexdigest()[:16]
    dest = cache_root() / "gcs" / f"{text.rsplit('/', 1)[-1]}-{key}"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            prefix = _gcs_name(text)
            if fs.isdir(text):
                for obj in objects:
                    target = staging / obj[len(prefix):].lstrip("/")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    fs.get_file(obj, str(target))
                os.replace(staging, dest)
            else:
                fs.get_file(text, str(staging / "file"))
                os.replace(staging / "file", dest)
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return dest


def _gcs_name(url: str) -> str:
    return url[len("gs://"):] if url.startswith("gs://") else url


# ------------------------------------------------------------------ appended files

class Mirror:
    """A local working copy of a directory's appended files (``metrics.jsonl``, TensorBoard events).

    Objects cannot be appended to, so on a bucket the files are written in a local directory and
    uploaded by :meth:`sync` (each upload replaces the whole object). ``files`` existing at the
    remote are downloaded first, so a resumed run appends to what the killed one synced. For a
    local directory the working copy *is* the directory and :meth:`sync` does nothing.
    """

    def __init__(self, directory: PathLike, files: tuple[str, ...] = ()):
        self.remote = str(directory)
        if not is_remote(directory):
            self.local = Path(os.path.expanduser(self.remote))
            self.local.mkdir(parents=True, exist_ok=True)
            return
        self.local = Path(tempfile.mkdtemp(prefix="dcd-jax-mirror-"))
        for fname in files:
            remote = path(self.remote) / fname
            if remote.is_file():
                (self.local / fname).write_bytes(remote.read_bytes())

    def sync(self) -> None:
        """Upload the working copy (each file replaced whole: a reader sees a consistent file)."""
        if is_remote(self.remote):
            upload_tree(self.local, self.remote)

    def close(self) -> None:
        self.sync()
        if is_remote(self.remote):
            shutil.rmtree(self.local, ignore_errors=True)


@contextlib.contextmanager
def local_staging(suffix: str = "") -> Iterator[Path]:
    """A private local temporary directory, removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="dcd-jax-stage-", suffix=suffix))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
