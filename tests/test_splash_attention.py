"""model.attention=splash (Pallas splash attention, interpreted on CPU) equals the einsum kernel:
logits and gradients on packed rows with padding, grouped-query heads, several blocks (with the
sequence padded up to a block multiple) and on a sharded mesh."""

import jax
import numpy as np
import pytest

from dcd_jax.models import ModelConfig, RopeConfig, abstract_model, bind, init_params
from dcd_jax.models import splash_attention as splash_module
from dcd_jax.models.config import resolve_attention
from dcd_jax.sharding import make_mesh

VOCAB = 64
CFG = ModelConfig(
    model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, rope=RopeConfig(theta=10000.0),
)


def _batch(length: int):
    """Two rows: three packed segments + 3 pads, and one full-length example."""
    a, b = length // 3, length // 4
    c = length - a - b - 3
    segments = np.array([[1] * a + [2] * b + [3] * c + [0] * 3, [1] * length], np.int32)
    positions = np.array([list(range(a)) + list(range(b)) + list(range(c)) + [0] * 3, list(range(length))], np.int32)
    ids = np.random.RandomState(length).randint(0, VOCAB, (2, length)).astype(np.int32)
    return ids, positions, segments


def _logits_and_grads(attention: str, params, length: int, mesh=None):
    cfg = ModelConfig(**{**CFG.__dict__, "attention": attention})
    graphdef, _, _ = abstract_model(cfg)
    ids, positions, segments = _batch(length)
    real = segments > 0

    def loss(p):
        logits = bind(graphdef, p)(ids, positions=positions, segment_ids=segments)
        return (logits * real[..., None]).sum() / 100.0, logits

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    if mesh is None:
        (_, logits), grads = step(params)
    else:
        with jax.set_mesh(mesh):
            (_, logits), grads = step(params)
    return np.asarray(logits)[real], jax.tree.map(np.asarray, grads)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, seed=1)


def _assert_same(got, want):
    np.testing.assert_allclose(got[0], want[0], atol=2e-5, rtol=0)
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4)
    # The gradients reach the attention projections (not vacuously equal zeros).
    assert np.abs(got[1]["layers"]["attn"]["k_proj"]["kernel"]).max() > 1e-4


def test_splash_with_several_blocks_and_padded_length(params, monkeypatch):
    """Blocks of 128 over 150 tokens padded to 256: the skipped block above the diagonal, the
    partial diagonal blocks and the padding change nothing."""
    monkeypatch.setattr(splash_module, "MAX_BLOCK", 128)
    assert splash_module._block_and_padded_length(150) == (128, 256)
    _assert_same(_logits_and_grads("splash", params, 150), _logits_and_grads("einsum", params, 150))


def test_splash_sharded_on_a_mesh_equals_einsum(params):
    """20 tokens padded to one block of 128, rows and heads split over fsdp x tensor."""
    mesh = make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])
    _assert_same(_logits_and_grads("splash", params, 20, mesh), _logits_and_grads("einsum", params, 20))


def test_auto_attention_is_splash_only_on_tpu():
    assert resolve_attention("auto", "tpu") == "splash"
    assert resolve_attention("auto", "cpu") == "einsum"
    assert resolve_attention("auto", "gpu") == "einsum"
    assert resolve_attention("xla", "tpu") == "xla"
    assert splash_module._block_and_padded_length(4096) == (512, 4096)
    assert splash_module._block_and_padded_length(1000) == (512, 1024)
    assert splash_module._block_and_padded_length(300) == (128, 384)
    assert splash_module._block_and_padded_length(20) == (128, 128)
