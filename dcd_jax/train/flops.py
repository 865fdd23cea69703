"""Model FLOPs utilization: achieved training FLOP/s over the chip's peak.

MFU = flops_per_token * tokens_per_second / (peak_flops_per_device * num_devices), with
flops_per_token = 6 * N (matmul parameters, forward + backward) + 6 * L * T * h * hd (attention
scores and values; see :meth:`dcd_jax.models.ModelConfig.flops_per_token`). Rematerialization's
extra forward pass is not counted (that is "model" FLOPs utilization, not hardware utilization).

Peak dense bf16 FLOP/s per device (vendor figures, no sparsity):

=====================  ==========
device_kind contains   peak
=====================  ==========
TPU v4                 275e12
TPU v5 lite (v5e)      197e12
TPU v5 / v5p           459e12
TPU v6 lite (v6e)      918e12
H100 / H200 (SXM)      989e12
A100                   312e12
L4                     121e12
=====================  ==========

Unknown devices (CPUs included) report no MFU rather than a made-up one.
"""

from __future__ import annotations

import jax

PEAK_BF16_FLOPS = (
    ("TPU v6 lite", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
)


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    for name, peak in PEAK_BF16_FLOPS:
        if name.lower() in kind.lower():
            return peak
    return None


def mfu(flops_per_token: float, tokens_per_second: float, num_devices: int | None = None) -> float | None:
    peak = peak_flops_per_device()
    if peak is None:
        return None
    return flops_per_token * tokens_per_second / (peak * (num_devices or jax.device_count()))
