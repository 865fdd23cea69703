"""Flax decoder parity with transformers, for each supported family (tiny local checkpoints)."""

import numpy as np
import pytest

from hf_fixtures import FAMILIES, VOCAB, hf_logits, make_hf_model, save_hf_model

import dcd_jax


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_pair(request, tmp_path_factory):
    """(family, torch model, dcd-jax model) from the same saved checkpoint."""
    family = request.param
    d = save_hf_model(family, tmp_path_factory.mktemp(family))
    return family, make_hf_model(family), dcd_jax.load_hf(d)


def test_logits_match_transformers_with_padding(family_pair):
    family, hf_model, model = family_pair
    rng = np.random.RandomState(0)
    ids = rng.randint(0, VOCAB, (3, 24)).astype(np.int32)  # 24 > llama3's original 16-token context
    lengths = np.array([24, 17, 9])
    mask = (np.arange(24)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask, ids, 0)
    ref = hf_logits(hf_model, ids, mask)
    out = np.asarray(model(ids, segment_ids=mask.astype(np.int32)))
    assert out.shape == (3, 24, VOCAB) and out.dtype == np.float32
    for row, n in enumerate(lengths):  # padded positions are undefined in both
        np.testing.assert_allclose(out[row, :n], ref[row, :n], atol=1e-4, rtol=0)


