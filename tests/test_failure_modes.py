"""Failure modes as a user meets them, through the ``dcd-jax`` CLI (see docs/failure_modes.md).

Bad input of every kind exits 2 with ``error: ...`` naming the file, line/record and field, and no
traceback; faults during a run (kills, damaged or incomplete checkpoints, a second launch on the same
out_dir) never lose finished work, and a resumed run ends bitwise equal to an undisturbed one.

Cost: most rows call ``dcd_jax.cli.main`` in-process (no JAX import per row); a few real
subprocesses prove the exit status / no-traceback path and the kill and lock behaviour.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from train_fixtures import base_overrides, make_assets

from dcd_jax import atomic_files
from dcd_jax.cli import main as cli_main
from dcd_jax.data import DataError
from dcd_jax.train import run_dir
from dcd_jax.train.checkpoint import CheckpointConfig, RunCheckpointer
from dcd_jax.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CLI_WORKER = Path(__file__).with_name("cli_worker.py")
RUN = {"train.steps": 4, "checkpoint.every_steps": 2}  # every run here: 4 steps, checkpoints at 2 and 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("fm_assets"), n_examples=48)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent XLA cache shared by this module's runs and subprocesses: the train step of every
    run here is the same program, compiled once (the same executable: bitwise results are unchanged)."""
    cache = tmp_path_factory.mktemp("xla_cache")
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    for name, value in zip(names, (str(cache), 0.0, 0)):
        jax.config.update(name, value)
    yield {"JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    for name, value in saved.items():
        jax.config.update(name, value)


# --------------------------------------------------------------------------- bad input table


def _jsonl(tmp: Path, name: str, lines: list) -> Path:
    path = tmp / name
    path.write_bytes(b"".join((x if isinstance(x, bytes) else (json.dumps(x) if not isinstance(x, str) else x).encode())
                              + b"\n" for x in lines))
    return path


GOOD = {"id": "g", "prompt": "Kim has 2 cards.", "response": "The answer is 2."}


def inspect_argv(assets, data_path, *extra):
    return ["data", "inspect", f"model.path={assets['student']}", f"data.path={data_path}", "data.seq_len=128", *extra]


def train_argv(assets, tmp, *extra, model=None):
    return ["train", *base_overrides(assets, tmp / "run", **RUN), *(f"model.path={model}",) * (model is not None),
            *extra]


def _student_copy(assets, tmp: Path) -> Path:
    dst = tmp / "student"
    shutil.copytree(assets["student"], dst)
    return dst


def _truncated_safetensors(assets, tmp):
    d = _student_copy(assets, tmp)
    f = next(d.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:-100])
    return d, f.name


def _bad_header_length(assets, tmp):
    d = _student_copy(assets, tmp)
    f = next(d.glob("*.safetensors"))
    f.write_bytes(struct.pack("<Q", 2**40) + f.read_bytes()[8:])
    return d, f.name


def _index_escapes(assets, tmp):
    d = _student_copy(assets, tmp)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = sorted(index["weight_map"])[0]
    index["weight_map"][name] = "../outside.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d, name


def _damaged_model_json(tmp):
    (tmp / "flax_model").mkdir()
    (tmp / "flax_model" / "model.json").write_text('{"model_config": {"hidden_size": 8')
    return tmp / "flax_model"


def _read_only(monkeypatch):
    def refuse(path, data):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(run_dir, "_write_exclusive", refuse)


def _full_disk(monkeypatch):
    monkeypatch.setattr(run_dir, "_free_bytes", lambda out: 1000)


def _locked(tmp):
    (tmp / "run").mkdir()
    info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    (tmp / "run" / run_dir.LOCK_FILE).write_text(json.dumps(info))


def _bad_yaml(tmp):
    (tmp / "bad.yaml").write_text("optim:\n  lr: [1e-5\n")
    return tmp / "bad.yaml"


