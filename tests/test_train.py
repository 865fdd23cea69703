"""The training engine: exactness across meshes / accumulation / processes, resume, preemption."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from train_fixtures import base_overrides, make_assets

from dcd_jax.config import load_config, to_dict
from dcd_jax.convert import load_model_dir
from dcd_jax.train.checkpoint import CheckpointConfig, RunCheckpointer
from dcd_jax.train.config import RunConfig
from dcd_jax.train.loop import train
from dcd_jax.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("train_worker.py")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


def run(assets, out_dir, **extra):
    cfg = load_config(RunConfig, None, base_overrides(assets, out_dir, **extra))
    return train(cfg), read_metrics(Path(out_dir) / "metrics.jsonl")


def final_params(out_dir):
    return jax.tree.map(np.asarray, load_model_dir(out_dir)[2])


def assert_trees_close(a, b, atol):
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_base_yaml_documents_every_option():
    """configs/base.yaml lists exactly the options of RunConfig, and its values are the defaults."""
    doc = yaml.safe_load((ROOT / "configs" / "base.yaml").read_text())
    defaults = to_dict(RunConfig())

    def keys(tree, prefix=""):
        out = set()
        for k, v in tree.items():
            out.add(prefix + k)
            if isinstance(v, dict) and k != "role_map":
                out |= keys(v, prefix + k + ".")
        return out

    assert keys(doc) == keys(defaults)
    loaded = load_config(RunConfig, ROOT / "configs" / "base.yaml", ["model.path=x", "data.path=y"])
    assert to_dict(loaded) == {**defaults, "model": {**defaults["model"], "path": "x"}, "data": {**defaults["data"], "path": "y"}}


def test_mesh_shapes_give_the_same_loss_trajectory(assets, tmp_path):
    losses = {}
    for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)]:
        d, f, t = shape
        _, rows = run(assets, tmp_path / f"m{d}{f}{t}", **{"train.steps": 5, "mesh.data": d, "mesh.fsdp": f, "mesh.tensor": t})
        losses[shape] = np.array([r["loss"] for r in rows if "loss" in r])
        assert len(losses[shape]) == 5
    ref = losses[(8, 1, 1)]
    assert ref[-1] < ref[0]  # it is training
    for shape, trajectory in losses.items():
        np.testing.assert_allclose(trajectory, ref, atol=1e-5, rtol=0, err_msg=str(shape))


def test_gradient_accumulation_equals_one_big_batch(assets, tmp_path):
    common = {"train.steps": 2, "mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 4}
    one, rows_one = run(assets, tmp_path / "accum1", **common)
    four, rows_four = run(assets, tmp_path / "accum4", **common, **{"train.grad_accum": 4})
    assert [r["tokens"] for r in rows_one] == [r["tokens"] for r in rows_four]  # same rows per step
    np.testing.assert_allclose([r["loss"] for r in rows_one], [r["loss"] for r in rows_four], atol=1e-6, rtol=0)
    assert_trees_close(final_params(tmp_path / "accum1"), final_params(tmp_path / "accum4"), atol=1e-5)


def _unigram_entropy(assets) -> float:
    """Entropy (nats) of the response tokens' frequencies: the best loss without using context."""
    from transformers import AutoTokenizer

    from dcd_jax.data import DataConfig, iter_examples

    tok = AutoTokenizer.from_pretrained(assets["student"])
    ids = np.concatenate([
        np.asarray(ex.input_ids)[np.asarray(ex.response_positions)]
        for ex in iter_examples(DataConfig(path=str(assets["train"]), seq_len=128), tok)
    ])
    p = np.bincount(ids) / len(ids)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_loss_decreases_on_the_embedded_task(assets, tmp_path):
    result, rows = run(assets, tmp_path / "learn", **{"train.steps": 40, "checkpoint.every_steps": 100})
    losses = [r["loss"] for r in rows]
    # Start: ~uniform over the vocabulary (log 512 = 6.2 nats). The bar: beat the unigram entropy
    # of the responses, i.e. predict tokens from their context, not just their frequencies.
    assert losses[0] > 5.0
    assert np.mean(losses[-5:]) < _unigram_entropy(assets), losses
    assert result.status == "completed" and result.step == 40
    assert rows[-1]["tokens_per_second"] > 0 and rows[-1]["grad_norm"] > 0


