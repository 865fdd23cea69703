"""dcd-jax parameters -> a Hugging Face model directory (transformers / vLLM loadable).

Writes ``config.json``, ``generation_config.json``, the tokenizer files of the source model,
and the weights as safetensors shards with a ``model.safetensors.index.json``. The same mapping
table as the loader is used in reverse, so a round trip reproduces every tensor bitwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from dcd_jax import storage
from dcd_jax.atomic_files import atomic_directory
from dcd_jax.convert.hf_to_flax import HF_SIDE_FILES
from dcd_jax.convert.mapping import active_rules, get_path
from dcd_jax.convert.safetensors_io import save_safetensors
from dcd_jax.errors import CheckpointError
from dcd_jax.models.config import ModelConfig

_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def _to_host(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def hf_tensors(params: dict[str, Any], cfg: ModelConfig, dtype: str | None = None):
    """Yield (hf_name, array) for every tensor, one layer at a time (bounded host memory)."""
    np_dtype = _NP_DTYPES[dtype] if dtype else None
    for rule in active_rules(cfg):
        arr = _to_host(get_path(params, rule.path))
        if np_dtype is not None:
            arr = arr.astype(np_dtype)
        if rule.per_layer:
            for i in range(cfg.num_layers):
                yield rule.hf_name.format(i=i), np.ascontiguousarray(rule.to_hf(arr[i], cfg))
        else:
            yield rule.hf_name, np.ascontiguousarray(rule.to_hf(arr, cfg))


def _is_hf_file(name: str) -> bool:
    return name in HF_SIDE_FILES or name.endswith(".safetensors") or name == "model.safetensors.index.json"


def save_hf(
    params: dict[str, Any],
    cfg: ModelConfig,
    hf_config: dict[str, Any],
    out_dir: str | Path,
    *,
    side_files_from: str | Path | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write a HF model directory. ``dtype`` casts the weights (default: keep the param dtype).

    Only process 0 writes (every process must call this: gathering sharded params is collective).
    """
    out = storage.path(out_dir)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in hf_tensors(params, cfg, dtype):
        if size and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    if jax.process_index() != 0:
        return out
    foreign = sorted(p.name for p in out.iterdir() if not _is_hf_file(p.name)) if out.is_dir() else []
    if foreign:  # the swap below replaces the whole directory: never take a user's other files with it
        raise CheckpointError(f"{out}: refusing to replace a directory that holds files of no HF model "
                              f"({', '.join(foreign[:5])}); export into a new or an earlier export's directory")
    # Built under a temporary name and swapped in whole: a kill never leaves a half-exported model.
    # Side files already in ``out`` (e.g. a tokenizer saved there first) are kept, as when writing
    # into it; ``side_files_from`` overrides them.
    with atomic_directory(out) as staging:
        for source in (out, side_files_from):
            for fname in HF_SIDE_FILES if source is not None else ():
                src = storage.path(source) / fname
                if src.is_file() and fname != "config.json":
                    (staging / fname).write_bytes(src.read_bytes())
        weight_map = {}
        total = 0
        for k, shard in enumerate(shards, start=1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors(shard, staging / fname)
            for name, arr in shard.items():
                weight_map[name] = fname
                total += arr.nbytes
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

        config = dict(hf_config)
        saved_dtype = dtype or cfg.param_dtype
        config["dtype"] = saved_dtype
        config.pop("torch_dtype", None)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if not (staging / "generation_config.json").is_file():
            gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
            (staging / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


def new_hf_checkpoint(
    hf_config: dict[str, Any], out_dir: str | Path, *, seed: int = 0, side_files_from: str | Path | None = None
) -> Path:
    """Write a fresh random-weight HF checkpoint for ``hf_config`` without PyTorch.

    The default job builds its tiny student this way, so it then goes through the same
    HF -> Flax path as a real downloaded checkpoint.
    """
    from dcd_jax.models import init_params

    cfg = ModelConfig.from_hf_config(hf_config)
    return save_hf(init_params(cfg, seed), cfg, hf_config, out_dir, side_files_from=side_files_from)