# (id, argv builder (assets, tmp, monkeypatch) -> argv, expected substrings of stderr: file, line, field)
BAD_INPUT = [
    ("malformed_json", lambda a, t, m: inspect_argv(a, _jsonl(t, "d.jsonl", [GOOD, '{"prompt": "x",'])),
     ["d.jsonl:2", "malformed JSON"]),
    ("missing_field", lambda a, t, m: inspect_argv(a, _jsonl(t, "d.jsonl", [GOOD, {"prompt": "p"}])),
     ["d.jsonl:2", "field 'response'", "missing"]),
    ("empty_response", lambda a, t, m: inspect_argv(a, _jsonl(t, "d.jsonl", [{"prompt": "p", "response": " "}])),
     ["d.jsonl:1", "field 'response'", "empty"]),
    ("non_string_field", lambda a, t, m: inspect_argv(a, _jsonl(t, "d.jsonl", [GOOD, GOOD, {"prompt": 7, "response": "r"}])),
     ["d.jsonl:3", "field 'prompt'", "must be a string"]),
    ("bad_chat_role", lambda a, t, m: inspect_argv(a, _jsonl(t, "d.jsonl", [
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}])),
     ["d.jsonl:1", "field 'messages[0].role'", "unknown role 'robot'"]),
    ("last_turn_not_assistant", lambda a, t, m: inspect_argv(a, _jsonl(t, "d.jsonl", [
        {"messages": [{"role": "user", "content": "x"}]}])),
     ["d.jsonl:1", "field 'messages[0].role'", "final turn must be 'assistant'"]),
    ("messages_not_a_list", lambda a, t, m: inspect_argv(a, _jsonl(t, "d.jsonl", [{"messages": "hi"}])),
     ["d.jsonl:1", "field 'messages'", "list of messages"]),
    ("record_not_an_object", lambda a, t, m: inspect_argv(a, _jsonl(t, "d.jsonl", [GOOD, "[1, 2]"])),
     ["d.jsonl:2", "JSON object"]),
    ("non_utf8", lambda a, t, m: inspect_argv(a, _jsonl(t, "d.jsonl", [GOOD, b'{"prompt": "\xff\xfe", "response": "r"}'])),
     ["d.jsonl:2", "utf-8"]),
    ("bad_json_array", lambda a, t, m: inspect_argv(a, _jsonl(t, "d.json", ['[{"prompt": "p",'])),
     ["d.json", "malformed JSON array"]),
    ("empty_file", lambda a, t, m: inspect_argv(a, _jsonl(t, "d.jsonl", [""])),
     ["d.jsonl", "no usable examples"]),
    ("prompt_too_long", lambda a, t, m: inspect_argv(a, _jsonl(t, "d.jsonl", [{"prompt": "7 " * 300, "response": "r"}])),
     ["d.jsonl:1", "field 'prompt'", "seq_len=128"]),
    ("missing_data_path", lambda a, t, m: inspect_argv(a, t / "nowhere" / "train.jsonl"),
     ["nowhere/train.jsonl", "field 'data.path'", "no such file or directory"]),
    ("teacher_scores_without_fingerprint", lambda a, t, m: inspect_argv(a, _jsonl(t, "d.jsonl", [GOOD]), "data.teacher_scores=inline"),
     ["d.jsonl:1", "field 'tokenizer_fingerprint'"]),
    ("mesh_not_dividing_devices", lambda a, t, m: train_argv(a, t, "mesh.data=1", "mesh.fsdp=3", "mesh.tensor=1"),
     ["mesh data=1 x fsdp=3 x tensor=1", "8 are available"]),
    ("mesh_size_zero", lambda a, t, m: train_argv(a, t, "mesh.data=0"), ["mesh.data=0", "positive integer"]),
    ("mesh_two_rest_axes", lambda a, t, m: train_argv(a, t, "mesh.data=-1", "mesh.fsdp=-1"), ["at most one mesh axis may be -1"]),
    ("wrong_type_option", lambda a, t, m: train_argv(a, t, "optim.lr=fast"), ["optim.lr", "expected a number, got 'fast'"]),
    ("unknown_option", lambda a, t, m: train_argv(a, t, "train.stepz=3"), ["train", "unknown option(s) ['stepz']"]),
    ("invalid_yaml", lambda a, t, m: ["train", "--config", str(_bad_yaml(t))], ["bad.yaml", "invalid YAML", "line 2"]),
    ("missing_config_file", lambda a, t, m: ["train", "--config", str(t / "none.yaml")], ["config file not found", "none.yaml"]),
    ("missing_model_path", lambda a, t, m: train_argv(a, t, model=t / "no_model"), ["model.path", "no such file or directory", "no_model"]),
    ("truncated_safetensors", lambda a, t, m: train_argv(a, t, model=_truncated_safetensors(a, t)[0]),
     ["student/model-00001-of-00001.safetensors", "truncated"]),
    ("bad_header_length", lambda a, t, m: train_argv(a, t, model=_bad_header_length(a, t)[0]),
     ["student/model-00001-of-00001.safetensors", "header claims 1099511627776 bytes"]),
    ("index_points_outside", lambda a, t, m: train_argv(a, t, model=_index_escapes(a, t)[0]),
     ["model.safetensors.index.json", "weight_map entry for tensor", "points outside the checkpoint directory"]),
    ("damaged_model_json", lambda a, t, m: train_argv(a, t, model=_damaged_model_json(t)),
     ["flax_model/model.json", "damaged (JSONDecodeError"]),
    ("read_only_out_dir", lambda a, t, m: (_read_only(m), train_argv(a, t))[1],
     ["train.out_dir", "run is not writable: Read-only file system"]),
    ("full_out_dir", lambda a, t, m: (_full_disk(m), train_argv(a, t))[1],
     ["train.out_dir", "0.0 MiB free, but one checkpoint needs about"]),
    ("out_dir_locked", lambda a, t, m: (_locked(t), train_argv(a, t))[1],
     ["is in use by another run", f"pid {os.getpid()} on host {socket.gethostname()}", run_dir.LOCK_FILE]),
    ("generate_missing_prompts", lambda a, t, m: ["generate", "--teacher", str(a["student"]), "--prompts",
                                                   str(t / "p.jsonl"), "--out", str(t / "o.jsonl")],
     ["no such file or directory", "p.jsonl"]),
    ("eval_model_without_name", lambda a, t, m: ["eval", "--model", str(a["student"])], ["--model expects NAME=VALUE"]),
    ("convert_missing_dir", lambda a, t, m: ["convert", "hf-to-flax", "--hf", str(t / "hf_in"), "--out", str(t / "o")],
     ["hf_in", "no such directory"]),
    ("bad_mesh_flag", lambda a, t, m: ["convert", "hf-to-flax", "--hf", str(a["student"]), "--out", str(t / "o"),
                                        "--mesh", "1,x,1"], ["--mesh expects three integers"]),
]


