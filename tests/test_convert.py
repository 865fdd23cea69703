"""HF <-> dcd-jax conversion: round trips, sharded loading, formats and clear errors."""

import json
import shutil

import numpy as np
import pytest
from transformers import AutoTokenizer

from hf_fixtures import VOCAB, hf_logits, make_hf_model, read_config, save_hf_model, save_word_tokenizer

import dcd_jax
from dcd_jax.cli import main as cli_main
from dcd_jax.convert import CheckpointError, save_hf
from dcd_jax.convert.model_dir import read_model_meta
from dcd_jax.convert.safetensors_io import SafetensorsFile
from dcd_jax.models import UnsupportedModelError


def _tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        sf = SafetensorsFile(f)
        out.update({k: np.array(sf.get(k)) for k in sf.keys()})
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3_text"])
def test_round_trip_is_bitwise_and_loads_in_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM

    src = save_hf_model(family, tmp_path / "src")
    model = dcd_jax.load_hf(src)
    from flax import nnx

    params = nnx.to_pure_dict(nnx.split(model)[1])
    out = save_hf(params, model.cfg, read_config(src), tmp_path / "out", side_files_from=src, max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").is_file() and (out / "generation_config.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1  # really sharded, with an index
    original, exported = _tensors(src), _tensors(out)
    assert sorted(original) == sorted(exported)
    for name, value in original.items():
        assert exported[name].dtype == value.dtype and np.array_equal(exported[name], value), name
    ids = np.random.RandomState(0).randint(0, VOCAB, (2, 9))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(make_hf_model(family), ids))


def test_cli_round_trip_through_model_dir(tmp_path):
    src = save_hf_model("qwen2", tmp_path / "src")
    save_word_tokenizer(src, VOCAB - 10)
    assert cli_main(["convert", "hf-to-flax", "--hf", str(src), "--out", str(tmp_path / "flax")]) == 0
    assert (tmp_path / "flax" / "model.json").is_file() and (tmp_path / "flax" / "hf" / "tokenizer.json").is_file()
    # The model dir records the tokenizer's vocabulary (not the padded embedding rows).
    n_tokens = len(AutoTokenizer.from_pretrained(str(src)))
    assert n_tokens < VOCAB and read_model_meta(tmp_path / "flax")[0].tokenizer_vocab_size == n_tokens
    assert cli_main(["convert", "flax-to-hf", "--ckpt", str(tmp_path / "flax"), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    original, exported = _tensors(src), _tensors(tmp_path / "hf")
    assert all(np.array_equal(exported[k], v) for k, v in original.items()) and len(original) == len(exported)
    # bf16 export: a cast of every tensor.
    assert cli_main(["convert", "flax-to-hf", "--ckpt", str(tmp_path / "flax"), "--out", str(tmp_path / "bf"), "--dtype", "bfloat16"]) == 0
    bf = _tensors(tmp_path / "bf")
    assert str(bf["model.norm.weight"].dtype) == "bfloat16"
    assert json.loads((tmp_path / "bf" / "config.json").read_text())["dtype"] == "bfloat16"


def test_bf16_and_index_sharded_checkpoints_load(tmp_path):
    import torch

    src = save_hf_model("llama", tmp_path / "src", max_shard_size="30KB", dtype=torch.bfloat16)
    assert (src / "model.safetensors.index.json").is_file()
    model = dcd_jax.load_hf(src)
    ref = make_hf_model("llama").to(torch.bfloat16)
    want = ref.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T
    got = np.asarray(model.layers.mlp.down_proj["kernel"][...][1])
    assert got.dtype == np.float32 and np.array_equal(got, want)


def test_true_vocab_size_from_tokenizer_keeps_padded_rows(tmp_path):
    src = save_hf_model("qwen2", tmp_path / "src")
    save_word_tokenizer(src, VOCAB - 16)  # embedding padded past the tokenizer, like Qwen checkpoints
    model = dcd_jax.load_hf(src)
    n_tokens = len(AutoTokenizer.from_pretrained(src))
    assert n_tokens < VOCAB
    assert model.cfg.vocab_size == VOCAB and model.cfg.true_vocab_size == n_tokens
    assert model.embed["embedding"][...].shape[0] == VOCAB


def _edit_config(d, **changes):
    cfg = read_config(d)
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_errors_name_the_problem(tmp_path):
    from safetensors.numpy import save_file

    with pytest.raises(CheckpointError, match="no such directory"):
        dcd_jax.load_hf(tmp_path / "nope")
    src = save_hf_model("qwen3", tmp_path / "src")
    bad = tmp_path / "bad_type"
    shutil.copytree(src, bad)
    _edit_config(bad, model_type="gpt2")
    with pytest.raises(UnsupportedModelError, match=r"config.json.*model_type='gpt2'"):
        dcd_jax.load_hf(bad)
    window = tmp_path / "window"
    shutil.copytree(src, window)
    _edit_config(window, use_sliding_window=True)
    with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
        dcd_jax.load_hf(window)

    tensors = _tensors(src)
    wrong = tmp_path / "wrong_shape"
    shutil.copytree(src, wrong)
    t = dict(tensors)
    t["model.layers.1.mlp.up_proj.weight"] = np.zeros((3, 3), np.float32)
    save_file(t, str(wrong / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*model\.layers\.1\.mlp\.up_proj\.weight.*shape \(3, 3\)"):
        dcd_jax.load_hf(wrong)
    missing = tmp_path / "missing"
    shutil.copytree(src, missing)
    t = {k: v for k, v in tensors.items() if k != "model.layers.0.self_attn.k_norm.weight"}
    save_file(t, str(missing / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.0\.self_attn\.k_norm\.weight"):
        dcd_jax.load_hf(missing)
    extra = tmp_path / "extra"
    shutil.copytree(src, extra)
    save_file({**tensors, "model.layers.0.mlp.extra.weight": np.zeros(2, np.float32)}, str(extra / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*unexpected.*model\.layers\.0\.mlp\.extra\.weight"):
        dcd_jax.load_hf(extra)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(src / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*never loaded"):
        dcd_jax.load_hf(pickled)
    assert cli_main(["convert", "hf-to-flax", "--hf", str(bad), "--out", str(tmp_path / "o")]) == 2
