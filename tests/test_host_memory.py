"""The command line's huge-page setting for host buffers (dcd_jax/host_memory.py): when it applies,
that ``dcd-jax`` restarts itself with it, and that it cuts XLA:CPU's per-call page faults."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from dcd_jax import cli, host_memory
from dcd_jax.host_memory import TUNABLE, hugepage_malloc_env


@pytest.mark.parametrize(
    "environ, libc, thp, expected",
    [
        ({}, (2, 36), "madvise", TUNABLE),
        ({}, (2, 35), "always", TUNABLE),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 36), "madvise", f"glibc.malloc.arena_max=2:{TUNABLE}"),
        ({}, (2, 34), "madvise", None),  # the tunable is new in glibc 2.35
        ({}, None, "madvise", None),  # musl / macOS
        ({}, (2, 36), "never", None),
        ({}, (2, 36), None, None),  # no THP in this kernel
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise", None),  # the user's value stands
        ({"GLIBC_TUNABLES": TUNABLE}, (2, 36), "madvise", None),  # already restarted
        ({"DCD_JAX_HUGEPAGE_MALLOC": "0"}, (2, 36), "madvise", None),
        ({"DCD_JAX_HUGEPAGE_MALLOC": "off"}, (2, 36), "always", None),
    ],
)
def test_the_restart_environment(environ, libc, thp, expected):
    env = hugepage_malloc_env({"PATH": "/bin", **environ}, libc=libc, thp=thp)
    if expected is None:
        assert env is None
    else:
        assert env["GLIBC_TUNABLES"] == expected and env["PATH"] == "/bin"
        others = {"PATH": "/bin", **environ}
        others.pop("GLIBC_TUNABLES", None)
        assert {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"} == others


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    for text, mode in (("always [madvise] never\n", "madvise"), ("[always] madvise never", "always"),
                       ("always madvise [never]", "never"), ("garbled", None)):
        (tmp_path / "enabled").write_text(text)
        assert host_memory.thp_mode(str(tmp_path / "enabled")) == mode
    assert host_memory.thp_mode(str(tmp_path / "missing")) is None


class _Exec(Exception):
    pass


def test_console_script_restarts_once_with_the_tunable_then_runs_main(monkeypatch):
    monkeypatch.setattr(host_memory, "glibc_version", lambda: (2, 36))
    monkeypatch.setattr(host_memory, "thp_mode", lambda: "madvise")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("DCD_JAX_HUGEPAGE_MALLOC", raising=False)
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "dcd_jax.cli", "train", "optim.lr=1e-5"])
    calls = []

    def fake_execve(path, argv, env):
        calls.append((path, argv, env))
        raise _Exec

    monkeypatch.setattr(os, "execve", fake_execve)
    monkeypatch.setattr(cli, "main", lambda argv=None: 7)
    with pytest.raises(_Exec):
        cli.run()
    (path, argv, env), = calls
    assert path == sys.executable and argv == [sys.executable, "-m", "dcd_jax.cli", "train", "optim.lr=1e-5"]
    assert env["GLIBC_TUNABLES"] == TUNABLE
    # The restarted process finds the tunable set: no second restart, the command runs.
    monkeypatch.setenv("GLIBC_TUNABLES", TUNABLE)
    assert host_memory.active() == TUNABLE
    with pytest.raises(SystemExit) as done:
        cli.run()
    assert done.value.code == 7 and len(calls) == 1
    # A restart that fails (no such executable) runs the command on in this process.
    monkeypatch.delenv("GLIBC_TUNABLES")
    def missing_executable(path, argv, env):
        raise FileNotFoundError(2, "No such file or directory", path)

    monkeypatch.setattr(os, "execve", missing_executable)
    with pytest.raises(SystemExit) as done:
        cli.run()
    assert done.value.code == 7


FAULTS_PER_CALL = textwrap.dedent("""
    import resource, jax, jax.numpy as jnp
    f = jax.jit(lambda x: jnp.sum(jnp.exp(x[:, None, :] + x[None, :, :1]) @ x.T))  # a ~64 MiB temporary
    x = jnp.ones((256, 256), jnp.float32) * 1e-3
    for _ in range(3):
        f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        f(x).block_until_ready()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
""")


@pytest.mark.skipif(hugepage_malloc_env({}, libc=host_memory.glibc_version(), thp=host_memory.thp_mode()) is None,
                    reason="needs glibc >= 2.35 and transparent huge pages (always / madvise)")
def test_huge_pages_cut_the_page_faults_of_each_xla_call():
    def faults(tunables):
        env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "XLA_FLAGS")}
        env.update(JAX_PLATFORMS="cpu", **({"GLIBC_TUNABLES": tunables} if tunables else {}))
        out = subprocess.run([sys.executable, "-c", FAULTS_PER_CALL], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        return float(out.stdout.split()[-1])

    plain, huge = faults(None), faults(TUNABLE)
    assert plain > 10_000  # every call faults its 64 MiB temporary in again, 4 KiB at a time
    assert huge < plain / 4, (plain, huge)