@pytest.mark.parametrize("build,expected", [r[1:] for r in BAD_INPUT], ids=[r[0] for r in BAD_INPUT])
def test_bad_input_exits_2_naming_file_line_and_field(build, expected, assets, tmp_path, monkeypatch, capsys):
    argv = build(assets, tmp_path, monkeypatch)
    code = cli_main([str(x) for x in argv])
    out, err = capsys.readouterr()
    assert code == 2, out + err
    assert "Traceback" not in out + err
    assert err.startswith("error: ") or "\nerror: " in err, err
    for piece in expected:
        assert piece in err, (piece, err)
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before any compute


def test_usage_errors(capsys):
    for argv, expected in [(["--bogus"], "unrecognized arguments: --bogus"), ([], "no command given; choose one of"),
                           (["train", "--bogus"], "unrecognized arguments: --bogus")]:
        with pytest.raises(SystemExit) as exit_info:
            cli_main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and expected in err and "dcd-jax --help" in err, err


def test_debug_shows_the_traceback_and_bugs_keep_theirs(assets, tmp_path, monkeypatch):
    bad = _jsonl(tmp_path, "d.jsonl", [GOOD, '{"prompt":'])
    with pytest.raises(DataError, match="d.jsonl:2"):
        cli_main(["--debug", *inspect_argv(assets, bad)])
    monkeypatch.setenv("DCD_JAX_DEBUG", "1")
    with pytest.raises(DataError, match="d.jsonl:2"):
        cli_main(inspect_argv(assets, bad))
    monkeypatch.delenv("DCD_JAX_DEBUG")
    import dcd_jax.data

    monkeypatch.setattr(dcd_jax.data, "inspect_data", lambda *a, **k: {}["a bug"])
    with pytest.raises(KeyError):  # not a user error: the traceback stays
        cli_main(inspect_argv(assets, _jsonl(tmp_path, "ok.jsonl", [GOOD])))


def test_bom_prefixed_jsonl_loads(assets, tmp_path, capsys):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps({**GOOD, "id": i}).encode() + b"\n" for i in range(3)))
    assert cli_main(inspect_argv(assets, path)) == 0
    assert "3 records read, 3 examples kept" in capsys.readouterr().out


def test_real_process_exit_status_and_no_traceback(assets, tmp_path):
    bad = _jsonl(tmp_path, "d.jsonl", [GOOD, {"prompt": "p", "response": 3}])
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "dcd_jax.cli", *inspect_argv(assets, bad)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "d.jsonl:2: field 'response': must be a string, got int" in proc.stderr


