"""Gemma 3 text models (``model_type: gemma3_text``; Gemma3ForCausalLM: 270M, 1B, and the text
tower layout of the larger ones).

Its switches: GeGLU MLP (``gelu_pytorch_tanh``), RMSNorm with the ``(1 + w)`` scale, norms before
and after attention and the MLP (``sandwich_norms``), q/k norms, the embedding scaled by
``sqrt(hidden_size)``, ``query_pre_attn_scalar`` as the attention scale, interleaved
sliding-window (``sliding_attention``) and global layers with their own RoPE bases (and the global
layers' linear scaling of the larger models), tied embeddings.

Refused: attention / final logit softcapping (Gemma 3 sets both to None; Gemma 2 uses them),
bidirectional attention (EmbeddingGemma), and ``model_type: gemma3`` (the multimodal checkpoint:
its tensors live under ``model.language_model.`` next to a vision tower; extract the text model
with transformers into a Gemma3ForCausalLM checkpoint first).
"""

from __future__ import annotations

from typing import Any, Mapping

from dcd_jax.models.registry import (
    Family,
    LAYER,
    REFUSED,
    Rule,
    UnsupportedModelError,
    decoder_fields,
    decoder_rules,
    identity,
    register_family,
    rope_from_params,
)

LOCAL, GLOBAL = "sliding_attention", "full_attention"
# transformers' defaults when a config omits them (Gemma3TextConfig.default_theta / its pattern).
DEFAULT_THETA = {GLOBAL: 1_000_000.0, LOCAL: 10_000.0}
DEFAULT_PATTERN = 6


def layer_types(hf: Mapping[str, Any], source: str) -> list[str]:
    """``layer_types``, or (older configs) every ``sliding_window_pattern``-th layer global."""
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None:
        pattern = int(hf.get("sliding_window_pattern", DEFAULT_PATTERN))
        types = [LOCAL if (i + 1) % pattern else GLOBAL for i in range(n)]
    if len(types) != n or any(t not in (LOCAL, GLOBAL) for t in types):
        raise UnsupportedModelError(f"{source}: layer_types must list {n} of {LOCAL!r} / {GLOBAL!r}, got {types!r}")
    return list(types)


def ropes(hf: Mapping[str, Any], source: str):
    """(global, local) RoPE: transformers 5's ``rope_parameters`` per layer type, or the older
    ``rope_theta`` / ``rope_local_base_freq`` / ``rope_scaling`` (the scaling is the global layers')."""
    params = hf.get("rope_parameters")
    if params and (GLOBAL in params or LOCAL in params):
        glob = dict(params.get(GLOBAL) or {})
        loc = dict(params.get(LOCAL) or {})
    else:
        glob = {**(hf.get("rope_scaling") or {}), **(params or {})}
        loc = {}
        if "rope_local_base_freq" in hf:
            loc["rope_theta"] = hf["rope_local_base_freq"]
        if "rope_theta" in hf:
            glob.setdefault("rope_theta", hf["rope_theta"])
    glob.setdefault("rope_theta", DEFAULT_THETA[GLOBAL])
    loc.setdefault("rope_theta", DEFAULT_THETA[LOCAL])
    return rope_from_params(glob, source), rope_from_params(loc, source)


def translate(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if hf.get(key) is not None:
            raise UnsupportedModelError(f"{source}: {key}={hf[key]!r} is not supported (Gemma 3 sets it to null)")
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedModelError(f"{source}: use_bidirectional_attention=true is not supported (causal decoders only)")
    if hf.get("attention_bias"):
        raise UnsupportedModelError(f"{source}: attention_bias=true is not supported for gemma3_text")
    types = layer_types(hf, source)
    local = tuple(t == LOCAL for t in types)
    window = hf.get("sliding_window")
    if any(local) and not (isinstance(window, int) and window > 0):
        raise UnsupportedModelError(f"{source}: sliding_attention layers need a positive sliding_window, got {window!r}")
    rope, rope_local = ropes(hf, source)
    return dict(
        decoder_fields(hf, source, act="gelu_pytorch_tanh"),
        rope=rope,
        rope_local=rope_local,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        qk_norm=True,
        mlp_activation="gelu_tanh",
        norm_plus_one=True,
        sandwich_norms=True,
        embed_scale=True,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
        sliding_window=window if any(local) else None,
        local_layers=local if any(local) else (),
    )


# HF's post_attention_layernorm normalizes the attention output (before its residual add);
# pre_feedforward_layernorm is the MLP's input norm (our post_attn_norm in every family).
RULES = decoder_rules(
    post_attention_norm_path=("layers", "attn_out_norm", "scale"),
    extra_layer_rules=(
        Rule(LAYER + "pre_feedforward_layernorm.weight", ("layers", "post_attn_norm", "scale"), identity, identity),
        Rule(LAYER + "post_feedforward_layernorm.weight", ("layers", "mlp_out_norm", "scale"), identity, identity),
    ),
)
REFUSED["gemma3"] = ("the multimodal Gemma 3 checkpoint; only its text model is supported: save "
                     "Gemma3ForConditionalGeneration's language model as a Gemma3ForCausalLM (model_type gemma3_text)")
FAMILY = register_family(Family("gemma3_text", translate, RULES, "Gemma 3 text (Gemma3ForCausalLM)"))
