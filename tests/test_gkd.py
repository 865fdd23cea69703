"""Online GKD: the generalized JSD (float64 reference, gradient), its equality with full-vocabulary
KD at beta=0, student rollouts on a sharded mesh."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcd_jax.objectives.gkd import generalized_jsd_chunked, generalized_jsd_loss

B, T, V, TRUE_V, D_S, D_T = 2, 11, 24, 21, 8, 12


def _np_log_softmax(z):
    z = z[..., :TRUE_V]
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_kl(log_a, log_b):
    return (np.exp(log_a) * (log_a - log_b)).sum(-1)


def np_generalized_jsd(student_logits, teacher_logits, beta):
    """float64 reference, straight from the definition (module docstring of objectives.gkd)."""
    s, t = _np_log_softmax(student_logits.astype(np.float64)), _np_log_softmax(teacher_logits.astype(np.float64))
    if beta == 0:
        return _np_kl(t, s)
    if beta == 1:
        return _np_kl(s, t)
    m = np.log(beta * np.exp(t) + (1 - beta) * np.exp(s))
    return beta * _np_kl(t, m) + (1 - beta) * _np_kl(s, m)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    hs = rng.normal(size=(B, T, D_S)).astype(np.float32)
    ws = rng.normal(size=(D_S, V)).astype(np.float32)
    ht = rng.normal(size=(B, T, D_T)).astype(np.float32)
    wt = rng.normal(size=(D_T, V + 3)).astype(np.float32)  # the teacher has more padding columns
    targets = rng.integers(0, TRUE_V, size=(B, T))
    # Packing: row 0 holds two traces and padding, row 1 one trace; the prompt tokens are masked.
    segment_ids = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0], [1] * T])
    loss_mask = np.array([[0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0]], np.float32)
    return hs, ws, ht, wt, targets, segment_ids, loss_mask


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_generalized_jsd_matches_float64_reference_with_masks(inputs, beta):
    hs, ws, ht, wt, targets, segment_ids, loss_mask = inputs
    ref = np_generalized_jsd(hs.astype(np.float64) @ ws, ht.astype(np.float64) @ wt, beta)
    valid = (segment_ids > 0) & (loss_mask > 0)
    stats = generalized_jsd_chunked(hs, ws, ht, wt, targets, beta=beta, true_vocab_size=TRUE_V, chunk_size=4)
    np.testing.assert_allclose(np.asarray(stats.jsd), ref, rtol=2e-5, atol=2e-6)
    loss_sum, denominator = generalized_jsd_loss(
        hs, ws, ht, wt, targets, loss_mask, segment_ids, beta=beta, true_vocab_size=TRUE_V, chunk_size=4
    )
    assert float(denominator) == valid.sum() == 12  # loss_mask 1 on padding (segment 0) does not count
    np.testing.assert_allclose(float(loss_sum), ref[valid].sum(), rtol=2e-5)
    assert (ref[valid] > 1e-3).all()  # a real divergence, not a trivially small one
    s_ref = _np_log_softmax(hs.astype(np.float64) @ ws)
    np.testing.assert_allclose(np.asarray(stats.student_target_logprobs), np.take_along_axis(s_ref, targets[..., None], -1)[..., 0], rtol=1e-5)


@pytest.mark.parametrize("beta", [0.3, 1.0])  # beta = 0: against full-vocabulary KD below
def test_generalized_jsd_gradient_equals_autodiff_of_the_full_logits(inputs, beta):
    """The chunked custom VJP against plain autodiff of the unchunked definition; masked positions get none."""
    hs, ws, ht, wt, targets, segment_ids, loss_mask = inputs
    valid = (segment_ids > 0) & (loss_mask > 0)

    def reference(hs, ws):
        s = jax.nn.log_softmax((hs @ ws)[..., :TRUE_V])
        t = jax.nn.log_softmax((ht @ wt)[..., :TRUE_V])
        kl = lambda a, b: jnp.sum(jnp.exp(a) * (a - b), -1)
        if beta == 0:
            jsd = kl(t, s)
        elif beta == 1:
            jsd = kl(s, t)
        else:
            m = jnp.log(beta * jnp.exp(t) + (1 - beta) * jnp.exp(s))
            jsd = beta * kl(t, m) + (1 - beta) * kl(s, m)
        return jnp.sum(jnp.where(valid, jsd, 0.0))

    def chunked(hs, ws):
        return generalized_jsd_loss(hs, ws, ht, wt, targets, loss_mask, segment_ids, beta=beta,
                                   true_vocab_size=TRUE_V, chunk_size=3)[0]

    g_ref = jax.grad(reference, argnums=(0, 1))(hs, ws)
    g = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hs, ws)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)  # fp32 vs fp32, |g| ~ 1
    assert np.all(np.asarray(g[0])[~valid] == 0)  # no gradient from padding / prompt positions
    assert np.abs(np.asarray(g[1])[:, TRUE_V:]).max() == 0  # nor into padding vocabulary columns


# ---------------------------------------------------------------------------------------------
# The objective with live tiny models: GKD(beta=0) == full-vocabulary KD; top-k KD approaches it
# ---------------------------------------------------------------------------------------------

from dcd_jax.models import ModelConfig, abstract_model, bind  # noqa: E402
from dcd_jax.objectives import ObjectiveConfig, token_logprobs_chunked  # noqa: E402
from dcd_jax.objectives.config import GKDConfig, KLConfig  # noqa: E402
from dcd_jax.train.online import first_prompts, make_gkd_loss_fn, regenerate, rollout_keys, rollout_rows  # noqa: E402
from dcd_jax.train.step import make_loss_fn  # noqa: E402

MODEL_TRUE_V = 60
STUDENT = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True, tie_word_embeddings=True,
                      true_vocab_size=MODEL_TRUE_V)
TEACHER = ModelConfig(model_type="qwen2", vocab_size=128, hidden_size=48, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=12, qkv_bias=True, true_vocab_size=MODEL_TRUE_V)
SEQ = 24


def _random_model(cfg, seed):
    """Graphdef and NumPy params: N(0, 0.25^2) weights and biases (next-token distributions far from
    uniform), unit norm scales (no compiled initializer: cheap)."""
    graphdef, shapes, _ = abstract_model(cfg)
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        if "norm" in jax.tree_util.keystr(path):
            return np.ones(s.shape, s.dtype)
        return (0.25 * rng.standard_normal(s.shape)).astype(s.dtype)

    return graphdef, jax.tree_util.tree_map_with_path(leaf, shapes)


@pytest.fixture(scope="module")
def models():
    s_graph, s_params = _random_model(STUDENT, 1)
    t_graph, t_params = _random_model(TEACHER, 2)
    return s_graph, s_params, t_graph, t_params


def _packed_batch(n_rows=4, seed=0):
    """Rows of two packed traces: prompt (loss 0) then response (loss 1), then padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, MODEL_TRUE_V, size=(n_rows, SEQ)).astype(np.int32)
    seg = np.zeros((n_rows, SEQ), np.int32)
    pos = np.zeros((n_rows, SEQ), np.int32)
    mask = np.zeros((n_rows, SEQ), np.float32)
    for r in range(n_rows):
        start = 0
        for s, (p, n) in enumerate([(3 + r % 3, 6), (4, 5)], start=1):
            seg[r, start:start + p + n] = s
            pos[r, start:start + p + n] = np.arange(p + n)
            mask[r, start + p - 1:start + p + n - 1] = 1.0  # targets of positions p-1 .. p+n-2 are the response
            start += p + n
    targets = np.where(np.roll(seg, -1, 1) == seg, np.roll(ids, -1, 1), 0)
    ids = np.where(seg > 0, ids, 0)
    return {"input_ids": ids, "targets": targets.astype(np.int32), "positions": pos, "segment_ids": seg,
            "loss_mask": mask * (seg > 0)}


