"""Hugging Face checkpoint -> dcd-jax parameters, placed straight into their shardings.

Reading never unpickles: weights come from ``*.safetensors`` only (single file or an index of
shards). Every tensor name and shape is checked against the mapping table before any array is
created, so a wrong checkpoint fails in a second with the tensor and file named. Each device's
slice is cut from a memory-mapped host view (``jax.make_array_from_callback``); no device ever
holds a full unsharded copy of a sharded parameter.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from dcd_jax.convert.mapping import Rule, expected_hf_names, get_path, set_path
from dcd_jax.convert.safetensors_io import SafetensorsFile
from dcd_jax.errors import CheckpointError
from dcd_jax.paths import looks_like_hub_id
from dcd_jax.models import abstract_model
from dcd_jax.models.config import ModelConfig
from dcd_jax.sharding import named_sharding

# Side files of a HF model directory that travel with the weights (tokenizer, generation defaults).
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclasses.dataclass
class HFCheckpoint:
    """An opened HF model directory: its config and the safetensors file holding each tensor."""

    directory: Path
    hf_config: dict[str, Any]
    tensor_files: dict[str, SafetensorsFile]  # tensor name -> file that holds it

    def tensor(self, name: str) -> np.ndarray:
        return self.tensor_files[name].get(name)


def resolve_model_dir(path_or_hub_id: str | Path, *, revision: str | None = None) -> Path:
    """A local directory as is; ``org/name`` (not an existing path) is downloaded from the hub
    (config, safetensors and tokenizer files only: no pickles, no code)."""
    path = Path(path_or_hub_id)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a model directory (with config.json and *.safetensors)")
        return path
    if not looks_like_hub_id(path_or_hub_id):
        raise CheckpointError(f"{path_or_hub_id}: no such directory (and not a hub id like 'Qwen/Qwen2.5-0.5B')")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            str(path_or_hub_id),
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"],
        )
    except Exception as e:  # offline, unknown repo, gated...: all mean "cannot get this model"
        raise CheckpointError(
            f"{path_or_hub_id}: not a local directory, and fetching it as a hub id failed: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    return Path(local)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def open_hf_checkpoint(directory: str | Path) -> HFCheckpoint:
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory}: missing config.json")
    hf_config = _read_json(cfg_path)
    index_path = directory / "model.safetensors.index.json"
    files: dict[str, SafetensorsFile] = {}
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: no 'weight_map'")
        opened: dict[str, SafetensorsFile] = {}
        inside = directory.resolve()
        for name, fname in weight_map.items():
            if fname not in opened:
                fpath = directory / str(fname)
                # An absolute or ../ name would open a file wherever it points: only files of this dir.
                if Path(str(fname)).is_absolute() or not fpath.resolve().is_relative_to(inside):
                    raise CheckpointError(
                        f"{index_path}: weight_map entry for tensor {name!r} points outside the checkpoint "
                        f"directory ({fname!r}); only file names inside {directory} are allowed"
                    )
                if not fpath.is_file():
                    raise CheckpointError(f"{index_path}: tensor {name!r} is in {fname}, which does not exist")
                opened[fname] = SafetensorsFile(fpath)
            if name not in opened[fname].header:
                raise CheckpointError(f"{directory / fname}: tensor {name!r} listed in the index is not in the file")
            files[name] = opened[fname]
    else:
        shards = sorted(directory.glob("*.safetensors"))
        if not shards:
            pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
            hint = (
                f" (found {pickles}: pickled weights are never loaded; re-save them with "
                "`save_pretrained(..., safe_serialization=True)`)"
                if pickles
                else ""
            )
            raise CheckpointError(f"{directory}: no *.safetensors weights{hint}")
        for fpath in shards:
            sf = SafetensorsFile(fpath)
            for name in sf.keys():
                files[name] = sf
    return HFCheckpoint(directory, hf_config, files)


def _check_tensors(ckpt: HFCheckpoint, cfg: ModelConfig, shapes: dict) -> dict[str, tuple[Rule, int | None]]:
    """Every expected tensor present with the right shape; nothing unexpected."""
    expected = expected_hf_names(cfg)
    missing = [n for n in expected if n not in ckpt.tensor_files]
    if missing:
        raise CheckpointError(
            f"{ckpt.directory}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            f"required by model_type={cfg.model_type}"
        )
    extra = [n for n in ckpt.tensor_files if n not in expected]
    # A tied checkpoint may still carry lm_head.weight (a copy of the embedding); rotary caches are derived.
    extra = [n for n in extra if not (n == "lm_head.weight" and cfg.tie_word_embeddings) and "rotary_emb" not in n]
    if extra:
        raise CheckpointError(
            f"{ckpt.tensor_files[extra[0]].path}: unexpected tensor(s) {extra[:5]} for model_type={cfg.model_type} "
            "(the config and the weights disagree)"
        )
    for name, (rule, layer) in expected.items():
        target = get_path(shapes, rule.path).shape
        if layer is not None:
            target = target[1:]
        got = ckpt.tensor_files[name].shape(name)
        want = rule.to_hf(np.empty(target, np.int8), cfg).shape
        if tuple(got) != tuple(want):
            raise CheckpointError(
                f"{ckpt.tensor_files[name].path}: tensor {name!r} has shape {tuple(got)}, expected {tuple(want)} from config.json"
            )
    return expected


def true_vocab_size_of(directory: Path, cfg: ModelConfig, trust_remote_code: bool) -> int:
    """The tokenizer's vocabulary size (Qwen pads the embedding past it); the embedding size without one."""
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return cfg.vocab_size
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    return min(len(tok), cfg.vocab_size)


