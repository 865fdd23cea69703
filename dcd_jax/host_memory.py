"""Huge pages for host buffers: the process setting the ``dcd-jax`` command starts with.

XLA:CPU allocates an executable's temporaries afresh at every call (``posix_memalign`` on a
worker thread), and glibc serves blocks that large with a new ``mmap``: every train step then
faults its whole temporary buffer in again, 4 KiB at a time (the 25M-parameter bench step: ~2 GiB,
~515k page faults per step; the tiny one ~19k). glibc >= 2.35 can back such blocks with
transparent huge pages (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``: ``madvise(MADV_HUGEPAGE)`` on
what malloc maps), which makes that 512x fewer faults. The tunable is read when the process
starts, so the command line re-executes itself once with it (:func:`reexec_with_hugepage_malloc`)
before anything else runs. Set ``DCD_JAX_HUGEPAGE_MALLOC=0`` to keep the allocator as it is.

Where it does nothing: not Linux / not glibc / glibc < 2.35, transparent huge pages ``never``,
or ``glibc.malloc.hugetlb`` already set by the user (their value stands).
"""

from __future__ import annotations

import os
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "DCD_JAX_HUGEPAGE_MALLOC"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc; None elsewhere (musl, macOS, Windows)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):
        return None


def thp_mode(path: str = THP_ENABLED) -> str | None:
    """The kernel's transparent huge page mode (the bracketed word: always, madvise, never)."""
    try:
        text = open(path).read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def hugepage_malloc_env(
    environ: Mapping[str, str], *, libc: tuple[int, int] | None, thp: str | None
) -> dict[str, str] | None:
    """The environment to restart with so glibc backs large blocks with huge pages, or None when
    there is nothing to do (see the module docstring). ``GLIBC_TUNABLES`` entries the user set are
    kept: the tunable is appended to them."""
    if environ.get(OPT_OUT, "").strip().lower() in ("0", "false", "no", "off"):
        return None
    if libc is None or libc < (2, 35) or thp not in ("always", "madvise"):
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if any(entry.split("=")[0] == "glibc.malloc.hugetlb" for entry in current.split(":")):
        return None
    return {**environ, "GLIBC_TUNABLES": f"{current}:{TUNABLE}" if current else TUNABLE}


def reexec_with_hugepage_malloc() -> None:
    """Replace this process by the same command with :data:`TUNABLE` set, when it applies (same
    PID, same arguments; the child finds the tunable set and goes on). Call it first thing in an
    entry point, before threads or output."""
    env = hugepage_malloc_env(os.environ, libc=glibc_version(), thp=thp_mode())
    if env is None or not sys.executable:  # (an embedded interpreter has no executable to restart)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:  # could not restart: run on with the allocator as it is
        return


def active() -> str:
    """The setting in force in this process, for logs and bench records: :data:`TUNABLE` or
    ``"glibc defaults"``."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return TUNABLE if TUNABLE in tunables.split(":") else "glibc defaults"
