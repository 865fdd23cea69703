"""The registry of model families: what each Hugging Face ``model_type`` means to dcd-jax.

A family (``dcd_jax/models/families/<name>.py``) declares, in one place:

* ``translate(hf, source)``: its HF ``config.json`` -> the :class:`~dcd_jax.models.config.ModelConfig`
  fields (the architecture switches it sets; anything it cannot compute is refused there with
  :class:`UnsupportedModelError`);
* ``rules``: its HF tensor-name <-> parameter-path table (:class:`Rule`, with the transforms
  between the HF ``nn.Linear`` layout and ours), which both conversion directions read.

``ModelConfig.from_hf_config``, the converters (``dcd_jax.convert``) and the planner find a family
with :func:`family_of`; :data:`FAMILIES` holds them by ``model_type``. Nothing outside the family
modules tests a ``model_type``: the layer code reads the switches only. This module imports nothing
of dcd-jax above the ground, so the family modules and ``models/config.py`` can both use it;
``models/config.py`` imports ``models/families`` (which registers every family), so the registry
is full whenever ``dcd_jax.models`` is imported.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

import numpy as np

from dcd_jax.errors import ModelError

if TYPE_CHECKING:
    from dcd_jax.models.config import ModelConfig


class UnsupportedModelError(ModelError):
    """The checkpoint uses an architecture or option this decoder does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: ``theta`` base plus optional frequency scaling: Llama 3's smooth band
    (``llama3``) or positions divided by ``factor`` (``linear``, Gemma 3's global layers)."""

    theta: float = 10000.0
    kind: Literal["default", "llama3", "linear"] = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


Transform = Callable[[np.ndarray, "ModelConfig"], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One HF tensor (``{i}`` = layer index) <-> the parameter at ``path`` (per-layer tensors live
    stacked under ``layers``), with the transforms between the two layouts; ``when``: whether a
    config has this tensor at all."""

    hf_name: str  # e.g. "model.layers.{i}.self_attn.q_proj.weight"
    path: tuple[str, ...]  # e.g. ("layers", "attn", "q_proj", "kernel")
    to_flax: Transform
    to_hf: Transform
    when: Callable[["ModelConfig"], bool] = lambda cfg: True

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_name


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: its ``model_type``, its config translation and its tensor table."""

    model_type: str
    translate: Callable[[Mapping[str, Any], str], dict[str, Any]]
    rules: tuple[Rule, ...]
    description: str = ""


FAMILIES: dict[str, Family] = {}
# model_types no family implements, with what to do instead (a family module adds its own).
REFUSED: dict[str, str] = {}


def register_family(family: Family) -> Family:
    if family.model_type in FAMILIES:
        raise ValueError(f"model family {family.model_type!r} is registered twice")
    FAMILIES[family.model_type] = family
    return family


def family_of(model_type: Any, source: str = "config.json") -> Family:
    """The registered family of ``model_type``, or a clear refusal naming the supported ones."""
    if model_type not in FAMILIES:
        hint = f" ({REFUSED[model_type]})" if model_type in REFUSED else ""
        raise UnsupportedModelError(
            f"{source}: model_type={model_type!r} is not supported{hint}; supported: {tuple(FAMILIES)}"
        )
    return FAMILIES[model_type]


# -- helpers shared by the family modules -------------------------------------------------------

def need(hf: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in hf:
        raise UnsupportedModelError(f"{source}: missing required field {key!r} for model_type={hf.get('model_type')}")
    return hf[key]


def decoder_fields(hf: Mapping[str, Any], source: str, *, act: str = "silu") -> dict[str, Any]:
    """The fields every decoder family reads the same way (shapes, eps, tying, context), after
    refusing what none of them implements (MLP biases, another activation than ``act``)."""
    got = hf.get("hidden_act", hf.get("hidden_activation", act))
    if got != act:
        raise UnsupportedModelError(f"{source}: hidden_act={got!r} is not supported for "
                                    f"model_type={hf.get('model_type')} (only {act!r})")
    if hf.get("mlp_bias"):
        raise UnsupportedModelError(f"{source}: mlp_bias=true is not supported")
    heads = need(hf, "num_attention_heads", source)
    hidden = need(hf, "hidden_size", source)
    return dict(
        vocab_size=need(hf, "vocab_size", source),
        hidden_size=hidden,
        intermediate_size=need(hf, "intermediate_size", source),
        num_layers=need(hf, "num_hidden_layers", source),
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
    )


def llama_layout_fields(hf: Mapping[str, Any], source: str, **switches: Any) -> dict[str, Any]:
    """ModelConfig fields of a full-attention Llama-layout decoder (Llama 3, Qwen2, Qwen3): the common
    decoder fields, RoPE and tied embeddings from ``hf``, plus the family's own ``switches``."""
    refuse_sliding_window(hf, source)
    return dict(decoder_fields(hf, source), rope=rope_from_hf(hf, source),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), **switches)


def refuse_sliding_window(hf: Mapping[str, Any], source: str) -> None:
    """For families whose decoder here has global attention only (Llama, Qwen)."""
    if hf.get("use_sliding_window"):
        raise UnsupportedModelError(f"{source}: use_sliding_window=true is not supported")
    layer_types = hf.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise UnsupportedModelError(f"{source}: layer_types other than full_attention are not supported")


def rope_from_params(params: Mapping[str, Any], source: str, theta_default: float = 10000.0) -> RopeConfig:
    """A :class:`RopeConfig` from one rope-parameter mapping (``rope_theta`` + ``rope_type`` and
    its scaling fields)."""
    theta = float(params.get("rope_theta", theta_default))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, kind="linear", factor=float(params["factor"]))
    if kind != "llama3":
        raise UnsupportedModelError(f"{source}: rope scaling type {kind!r} is not supported (default, linear, llama3)")
    return RopeConfig(
        theta=theta,
        kind="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def rope_from_hf(hf: Mapping[str, Any], source: str) -> RopeConfig:
    """The one RoPE of a config: transformers 5 writes ``rope_parameters``; checkpoints saved by
    transformers 4 use ``rope_theta`` + ``rope_scaling``. Accept both."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    merged = {**scaling, **params}
    merged.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return rope_from_params(merged, source)


# -- tensor-table building blocks ---------------------------------------------------------------

def identity(x, cfg):
    return x


def transpose(x, cfg):
    return x.T


def heads_in(n_heads: Callable[["ModelConfig"], int]):
    """[n*hd, D] -> [D, n, hd] and back."""
    to_flax = lambda x, cfg: x.T.reshape(cfg.hidden_size, n_heads(cfg), cfg.head_dim)
    to_hf = lambda x, cfg: x.reshape(cfg.hidden_size, -1).T
    return to_flax, to_hf


def heads_bias(n_heads: Callable[["ModelConfig"], int]):
    to_flax = lambda x, cfg: x.reshape(n_heads(cfg), cfg.head_dim)
    to_hf = lambda x, cfg: x.reshape(-1)
    return to_flax, to_hf


q_heads = lambda cfg: cfg.num_heads
kv_heads = lambda cfg: cfg.num_kv_heads
o_to_flax = lambda x, cfg: x.T.reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size)
o_to_hf = lambda x, cfg: x.reshape(-1, cfg.hidden_size).T

LAYER = "model.layers.{i}."


def decoder_rules(*, extra_layer_rules: tuple[Rule, ...] = (), post_attention_norm_path=("layers", "post_attn_norm", "scale")) -> tuple[Rule, ...]:
    """The Llama-layout table (embedding, q/k/v/o with optional biases, optional q/k norms, the
    gated MLP, two norms per layer, the final norm, an untied ``lm_head``) plus a family's extra
    per-layer rules. ``post_attention_norm_path``: where HF's ``post_attention_layernorm`` goes
    (Llama's pre-MLP norm; Gemma's norm of the attention output)."""
    L = LAYER
    return (
        Rule("model.embed_tokens.weight", ("embed", "embedding"), identity, identity),
        Rule(L + "self_attn.q_proj.weight", ("layers", "attn", "q_proj", "kernel"), *heads_in(q_heads)),
        Rule(L + "self_attn.k_proj.weight", ("layers", "attn", "k_proj", "kernel"), *heads_in(kv_heads)),
        Rule(L + "self_attn.v_proj.weight", ("layers", "attn", "v_proj", "kernel"), *heads_in(kv_heads)),
        Rule(L + "self_attn.q_proj.bias", ("layers", "attn", "q_proj", "bias"), *heads_bias(q_heads), when=lambda c: c.qkv_bias),
        Rule(L + "self_attn.k_proj.bias", ("layers", "attn", "k_proj", "bias"), *heads_bias(kv_heads), when=lambda c: c.qkv_bias),
        Rule(L + "self_attn.v_proj.bias", ("layers", "attn", "v_proj", "bias"), *heads_bias(kv_heads), when=lambda c: c.qkv_bias),
        Rule(L + "self_attn.o_proj.weight", ("layers", "attn", "o_proj", "kernel"), o_to_flax, o_to_hf),
        Rule(L + "self_attn.o_proj.bias", ("layers", "attn", "o_proj", "bias"), identity, identity, when=lambda c: c.o_bias),
        Rule(L + "self_attn.q_norm.weight", ("layers", "attn", "q_norm", "scale"), identity, identity, when=lambda c: c.qk_norm),
        Rule(L + "self_attn.k_norm.weight", ("layers", "attn", "k_norm", "scale"), identity, identity, when=lambda c: c.qk_norm),
        Rule(L + "mlp.gate_proj.weight", ("layers", "mlp", "gate_proj", "kernel"), transpose, transpose),
        Rule(L + "mlp.up_proj.weight", ("layers", "mlp", "up_proj", "kernel"), transpose, transpose),
        Rule(L + "mlp.down_proj.weight", ("layers", "mlp", "down_proj", "kernel"), transpose, transpose),
        Rule(L + "input_layernorm.weight", ("layers", "input_norm", "scale"), identity, identity),
        Rule(L + "post_attention_layernorm.weight", post_attention_norm_path, identity, identity),
        *extra_layer_rules,
        Rule("model.norm.weight", ("final_norm", "scale"), identity, identity),
        Rule("lm_head.weight", ("lm_head", "kernel"), transpose, transpose, when=lambda c: not c.tie_word_embeddings),
    )
