"""Test setup: 8 fake CPU devices (sharding tests), no network, and tiny local HF checkpoints."""

import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# 8 fake devices share 2 cores: under load a device can reach a collective long after the others.
# XLA:CPU aborts the process after 40 s of waiting by default; wait longer instead.
for flag in ("--xla_cpu_collective_call_terminate_timeout_seconds=900", "--xla_cpu_collective_timeout_seconds=900"):
    if flag.split("=")[0] not in os.environ["XLA_FLAGS"]:
        os.environ["XLA_FLAGS"] += " " + flag
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

