"""dcd-jax: distribution-corrected offline distillation of reasoning into small language models."""

__version__ = "0.1.0"


def load_hf(path_or_hub_id, *, dtype="float32", mesh=None, **kwargs):
    """Load a Llama 3 / Qwen2.5 / Qwen3 HF checkpoint as a Flax model (see :func:`dcd_jax.convert.load_hf`)."""
    from dcd_jax.convert import load_hf as _load_hf

    return _load_hf(path_or_hub_id, dtype=dtype, mesh=mesh, **kwargs)


__all__ = ["load_hf", "__version__"]