def test_gkd_beta0_equals_full_vocabulary_kd_and_topk_kd_approaches_it(models):
    s_graph, s_params, t_graph, t_params = models
    batch = _packed_batch()
    gkd_cfg = ObjectiveConfig(loss="gkd", chunk_size=8, gkd=GKDConfig(lmbda=0.0, beta=0.0, teacher_path="live"))
    gkd_loss = make_gkd_loss_fn(s_graph, t_graph, t_params, gkd_cfg, MODEL_TRUE_V)
    (gkd_value, gkd_out), gkd_grads = jax.jit(jax.value_and_grad(gkd_loss, has_aux=True))(s_params, None, batch, 0)
    # (lmbda=0: the batch is the data's own; the rollout path is tested below)

    teacher = bind(t_graph, t_params)
    t_hidden = teacher(batch["input_ids"], batch["positions"], batch["segment_ids"], return_hidden=True)

    stats = token_logprobs_chunked(t_hidden, teacher.unembed_matrix(), batch["targets"],
                                   true_vocab_size=MODEL_TRUE_V, top_k=MODEL_TRUE_V, return_entropy=False)

    def kd_loss(k, tail):
        scored = {**batch, "teacher_topk_ids": stats.topk_ids[..., :k], "teacher_topk_logprobs": stats.topk_logprobs[..., :k]}
        cfg = ObjectiveConfig(loss="kl", chunk_size=8, kl=KLConfig(tail=tail))
        return functools.partial(make_loss_fn(s_graph, cfg, MODEL_TRUE_V), batch=scored, step=0, ref_params=None)

    # KD on the teacher's whole vocabulary (all ids "top-k", nothing outside): the exact forward KL.
    (full_value, _), full_grads = jax.jit(jax.value_and_grad(kd_loss(MODEL_TRUE_V, "renormalize"), has_aux=True))(s_params)
    assert float(gkd_out.denominator) == batch["loss_mask"].sum()
    np.testing.assert_allclose(float(gkd_value), float(full_value), rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gkd_grads), jax.tree.leaves(full_grads)):
        scale = max(1.0, float(np.abs(b).max()))  # fp32 accumulation-order noise scales with the gradient
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5 * scale, err_msg=jax.tree_util.keystr(path))
    assert float(full_value) / float(gkd_out.denominator) > 0.1  # the models disagree: a real signal

    # Cached top-k KD (tail bucket, the default) approaches it from below as k grows.
    values = [float(jax.jit(kd_loss(k, "bucket"))(s_params)[0]) for k in (4, 32)]
    errors = [float(full_value) - v for v in values]
    assert errors[0] > errors[1] > 0, (values, float(full_value))
    assert errors[0] > 0.1 * float(full_value) and errors[1] < 0.2 * errors[0]


