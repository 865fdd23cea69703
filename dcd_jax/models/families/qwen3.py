"""Qwen3 (``model_type: qwen3``): per-head q/k RMSNorm, optional attention biases."""

from __future__ import annotations

from typing import Any, Mapping

from dcd_jax.models.registry import Family, decoder_rules, llama_layout_fields, register_family


def translate(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    bias = bool(hf.get("attention_bias", False))
    return llama_layout_fields(hf, source, qkv_bias=bias, o_bias=bias, qk_norm=True)


RULES = decoder_rules()
FAMILY = register_family(Family("qwen3", translate, RULES, "Qwen3 (dense)"))
