"""The dcd-jax model directory: Orbax params + ``model.json`` + the source model's HF side files.

Layout (written by ``dcd-jax convert hf-to-flax`` and by training runs)::

    DIR/model.json   {"model_config": ..., "hf_config": ...}   architecture + original HF config
    DIR/hf/          tokenizer / generation config files copied from the source checkpoint
    DIR/params/      Orbax checkpoint of the params dict

A training run directory holds ``model.json`` and ``hf/`` once, and Orbax steps under
``checkpoints/<step>/params``; :func:`find_params_dir` accepts either layout.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from dcd_jax import storage
from dcd_jax.atomic_files import atomic_write_bytes, atomic_write_text
from dcd_jax.config import from_dict, to_dict
from dcd_jax.convert.hf_to_flax import (
    HF_SIDE_FILES,
    CheckpointError,
    load_hf_params,
    model_config_of,
    open_hf_checkpoint,
    resolve_model_dir,
)
from dcd_jax.models import Transformer, abstract_model, bind, sharded_abstract_params
from dcd_jax.models.config import ModelConfig, resolve_attention

MODEL_META = "model.json"
SIDE_DIR = "hf"


def write_model_meta(out_dir: str | Path, cfg: ModelConfig, hf_config: dict[str, Any], side_files_from: str | Path | None) -> None:
    out = storage.path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The attention kernel is the running process's choice, not the model's: a model trained with
    # cuDNN attention must load on a CPU, so it is not recorded.
    arch = {k: v for k, v in to_dict(cfg).items() if k != "attention"}
    meta = {"model_config": arch, "hf_config": hf_config}
    atomic_write_text(out / MODEL_META, json.dumps(meta, indent=2, sort_keys=True))
    if side_files_from is not None:
        (out / SIDE_DIR).mkdir(exist_ok=True)
        for fname in HF_SIDE_FILES:
            src = storage.path(side_files_from) / fname
            if src.is_file():
                atomic_write_bytes(out / SIDE_DIR / fname, src.read_bytes())


def find_model_meta(start: str | Path) -> Path:
    """``model.json`` in ``start`` or one of its parents (a step dir sits inside a run dir)."""
    start = Path(start).resolve()
    for d in (start, *start.parents[:3]):
        if (d / MODEL_META).is_file():
            return d
    raise CheckpointError(f"{start}: no {MODEL_META} here or in the parent directories (is this a dcd-jax checkpoint?)")


def read_model_meta(model_dir: str | Path, **runtime: Any) -> tuple[ModelConfig, dict[str, Any], Path]:
    """(model config with ``runtime`` dtype/remat overrides, original HF config, dir holding model.json)."""
    d = find_model_meta(model_dir)
    try:
        meta = json.loads((d / MODEL_META).read_text())
        arch, hf_config = meta["model_config"], meta["hf_config"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{d / MODEL_META}: damaged ({type(e).__name__}: {e}); expected "
                              "{\"model_config\": ..., \"hf_config\": ...}") from None
    cfg = from_dict(ModelConfig, {**arch, **runtime})
    return cfg, hf_config, d


def find_params_dir(ckpt: str | Path) -> Path:
    """The Orbax params directory inside a model dir, a step dir, or a run/checkpoints root (latest step)."""
    ckpt = Path(ckpt)
    if (ckpt / "params").is_dir():
        return ckpt / "params"
    for root in (ckpt / "checkpoints", ckpt):
        steps = sorted((int(p.name), p) for p in root.glob("*") if p.name.isdigit() and (p / "params").is_dir())
        if steps:
            return steps[-1][1] / "params"
    raise CheckpointError(f"{ckpt}: no params checkpoint found (expected {ckpt}/params or checkpoints/<step>/params)")


def save_params(params_dir: str | Path, params: dict[str, Any]) -> None:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(storage.absolute(params_dir), params)
    checkpointer.wait_until_finished()


def restore_params(params_dir: str | Path, cfg: ModelConfig, mesh: Mesh | None = None) -> dict[str, Any]:
    """Restore params straight into the shardings of ``mesh`` (any mesh shape; single device if None)."""
    target = sharded_abstract_params(cfg, mesh)
    return ocp.StandardCheckpointer().restore(storage.absolute(params_dir), target)


def save_model_dir(
    out_dir: str | Path, params: dict[str, Any], cfg: ModelConfig, hf_config: dict[str, Any], side_files_from=None
) -> Path:
    out = storage.path(out_dir)
    write_model_meta(out, cfg, hf_config, side_files_from)
    save_params(out / "params", params)
    return out


def load_model_dir(ckpt: str | Path, *, mesh: Mesh | None = None, **runtime: Any):
    """(cfg, hf_config, params, dir with model.json) from a model dir or training checkpoint."""
    cfg, hf_config, meta_dir = read_model_meta(ckpt, **runtime)
    params = restore_params(find_params_dir(ckpt), cfg, mesh)
    return cfg, hf_config, params, meta_dir


@dataclasses.dataclass
class Pretrained:
    """A loaded model: architecture, original HF config, params and the dir with tokenizer files."""

    cfg: ModelConfig
    hf_config: dict[str, Any]
    params: dict[str, Any]
    files_dir: Path  # tokenizer / generation_config files

    def tokenizer(self, trust_remote_code: bool = False):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.files_dir), trust_remote_code=trust_remote_code)


def load_pretrained(
    path: str | Path, *, mesh: Mesh | None = None, dtype: str = "float32", param_dtype: str = "float32",
    remat: str = "none", attention: str = "auto", trust_remote_code: bool = False,
) -> Pretrained:
    """Load a HF directory / hub id, or a dcd-jax model dir or checkpoint, onto ``mesh``
    (``attention="auto"``: splash on TPU, einsum elsewhere)."""
    attention = resolve_attention(attention, jax.default_backend())
    runtime = dict(dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention)
    local = storage.localize(path)  # a bucket's model is read from a local copy (tokenizer, config readers)
    if local.exists() and (local / "config.json").is_file() and not (local / MODEL_META).is_file():
        directory = local
    elif local.exists():
        cfg, hf_config, params, meta_dir = load_model_dir(local, mesh=mesh, **runtime)
        return Pretrained(cfg, hf_config, params, meta_dir / SIDE_DIR)
    else:
        directory = resolve_model_dir(path)
    ckpt = open_hf_checkpoint(directory)
    cfg = model_config_of(ckpt, directory, trust_remote_code=trust_remote_code, **runtime)
    return Pretrained(cfg, ckpt.hf_config, load_hf_params(ckpt, cfg, mesh), directory)


def load_hf(
    path_or_hub_id: str | Path,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    mesh: Mesh | None = None,
    remat: str = "none",
    attention: str = "auto",
    trust_remote_code: bool = False,
) -> Transformer:
    """Load a HF checkpoint of a registered family (Llama 3, Qwen2.5, Qwen3, Gemma 3 text; or a dcd-jax
    model dir) as a callable Flax model.

    ``model(input_ids, positions=None, segment_ids=None)`` returns fp32 logits [B, T, V]. With
    ``mesh``, every parameter is created directly in its sharding from the table in
    :mod:`dcd_jax.sharding`. ``model.cfg.true_vocab_size`` is the tokenizer's vocabulary size
    (the embedding may have padding rows past it).
    """
    loaded = load_pretrained(
        path_or_hub_id, mesh=mesh, dtype=dtype, param_dtype=param_dtype or dtype, remat=remat,
        attention=attention, trust_remote_code=trust_remote_code,
    )
    graphdef, _, _ = abstract_model(loaded.cfg)
    return bind(graphdef, loaded.params)


def peek_model_config(path: str | Path) -> ModelConfig | None:
    """The architecture of a local model (HF dir, dcd-jax model dir or checkpoint) without reading
    any weight; None for a hub id (not downloaded yet)."""
    local = storage.localize(path)
    if not local.exists():
        return None
    if (local / "config.json").is_file() and not (local / MODEL_META).is_file():
        return ModelConfig.from_pretrained_dir(local)
    return read_model_meta(local)[0]


def load_pretrained_tokenizer(path: str | Path, *, trust_remote_code: bool = False):
    """The tokenizer of a HF directory / hub id, or of a dcd-jax model dir or checkpoint."""
    from transformers import AutoTokenizer

    local = storage.localize(path)
    if local.exists() and not (local / "config.json").is_file():
        local = find_model_meta(local) / SIDE_DIR
    elif not local.exists():
        local = resolve_model_dir(path)
    return AutoTokenizer.from_pretrained(str(local), trust_remote_code=trust_remote_code)
