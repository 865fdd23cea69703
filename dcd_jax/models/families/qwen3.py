"""Qwen3 (``model_type: qwen3``): per-head q/k RMSNorm, optional attention biases."""

from __future__ import annotations

from typing import Any, Mapping

from dcd_jax.models.registry import Family, decoder_fields, decoder_rules, refuse_sliding_window, register_family, rope_from_hf


def translate(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    refuse_sliding_window(hf, source)
    bias = bool(hf.get("attention_bias", False))
    return dict(
        decoder_fields(hf, source),
        rope=rope_from_hf(hf, source),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=True,
    )


RULES = decoder_rules()
FAMILY = register_family(Family("qwen3", translate, RULES, "Qwen3 (dense)"))