def test_on_a_tpu_the_step_is_compiled_once_by_the_memory_check(assets, tmp_path, monkeypatch):
    """On a (simulated) TPU, the pre-training memory check compiles the step for the attached
    chips; the run then calls that executable rather than jitting the step a second time, and
    trains as the jitted step does: the same losses, and final weights equal up to float rounding
    (the ahead-of-time compile may order a few reductions differently: 1 ulp, measured)."""
    from dcd_jax.train import loop, plan

    extra = {"train.steps": 3, "checkpoint.every_steps": 100, "model.attention": "einsum"}
    _, jitted_rows = run(assets, tmp_path / "jit", **extra)
    chip = plan.ChipSpec("fake", hbm_bytes=64 * 2**30, hbm_bandwidth=1e11, chip_config="default")
    monkeypatch.setattr(plan, "attached_target", lambda: plan.Target("fake:8", tuple(jax.devices()[:8]), chip))
    monkeypatch.setattr(plan.jax, "default_backend", lambda: "tpu")

    def second_compile(*a, **kw):
        raise AssertionError("the run jitted the step again instead of using the plan's executable")

    monkeypatch.setattr(loop, "jit_train_step", second_compile)
    result, rows = run(assets, tmp_path / "planned", **extra)
    assert result.status == "completed" and result.step == 3
    assert [r["loss"] for r in rows] == [r["loss"] for r in jitted_rows]
    assert_trees_close(final_params(tmp_path / "planned"), final_params(tmp_path / "jit"), atol=1e-6)


def _worker(kill_at, overrides, env_extra=None, **popen):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(kill_at), *overrides], env=env, cwd=str(ROOT),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen,
    )


def test_resume_after_sigkill_is_bitwise_identical(assets, tmp_path):
    n = 3
    common = {"train.steps": 2 * n, "checkpoint.every_steps": n}
    straight, _ = run(assets, tmp_path / "straight", **common)
    resumed_dir = tmp_path / "killed"
    proc = _worker(n, base_overrides(assets, resumed_dir, **common))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out
    ckpt = RunCheckpointer(resumed_dir / "checkpoints", CheckpointConfig())
    assert ckpt.steps() == [n]
    ckpt.close()
    result, _ = run(assets, resumed_dir, **common)  # same out_dir: resumes at step n
    assert result.step == 2 * n
    rows = read_metrics(resumed_dir / "metrics.jsonl")
    straight_rows = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight_rows]  # bitwise, every step
    a = RunCheckpointer(tmp_path / "straight" / "checkpoints", CheckpointConfig())
    b = RunCheckpointer(resumed_dir / "checkpoints", CheckpointConfig())
    template = {"params": final_params(tmp_path / "straight")}
    for m in (a, b):
        assert m.steps()[-1] == 2 * n
    raw_a = a.manager.restore(2 * n)
    raw_b = b.manager.restore(2 * n)
    for item in ("params", "opt_state"):
        for x, y in zip(jax.tree.leaves(raw_a[item]), jax.tree.leaves(raw_b[item])):
            assert np.array_equal(np.asarray(x), np.asarray(y)), item
    assert raw_a["data"] == raw_b["data"]  # the data position too: the next batch is the same
    a.close(), b.close()
    del template


def test_sigterm_saves_at_a_step_boundary_and_exits_zero(assets, tmp_path):
    out_dir = tmp_path / "preempt"
    proc = _worker(-1, base_overrides(assets, out_dir, **{"train.steps": 100000, "checkpoint.every_steps": 100000}))
    metrics = out_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "RESULT preempted" in out
    ckpt = RunCheckpointer(out_dir / "checkpoints", CheckpointConfig())
    steps = ckpt.steps()
    ckpt.close()
    assert len(steps) == 1 and 3 <= steps[0] < 100000
    logged = [r["step"] for r in read_metrics(metrics)]
    assert steps[0] == logged[-1]  # the checkpoint is the last completed step


