"""Llama 3 (``model_type: llama``): GQA, SwiGLU, optional attention biases, Llama-3 RoPE scaling."""

from __future__ import annotations

from typing import Any, Mapping

from dcd_jax.models.registry import Family, decoder_rules, llama_layout_fields, register_family


def translate(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    bias = bool(hf.get("attention_bias", False))
    return llama_layout_fields(hf, source, qkv_bias=bias, o_bias=bias)


RULES = decoder_rules()
FAMILY = register_family(Family("llama", translate, RULES, "Llama 3 (3.1, 3.2)"))
