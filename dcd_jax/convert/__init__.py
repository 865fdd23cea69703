"""Conversion between Hugging Face checkpoints and dcd-jax parameters (both directions)."""

from dcd_jax.convert.flax_to_hf import save_hf
from dcd_jax.convert.hf_to_flax import CheckpointError, load_hf_params, open_hf_checkpoint, resolve_model_dir
from dcd_jax.convert.model_dir import load_hf, load_model_dir, save_model_dir

__all__ = [
    "CheckpointError",
    "load_hf",
    "load_hf_params",
    "open_hf_checkpoint",
    "resolve_model_dir",
    "save_hf",
    "load_model_dir",
    "save_model_dir",
]
