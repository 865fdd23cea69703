"""Sharded loading and forward on 8 fake CPU devices equal the single-device result."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hf_fixtures import VOCAB, save_hf_model

import dcd_jax
from dcd_jax.models import bind
from dcd_jax.errors import ConfigError
from dcd_jax.sharding import logical_to_spec, make_mesh


def test_mesh_sizes_and_errors():
    assert jax.device_count() == 8
    assert dict(make_mesh(2, -1, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ConfigError, match="= 3 devices, but 8 are available"):
        make_mesh(3, 1, 1)
    with pytest.raises(ConfigError, match="at most one"):
        make_mesh(-1, -1, 1)
    with pytest.raises(ConfigError, match="mesh.fsdp=0"):  # was a ZeroDivisionError
        make_mesh(-1, 0, 1)


def test_logical_rules_replicate_what_does_not_divide():
    mesh = make_mesh(2, 2, 2)
    assert logical_to_spec(("embed", "vocab"), mesh=mesh, shape=(48, 96)) == P("fsdp", "tensor")
    assert logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), mesh=mesh, shape=(2, 48, 1, 20)) == P(None, "fsdp", None, None)
    assert logical_to_spec(("batch", "length"), mesh=mesh) == P(("data", "fsdp"), None)


@pytest.mark.parametrize("family,attention", [("qwen2", "einsum"), ("qwen3", "einsum"), ("qwen3", "xla")])
def test_sharded_forward_equals_single_device(family, attention, tmp_path):
    src = save_hf_model(family, tmp_path / "m")
    ids = np.random.RandomState(0).randint(0, VOCAB, (4, 16)).astype(np.int32)
    single = np.asarray(dcd_jax.load_hf(src)(ids))

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model = dcd_jax.load_hf(src, mesh=mesh, attention=attention)
    from flax import nnx

    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    # Parameters really are sharded as the table says.
    q = params["layers"]["attn"]["q_proj"]["kernel"]  # (layers, embed, heads, head_dim)
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 24, q.shape[2] // 2, q.shape[3])
    assert params["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert params["layers"]["mlp"]["down_proj"]["kernel"].sharding.spec == P(None, "tensor", "fsdp")

    @jax.jit
    def forward(p, x):
        return bind(graphdef, p)(x)

    with jax.set_mesh(mesh):
        out = forward(params, jax.device_put(ids, jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))))
    assert out.sharding.spec[0] == ("data", "fsdp")  # activations stay batch-sharded
    np.testing.assert_allclose(np.asarray(out), single, atol=1e-5, rtol=0)
