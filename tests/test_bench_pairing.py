"""bench/sampler.py's host-limit fractions: each reference probe is paired with the step timed
right after it, and the decode step's FLOPs are counted by hand; bench/train_step.py's shapes
each have a GKD teacher."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_paired_fractions_pair_each_probe_with_the_step_right_after_it():
    import sampler

    calls = []
    refs = iter([10.0, 20.0, 40.0])  # the host's speed drifts: the reference doubles each round
    steps = iter([0.1, 0.05, 0.025])  # and our step speeds up with it

    def reference():
        calls.append("ref")
        return next(refs)

    def step():
        calls.append("step")
        return next(steps)

    out = sampler.paired_fractions(reference, step, work=1.0, rounds=3)
    assert calls == ["ref", "step"] * 3
    # Every round reaches the same fraction of its own reference, whatever the drift.
    assert out["fractions"] == pytest.approx([1.0, 1.0, 1.0])
    assert out["fraction"] == pytest.approx(1.0)
    # One round hit by a load spike (its step 10x slower) does not move the median.
    out = sampler.paired_fractions(iter([10.0, 10.0, 10.0]).__next__, iter([0.1, 0.1, 1.0]).__next__, 1.0, 3)
    assert out["fraction"] == pytest.approx(1.0)


def test_decode_flops_count_every_weight_once_and_attention_over_all_slots():
    import sampler

    from dcd_jax.models import ModelConfig

    hf = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 96, "hidden_size": 32,
          "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 64,
          "tie_word_embeddings": True}
    cfg = ModelConfig.from_hf_config(hf, source="test")
    d, f, layers, h, kv, hd, vocab = (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
                                      cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size)
    per_layer = d * (h + 2 * kv) * hd + h * hd * d + 3 * d * f + 2 * d  # q, k, v, o, MLP, two norms
    params = vocab * d + layers * per_layer + d  # tied embedding once, final norm
    if cfg.qkv_bias:
        params += layers * (h + 2 * kv) * hd
    assert cfg.num_params == params
    batch, slots = 4, 10
    assert sampler.decode_flops_per_step(cfg, batch, slots) == 2 * batch * params + 4 * batch * layers * h * hd * slots


def test_every_train_bench_shape_has_a_gkd_teacher_sharing_its_vocabulary():
    """`bench/train_step.py --objectives ...,GKD-l0` runs on any of its shapes: each has a live
    teacher with the student's vocabulary and at least its size (a missing demo teacher once
    stopped the README's GKD command at the second shape)."""
    import train_step

    assert set(train_step.GKD_TEACHERS) == set(train_step.MODELS)
    for name, (student, _, _) in train_step.MODELS.items():
        teacher = train_step.GKD_TEACHERS[name]
        assert teacher["vocab_size"] == student["vocab_size"], name
        assert teacher["hidden_size"] >= student["hidden_size"], name
        assert teacher["num_hidden_layers"] >= student["num_hidden_layers"], name


def test_decode_matrices_are_the_weights_a_cpu_decode_step_multiplies_by(tmp_path):
    """The shapes bench/sampler.py's matmul and bandwidth probes stream are those of the model's
    CPU decode copies (fused q/k/v and gate/up, o, down, unembedding), each counted per step."""
    import sampler
    from hf_fixtures import save_hf_model

    import dcd_jax
    from dcd_jax.infer.sampler import cpu_decode_weights

    model = dcd_jax.load_hf(save_hf_model("qwen2", tmp_path / "qwen2"))
    weights = cpu_decode_weights(model)
    layers, fused = weights["layers"], weights["fused"]

    def matrix(w):  # a kernel as the [in, out] matrix its dot contracts
        w = w[...]
        return (w.shape[0], int(w.size // w.shape[0])) if w.shape[0] == model.cfg.hidden_size else \
            (int(w.size // w.shape[-1]), w.shape[-1])

    expected = {
        "qkv": [matrix(f["qkv"]) for f in fused["layers"]],
        "o": [matrix(layer["attn"]["o_proj"]["kernel"]) for layer in layers],
        "gate_up": [matrix(f["gate_up"]) for f in fused["layers"]],
        "down": [matrix(layer["mlp"]["down_proj"]["kernel"]) for layer in layers],
        "unembed": [tuple(fused["unembed"].shape)],
    }
    got = sampler.decode_matrices(model.cfg)
    assert set(got) == set(expected)
    for name, shapes in expected.items():
        assert got[name] == (shapes[0], len(shapes)), name
        assert len(set(shapes)) == 1
