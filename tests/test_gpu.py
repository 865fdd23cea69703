"""Checks that need an NVIDIA GPU (skipped elsewhere; `bash bench/gpu.sh` runs them on a device).

cuDNN flash attention (``model.attention=cudnn``) must give the einsum kernel's logits and
gradients, on packed rows with padding, in bf16 at the head sizes of Qwen2.5 (128) and Llama (64).
"""

import jax
import numpy as np
import pytest

from dcd_jax.models import ModelConfig, abstract_model, bind, init_params

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU (cuDNN)")


@pytest.mark.parametrize("head_dim", [64, 128])
def test_cudnn_attention_equals_einsum(head_dim):
    rng = np.random.RandomState(0)
    t = 256
    ids = rng.randint(0, 1024, (2, t)).astype(np.int32)
    segments = np.array([[1] * 100 + [2] * 140 + [0] * 16, [1] * t], np.int32)
    positions = np.array([list(range(100)) + list(range(140)) + [0] * 16, list(range(t))], np.int32)
    real = segments > 0
    outs = {}
    for kernel in ("einsum", "cudnn"):
        cfg = ModelConfig(model_type="qwen2", vocab_size=1024, hidden_size=512, intermediate_size=1024, num_layers=2,
                          num_heads=512 // head_dim, num_kv_heads=2, head_dim=head_dim, qkv_bias=True,
                          dtype="bfloat16", param_dtype="float32", attention=kernel)
        graphdef, _, _ = abstract_model(cfg)
        params = init_params(cfg, seed=0)

        def loss(p):
            logits = bind(graphdef, p)(ids, positions=positions, segment_ids=segments)
            return (logits * real[..., None]).sum() / real.sum(), logits

        (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        outs[kernel] = (float(value), np.asarray(logits, np.float32), np.asarray(grads["layers"]["attn"]["q_proj"]["kernel"]))
    ref, got = outs["einsum"], outs["cudnn"]
    scale = np.abs(ref[1][real]).max()
    assert np.abs(got[1][real] - ref[1][real]).max() < 0.02 * scale  # bf16 agreement
    assert (got[1][real].argmax(-1) == ref[1][real].argmax(-1)).mean() > 0.95
    np.testing.assert_allclose(got[2], ref[2], atol=0.05 * np.abs(ref[2]).max())