def test_first_prompts_and_rollout_rows_by_hand():
    batch = {k: jnp.asarray(v) for k, v in _packed_batch(n_rows=2).items()}
    ids, mask = first_prompts(batch, prompt_window=6)
    # Row 0's first prompt is 3 tokens, row 1's 4; the second traces are not prompts.
    np.testing.assert_array_equal(np.asarray(mask), [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(np.asarray(ids)[0, :3], np.asarray(batch["input_ids"])[0, :3])
    assert int(first_prompts(batch, prompt_window=3)[1][1].sum()) == 0  # row 1's prompt does not fit
    tokens = jnp.asarray([[50, 51, 9, 9], [52, 53, 54, 55]])
    rows = {k: np.asarray(v) for k, v in rollout_rows(ids, mask, tokens, jnp.asarray([2, 4])).items()}
    p0 = np.asarray(batch["input_ids"])[0, :3].tolist()
    assert rows["input_ids"][0].tolist() == p0 + [50, 51] + [0] * 5
    assert rows["targets"][0].tolist() == p0[1:] + [50, 51] + [0] * 6
    assert rows["loss_mask"][0].tolist() == [0, 0, 1, 1] + [0] * 6  # exactly the generated tokens
    assert rows["segment_ids"][0].tolist() == [1] * 5 + [0] * 5
    assert rows["positions"][0].tolist() == [0, 1, 2, 3, 4] + [0] * 5
    assert rows["loss_mask"][1].tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]


def _rollout_and_scores(s_graph, t_graph, s_params, t_params, batch, key, sampling):
    rows, generated = regenerate(s_graph, s_params, batch, key, sampling, pad_id=0)
    teacher = bind(t_graph, t_params)
    student = bind(s_graph, s_params)
    args = (rows["input_ids"], rows["positions"], rows["segment_ids"])
    stats = generalized_jsd_chunked(student(*args, return_hidden=True), student.unembed_matrix(),
                                    teacher(*args, return_hidden=True), teacher.unembed_matrix(), rows["targets"],
                                    beta=0.5, true_vocab_size=MODEL_TRUE_V, chunk_size=8)
    return rows, generated, stats.teacher_target_logprobs, stats.jsd


def test_rollouts_and_teacher_scores_on_the_2x2x2_mesh_equal_single_device(models):
    from dcd_jax.infer.sampler import SamplingConfig
    from dcd_jax.sharding import make_mesh, named_sharding

    s_graph, s_params, t_graph, t_params = models
    batch = _packed_batch(n_rows=8, seed=3)
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0, eos_token_ids=(1,))
    _, key = rollout_keys(jax.random.key(0), jnp.int32(5))
    fn = jax.jit(_rollout_and_scores, static_argnums=(0, 1, 6))
    single = jax.device_get(fn(s_graph, t_graph, s_params, t_params, batch, key, sampling))

    mesh = make_mesh(2, 2, 2)
    _, _, s_axes = abstract_model(STUDENT)
    _, _, t_axes = abstract_model(TEACHER)
    is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
    place = lambda params, axes: jax.tree.map(
        lambda ax, x: jax.device_put(x, named_sharding(mesh, ax, x.shape)), axes, params, is_leaf=is_axes)
    sharded_batch = {k: jax.device_put(v, named_sharding(mesh, ("batch", "length"), v.shape)) for k, v in batch.items()}
    with jax.set_mesh(mesh):
        sharded = jax.device_get(fn(s_graph, t_graph, place(s_params, s_axes), place(t_params, t_axes),
                                    sharded_batch, key, sampling))
    rows, generated, teacher_lp, jsd = single
    for name in rows:
        np.testing.assert_array_equal(sharded[0][name], rows[name], err_msg=name)
    assert sharded[1] == generated and generated >= 8  # every row generated
    valid = rows["loss_mask"] > 0
    assert valid.sum() == generated
    np.testing.assert_allclose(sharded[2][valid], teacher_lp[valid], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sharded[3][valid], jsd[valid], rtol=1e-5, atol=1e-6)
    # The rollouts are the student's own: new tokens where the data had its response.
    assert not np.array_equal(rows["input_ids"], batch["input_ids"])


