"""Runs that live in a bucket: every ``gs://`` path against a GCS API server on loopback.

The server is ``gcp-storage-emulator`` (``tests/gcs_emulator.py`` adds the generation preconditions
real GCS enforces); gcsfs reaches it through ``STORAGE_EMULATOR_HOST``, Orbax / TensorStore through
``TENSORSTORE_GCS_HTTP_URL``, both anonymously. Nothing here leaves 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import pytest

from train_fixtures import base_overrides, make_assets

from dcd_jax import atomic_files, storage
from dcd_jax.config import load_config
from dcd_jax.train import run_dir
from dcd_jax.train.checkpoint import CheckpointConfig, RunCheckpointer
from dcd_jax.train.config import RunConfig
from dcd_jax.train.loop import train
from dcd_jax.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "dcd-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator on a free loopback port, and the environment that points every client at it."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("gcs") / "emulator.log", "w")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("gcs_emulator.py")), str(port), BUCKET],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    assert proc.stdout.readline().startswith("READY"), "the GCS emulator did not start"
    url = f"http://127.0.0.1:{port}"
    env = {
        "STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "anonymous",  # TensorStore: a fixed token, no credential lookup
        "FSSPEC_GS_TOKEN": "anon", "FSSPEC_GCS_TOKEN": "anon",  # gcsfs in the subprocesses: anonymous
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no gRPC probe of the bucket type
        "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9", "GCE_METADATA_ROOT": "127.0.0.1:9",
        "NO_GCE_CHECK": "True",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec

    fsspec.config.conf.update({"gs": {"token": "anon"}, "gcs": {"token": "anon"}})
    fsspec.filesystem("gs").clear_instance_cache()
    try:
        yield f"gs://{BUCKET}"
    finally:
        proc.kill()
        proc.wait()
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for k in ("gs", "gcs"):
            fsspec.config.conf.pop(k, None)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"), n_examples=200)


def _overrides(assets, out_dir, **extra):
    # Data parallel only: the smallest programs to compile; what is tested here is the storage.
    return base_overrides(assets, out_dir, **{"mesh.data": -1, "mesh.fsdp": 1, "mesh.tensor": 1, **extra})


# --------------------------------------------------------------------------- the lock


def test_gcs_lock_create_is_compare_and_swap(gcs):
    """Of starters racing for one lock object, exactly one wins (``ifGenerationMatch=0``), and a
    delete at a stale generation leaves the new holder's lock alone."""
    name = f"{gcs}/race/{run_dir.LOCK_FILE}"
    for attempt in range(4):
        wins, barrier = [], threading.Barrier(3)

        def starter(i):
            barrier.wait()
            try:
                wins.append((i, storage.create_exclusive(name, json.dumps({"i": i}).encode())))
            except FileExistsError:
                pass

        threads = [threading.Thread(target=starter, args=(i,)) for i in range(3)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert len(wins) == 1, f"attempt {attempt}: {len(wins)} starters took the lock"
        (winner, generation), = wins
        assert json.loads(storage.read_versioned(name)[0]) == {"i": winner}
        assert storage.delete_if(name, generation)
    first = storage.create_exclusive(name, b"old")
    assert storage.delete_if(name, first)
    second = storage.create_exclusive(name, b"new")
    assert not storage.delete_if(name, first)  # a breaker that judged the old lock stale
    assert storage.read_versioned(name)[0] == b"new"
    with pytest.raises(FileExistsError):
        storage.rewrite_if(name, b"heartbeat", first)  # the old holder's heartbeat notices
    assert storage.delete_if(name, second)


def test_gcs_second_run_on_a_bucket_out_dir_is_refused(gcs, assets):
    """A live run holds ``gs://.../run``: ``dcd-jax train`` on it exits 2 with the one-line lock
    error, before loading anything, and leaves the holder's lock in place."""
    out = f"{gcs}/two-runs"
    holder = run_dir.claim_run_dir(out, needed_bytes=None, stale_after_s=3600, break_lock=False)
    try:
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
        # One step: if the lock failed to refuse, the test still ends quickly (and fails).
        proc = subprocess.run([sys.executable, "-m", "dcd_jax.cli", "train", *_overrides(assets, out, **{"train.steps": 1})],
                              env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "is in use by another run" in errors[0] and f"pid {os.getpid()}" in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr
        content, version, _ = storage.read_versioned(f"{out}/{run_dir.LOCK_FILE}")
        assert json.loads(content)["pid"] == os.getpid()
    finally:
        holder.release()
    assert not storage.exists(f"{out}/{run_dir.LOCK_FILE}")  # released: the generation was still ours


# --------------------------------------------------------------------------- atomic writes


def test_gcs_atomic_writes_leave_the_old_or_the_new(gcs, monkeypatch, tmp_path):
    """A kill (simulated at each crash point) while replacing a file or an export directory in the
    bucket leaves the previous content readable, whole; without the kill the new content is there."""
    name = f"{gcs}/atomic/summary.json"
    atomic_files.atomic_write_text(name, "old")
    for point in ("write", "fsync", "rename"):
        def crash(at, point=point):
            if at == point:
                raise KeyboardInterrupt(point)

        monkeypatch.setattr(atomic_files, "_crash_point", crash)
        with pytest.raises(KeyboardInterrupt):
            atomic_files.atomic_write_text(name, "new " * 1000)
        assert storage.path(name).read_text() == "old", point
    monkeypatch.setattr(atomic_files, "_crash_point", lambda at: None)
    atomic_files.atomic_write_text(name, "new")
    assert storage.path(name).read_text() == "new"

    export = f"{gcs}/atomic/export"
    with atomic_files.atomic_directory(export) as d:
        (d / "a.json").write_text("1")
        (d / "b.json").write_text("1")
    monkeypatch.setattr(atomic_files, "_crash_point", lambda at: (_ for _ in ()).throw(KeyboardInterrupt(at)))
    with pytest.raises(KeyboardInterrupt):
        with atomic_files.atomic_directory(export) as d:
            (d / "a.json").write_text("2")
    assert sorted(storage.list_names(export)) == ["a.json", "b.json"]
    assert storage.path(f"{export}/a.json").read_text() == "1"
    monkeypatch.setattr(atomic_files, "_crash_point", lambda at: None)
    with atomic_files.atomic_directory(export) as d:
        (d / "a.json").write_text("2")
    assert storage.list_names(export) == ["a.json"]  # the old export's other files went with it
    assert storage.path(f"{export}/a.json").read_text() == "2"


# --------------------------------------------------------------------------- data


def test_gcs_streamed_data_equals_local_batches(gcs, assets):
    """``data.path`` in a bucket, streamed block by block, gives the very batches of the local file,
    for each host's share; read whole (not streamed), the very records."""
    from dcd_jax.data import build_train_iterator
    from dcd_jax.data.records import read_raw_records
    from dcd_jax.data.synthetic import build_tokenizer

    remote = f"{gcs}/data/train.jsonl"
    storage.upload_file(assets["train"], remote)
    tokenizer = build_tokenizer()
    cfg = load_config(RunConfig, None, _overrides(assets, "unused", **{"data.streaming": "true", "data.block_records": 32}))
    whole = lambda path: [(i, loc.line, rec) for i, loc, rec in
                          read_raw_records(dataclasses.replace(cfg.data, path=path), process_index=1, process_count=2)]
    assert whole(remote) == whole(str(assets["train"])) and len(whole(remote)) == 100
    for pid in range(2):
        local = build_train_iterator(cfg.data, tokenizer, process_index=pid, process_count=2)
        bucket = build_train_iterator(dataclasses.replace(cfg.data, path=remote), tokenizer,
                                      process_index=pid, process_count=2)
        for _ in range(3):
            a, b = next(local), next(bucket)
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


# --------------------------------------------------------------------------- HF export


def test_gcs_hf_export_reloads_bitwise(gcs, assets):
    """``save_hf`` into the bucket, then ``load_pretrained`` of that URL: the same weights."""
    from dcd_jax.convert import save_hf
    from dcd_jax.convert.model_dir import load_pretrained

    local = load_pretrained(str(assets["student"]))
    out = f"{gcs}/export/hf"
    save_hf(local.params, local.cfg, local.hf_config, out, side_files_from=local.files_dir)
    assert {"config.json", "model.safetensors.index.json"} <= set(storage.list_names(out))
    again = load_pretrained(out)
    assert again.cfg == local.cfg
    for x, y in zip(jax.tree.leaves(local.params), jax.tree.leaves(again.params)):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert again.tokenizer()("2+2").input_ids == local.tokenizer()("2+2").input_ids


# --------------------------------------------------------------------------- the guide's commands


def test_gcs_guide_commands_read_and_write_the_bucket(gcs, assets, tmp_path, capsys):
    """The TPU guide's commands with their models, data and outputs in the bucket: ``convert`` both
    ways (the export reloads bitwise), ``score-teacher`` (equal to the local run's scores; streamed
    batches with bucket teacher scores equal the local batches), ``data select`` (the top half by the
    log-ratios it reports), ``generate`` (a rerun resumes it: nothing generated twice) and
    ``eval --out``."""
    from dcd_jax.cli import main as cli_main
    from dcd_jax.convert.model_dir import load_pretrained
    from dcd_jax.data import build_train_iterator
    from dcd_jax.data.synthetic import build_tokenizer
    from dcd_jax.eval.weight_diagnostics import read_logprobs
    from dcd_jax.teacher.selection import select_by_log_ratio

    root = f"{gcs}/guide"
    lines = assets["train"].read_text().splitlines()[:40]  # small: each command compiles its own program
    local_traces = tmp_path / "traces.jsonl"
    local_traces.write_text("\n".join(lines) + "\n")
    traces, student = f"{root}/data/traces.jsonl", f"{root}/models/student"
    storage.upload_file(local_traces, traces)
    storage.upload_tree(assets["student"], student)

    # convert: HF in the bucket -> dcd-jax model dir in the bucket -> HF in the bucket, reloaded bitwise
    assert cli_main(["convert", "hf-to-flax", "--hf", student, "--out", f"{root}/models/flax"]) == 0
    assert cli_main(["convert", "flax-to-hf", "--ckpt", f"{root}/models/flax", "--out", f"{root}/models/back"]) == 0
    original, back = load_pretrained(str(assets["student"])), load_pretrained(f"{root}/models/back")
    for x, y in zip(jax.tree.leaves(original.params), jax.tree.leaves(back.params)):
        assert np.array_equal(np.asarray(x), np.asarray(y))

    # score-teacher: bucket model and data in, bucket Parquet out; the local run's very scores
    scores, local_scores = f"{root}/data/traces.teacher.parquet", tmp_path / "traces.teacher.parquet"
    for teacher, data, out in ((student, traces, scores), (assets["student"], local_traces, local_scores)):
        assert cli_main(["score-teacher", "--teacher", str(teacher), "--topk", "4", "--out", str(out),
                         f"data.path={data}"]) == 0
    remote_lp, local_lp = read_logprobs(scores), read_logprobs(local_scores)
    assert remote_lp.keys() == local_lp.keys() and len(remote_lp) == 40
    assert all(np.array_equal(remote_lp[k], local_lp[k]) for k in remote_lp)
    cfg = load_config(RunConfig, None, _overrides(assets, "unused", **{"data.topk": 4, "data.teacher_scores": local_scores}))
    for pid in range(2):
        batches = [build_train_iterator(dataclasses.replace(cfg.data, path=str(p), teacher_scores=str(t)),
                                        build_tokenizer(), process_index=pid, process_count=2)
                   for p, t in ((traces, scores), (local_traces, local_scores))]
        a, b = next(batches[0]), next(batches[1])
        assert a.keys() == b.keys() and any(k.startswith("teacher") for k in a)
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)

    # data select: the kept half, read and written in the bucket
    selected = f"{root}/data/traces.selected.jsonl"
    assert cli_main(["data", "select", f"model.path={student}", f"data.path={traces}", f"data.teacher_scores={scores}",
                     "--keep-fraction", "0.5", "--out", selected]) == 0
    kept = storage.path(selected).read_text().splitlines()
    report = json.loads(storage.path(f"{selected}.selection.json").read_text())
    assert report["kept"] == len(kept) == 20 and set(kept) <= set(lines)
    assert {json.loads(line)["id"] for line in kept} == set(select_by_log_ratio(report["log_ratios"], keep_fraction=0.5))

    # generate: the traces file in the bucket; a rerun finds every prompt done
    generated = f"{root}/data/generated.jsonl"
    generate = ["generate", "--teacher", student, "--prompts", str(local_traces), "--limit", "3", "--keep", "all",
                "--temperature", "0", "--max-new-tokens", "8", "--batch-size", "4", "--out", generated]
    assert cli_main(generate) == 0
    first = storage.path(generated).read_text()
    assert len(first.splitlines()) == 3
    capsys.readouterr()
    assert cli_main(generate) == 0
    assert "(3 already done)" in capsys.readouterr().out and storage.path(generated).read_text() == first

    # eval --out in the bucket
    assert cli_main(["eval", "--model", f"s={student}", "--benchmarks", "embedded", "--path", f"embedded={local_traces}",
                     "--limit", "3", "--max-new-tokens", "8", "--batch-size", "4", "--out", f"{root}/eval"]) == 0
    summary = json.loads(storage.path(f"{root}/eval/summary.json").read_text())
    assert summary["results"]["s"]["embedded"]["n_items"] == 3
    assert "embedded.jsonl" in storage.list_names(f"{root}/eval/generations/s/generations")


def test_gcs_killed_score_teacher_resumes_to_the_same_file(gcs, assets, tmp_path, monkeypatch):
    """``score-teacher`` with its output in the bucket, killed after two finished parts: the rerun keeps
    them (one object each under ``<out>.parts/``) and ends with the bytes of an undisturbed local run."""
    from dcd_jax.data import DataConfig
    from dcd_jax.teacher import scoring
    from dcd_jax.teacher.scoring import ScoreConfig, score_teacher

    data = DataConfig(path=str(assets["train"]), seq_len=256, max_records=20)
    cfg = ScoreConfig(teacher=str(assets["student"]), topk=3, batch_size=4, chunk_examples=4, chunk_size=32)
    written, real_write, kill_after = [], scoring._atomic_write, [None]

    def counted_write(path, rows, provenance):
        if len(written) == kill_after[0]:
            raise KeyboardInterrupt("killed")  # the process dies after that many finished parts
        real_write(path, rows, provenance)
        written.append(path)

    monkeypatch.setattr(scoring, "_atomic_write", counted_write)
    straight = score_teacher(data, dataclasses.replace(cfg, out=str(tmp_path / "s.parquet")), progress=False)
    parts = len(written)
    assert parts >= 3
    written.clear()
    kill_after[0] = 2
    target = f"{gcs}/scores/s.parquet"
    with pytest.raises(KeyboardInterrupt):
        score_teacher(data, dataclasses.replace(cfg, out=target), progress=False)
    assert not storage.exists(target)
    assert len([n for n in storage.list_names(f"{target}.parts") if n.endswith(".parquet")]) == 2
    written.clear()
    kill_after[0] = None
    resumed = score_teacher(data, dataclasses.replace(cfg, out=target), progress=False)
    assert len(written) == parts - 2  # only the parts the killed run had not finished are scored again
    assert storage.path(str(resumed)).read_bytes() == straight.read_bytes()
    assert not storage.exists(f"{target}.parts")


# --------------------------------------------------------------------------- train: kill and resume


@pytest.mark.slow
def test_gcs_train_killed_and_resumed_is_bitwise_identical(gcs, assets, tmp_path):
    """``train.out_dir=gs://...``: SIGKILLed right after step n's checkpoint, rerun, it ends bitwise
    equal (every logged loss, params, optimizer state, data position) to an undisturbed local run."""
    n = 1
    common = {"train.steps": 2 * n, "checkpoint.every_steps": n, "train.tensorboard": "true"}
    straight = tmp_path / "straight"
    train(load_config(RunConfig, None, _overrides(assets, straight, **common)))
    out = f"{gcs}/killed"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("train_worker.py")), str(n),
                           *_overrides(assets, out, **common)], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    ckpt = RunCheckpointer(f"{out}/checkpoints", CheckpointConfig())
    assert ckpt.steps() == [n]
    ckpt.close()
    assert json.loads(storage.path(f"{out}/{run_dir.LOCK_FILE}").read_text())["host"] == socket.gethostname()

    result = train(load_config(RunConfig, None, _overrides(assets, out, **common)))  # takes over the dead run's lock
    assert result.step == 2 * n
    rows, straight_rows = read_metrics(f"{out}/metrics.jsonl"), read_metrics(straight / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 2 * n + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight_rows]
    a = RunCheckpointer(straight / "checkpoints", CheckpointConfig())
    b = RunCheckpointer(f"{out}/checkpoints", CheckpointConfig())
    raw_a, raw_b = a.manager.restore(2 * n), b.manager.restore(2 * n)
    for item in ("params", "opt_state"):
        for x, y in zip(jax.tree.leaves(raw_a[item]), jax.tree.leaves(raw_b[item])):
            assert np.array_equal(np.asarray(x), np.asarray(y)), item
    assert raw_a["data"] == raw_b["data"]
    assert raw_a["meta"]["checksums"] == raw_b["meta"]["checksums"]
    a.close(), b.close()
    names = storage.list_names(out)
    assert {"config.yaml", "model.json", "hf", "checkpoints", "metrics.jsonl", "tensorboard"} <= set(names), names
    assert run_dir.LOCK_FILE not in names  # released at the end