def test_packed_segments_do_not_attend_across(family_pair):
    family, hf_model, model = family_pair
    rng = np.random.RandomState(1)
    a, b = rng.randint(0, VOCAB, 11), rng.randint(0, VOCAB, 8)
    packed = np.concatenate([a, b, [0, 0, 0]])[None].astype(np.int32)
    segments = np.array([[1] * 11 + [2] * 8 + [0] * 3], np.int32)
    positions = np.array([list(range(11)) + list(range(8)) + [0] * 3], np.int32)
    out = np.asarray(model(packed, positions=positions, segment_ids=segments))
    np.testing.assert_allclose(out[0, :11], hf_logits(hf_model, a[None])[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out[0, 11:19], hf_logits(hf_model, b[None])[0], atol=1e-4, rtol=0)


def test_bf16_compute_is_close_to_fp32(tmp_path):
    d = save_hf_model("qwen3", tmp_path / "q")
    ids = np.random.RandomState(2).randint(0, VOCAB, (2, 10))
    full = np.asarray(dcd_jax.load_hf(d)(ids))
    half = dcd_jax.load_hf(d, dtype="bfloat16", param_dtype="float32")
    out = np.asarray(half(ids))
    assert half.cfg.param_dtype == "float32" and half.cfg.dtype == "bfloat16"
    assert np.isfinite(out).all()
    # bf16 has ~3 significant digits: agreement at that level, and the same argmax almost everywhere.
    assert np.abs(out - full).max() < 0.1 * np.abs(full).max()
    assert (out.argmax(-1) == full.argmax(-1)).mean() > 0.9


def test_remat_policies_give_identical_logits(tmp_path):
    import jax

    from dcd_jax.convert.hf_to_flax import open_hf_checkpoint, load_hf_params
    from dcd_jax.models import ModelConfig, abstract_model, bind

    d = save_hf_model("llama", tmp_path / "l")
    ckpt = open_hf_checkpoint(d)
    ids = np.random.RandomState(3).randint(0, VOCAB, (2, 12))
    outs = []
    for remat in ("none", "full", "dots_saveable"):
        cfg = ModelConfig.from_hf_config(ckpt.hf_config, remat=remat)
        graphdef, _, _ = abstract_model(cfg)
        params = load_hf_params(ckpt, cfg)
        loss = lambda p: bind(graphdef, p)(ids).mean()
        value, grads = jax.value_and_grad(loss)(params)
        outs.append((float(value), np.asarray(grads["layers"]["mlp"]["up_proj"]["kernel"])))
    for value, grad in outs[1:]:
        assert value == pytest.approx(outs[0][0], abs=1e-6)
        np.testing.assert_allclose(grad, outs[0][1], atol=1e-6)


def test_cpu_layout_path_equals_accelerator_path(tmp_path, monkeypatch):
    """On CPU the training pass unrolls the layers, runs projections as 2-D dots and attention one
    row at a time; elsewhere it scans the layers and keeps [B, T, ...] operands. Both programs give
    the same loss and parameter gradients on packed rows (the accelerator one traced here on CPU)."""
    import jax
    import jax.numpy as jnp

    import dcd_jax.models.transformer as transformer
    from dcd_jax.convert.hf_to_flax import open_hf_checkpoint, load_hf_params
    from dcd_jax.models import ModelConfig, abstract_model, bind

    d = save_hf_model("qwen2", tmp_path / "q")
    ckpt = open_hf_checkpoint(d)
    cfg = ModelConfig.from_hf_config(ckpt.hf_config)
    graphdef, _, _ = abstract_model(cfg)
    params = load_hf_params(ckpt, cfg)
    rng = np.random.RandomState(4)
    ids = rng.randint(0, VOCAB, (3, 20))
    segments = np.array([[1] * 12 + [2] * 8, [1] * 20, [1] * 15 + [0] * 5], np.int32)
    weights = jnp.asarray(rng.normal(size=(3, 20, VOCAB)), jnp.float32)

    def loss(p):
        return jnp.sum(bind(graphdef, p)(ids, segment_ids=segments) * weights * (segments > 0)[..., None])

    cpu = jax.value_and_grad(loss)(params)
    monkeypatch.setattr(transformer, "traced_for_cpu", lambda: False)
    accelerator = jax.value_and_grad(loss)(params)
    assert float(cpu[0]) == pytest.approx(float(accelerator[0]), rel=1e-5)
    for got, want in zip(jax.tree.leaves(cpu[1]), jax.tree.leaves(accelerator[1])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-4)
    assert np.abs(np.asarray(cpu[1]["layers"]["attn"]["k_proj"]["kernel"])).max() > 1e-3


def test_dot_product_attention_kernel_equals_einsum_on_packed_rows(tmp_path):
    """attention="xla" (jax.nn.dot_product_attention, the cuDNN path's XLA twin) gives the einsum
    path's logits and gradients on a packed row with padding, GQA and llama3 rope."""
    import jax

    from dcd_jax.convert.hf_to_flax import open_hf_checkpoint, load_hf_params
    from dcd_jax.models import ModelConfig, abstract_model, bind

    d = save_hf_model("llama", tmp_path / "l")
    ckpt = open_hf_checkpoint(d)
    rng = np.random.RandomState(4)
    ids = rng.randint(0, VOCAB, (2, 20)).astype(np.int32)
    segments = np.array([[1] * 9 + [2] * 8 + [0] * 3, [1] * 20], np.int32)
    positions = np.array([list(range(9)) + list(range(8)) + [0] * 3, list(range(20))], np.int32)
    real = segments > 0
    outs = {}
    for kernel in ("einsum", "xla"):
        cfg = ModelConfig.from_hf_config(ckpt.hf_config, attention=kernel)
        assert cfg.num_kv_heads < cfg.num_heads  # grouped-query attention is exercised
        graphdef, _, _ = abstract_model(cfg)
        params = load_hf_params(ckpt, cfg)

        def loss(p):
            logits = bind(graphdef, p)(ids, positions=positions, segment_ids=segments)
            return (logits * real[..., None]).sum() / 1000.0, logits

        (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
        outs[kernel] = (float(value), np.asarray(logits), np.asarray(grads["layers"]["attn"]["q_proj"]["kernel"]))
    np.testing.assert_allclose(outs["xla"][1][real], outs["einsum"][1][real], atol=1e-5, rtol=0)
    assert outs["xla"][0] == pytest.approx(outs["einsum"][0], abs=1e-4)
    np.testing.assert_allclose(outs["xla"][2], outs["einsum"][2], atol=1e-5)


def test_attention_kernel_is_a_runtime_choice_not_saved(tmp_path):
    """A model converted with attention="cudnn" (say on a GPU box) loads with the einsum kernel elsewhere."""
    from dcd_jax.convert.model_dir import load_pretrained, read_model_meta, save_model_dir
    from dcd_jax.models import ModelConfig

    d = save_hf_model("qwen2", tmp_path / "q")
    loaded = load_pretrained(d, attention="cudnn")
    assert loaded.cfg.attention == "cudnn"
    save_model_dir(tmp_path / "m", loaded.params, loaded.cfg, loaded.hf_config)
    assert read_model_meta(tmp_path / "m")[0].attention == "einsum"
    assert read_model_meta(tmp_path / "m", attention="xla")[0].attention == "xla"
    with pytest.raises(ValueError, match="attention='flash'"):
        ModelConfig.from_hf_config(loaded.hf_config, attention="flash")


@pytest.mark.parametrize("dtype,atol,row_group", [("float32", 2e-5, 4), ("bfloat16", 3e-2, 4),
                                                  ("float32", 2e-5, 1), ("float32", 2e-5, 2), ("float32", 2e-5, 3)])
def test_blockwise_causal_attention_equals_dense_masked_attention(dtype, atol, row_group):
    """The training pass's blockwise attention (query blocks, upper triangle skipped, custom
    backward that recomputes each block's probabilities; the whole batch at once, or groups of
    rows in a loop as on CPU; 3 rounds down to 2, a divisor of the batch) gives the full masked
    softmax's output and q/k/v gradients on packed rows with padding, GQA and a T that is not a
    multiple of the block."""
    import jax
    import jax.numpy as jnp

    from dcd_jax.models.transformer import blockwise_causal_attention, cache_bias, cached_attention

    b, t, h, kvh, hd = 4, 21, 6, 2, 8
    rng = np.random.RandomState(7)
    q, k, v, w = (jnp.asarray(rng.normal(size=s), dtype) for s in
                  [(b, t, h, hd), (b, t, kvh, hd), (b, t, kvh, hd), (b, t, h, hd)])
    segments = jnp.asarray([[1] * 7 + [2] * 10 + [0] * 4, [3] * 21, [1] * 12 + [2] * 9, [0] * 3 + [5] * 18],
                           jnp.int32)
    slots = jnp.broadcast_to(jnp.arange(t), (b, t))
    real = (segments > 0)[..., None, None]

    def full(q, k, v):  # the dense masked softmax: each row attends over itself as a cache
        heads_major = lambda x: x.transpose(0, 2, 1, 3)
        return cached_attention(q, heads_major(k), heads_major(v), cache_bias(segments, slots, segments))

    def blockwise(q, k, v):
        return blockwise_causal_attention(q, k, v, segments, block=8, row_group=row_group)

    outs = {}
    for name, fn in (("full", full), ("blockwise", blockwise)):
        def loss(q, k, v, fn=fn):  # padding query rows are undefined in both: excluded
            out = fn(q, k, v)
            return jnp.sum(jnp.where(real, out * w, 0.0).astype(jnp.float32)), out
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        outs[name] = [np.asarray(x, np.float32) for x in (out, *grads)]
    mask = np.broadcast_to(np.asarray(real), outs["full"][0].shape)
    np.testing.assert_allclose(outs["blockwise"][0][mask], outs["full"][0][mask], atol=atol, rtol=0)
    for got, want in zip(outs["blockwise"][1:], outs["full"][1:]):
        np.testing.assert_allclose(got, want, atol=atol * 4, rtol=0)
    assert np.abs(outs["full"][2]).max() > 0.1  # the key gradient is not trivially zero


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_single_row_projection_splits_the_contraction_and_equals_the_plain_dot(dtype):
    """A one-row projection on CPU (a batch-1 decode step's) runs as MATVEC_SPLIT partial products
    over slices of the contraction, one batched dot summed in fp32, and equals the plain product:
    contract=1 and contract=2 (the attention output's heads x head_dim), fp32 and bf16."""
    import jax
    import jax.numpy as jnp

    from dcd_jax.models.transformer import MATVEC_SPLIT, dense

    rng = np.random.default_rng(0)
    for x_shape, w_shape, contract in [((1, 1, 96), (96, 40), 1), ((1, 1, 4, 24), (4, 24, 40), 2)]:
        x = jnp.asarray(rng.normal(size=x_shape), dtype)
        w = jnp.asarray(rng.normal(size=w_shape), dtype)
        want = np.tensordot(np.asarray(x, np.float32), np.asarray(w, np.float32), axes=contract)
        got = jax.jit(dense, static_argnums=2)(x, w, contract)
        assert got.shape == want.shape and got.dtype == x.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-5 if dtype == "float32" else 1e-2,
                                   atol=1e-5 if dtype == "float32" else 5e-2)
        hlo = jax.jit(dense, static_argnums=2).lower(x, w, contract).as_text()
        assert "batching_dims" in hlo and f"tensor<{MATVEC_SPLIT}x1x" in hlo  # one batched dot over the K slices
    # Two rows keep the one 2-D dot (the split only pays for a matrix-vector product).
    hlo = jax.jit(dense).lower(jnp.ones((2, 96)), jnp.ones((96, 40))).as_text()
    assert "batching_dims" not in hlo
