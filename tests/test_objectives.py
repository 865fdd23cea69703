"""Objectives: losses, weightings, chunking and diagnostics against float64 NumPy references."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_objectives_reference as ref
from dcd_jax.config import ConfigError, from_dict
from dcd_jax.objectives import (
    ObjectiveConfig,
    VocabMismatchError,
    check_batch_fields,
    check_vocab_alignment,
    compute_objective,
    compute_weights,
    lam_schedule,
    merge_metrics,
    required_batch_fields,
    summarize_metrics,
    token_logprobs_chunked,
    token_logprobs_reference,
    validate_batch,
)
from dcd_jax.objectives.config import DCDConfig, IDFTConfig, IWSFTConfig, KLConfig, LamSchedule, ToDiConfig
from dcd_jax.objectives.weights import WEIGHTINGS, Weighting, Weights, register_weighting

CASE = ref.make_case(0)


def cfg_of(**kw) -> ObjectiveConfig:
    cfg = ObjectiveConfig(**kw)
    cfg.validate()
    return cfg


@functools.lru_cache(maxsize=None)
def _step_fn(cfg: ObjectiveConfig):
    """One jit(value_and_grad) per config, shared by the tests (step and data are arguments)."""

    def f(h, w, batch, ref_h, ref_w, step):
        out = compute_objective(cfg, h, w, batch, step=step, true_vocab_size=ref.VT, ref_hidden=ref_h, ref_unembed=ref_w)
        return out.loss, out

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


def run(cfg, case=CASE, *, step=0):
    """Loss, ObjectiveOutput and gradients w.r.t. (hidden, unembed)."""
    (loss, out), grads = _step_fn(cfg)(
        case["hidden"], case["unembed"], case["batch"], case["ref_hidden"], case["ref_unembed"], jnp.int32(step)
    )
    return float(loss), out, [np.asarray(g) for g in grads]


# --- chunked per-token statistics -------------------------------------------------------------


@pytest.mark.parametrize("saved_logits_bytes", [1 << 30, 0], ids=["cpu-saved-logits", "recomputed-logits"])
def test_token_stats_chunked_matches_reference_and_numpy(saved_logits_bytes, monkeypatch):
    """Chunked == unchunked (1e-5, value and gradient) with T=13 and V=37 not multiples of the chunk
    (5); both match float64 NumPy; padding columns never appear; top-k matches NumPy's. Both
    backward passes: logits kept from the forward pass (CPU default) and recomputed (accelerators)."""
    from dcd_jax.objectives import logprobs

    monkeypatch.setattr(logprobs, "CPU_SAVED_LOGITS_BYTES", saved_logits_bytes)
    rng = np.random.default_rng(1)
    b, t, d, v, vt, k = 2, 13, 8, 37, 33, 4
    h = rng.normal(size=(b, t, d)).astype(np.float32)
    w = rng.normal(size=(d, v)).astype(np.float32)
    w[:, vt:] += 5.0  # padding columns with large logits: must be masked, not merely unlikely
    tgt = rng.integers(0, vt, size=(b, t)).astype(np.int32)
    ids = np.argsort(rng.random((b, t, vt)), -1)[..., :k].astype(np.int32)
    coef = [rng.normal(size=s).astype(np.float32) for s in ((b, t), (b, t, k), (b, t))]

    def value_and_grad(fn):
        def f(h, w):
            s = fn(h, w, tgt, true_vocab_size=vt, gather_ids=ids, top_k=3)
            total = (jnp.sum(coef[0] * s.target_logprobs) + jnp.sum(coef[1] * s.gathered_logprobs)
                     + jnp.sum(coef[2] * s.rest_logprob))
            return total, s
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(h, w)

    chunked = lambda h, w, *a, **kw: token_logprobs_chunked(h, w, *a, chunk_size=5, **kw)
    (_, s_c), g_c = value_and_grad(chunked)
    (_, s_r), g_r = value_and_grad(token_logprobs_reference)
    for name in ("target_logprobs", "entropy", "gathered_logprobs", "rest_logprob", "topk_logprobs"):
        np.testing.assert_allclose(getattr(s_c, name), getattr(s_r, name), rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(s_c.topk_ids, s_r.topk_ids)
    for a, bb in zip(g_c, g_r):
        np.testing.assert_allclose(a, bb, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(g_c[1])[:, vt:] == 0)  # padding columns get no gradient

    logp = ref.log_softmax(h, w, vt)
    p = np.exp(logp)
    np.testing.assert_allclose(s_c.target_logprobs, np.take_along_axis(logp, tgt[..., None], -1)[..., 0], atol=2e-5)
    np.testing.assert_allclose(s_c.entropy, -(p * logp).sum(-1), atol=2e-5)
    np.testing.assert_allclose(s_c.gathered_logprobs, np.take_along_axis(logp, ids, -1), atol=2e-5)
    outside = np.ones_like(p, bool)
    np.put_along_axis(outside, ids, False, -1)
    np.testing.assert_allclose(s_c.rest_logprob, np.log((p * outside).sum(-1)), atol=2e-5)
    np.testing.assert_array_equal(s_c.topk_ids, np.argsort(-logp, -1)[..., :3])
    np.testing.assert_allclose(s_c.topk_logprobs, -np.sort(-logp, -1)[..., :3], atol=2e-5)


@pytest.mark.parametrize("saved_logits_bytes", [1 << 30, 0], ids=["cpu-saved-logits", "recomputed-logits"])
def test_rest_mass_exact_when_the_ids_hold_almost_all_of_it(saved_logits_bytes, monkeypatch):
    """The rest mass shares the log-normalizer's exp pass unless it underflows that scale; then it
    is recomputed: with the other logits 100-140 nats below the gathered ones (rest ~ e^-100),
    rest_logprob still equals float64 NumPy, and its gradient (the softmax over the rest, minus
    p) is finite and equals the unchunked autodiff one. A chunk without underflow keeps the
    shared path (second row)."""
    from dcd_jax.objectives import logprobs

    monkeypatch.setattr(logprobs, "CPU_SAVED_LOGITS_BYTES", saved_logits_bytes)
    rng = np.random.default_rng(3)
    b, t, v, k = 2, 6, 16, 3
    z = rng.normal(size=(b, t, v)) * 3.0
    ids = np.argsort(-z, -1)[..., :k].astype(np.int32)
    peaked = np.zeros_like(z, bool)
    np.put_along_axis(peaked, ids, True, -1)
    z[0] = np.where(peaked[0], z[0] + 100.0, z[0] - 40.0 * rng.random(size=(t, v)))
    # hidden = identity rows so logits == z exactly (D = V, unembed = I).
    h = z.astype(np.float32)
    w = np.eye(v, dtype=np.float32)
    tgt = ids[..., 0]

    def rest_and_grad(fn):
        f = lambda h: jnp.sum(fn(h, w, tgt, gather_ids=ids).rest_logprob)
        return jax.jit(jax.value_and_grad(f))(h), fn(h, w, tgt, gather_ids=ids).rest_logprob

    chunked = lambda *a, **kw: token_logprobs_chunked(*a, chunk_size=3, **kw)
    (_, g_c), rest = rest_and_grad(chunked)
    (_, g_r), _ = rest_and_grad(token_logprobs_reference)
    zz = z.astype(np.float32).astype(np.float64)
    lse = np.log(np.exp(zz - zz.max(-1, keepdims=True)).sum(-1)) + zz.max(-1)
    out = np.where(peaked, -np.inf, zz)
    rest_lse = np.log(np.exp(out - out.max(-1, keepdims=True)).sum(-1)) + out.max(-1)
    assert np.all(rest_lse[0] - lse[0] < -90)  # the regime: underflows exp(z - max z) in fp32
    np.testing.assert_allclose(rest, rest_lse - lse, rtol=1e-5, atol=1e-4)
    assert np.all(np.isfinite(g_c))
    np.testing.assert_allclose(g_c, g_r, rtol=1e-5, atol=1e-5)


def test_bf16_hidden_single_chunk():
    """bf16 hidden states with an fp32 unembedding and a chunk larger than T: fp32 loss, gradients in
    the input dtypes, close to the fp32 (chunk 5) computation."""
    kw = CASES["kl-dcd-sequence"]
    h16 = dict(CASE, hidden=CASE["hidden"].astype(jnp.bfloat16))
    loss16, _, (gh, gw) = run(cfg_of(chunk_size=64, **kw), h16, step=5)
    loss32, _, (gh32, gw32) = run(cfg_of(chunk_size=5, **kw), step=5)
    assert gh.dtype == jnp.bfloat16 and gw.dtype == np.float32
    np.testing.assert_allclose(loss16, loss32, rtol=3e-2)
    np.testing.assert_allclose(np.float32(gh), gh32, atol=3e-2 * np.abs(gh32).max())
    np.testing.assert_allclose(gw, gw32, atol=3e-2 * np.abs(gw32).max())


# --- every loss x weighting against NumPy, value and gradient ---------------------------------

CASES = {
    "ce-none-token": dict(loss="ce", weighting="none"),
    "ce-none-sequence": dict(loss="ce", weighting="none", reduction="sequence"),
    "ce-dcd-token-clip-lam": dict(
        loss="ce", weighting="dcd", dcd=DCDConfig(tau=2.0, b=-0.3, clip_min=0.5, clip_max=1.5),
        lam=LamSchedule(kind="cosine", warmup_steps=100),
    ),
    "ce-dcd_prefix-lam": dict(loss="ce", weighting="dcd_prefix", dcd=DCDConfig(tau=0.7, b=0.2),
                              lam=LamSchedule(kind="linear", warmup_steps=100)),
    "ce-dcd_sequence-clip": dict(loss="ce", weighting="dcd_sequence", dcd=DCDConfig(tau=0.5, b=-0.1, clip_max=1.8),
                                 lam=LamSchedule(kind="constant")),
    "kl-dcd_sequence-lam": dict(loss="kl", weighting="dcd_sequence", lam=LamSchedule(kind="linear", warmup_steps=80)),
    "ce-dft": dict(loss="ce", weighting="dft"),
    "ce-idft": dict(loss="ce", weighting="idft", idft=IDFTConfig(alpha_min=0.2, alpha_max=0.9, warmup_steps=200)),
    "ce-iwsft-seq": dict(loss="ce", weighting="iw_sft", reduction="sequence", iw_sft=IWSFTConfig(kappa=0.5, c=1.2)),
    "ce-iwsft-token": dict(loss="ce", weighting="iw_sft", iw_sft=IWSFTConfig(level="token", lo=0.8, hi=1.5)),
    "kl-none-bucket": dict(loss="kl", weighting="none"),
    "kl-none-renorm": dict(loss="kl", weighting="none", kl=KLConfig(tail="renormalize"), reduction="sequence"),
    "kl-dcd-sequence": dict(loss="kl", weighting="dcd", reduction="sequence", lam=LamSchedule(kind="constant")),
    "todi-bucket": dict(loss="todi", todi=ToDiConfig(beta=1.5), reduction="sequence"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_objective_matches_numpy(name):
    """Loss value and gradient (w.r.t. hidden and unembed) vs float64 NumPy with padding, packing,
    prompts and NaN filler outside the mask; weights held fixed for the reference gradient."""
    cfg = cfg_of(chunk_size=5, **CASES[name])
    step = 50
    loss, out, grads = run(cfg, step=step)
    kw = dict(step=step, ref_hidden=CASE["ref_hidden"], ref_unembed=CASE["ref_unembed"])
    exp_loss, aux = ref.objective(cfg, CASE["hidden"], CASE["unembed"], CASE["batch"], **kw)
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in grads)
    np.testing.assert_allclose(loss, exp_loss, rtol=2e-5)
    np.testing.assert_allclose(float(out.denominator), aux["den"])
    np.testing.assert_allclose(float(out.loss_sum), aux["total"], rtol=2e-5)
    fd = ref.finite_difference_grads(cfg, CASE, step=step)
    for g, (idx, e) in zip(grads, fd):
        np.testing.assert_allclose(g[idx], e, rtol=1e-4, atol=2e-5 * max(1.0, np.abs(g).max()))
    assert np.all(grads[1][:, ref.VT:] == 0)  # padding columns of the unembedding get no gradient
    m = summarize_metrics(out.metrics)
    np.testing.assert_allclose(m["weight_mean"], aux["w"][aux["valid"]].mean(), rtol=1e-5)
    np.testing.assert_allclose(m["frac_clipped"], aux["clipped"][aux["valid"]].mean(), atol=1e-6)
    np.testing.assert_allclose(m["lam"], aux["lam"], rtol=1e-6)


def test_chunked_equals_unchunked_objective():
    """Full objective (KL + DCD) with chunk 5 vs no chunking: value and gradient within 1e-5."""
    cfg = cfg_of(chunk_size=5, **CASES["kl-dcd-sequence"])
    a = run(cfg, step=7)
    b = run(dataclasses.replace(cfg, chunk_size=0), step=7)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-5)
    for x, y in zip(a[2], b[2]):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


# --- properties of the weights ----------------------------------------------------------------


def test_lam_zero_is_exactly_sft():
    """lam(0) = 0 under the linear warmup: loss and gradient are exactly the SFT ones."""
    sft = run(cfg_of(chunk_size=5, weighting="none"), step=0)
    dcd = run(cfg_of(chunk_size=5, weighting="dcd", dcd=DCDConfig(tau=0.5, clip_max=3.0),
                     lam=LamSchedule(kind="linear", warmup_steps=100)), step=0)
    assert sft[0] == dcd[0]
    for x, y in zip(sft[2], dcd[2]):
        np.testing.assert_array_equal(x, y)
    assert float(dcd[1].metrics["lam"]) == 0.0


@pytest.mark.parametrize("loss, weighting", [("ce", "dcd"), ("ce", "dcd_prefix"), ("ce", "dcd_sequence"), ("kl", "dcd_sequence"), ("ce", "dft"), ("ce", "idft"),
                                             ("ce", "iw_sft"), ("todi", "none")])
def test_every_method_at_strength_zero_is_exactly_sft_or_kd(loss, weighting):
    """objective.strength = 0 turns every weighting into plain SFT (ce) and the ToDi loss into plain KD
    (kl): same loss, same gradient; at strength 1 they really differ from it (so the comparison can fail)."""
    plain = run(cfg_of(chunk_size=5, loss="kl" if loss == "todi" else loss, weighting="none"), step=50)
    kw = dict(chunk_size=5, loss=loss, weighting=weighting, lam=LamSchedule(kind="constant"),
              idft=IDFTConfig(alpha_min=0.5, alpha_max=1.0), iw_sft=IWSFTConfig(kappa=1.0, c=3.0))
    off = run(cfg_of(strength=0.0, **kw), step=50)
    on = run(cfg_of(**kw), step=50)
    assert off[0] == plain[0]
    for x, y in zip(plain[2], off[2]):
        np.testing.assert_array_equal(x, y)
    assert abs(on[0] - plain[0]) > 1e-4


def _weight_inputs(seed=3):
    rng = np.random.default_rng(seed)
    shape = (2, 12)
    return dict(
        target_logprobs=jnp.asarray(np.log(rng.uniform(0.01, 1, shape)), jnp.float32),
        entropy=jnp.asarray(rng.uniform(0, 3, shape), jnp.float32),
        teacher_logprobs=jnp.asarray(np.log(rng.uniform(0.01, 1, shape)), jnp.float32),
        ref_logprobs=jnp.asarray(np.log(rng.uniform(0.01, 1, shape)), jnp.float32),
    )


@pytest.mark.parametrize("weighting", sorted(WEIGHTINGS))
def test_weights_carry_no_gradient(weighting):
    """jax.grad through the weight path alone (w.r.t. every input it reads) is exactly zero."""
    cfg = cfg_of(weighting=weighting, lam=LamSchedule(kind="constant"))
    inputs = _weight_inputs()
    batch = CASE["batch"]
    mask = jnp.asarray(batch["loss_mask"] * (batch["segment_ids"] > 0))

    def total(x):
        w = compute_weights(cfg, mask=mask, segment_ids=jnp.asarray(batch["segment_ids"]), step=10,
                            true_vocab_size=ref.VT, **x)
        return jnp.sum(w.weights**2) + jnp.sum(w.weights)

    grads = jax.grad(total)(inputs)
    assert float(total(inputs)) > 0
    for k, g in grads.items():
        assert np.all(np.asarray(g) == 0), k


def test_dcd_weight_limits():
    """tau=1, b=0 (no normalization, lam=1) gives pi_theta/(pi_theta+pi_T); large tau gives uniform weights."""
    x = _weight_inputs()
    mask = jnp.ones((2, 12))
    seg = jnp.ones((2, 12), jnp.int32)
    kw = dict(mask=mask, segment_ids=seg, step=0, true_vocab_size=ref.VT, target_logprobs=x["target_logprobs"],
              teacher_logprobs=x["teacher_logprobs"])
    const = LamSchedule(kind="constant")
    w = compute_weights(cfg_of(weighting="dcd", dcd=DCDConfig(normalize=False), lam=const), **kw).weights
    p, pt = np.exp(np.float64(x["target_logprobs"])), np.exp(np.float64(x["teacher_logprobs"]))
    np.testing.assert_allclose(w, p / (p + pt), rtol=1e-5)
    w_big = compute_weights(cfg_of(weighting="dcd", dcd=DCDConfig(tau=1e6), lam=const), **kw).weights
    np.testing.assert_allclose(w_big, 1.0, atol=1e-5)
    w_raw = compute_weights(cfg_of(weighting="dcd", dcd=DCDConfig(tau=1e6, normalize=False), lam=const), **kw).weights
    np.testing.assert_allclose(w_raw, 0.5, atol=1e-5)


def test_schedules():
    lin = LamSchedule(kind="linear", max=0.8, warmup_steps=100)
    cos = LamSchedule(kind="cosine", max=1.0, warmup_steps=100)
    np.testing.assert_allclose([float(lam_schedule(lin, s)) for s in (0, 25, 100, 1000)], [0, 0.2, 0.8, 0.8], rtol=1e-6)
    np.testing.assert_allclose([float(lam_schedule(cos, s)) for s in (0, 50, 100)], [0, 0.5, 1.0], atol=1e-6)
    assert float(lam_schedule(LamSchedule(kind="constant", max=0.3), 0)) == pytest.approx(0.3)
    assert float(lam_schedule(LamSchedule(warmup_steps=0), 0)) == 1.0
    # traced step is fine
    np.testing.assert_allclose(jax.jit(lambda s: lam_schedule(lin, s))(jnp.int32(50)), 0.4, rtol=1e-6)


# --- diagnostics --------------------------------------------------------------------------------


def test_diagnostics_match_numpy_and_merge_exactly():
    """ESS over tokens and sequences, weight mean/std/min/max, clipped fraction, position bins and
    log-ratio vs NumPy; the metrics of two micro-batches merged equal those of the whole batch."""
    cfg = cfg_of(chunk_size=5, **CASES["ce-dcd-token-clip-lam"])
    _, out, _ = run(cfg, step=50)
    m = {k: np.asarray(v) for k, v in summarize_metrics(out.metrics).items()}
    _, aux = ref.objective(cfg, CASE["hidden"], CASE["unembed"], CASE["batch"], step=50)
    expected = ref.diagnostics(aux, CASE["batch"]["teacher_logprobs"])
    assert 0 < expected["frac_clipped"] < 1
    for k, v in expected.items():
        np.testing.assert_allclose(m[k], v, rtol=2e-5, atol=1e-6, err_msg=k)

    # row-wise micro-batches, with a weighting that does not depend on the rest of the batch
    cfg = cfg_of(chunk_size=5, **CASES["ce-dft"])
    whole = {k: np.asarray(v) for k, v in summarize_metrics(run(cfg, step=50)[1].metrics).items()}

    def half(i):
        c = {k: v[i : i + 1] for k, v in CASE.items() if k != "unembed" and k != "ref_unembed" and k != "batch"}
        c.update(unembed=CASE["unembed"], ref_unembed=CASE["ref_unembed"])
        c["batch"] = {k: v[i : i + 1] for k, v in CASE["batch"].items()}
        return run(cfg, c, step=50)[1].metrics

    merged = summarize_metrics(merge_metrics(half(0), half(1)))
    assert set(merged) == set(whole)
    for k, v in whole.items():
        np.testing.assert_allclose(merged[k], v, rtol=2e-5, atol=1e-6, err_msg=k)


# --- configuration ------------------------------------------------------------------------------


def test_config_from_dict_and_validation():
    cfg = from_dict(ObjectiveConfig, {"loss": "kl", "weighting": "dcd", "dcd": {"tau": 0.5}, "lam": {"kind": "cosine"}})
    assert cfg.dcd.tau == 0.5 and cfg.lam.kind == "cosine" and cfg.dcd.normalize
    hash(cfg)  # frozen: usable as a static jit argument
    with pytest.raises(ConfigError, match="unknown option"):
        from_dict(ObjectiveConfig, {"weighting": "dcd", "dcd": {"temperature": 1.0}})
    with pytest.raises(ConfigError, match="objective.loss=todi"):
        from_dict(ObjectiveConfig, {"loss": "kl", "weighting": "todi"})
    with pytest.raises(ConfigError, match="takes no token weighting"):
        from_dict(ObjectiveConfig, {"loss": "todi", "weighting": "dcd"})
    with pytest.raises(ConfigError, match="tau must be > 0"):
        from_dict(ObjectiveConfig, {"dcd": {"tau": 0.0}})
    with pytest.raises(ConfigError, match="clip_min"):
        from_dict(ObjectiveConfig, {"dcd": {"clip_min": 2.0, "clip_max": 1.0}})
    with pytest.raises(ConfigError, match="lam.max"):
        from_dict(ObjectiveConfig, {"lam": {"max": 1.5}})
    with pytest.raises(ConfigError, match="tail"):
        from_dict(ObjectiveConfig, {"kl": {"tail": "drop"}})


def test_required_fields_and_clear_errors():
    assert required_batch_fields(cfg_of(weighting="none")) == {"targets", "loss_mask", "segment_ids"}
    assert "teacher_logprobs" in required_batch_fields(cfg_of(weighting="dcd"))
    assert {"teacher_topk_ids", "teacher_topk_logprobs"} <= required_batch_fields(cfg_of(loss="kl"))
    assert cfg_of(weighting="iw_sft").needs_reference_model
    with pytest.raises(ConfigError, match=r"weighting=dcd needs `teacher_logprobs`.*score-teacher"):
        check_batch_fields(cfg_of(weighting="dcd"), {"targets", "loss_mask", "segment_ids"})
    with pytest.raises(ConfigError, match=r"loss=kl needs `teacher_topk_ids`"):
        check_batch_fields(cfg_of(loss="kl"), {"targets", "loss_mask", "segment_ids", "teacher_logprobs"})
    check_batch_fields(cfg_of(loss="kl", weighting="dcd"), CASE["batch"].keys())


def test_vocab_alignment():
    # Qwen2.5-7B teacher (152064 rows) and 0.5B student (151936 rows), one 151665-token tokenizer
    assert check_vocab_alignment(student_vocab_size=151936, teacher_vocab_size=152064,
                                 student_true_vocab_size=151665, teacher_true_vocab_size=151665) == 151665
    with pytest.raises(VocabMismatchError, match="tokenizers differ"):
        check_vocab_alignment(student_vocab_size=128256, teacher_vocab_size=152064, teacher_true_vocab_size=151665)
    with pytest.raises(VocabMismatchError, match="fingerprints"):
        check_vocab_alignment(student_vocab_size=100, teacher_vocab_size=100, student_tokenizer_hash="a",
                              teacher_tokenizer_hash="b")
    cfg = cfg_of(loss="kl", weighting="dcd")
    validate_batch(cfg, CASE["batch"], true_vocab_size=ref.VT)
    bad = dict(CASE["batch"])
    bad["teacher_topk_ids"] = CASE["batch"]["teacher_topk_ids"].copy()
    bad["teacher_topk_ids"][0, 3, 0] = ref.VT + 1  # a padding-row id on a response token
    with pytest.raises(VocabMismatchError, match="different tokenizer"):
        validate_batch(cfg, bad, true_vocab_size=ref.VT)


# --- the weighting registry -------------------------------------------------------------------


def test_registry_and_config_validation_agree():
    """Every registered weighting validates and reports its fields / reference model through the
    config; a name outside the registry is refused with the registry listed."""
    sections = {f.name for f in dataclasses.fields(ObjectiveConfig)}
    for name, entry in WEIGHTINGS.items():
        cfg = from_dict(ObjectiveConfig, {"loss": "ce", "weighting": name})
        assert required_batch_fields(cfg) == {"targets", "loss_mask", "segment_ids"} | entry.batch_fields
        assert cfg.needs_reference_model == entry.needs_reference_model
        assert entry.config_section is None or entry.config_section in sections
    with pytest.raises(ConfigError) as err:
        from_dict(ObjectiveConfig, {"weighting": "dpo"})
    assert all(repr(name) in str(err.value) for name in WEIGHTINGS)
    assert {"none", "dcd", "dcd_prefix", "dcd_sequence", "dft", "idft", "iw_sft"} <= set(WEIGHTINGS) and "todi" not in WEIGHTINGS


def test_a_new_weighting_is_one_function_and_one_entry():
    """A throwaway weighting, w_t = pi_T(y_t) (reads the cached teacher log-probs): registered once,
    it validates, its batch field is required, and the objective computes the hand-written loss
    sum_t m_t pi_T(y_t) (-log pi_theta(y_t)) / sum_t m_t."""
    def teacher_prob(cfg, x):
        return Weights(jnp.exp(x.teacher_logprobs), jnp.zeros_like(x.mask), jnp.ones((), jnp.float32))

    register_weighting(Weighting("teacher_prob", teacher_prob, batch_fields=frozenset({"teacher_logprobs"})))
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_weighting(Weighting("teacher_prob", teacher_prob))
        cfg = from_dict(ObjectiveConfig, {"weighting": "teacher_prob"})
        assert "teacher_logprobs" in required_batch_fields(cfg)
        with pytest.raises(ConfigError, match="weighting=teacher_prob needs `teacher_logprobs`"):
            check_batch_fields(cfg, {"targets", "loss_mask", "segment_ids"})
        loss, _, _ = run(cfg)
        batch = CASE["batch"]
        logp = ref.log_softmax(np.asarray(CASE["hidden"], np.float64), np.asarray(CASE["unembed"], np.float64))
        lp = np.take_along_axis(logp, np.asarray(batch["targets"])[..., None], -1)[..., 0]
        mask = np.asarray(batch["loss_mask"]) * (np.asarray(batch["segment_ids"]) > 0)
        expected = np.where(mask > 0, np.exp(batch["teacher_logprobs"]) * -lp, 0.0).sum() / mask.sum()
        np.testing.assert_allclose(loss, expected, rtol=1e-5)
    finally:
        WEIGHTINGS.pop("teacher_prob", None)


def test_one_mix_matches_the_former_two():
    """DCD at strength s and schedule lam is mixed once with m = s * lam; it equals the former two
    mixes (1 - s) + s * ((1 - lam) + lam * w) (tolerance: float rounding)."""
    kw = dict(target_logprobs=_weight_inputs()["target_logprobs"], teacher_logprobs=_weight_inputs()["teacher_logprobs"],
              mask=jnp.asarray(CASE["batch"]["loss_mask"] * (CASE["batch"]["segment_ids"] > 0)),
              segment_ids=jnp.asarray(CASE["batch"]["segment_ids"]), true_vocab_size=ref.VT, step=30)
    lam = LamSchedule(kind="linear", warmup_steps=100)  # lam(30) = 0.3
    raw = compute_weights(cfg_of(weighting="dcd", lam=LamSchedule(kind="constant")), **kw).weights
    once = compute_weights(cfg_of(weighting="dcd", lam=lam, strength=0.6), **kw).weights
    twice = (1 - 0.6) + 0.6 * ((1 - 0.3) + 0.3 * raw)
    valid = np.asarray(kw["mask"]) > 0
    np.testing.assert_allclose(np.asarray(once)[valid], np.asarray(twice)[valid], rtol=1e-6)
    assert not np.allclose(np.asarray(once)[valid], np.asarray(raw)[valid])
