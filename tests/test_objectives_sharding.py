"""The objective on a (data=2, fsdp=2, tensor=2) mesh of 8 fake CPU devices, vocabulary sharded over
``tensor``, equals the single-device result (value, gradient, diagnostics, teacher-scoring top-k)."""

import jax
import numpy as np

import test_objectives_reference as ref
from dcd_jax.objectives import ObjectiveConfig, compute_objective, token_logprobs_chunked
from dcd_jax.objectives.config import LamSchedule
from dcd_jax.sharding import make_mesh, named_sharding

def _case():
    a, b = ref.make_case(0), ref.make_case(1)
    cat = lambda x, y: np.concatenate([x, y], 0)
    pad = np.zeros((ref.D, 40 - ref.V), np.float32)  # 40 columns: divisible by tensor=2 (33 real)
    return dict(
        hidden=cat(a["hidden"], b["hidden"]),
        unembed=np.concatenate([a["unembed"], pad], 1),
        batch={k: cat(a["batch"][k], b["batch"][k]) for k in a["batch"]},
    )


def test_sharded_objective_equals_single_device():
    assert len(jax.devices()) == 8  # tests/conftest.py asks XLA for 8 CPU devices
    case = _case()
    cfg = ObjectiveConfig(loss="kl", weighting="dcd", reduction="sequence", chunk_size=5,
                          lam=LamSchedule(kind="linear", warmup_steps=10))

    def f(h, w, batch):
        out = compute_objective(cfg, h, w, batch, step=4, true_vocab_size=ref.VT)
        return out.loss, out

    def step(h, w, batch):
        # one program: training loss + gradient, and the teacher-scoring statistics (top-k)
        (loss, out), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(h, w, batch)
        s = token_logprobs_chunked(h, w, batch["targets"], true_vocab_size=ref.VT, chunk_size=5, top_k=3)
        return loss, out, grads, (s.target_logprobs, s.entropy, s.topk_logprobs, s.topk_ids)

    step_fn = jax.jit(step)
    loss1, out1, g1, score1 = step_fn(case["hidden"], case["unembed"], case["batch"])

    mesh = make_mesh(2, 2, 2)
    with jax.set_mesh(mesh):
        h_s = jax.device_put(case["hidden"], named_sharding(mesh, ("batch", "length", "act_embed")))
        w_s = jax.device_put(case["unembed"], named_sharding(mesh, ("embed", "vocab")))
        assert tuple(w_s.sharding.spec) == ("fsdp", "tensor")
        assert tuple(h_s.sharding.spec)[0] == ("data", "fsdp")
        batch_s = {
            k: jax.device_put(v, named_sharding(mesh, ("batch",) + (None,) * (v.ndim - 1)))
            for k, v in case["batch"].items()
        }
        loss2, out2, g2, score2 = step_fn(h_s, w_s, batch_s)
        assert g2[0].sharding.num_devices == 8 and g2[1].sharding.num_devices == 8

    np.testing.assert_allclose(loss2, loss1, rtol=1e-5)
    for a, b in zip(g2, g1):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for k in out1.metrics:
        np.testing.assert_allclose(out2.metrics[k], out1.metrics[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(score2[:3], score1[:3]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(score2[3], score1[3])
