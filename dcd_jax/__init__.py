"""dcd-jax: distribution-corrected offline distillation of reasoning into small language models."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``dcd_jax.load_hf`` without importing JAX when the package is imported (the CLI starts fast).
    if name == "load_hf":
        from dcd_jax.convert.model_dir import load_hf

        return load_hf
    raise AttributeError(f"module 'dcd_jax' has no attribute {name!r}")


__all__ = ["load_hf", "__version__"]