def test_corrupt_latest_checkpoint_is_skipped(assets, tmp_path, caplog):
    out_dir = tmp_path / "corrupt"
    run(assets, out_dir, **{"train.steps": 4, "checkpoint.every_steps": 2})
    ckpt_dir = out_dir / "checkpoints"
    # Damage step 4: remove the array data of its params.
    for f in (ckpt_dir / "4" / "params").rglob("*"):
        if f.is_file() and f.name != "_CHECKPOINT_METADATA":
            f.write_bytes(b"")
    cfg = load_config(RunConfig, None, base_overrides(assets, out_dir, **{"train.steps": 6, "checkpoint.every_steps": 2}))
    with caplog.at_level("WARNING"):
        result = train(cfg)
    assert any("checkpoint" in r.message and "unreadable" in r.message for r in caplog.records)
    rows = read_metrics(out_dir / "metrics.jsonl")
    assert result.step == 6
    # Resumed from step 2: steps 3 and 4 were trained again.
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_two_processes_equal_one_process(assets, tmp_path):
    """2 processes x 4 CPU devices (jax.distributed, local coordinator) == 1 process x 8 devices."""
    common = {"train.steps": 3, "data.packing": "false", "data.shuffle": "false", "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    single_dir = tmp_path / "single"
    run(assets, single_dir, **common)
    multi_dir = tmp_path / "multi"
    import portpicker

    port = portpicker.pick_unused_port()
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "DCD_COORDINATOR_ADDRESS": f"localhost:{port}",
           "DCD_NUM_PROCESSES": "2", "DCD_CPU_COLLECTIVES": "1"}
    procs = [
        _worker(-1, base_overrides(assets, multi_dir, **common), {**env, "DCD_PROCESS_ID": str(i)})
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    single_rows = read_metrics(single_dir / "metrics.jsonl")
    multi_rows = read_metrics(multi_dir / "metrics.jsonl")
    np.testing.assert_allclose([r["loss"] for r in multi_rows], [r["loss"] for r in single_rows], atol=1e-5, rtol=0)
    assert_trees_close(final_params(multi_dir), final_params(single_dir), atol=1e-5)


@pytest.mark.parametrize("model_config", ["qwen2.5-0.5b-dcd.yaml", "qwen2.5-1.5b-dcd.yaml", "llama3.2-1b-dcd.yaml", "demo.yaml"])
@pytest.mark.parametrize("objective", [None, "sft", "kl", "dft", "iw_sft", "todi", "dcd", "dcd_kl"])
def test_ready_configs_load_with_every_baseline(model_config, objective):
    files = [ROOT / "configs" / model_config] + ([ROOT / "configs" / "objectives" / f"{objective}.yaml"] if objective else [])
    cfg = load_config(RunConfig, files)
    assert cfg.model.path and cfg.data.path
    if objective in ("kl", "todi", "dcd_kl"):
        assert cfg.objective.loss == ("todi" if objective == "todi" else "kl") and cfg.data.topk > 0
    if objective is not None:
        expected = {"sft": "none", "kl": "none", "dft": "dft", "iw_sft": "iw_sft", "todi": "none", "dcd": "dcd",
                    "dcd_kl": "dcd"}
        assert cfg.objective.weighting == expected[objective]


@pytest.mark.parametrize("model_config", ["qwen2.5-0.5b-dcd.yaml", "qwen2.5-1.5b-dcd.yaml", "llama3.2-1b-dcd.yaml", "demo.yaml"])
def test_ready_configs_use_the_default_recipe(model_config):
    """The ready configs and the demo's config train the study's pick (docs/objectives.md), the recipe the
    demo trains beside SFT: its objective, and `dcd-jax data select` first when it selects traces."""
    from dcd_jax.demo import DEFAULT_RECIPE

    cfg = load_config(RunConfig, [ROOT / "configs" / model_config])
    assert cfg.objective.loss == "ce" and cfg.objective.weighting == DEFAULT_RECIPE.objective["weighting"]
    main = (ROOT / "configs" / "qwen2.5-1.5b-dcd.yaml").read_text()
    if DEFAULT_RECIPE.keep_fraction:
        assert f"--keep-fraction {DEFAULT_RECIPE.keep_fraction}" in main
        assert "train_selected.jsonl" in (ROOT / "configs" / "demo.yaml").read_text()


def test_local_multiprocess_launcher(tmp_path):
    probe = (
        "from dcd_jax.distributed import DistributedConfig, initialize_distributed; import jax; "
        "initialize_distributed(DistributedConfig()); "
        "print('PROBE', jax.process_index(), jax.process_count(), jax.device_count(), jax.local_device_count())"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "local_multiprocess.sh"), "-n", "2", "-d", "4", "--", sys.executable, "-c", probe],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    logs = sorted((tmp_path / "launch_logs").glob("process_*.log"))
    probes = sorted(line for f in logs for line in f.read_text().splitlines() if line.startswith("PROBE"))
    assert probes == ["PROBE 0 2 8 4", "PROBE 1 2 8 4"]