def test_gkd_config_loads_and_refuses_a_missing_teacher():
    from pathlib import Path

    from dcd_jax.config import ConfigError, load_config
    from dcd_jax.train.config import RunConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    files = [root / "qwen2.5-0.5b-dcd.yaml", root / "objectives" / "gkd.yaml"]
    cfg = load_config(RunConfig, files, ["objective.gkd.teacher_path=teacher_dir"])
    assert cfg.objective.loss == "gkd" and cfg.objective.weighting == "none"
    assert (cfg.objective.gkd.lmbda, cfg.objective.gkd.beta) == (0.5, 0.5)
    with pytest.raises(ConfigError, match="objective.gkd.teacher_path"):
        load_config(RunConfig, files, [])
    with pytest.raises(ConfigError, match=r"objective.gkd.lmbda must be in \[0, 1\]"):
        load_config(RunConfig, files, ["objective.gkd.teacher_path=t", "objective.gkd.lmbda=1.5"])
    with pytest.raises(ConfigError, match="leaves no prompt window"):
        load_config(RunConfig, files, ["objective.gkd.teacher_path=t", "objective.gkd.max_new_tokens=4096"])


# ---------------------------------------------------------------------------------------------
# Through the training loop: a GKD run, SIGKILL and resume
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gkd_assets(tmp_path_factory):
    from train_fixtures import make_assets

    from dcd_jax.data.synthetic import build_tokenizer
    from dcd_jax.tiny_models import make_tiny_student

    assets = make_assets(tmp_path_factory.mktemp("gkd_assets"), n_examples=64)
    assets["teacher"] = make_tiny_student(assets["student"].parent / "teacher", build_tokenizer(), size="tiny", seed=7,
                                          max_position_embeddings=512)
    return assets


