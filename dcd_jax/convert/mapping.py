"""Declarative table: Hugging Face tensor names <-> dcd-jax parameter paths.

Each :class:`Rule` names one HF tensor (``{i}`` = layer index), the path of the matching
parameter in the params dict (per-layer tensors live stacked under ``layers``), and the pair
of transforms between the HF ``nn.Linear`` layout ([out, in]) and ours ([in, heads, head_dim]
etc.). Both conversion directions read this one table, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from dcd_jax.models.config import ModelConfig

Transform = Callable[[np.ndarray, ModelConfig], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Rule:
    hf_name: str  # e.g. "model.layers.{i}.self_attn.q_proj.weight"
    path: tuple[str, ...]  # e.g. ("layers", "attn", "q_proj", "kernel")
    to_flax: Transform
    to_hf: Transform
    when: Callable[[ModelConfig], bool] = lambda cfg: True

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_name


def _identity(x, cfg):
    return x


def _transpose(x, cfg):
    return x.T


def _heads_in(n_heads: Callable[[ModelConfig], int]):
    """[n*hd, D] -> [D, n, hd] and back."""
    to_flax = lambda x, cfg: x.T.reshape(cfg.hidden_size, n_heads(cfg), cfg.head_dim)
    to_hf = lambda x, cfg: x.reshape(cfg.hidden_size, -1).T
    return to_flax, to_hf


def _heads_bias(n_heads: Callable[[ModelConfig], int]):
    to_flax = lambda x, cfg: x.reshape(n_heads(cfg), cfg.head_dim)
    to_hf = lambda x, cfg: x.reshape(-1)
    return to_flax, to_hf


_q = lambda cfg: cfg.num_heads
_kv = lambda cfg: cfg.num_kv_heads
_o_to_flax = lambda x, cfg: x.T.reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size)
_o_to_hf = lambda x, cfg: x.reshape(-1, cfg.hidden_size).T

_L = "model.layers.{i}."
RULES: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", ("embed", "embedding"), _identity, _identity),
    Rule(_L + "self_attn.q_proj.weight", ("layers", "attn", "q_proj", "kernel"), *_heads_in(_q)),
    Rule(_L + "self_attn.k_proj.weight", ("layers", "attn", "k_proj", "kernel"), *_heads_in(_kv)),
    Rule(_L + "self_attn.v_proj.weight", ("layers", "attn", "v_proj", "kernel"), *_heads_in(_kv)),
    Rule(_L + "self_attn.q_proj.bias", ("layers", "attn", "q_proj", "bias"), *_heads_bias(_q), when=lambda c: c.qkv_bias),
    Rule(_L + "self_attn.k_proj.bias", ("layers", "attn", "k_proj", "bias"), *_heads_bias(_kv), when=lambda c: c.qkv_bias),
    Rule(_L + "self_attn.v_proj.bias", ("layers", "attn", "v_proj", "bias"), *_heads_bias(_kv), when=lambda c: c.qkv_bias),
    Rule(_L + "self_attn.o_proj.weight", ("layers", "attn", "o_proj", "kernel"), _o_to_flax, _o_to_hf),
    Rule(_L + "self_attn.o_proj.bias", ("layers", "attn", "o_proj", "bias"), _identity, _identity, when=lambda c: c.o_bias),
    Rule(_L + "self_attn.q_norm.weight", ("layers", "attn", "q_norm", "scale"), _identity, _identity, when=lambda c: c.qk_norm),
    Rule(_L + "self_attn.k_norm.weight", ("layers", "attn", "k_norm", "scale"), _identity, _identity, when=lambda c: c.qk_norm),
    Rule(_L + "mlp.gate_proj.weight", ("layers", "mlp", "gate_proj", "kernel"), _transpose, _transpose),
    Rule(_L + "mlp.up_proj.weight", ("layers", "mlp", "up_proj", "kernel"), _transpose, _transpose),
    Rule(_L + "mlp.down_proj.weight", ("layers", "mlp", "down_proj", "kernel"), _transpose, _transpose),
    Rule(_L + "input_layernorm.weight", ("layers", "input_norm", "scale"), _identity, _identity),
    Rule(_L + "post_attention_layernorm.weight", ("layers", "post_attn_norm", "scale"), _identity, _identity),
    Rule("model.norm.weight", ("final_norm", "scale"), _identity, _identity),
    Rule("lm_head.weight", ("lm_head", "kernel"), _transpose, _transpose, when=lambda c: not c.tie_word_embeddings),
)


def active_rules(cfg: ModelConfig) -> list[Rule]:
    return [r for r in RULES if r.when(cfg)]


def expected_hf_names(cfg: ModelConfig) -> dict[str, tuple[Rule, int | None]]:
    """Every HF tensor name this config needs -> (rule, layer index or None)."""
    names: dict[str, tuple[Rule, int | None]] = {}
    for rule in active_rules(cfg):
        if rule.per_layer:
            for i in range(cfg.num_layers):
                names[rule.hf_name.format(i=i)] = (rule, i)
        else:
            names[rule.hf_name] = (rule, None)
    return names


def get_path(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
