"""Qwen2 / Qwen2.5 (``model_type: qwen2``): q/k/v biases always, no output bias."""

from __future__ import annotations

from typing import Any, Mapping

from dcd_jax.models.registry import Family, decoder_rules, llama_layout_fields, register_family


def translate(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    return llama_layout_fields(hf, source, qkv_bias=True, o_bias=False)


RULES = decoder_rules()
FAMILY = register_family(Family("qwen2", translate, RULES, "Qwen2, Qwen2.5"))