# --------------------------------------------------------------------------- generate restart


class SimulatedKill(BaseException):
    """Raised at a write point: like SIGKILL, no ``except Exception`` clean-up runs."""


@pytest.mark.parametrize("point", ["write", "fsync", "rename"])
def test_kill_at_any_point_of_a_generate_restart_loses_no_finished_trace(point, tmp_path, monkeypatch):
    from dcd_jax.teacher.generate import GenerateConfig, generate_traces

    prompts = _jsonl(tmp_path, "prompts.jsonl", [{"id": f"p{i}", "prompt": f"{i} + 1?", "answer": str(i + 1)} for i in range(4)])
    out = tmp_path / "traces.jsonl"
    finished = [json.dumps({"id": f"p{i}-s0", "source_id": f"p{i}", "response": f"r{i}"}) for i in range(4)]
    # A killed first run: every prompt finished (in .done), plus a trace of an interrupted chunk and a torn line.
    out.write_text("\n".join(finished[:2] + ['{"id": "p9-s0", "source_id": "p9"}'] + finished[2:]) + '\n{"id": "p')
    out.with_name(out.name + ".done").write_text("p0\np1\np2\np3\n")

    def crash(name):
        if name == point:
            raise SimulatedKill(name)

    monkeypatch.setattr(atomic_files, "_crash_point", crash)
    cfg = GenerateConfig(teacher="unused", prompts=str(prompts), out=str(out))
    with pytest.raises(SimulatedKill):
        generate_traces(cfg, progress=False)
    assert set(finished) <= set(out.read_text().splitlines())  # the old file, whole
    monkeypatch.setattr(atomic_files, "_crash_point", lambda name: None)
    stats = generate_traces(cfg, progress=False)  # the rerun: nothing left to generate, nothing lost
    assert stats["skipped_done"] == 4 and stats["traces_in_file"] == 4
    assert out.read_text().splitlines() == finished
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl", "traces.jsonl", "traces.jsonl.done"]


# --------------------------------------------------------------------------- checkpoints and the run lock


@pytest.fixture(scope="module")
def reference(assets, compile_cache, tmp_path_factory):
    """An undisturbed run (in-process, through the CLI): the bitwise target of every faulted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert cli_main(["train", *base_overrides(assets, out, **RUN)]) == 0
    return out


def assert_bitwise_equal_runs(run_a: Path, run_b: Path, step: int = 4) -> None:
    a = RunCheckpointer(run_a / "checkpoints", CheckpointConfig())
    b = RunCheckpointer(run_b / "checkpoints", CheckpointConfig())
    raw_a, raw_b = a.manager.restore(step), b.manager.restore(step)
    for item in ("params", "opt_state"):
        for x, y in zip(jax.tree.leaves(raw_a[item]), jax.tree.leaves(raw_b[item]), strict=True):
            assert np.array_equal(np.asarray(x), np.asarray(y)), item
    assert raw_a["data"] == raw_b["data"]
    a.close(), b.close()
    losses = lambda run: [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
    assert losses(run_a) == losses(run_b)


def _restore_params(step_dir: Path) -> list[np.ndarray] | None:
    """The step's parameter arrays as Orbax alone reads them (no checksums), or None if it cannot."""
    ckpt = RunCheckpointer(step_dir.parent, CheckpointConfig())
    try:
        return [np.asarray(x) for x in jax.tree.leaves(ckpt.manager.restore(int(step_dir.name))["params"])]
    except Exception:  # noqa: BLE001 - any read failure means "unreadable" here
        return None
    finally:
        ckpt.close()


