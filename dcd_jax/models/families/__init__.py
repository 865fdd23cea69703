"""The registered model families, one module each (see :mod:`dcd_jax.models.registry`).

Importing this package registers them, in this order (the order ``SUPPORTED_MODEL_TYPES`` lists).
To add a family: write ``<name>.py`` here (its ``translate`` and ``RULES``, then
``register_family``), import it below, and add its tiny checkpoint to the parity tests.
"""

from dcd_jax.models.families import llama, qwen2, qwen3, gemma3  # noqa: F401  (registration)