def gkd_overrides(assets, **extra):
    return {"objective.loss": "gkd", "objective.gkd.teacher_path": assets["teacher"], "objective.gkd.teacher_dtype": "float32",
            "objective.gkd.max_new_tokens": 16, "objective.gkd.lmbda": 0.5, "objective.gkd.beta": 0.5, **extra}


def test_gkd_run_resumes_bitwise_after_sigkill_rollouts_included(gkd_assets, tmp_path):
    import signal

    from test_train import _worker, final_params, run
    from train_fixtures import base_overrides

    from dcd_jax.train.checkpoint import CheckpointConfig, RunCheckpointer
    from dcd_jax.train.metrics import read_metrics

    common = gkd_overrides(gkd_assets, **{"train.steps": 2, "checkpoint.every_steps": 1, "train.seed": 3})
    straight_result, straight = run(gkd_assets, tmp_path / "straight", **common)
    assert straight_result.step == 2
    # The coin is drawn from the run key: with seed 3, step 1 trains on the data, step 2 (after the kill) on rollouts.
    assert [r["on_policy"] for r in straight] == [0.0, 1.0]
    for r in straight:
        assert (r["generated_tokens"] > 0) == (r["on_policy"] == 1.0)
        assert r["teacher_forward_flops"] > 0 and r["cost/wall_seconds"] > 0
    assert straight[-1]["cost/generated_tokens"] == sum(r["generated_tokens"] for r in straight)

    killed = tmp_path / "killed"
    proc = _worker(1, base_overrides(gkd_assets, killed, **common))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, out
    run(gkd_assets, killed, **common)  # resumes at step 1
    resumed = read_metrics(killed / "metrics.jsonl")
    for key in ("loss", "jsd", "on_policy", "generated_tokens", "cost/generated_tokens"):
        assert [r[key] for r in resumed] == [r[key] for r in straight], key  # bitwise, every step
    a = RunCheckpointer(tmp_path / "straight" / "checkpoints", CheckpointConfig())
    b = RunCheckpointer(killed / "checkpoints", CheckpointConfig())
    raw_a, raw_b = a.manager.restore(2), b.manager.restore(2)
    for item in ("params", "opt_state"):
        for x, y in zip(jax.tree.leaves(raw_a[item]), jax.tree.leaves(raw_b[item])):
            assert np.array_equal(np.asarray(x), np.asarray(y)), item
    a.close(), b.close()
    del final_params


def test_cost_totals_resume_and_wall_budget(tmp_path):
    from dcd_jax.train.cost import RunCost, run_cost, steps_within_wall_budget
    from dcd_jax.train.metrics import MetricsWriter

    cost = RunCost(teacher_flops_per_step=10.0)
    writer = MetricsWriter(tmp_path, tensorboard=False)
    for step, (generated, seconds) in enumerate([(5, 1.0), (0, 0.5), (7, 2.0)], start=1):
        cost.add_step(generated, seconds)
        writer.write(step, cost.step_metrics(generated))
    writer.close()
    assert run_cost(tmp_path / "metrics.jsonl") == {"generated_tokens": 12.0, "teacher_forward_flops": 30.0,
                                                    "wall_seconds": 3.5, "steps": 3.0, "step_seconds_mean": 3.5 / 3}
    assert [steps_within_wall_budget(tmp_path / "metrics.jsonl", s) for s in (0.9, 1.5, 3.4, 9.0)] == [0, 2, 2, 3]
    resumed = RunCost(teacher_flops_per_step=10.0)
    resumed.resume_from(tmp_path / "metrics.jsonl", step=2)  # a checkpoint at step 2: continue its totals
    assert (resumed.generated_tokens, resumed.teacher_forward_flops, resumed.wall_seconds) == (5.0, 20.0, 1.5)
