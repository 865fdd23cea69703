"""Hugging Face tensor names <-> dcd-jax parameter paths: each family's table, from the registry.

A family's module (:mod:`dcd_jax.models.families`) declares its :class:`Rule` table: one HF
tensor (``{i}`` = layer index), the path of the matching parameter in the params dict (per-layer
tensors live stacked under ``layers``), and the pair of transforms between the HF ``nn.Linear``
layout ([out, in]) and ours ([in, heads, head_dim] etc.). Both conversion directions read the same
table, so they cannot drift apart.
"""

from __future__ import annotations

from dcd_jax.models.config import ModelConfig
from dcd_jax.models.registry import Rule, family_of

__all__ = ["Rule", "active_rules", "expected_hf_names", "get_path", "set_path"]


def active_rules(cfg: ModelConfig) -> list[Rule]:
    return [r for r in family_of(cfg.model_type).rules if r.when(cfg)]


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