def _damage_params(step_dir: Path) -> None:
    """Same-size damage only the checksums can tell: one flipped bit in the largest parameter data
    file of a step, at the first position from the middle on where Orbax still reads the step
    without complaint and a parameter value changed. (The data is compressed: a flip elsewhere can
    make a chunk undecodable instead, the unreadable case; which positions do depends on the bytes.)"""
    largest = max((f for f in (step_dir / "params").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    original = largest.read_bytes()
    clean = _restore_params(step_dir)
    assert clean is not None
    stride = max(len(original) // 64, 1)
    mtime = largest.stat().st_mtime_ns
    for offset in [*range(len(original) // 2, len(original), stride), *range(0, len(original) // 2, stride)]:
        data = bytearray(original)
        data[offset] ^= 0x40
        largest.write_bytes(bytes(data))
        # A new mtime for every write: TensorStore knows a file's version by (inode, size, mtime), and two
        # same-size writes within one kernel clock tick share an mtime, so a read could be served the
        # previous flip's cached chunk (this test was flaky under load).
        mtime += 1_000_000
        os.utime(largest, ns=(mtime, mtime))
        read = _restore_params(step_dir)
        if read is not None and any(not np.array_equal(a, b) for a, b in zip(read, clean)):
            return
    largest.write_bytes(original)
    raise AssertionError(f"no one-bit flip of {largest} is both readable and visible in the values")


def _drop_data_position(step_dir: Path) -> None:
    for f in (step_dir / "data").glob("process_*"):
        f.unlink()


@pytest.mark.parametrize("damage,why", [(_damage_params, "do not match the checksums"),
                                        (_drop_data_position, "data-position file is missing")],
                         ids=["params_corrupted_same_size", "data_position_deleted"])
def test_unusable_latest_step_falls_back_and_ends_bitwise_equal(damage, why, assets, reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)  # a run that finished step 4 ...
    damage(run / "checkpoints" / "4")  # ... whose latest step was then damaged on disk
    kept = (reference / "metrics.jsonl").read_text().splitlines()[:2]  # steps 3 and 4 must be logged anew
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    assert cli_main(["train", *base_overrides(assets, run, **RUN)]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "WARNING" in line and "/4 is unusable" in line]
    assert len(warnings) == 1 and why in warnings[0], err
    assert "resumed from" in err and "at step 2" in err  # INFO lines are visible
    assert_bitwise_equal_runs(reference, run)
    assert (run / "checkpoints" / "unusable_step_4").is_dir()  # kept aside for inspection, not deleted


def test_non_finite_loss_right_after_a_restore_falls_back(assets, reference, tmp_path, monkeypatch, capsys):
    """A step that restores fine but gives a non-finite loss on the next step (e.g. saved from a state that
    had just diverged) is unusable: the run falls back to the step before (here: none, a fresh start)."""
    import jax.numpy as jnp

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints" / "4")  # the latest step is now 2
    (run / "metrics.jsonl").unlink()
    real_restore, calls = RunCheckpointer.restore, []

    def restore_poisoned_once(self, step, target):
        state, data = real_restore(self, step, target)
        calls.append(step)
        if len(calls) == 1:
            state = {**state, "params": jax.tree.map(lambda x: x * jnp.nan, state["params"])}
        return state, data

    monkeypatch.setattr(RunCheckpointer, "restore", restore_poisoned_once)
    assert cli_main(["train", *base_overrides(assets, run, **RUN)]) == 0
    err = capsys.readouterr().err
    assert calls == [2]
    assert "checkpoint step 2 is unusable (loss nan on the first step after restoring it)" in err, err
    assert_bitwise_equal_runs(reference, run)
    assert (run / "checkpoints" / "unusable_step_2").is_dir()


def test_hf_export_replaces_a_previous_export_whole_and_never_a_users_directory(reference, tmp_path, capsys):
    out = tmp_path / "export"
    for _ in range(2):  # the second export replaces the first (built aside, swapped in)
        assert cli_main(["convert", "flax-to-hf", "--ckpt", str(reference), "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporaries left behind
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert cli_main(["convert", "flax-to-hf", "--ckpt", str(reference), "--out", str(mine)]) == 2
    assert "refusing to replace a directory that holds files of no HF model (notes.txt)" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me"


def test_disk_full_while_saving_is_a_clear_error_and_keeps_the_earlier_steps(assets, reference, tmp_path, monkeypatch,
                                                                               capsys):
    from dcd_jax.train import checkpoint

    real_save, saves = checkpoint.DataStateHandler.save, []

    def save_until_full(self, directory, args):
        saves.append(directory)
        if len(saves) == 2:  # the second checkpoint (step 4) finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return real_save(self, directory, args)

    monkeypatch.setattr(checkpoint.DataStateHandler, "save", save_until_full)
    run = tmp_path / "run"
    assert cli_main(["train", *base_overrides(assets, run, **RUN)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "error: train.out_dir: no space left on device while saving a checkpoint" in err
    ckpt = RunCheckpointer(run / "checkpoints", CheckpointConfig())
    assert ckpt.steps() == [2]
    ckpt.close()
    assert not (run / run_dir.LOCK_FILE).exists()


def _cli_worker(overrides, cache_env, **env):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **cache_env, **{k: str(v) for k, v in env.items()}}
    return subprocess.Popen([sys.executable, str(CLI_WORKER), *overrides], env=env, cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_line(proc, prefix: str, timeout: float = 300) -> list[str]:
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"no {prefix!r} line:\n{''.join(lines)}")


def test_second_run_on_a_live_out_dir_is_refused_and_the_first_is_unharmed(assets, reference, compile_cache, tmp_path):
    run, release = tmp_path / "run", tmp_path / "release"
    first = _cli_worker(base_overrides(assets, run, **RUN), compile_cache, DCD_TEST_PAUSE_AFTER=2, DCD_TEST_RELEASE=release)
    try:
        early = _wait_for_line(first, "PAUSED 2")  # alive, holding the lock, mid-run
        second = subprocess.run([sys.executable, "-m", "dcd_jax.cli", "train", *base_overrides(assets, run, **RUN)],
                                env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
        release.touch()
        rest, _ = first.communicate(timeout=300)
    finally:
        first.kill()
    assert second.returncode == 2, second.stderr
    assert "Traceback" not in second.stderr
    assert f"is in use by another run: pid {first.pid} on host {socket.gethostname()}" in second.stderr
    assert first.returncode == 0, "".join(early) + rest
    assert "INFO dcd_jax.train: data:" in "".join(early)  # the CLI's INFO lines show despite absl
    assert not (run / run_dir.LOCK_FILE).exists()  # released at the end
    assert_bitwise_equal_runs(reference, run)


def test_sigkill_during_a_checkpoint_save_never_leaves_an_unusable_latest_step(assets, reference, compile_cache, tmp_path,
                                                                              capsys):
    run = tmp_path / "run"
    proc = _cli_worker(base_overrides(assets, run, **RUN), compile_cache, DCD_TEST_KILL_IN_SAVE=4)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL and "KILLED IN SAVE 4" in out, out
    ckpt = RunCheckpointer(run / "checkpoints", CheckpointConfig())
    assert ckpt.steps() == [2]  # the step being written is not listed
    ckpt.close()
    assert json.loads((run / run_dir.LOCK_FILE).read_text())["pid"] == proc.pid  # left by the killed run
    assert cli_main(["train", *base_overrides(assets, run, **RUN)]) == 0
    err = capsys.readouterr().err
    assert "breaking the stale lock" in err and f"pid {proc.pid}" in err
    assert "resumed from" in err
    assert_bitwise_equal_runs(reference, run)


def test_locks_from_another_host_need_break_lock(tmp_path, caplog):
    """A lock from another host (shared filesystem) is refused, reported as stale once its heartbeat is
    older than lock_stale_after_s, and taken over only with train.break_lock=true."""
    from dcd_jax.errors import PathError

    lock = tmp_path / run_dir.LOCK_FILE
    lock.write_text(json.dumps({"host": "other-vm", "pid": 7, "started": time.time() - 7200}))
    claim = lambda **kw: run_dir.claim_run_dir(tmp_path, needed_bytes=None, **kw)
    with pytest.raises(PathError, match=r"locked by a run on another host \(in use\): pid 7 on host other-vm") as e:
        claim(stale_after_s=3600, break_lock=False)
    assert "train.break_lock=true" in e.value.hint
    os.utime(lock, (time.time() - 7200,) * 2)  # no heartbeat for two hours
    with pytest.raises(PathError, match=r"\(stale: no sign of life for 7[12]\d\d s\)"):
        claim(stale_after_s=3600, break_lock=False)
    with caplog.at_level("WARNING"):
        mine = claim(stale_after_s=3600, break_lock=True)
    assert any("breaking the stale lock" in r.message and "other-vm" in r.message for r in caplog.records)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    mine.release()
    assert not lock.exists()


def test_a_lock_whose_pid_was_reused_is_stale(tmp_path, caplog):
    """Same host, live pid, but that process started after the lock was taken: the pid was reused by an
    unrelated process, so the holder is gone (Linux /proc start times)."""
    lock = tmp_path / run_dir.LOCK_FILE
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time() - 10**6}))
    with caplog.at_level("WARNING"):
        run_dir.claim_run_dir(tmp_path, needed_bytes=None, stale_after_s=3600, break_lock=False).release()
    assert any("breaking the stale lock" in r.message and "its process is gone" in r.message for r in caplog.records)