def test_resume_onto_a_different_mesh(assets, tmp_path):
    """Checkpoints restore onto the current mesh, whatever mesh saved them."""
    _, straight = run(assets, tmp_path / "straight", **{"train.steps": 4, "checkpoint.every_steps": 2})
    out = tmp_path / "remesh"
    run(assets, out, **{"train.steps": 2, "checkpoint.every_steps": 2})
    result, rows = run(assets, out, **{"train.steps": 4, "checkpoint.every_steps": 2,
                                        "mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2})
    assert result.step == 4
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in straight], atol=1e-5, rtol=0)


def test_restoring_with_another_process_count_is_refused_clearly(tmp_path):
    from dcd_jax.config import ConfigError
    from dcd_jax.train.checkpoint import DataStateHandler

    (tmp_path / "process_0-of-2.json").write_text("{}")
    (tmp_path / "process_1-of-2.json").write_text("{}")
    from etils import epath

    with pytest.raises(ConfigError, match=r"saved by 2 process\(es\) but this run has 1"):
        DataStateHandler().restore(epath.Path(tmp_path))


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(assets, tmp_path, monkeypatch):
    import jax.numpy as jnp

    from dcd_jax.train import step
    from dcd_jax.train.loop import NonFiniteLossError

    real = step.make_train_step  # what jit_train_step wraps for the loop

    def poisoned(*args, **kwargs):
        step_fn = real(*args, **kwargs)

        def wrapped(state, batch):
            new_state, metrics = step_fn(state, batch)
            bad = state["step"] >= 2  # the third step diverges
            metrics = {**metrics, "loss": jnp.where(bad, jnp.nan, metrics["loss"])}
            return new_state, metrics

        return wrapped

    monkeypatch.setattr(step, "make_train_step", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3.*last good checkpoint \(2\)"):
        run(assets, out, **{"train.steps": 6, "checkpoint.every_steps": 1})
    ckpt = RunCheckpointer(out / "checkpoints", CheckpointConfig())
    assert ckpt.steps()[-1] == 2
    ckpt.close()


def test_periodic_eval_hook_logs_and_keeps_the_best_checkpoint(assets, tmp_path):
    from dcd_jax.eval.runner import train_eval_hook
    from dcd_jax.train.loop import TrainHooks

    scores = iter([0.5, 0.25, 0.125])  # eval at steps 2, 4, 6: the best is the first
    real_hook = None

    def hook(ctx):
        metrics = real_hook(ctx)
        assert "eval/embedded/pass@1" in metrics and 0.0 <= metrics["eval/embedded/pass@1"] <= 1.0
        return {**metrics, "eval/score": next(scores)}

    cfg = load_config(RunConfig, None, base_overrides(assets, tmp_path / "evalrun", **{
        "train.steps": 6, "checkpoint.every_steps": 100, "checkpoint.keep": 1, "checkpoint.best_metric": "eval/score",
        "eval.every_steps": 2, "eval.path": assets["train"], "eval.limit": 4, "eval.max_new_tokens": 4,
        "eval.batch_size": 8, "eval.benchmark": "embedded",
    }))
    real_hook = train_eval_hook(cfg.eval, cfg.data, cfg.train.out_dir)
    train(cfg, TrainHooks(evaluate=hook))
    rows = read_metrics(tmp_path / "evalrun" / "metrics.jsonl")
    assert [r["step"] for r in rows if "eval/score" in r] == [2, 4, 6]
    # each evaluation's outputs are kept: the logged pass@1 is their share graded correct
    saved = sorted(p.name for p in (tmp_path / "evalrun" / "eval_results").iterdir())
    assert saved == ["step_0000002", "step_0000004", "step_0000006"]
    for r in rows:
        if "eval/score" in r:
            folder = tmp_path / "evalrun" / "eval_results" / f"step_{r['step']:07d}"
            records = [json.loads(line) for line in (folder / "generations" / "embedded.jsonl").open()]
            assert len(records) == 4 and all(isinstance(x["response"], str) for x in records)
            assert np.mean([x["correct"] for x in records]) == pytest.approx(r["eval/embedded/pass@1"])
            assert json.loads((folder / "summary.json").read_text())["step"] == r["step"]
    ckpt = RunCheckpointer(tmp_path / "evalrun" / "checkpoints", CheckpointConfig())
    assert ckpt.steps() == [2, 6]  # the best (step 2) plus the latest
    ckpt.close()
