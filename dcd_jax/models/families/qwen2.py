"""Qwen2 / Qwen2.5 (``model_type: qwen2``): q/k/v biases always, no output bias."""

from __future__ import annotations

from typing import Any, Mapping

from dcd_jax.models.registry import Family, decoder_fields, decoder_rules, refuse_sliding_window, register_family, rope_from_hf


def translate(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    refuse_sliding_window(hf, source)
    return dict(
        decoder_fields(hf, source),
        rope=rope_from_hf(hf, source),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=True,
        o_bias=False,
    )


RULES = decoder_rules()
FAMILY = register_family(Family("qwen2", translate, RULES, "Qwen2, Qwen2.5"))
