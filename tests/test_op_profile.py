"""bench/op_profile.py: XLA:CPU thunk times joined with the HLO's source stacks, by op class."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_profile_classifies_ops_by_the_code_that_built_them():
    import jax
    import jax.numpy as jnp
    import op_profile

    from dcd_jax.models.transformer import cache_bias, cached_attention
    from dcd_jax.objectives import token_logprobs_chunked

    if jax.default_backend() != "cpu":
        pytest.skip("the profile reads XLA:CPU's per-thunk trace events")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 16, 32)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(32, 32)), jnp.float32)
    unembed = jnp.asarray(rng.normal(size=(32, 64)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 64, (2, 16)), jnp.int32)
    seg = jnp.ones((2, 16), jnp.int32)
    slots = jnp.broadcast_to(jnp.arange(16), (2, 16))

    def program(x, w, unembed):
        h = jnp.tanh(x @ w)  # a dense matmul, then elementwise "other"
        q = h.reshape(2, 16, 4, 8)
        kv = q[:, :, :2].transpose(0, 2, 1, 3)
        a = cached_attention(q, kv, kv, cache_bias(seg, slots, seg))
        stats = token_logprobs_chunked(a.reshape(2, 16, 32), unembed, targets, chunk_size=8)
        return jnp.sum(stats.target_logprobs)

    args = (x, w, unembed)
    compiled = jax.jit(program).lower(*args).compile()
    classes = op_profile.classify_instructions(compiled.as_text())
    assert {"matmul", "attention", "loss"} <= set(classes.values())
    prof = op_profile.profile_compiled(compiled, args, calls=2, donate=False)
    by_class = prof["by_class_s"]
    assert by_class["matmul"] > 0 and by_class["attention"] > 0 and by_class["loss"] > 0
    assert by_class["optimizer"] == 0 and by_class["sampling"] == 0
    assert sum(prof["by_class_fraction"].values()) == pytest.approx(1.0)
    assert 0 <= prof["host_s"] <= prof["wall_s"]


@pytest.mark.parametrize("flags, isa", [("fpu sse avx avx2 avx512f avx512bw", "avx512"), ("fpu sse avx avx2 fma", "avx2"),
                                        ("fpu sse sse2", "sse")])
def test_host_cpu_reads_model_and_widest_vector_isa(tmp_path, flags, isa):
    import op_profile

    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: {flags}\n\n"
                    f"processor\t: 1\nmodel name\t: AMD EPYC 9B14\nflags\t\t: {flags}\n")
    assert op_profile.host_cpu(str(info)) == {"model": "AMD EPYC 9B14", "vector_isa": isa}
    assert op_profile.host_cpu(str(tmp_path / "missing")) == {}