def model_config_of(ckpt: HFCheckpoint, directory: Path, *, trust_remote_code: bool = False, **runtime) -> ModelConfig:
    """The architecture of an opened HF checkpoint, with the tokenizer's true vocabulary size
    recorded (losses and samplers exclude the embedding's padding rows past it)."""
    cfg = ModelConfig.from_hf_config(ckpt.hf_config, source=str(directory / "config.json"), **runtime)
    return dataclasses.replace(cfg, true_vocab_size=true_vocab_size_of(directory, cfg, trust_remote_code))


def load_hf_params(
    ckpt: HFCheckpoint, cfg: ModelConfig, mesh: Mesh | None = None
) -> dict[str, Any]:
    """Params dict for ``cfg`` from an opened checkpoint, each array placed in its sharding."""
    _, shapes, axes = abstract_model(cfg)
    expected = _check_tensors(ckpt, cfg, shapes)
    by_path: dict[tuple[str, ...], Rule] = {}
    for rule, _ in expected.values():
        by_path[rule.path] = rule
    dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
    params: dict[str, Any] = {}
    for path, rule in by_path.items():
        shape = get_path(shapes, path).shape
        if mesh is None:
            sharding = SingleDeviceSharding(jax.devices()[0])
        else:
            sharding = named_sharding(mesh, get_path(axes, path), shape)
        layer_cache: dict[int, np.ndarray] = {}

        def layer_array(i: int, rule=rule, layer_cache=layer_cache) -> np.ndarray:
            if i not in layer_cache:
                raw = ckpt.tensor(rule.hf_name.format(i=i))
                layer_cache[i] = np.asarray(rule.to_flax(raw, cfg), dtype=dtype)
            return layer_cache[i]

        def slice_for(index, rule=rule, shape=shape, layer_array=layer_array) -> np.ndarray:
            if rule.per_layer:
                layers = range(*index[0].indices(shape[0]))
                return np.stack([layer_array(i)[index[1:]] for i in layers])
            return np.asarray(rule.to_flax(ckpt.tensor(rule.hf_name), cfg)[index], dtype=dtype)

        set_path(params, path, jax.make_array_from_callback(shape, sharding, slice_for))
        layer_cache.clear()
    return params
