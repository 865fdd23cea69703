"""``dcd-jax plan``: the real train step compiled from abstract shapes (architecture only, no
weights) for cpu:N devices and, when libtpu is installed, for a TPU topology; per-chip parameter
bytes equal the hand-computed sharded size; a config that does not fit is refused with the
smallest change that does."""

import importlib.util
import json
import math

import jax
import pytest

from dcd_jax.cli import main
from dcd_jax.config import ConfigError, load_config
from dcd_jax.train import plan
from dcd_jax.train.config import RunConfig

# The tiny Llama of tests/hf_fixtures.py (GQA, llama3 rope), as a bare config.json: no weights.
ARCH = dict(
    model_type="llama", vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=128,
    tie_word_embeddings=False,
)


def _hand_sharded_param_bytes(fsdp: int) -> int:
    """fp32 params, every matrix split over fsdp along its embed (hidden=48) dimension, norms replicated."""
    d, f, h, kv, hd, v, layers = 48, 80, 4, 2, 12, 96, 2
    embed_split = v * d + d * v  # embedding + untied lm_head
    per_layer_split = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f  # q, k, v, o, gate/up/down
    replicated = layers * 2 * d + d  # two norms per layer + final norm
    assert d % fsdp == 0
    return 4 * ((embed_split + layers * per_layer_split) // fsdp + replicated)


@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("plan")
    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(ARCH))
    path = tmp_path / "run.yaml"
    path.write_text(
        f"base: {plan.ARCHITECTURES_DIR.parent / 'base.yaml'}\n"
        f"model: {{path: {model_dir}, dtype: float32, remat: none}}\n"
        "data: {path: unused.jsonl, seq_len: 128, batch_size: 16, teacher_scores: inline}\n"
        "objective: {loss: ce, weighting: dcd}\n"
        "mesh: {data: 1, fsdp: -1, tensor: 1}\n"
    )
    return path


@pytest.fixture(scope="module")
def cpu_plan(run_config):
    """`dcd-jax plan --topology cpu:4 --json` (output captured by hand: capsys is per test)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["plan", "--config", str(run_config), "--topology", "cpu:4", "--json", "--no-suggest"])
    return rc, json.loads(out.getvalue())["plan"]


def test_cpu_plan_params_and_optimizer_bytes_are_the_sharded_sizes(cpu_plan):
    rc, report = cpu_plan
    assert rc == 0 and report["fits"] and report["chips"] == 4 and report["mesh"]["fsdp"] == 4
    params = _hand_sharded_param_bytes(4)
    assert report["bytes_per_chip"]["params"] == params
    # AdamW: mu and nu shaped and sharded like the params, plus two replicated int32 step counts
    # (Adam's and the learning-rate schedule's).
    assert report["bytes_per_chip"]["opt_state"] == 2 * params + 2 * 4
    assert report["bytes_per_chip"]["argument"] >= params * 3  # the compiled step really takes them
    assert report["bytes_per_chip"]["temp"] > 0 and report["attention"] == "einsum"
    assert report["tokens_per_step"] == 16 * 128


@pytest.mark.parametrize("what", ["sample", "score"])
def test_sampler_and_scorer_plans(run_config, what):
    """The sampler's generate loop and the teacher scorer compile for cpu:2 with the weights split in two."""
    cfg = load_config(RunConfig, run_config, ["eval.max_new_tokens=16", "eval.batch_size=4"])
    report = plan.compile_plan(cfg, plan.topology_target("cpu:2"), what, prompt_len=16)
    assert report.compiled and report.fits and report.bytes_per_chip["params"] == _hand_sharded_param_bytes(2)
    assert report.tokens_per_step == (4 * 16 if what == "sample" else 8 * 128)
    assert report.bytes_per_chip["argument"] >= report.bytes_per_chip["params"]


def test_plan_errors_are_one_line(run_config, capsys):
    assert main(["plan", "--config", str(run_config), "--topology", "v9:2x2"]) == 2
    assert "error: --topology 'v9:2x2'" in capsys.readouterr().err
    assert main(["plan", "--config", str(run_config), "--topology", "cpu:2", "model.path=nobody/nothing"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.path=nobody/nothing") and "nobody--nothing.json" in err


def test_train_refuses_a_config_that_cannot_fit_with_the_change_that_does(run_config, cpu_plan, monkeypatch):
    """The train-time check on a (here simulated) TPU whose HBM is half the config's peak: the
    refusal names the first candidate, in the planner's order, that leaves 10% free."""
    cfg = load_config(RunConfig, run_config)
    chip = plan.ChipSpec("fake", hbm_bytes=0.5 * cpu_plan[1]["peak_bytes"], hbm_bandwidth=1e11, chip_config="default")
    target = plan.Target("fake:4", tuple(jax.devices()[:4]), chip)
    monkeypatch.setattr(plan, "attached_target", lambda: target)
    monkeypatch.setattr(plan.jax, "default_backend", lambda: "tpu")
    tried = []
    with pytest.raises(ConfigError, match="it fits with: ") as refusal:
        plan.check_fits_before_training(cfg, log=tried.append)
    best = tried[-1]
    assert best.headroom >= 0.10 and str(refusal.value).endswith(
        f"it fits with: {' '.join(best.overrides)} (dcd-jax plan shows the details)")
    assert len(tried) > 1 and all(t.headroom < 0.10 for t in tried[:-1])  # the first that fits
    candidates = [plan._override_strings(c) for c in plan.train_candidates(cfg, 4)]
    assert [t.overrides for t in tried] == candidates[:len(tried)]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (pip install -e '.[tpu]')")
def test_tpu_topology_plan_params_bytes_and_splash(run_config):
    """Compiled for a v5e 2x2 slice from this CPU host: splash attention, params split 4 ways."""
    cfg = load_config(RunConfig, run_config)
    report = plan.compile_plan(cfg, plan.topology_target("v5e:2x2"), "train")
    assert report.chips == 4 and report.attention == "splash"
    assert report.bytes_per_chip["params"] == _hand_sharded_param_bytes(4)
    assert report.memory_budget == 15.75 * 2**30 and report.fits
    assert report.roofline_seconds >= report.flops_per_chip / 197e12 > 0
    assert math.isclose(report.flops_per_chip * 4, report.model_flops_per_token * 16 * 128)
