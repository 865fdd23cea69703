"""The ids that end a model's turn: the tokenizer's EOS, then every ``eos_token_id`` of the
``generation_config.json`` next to the tokenizer's files (``tokenizer.name_or_path``).

Chat models list several there: Gemma 3's ``<eos>`` and ``<end_of_turn>`` (its tokenizer's EOS is
``<eos>``, its chat turns end with ``<end_of_turn>``), Llama 3's ``<|eot_id|>``. Generation stops at
any of them (``infer/sampler``, the GKD rollouts of ``train/online``), and a training example whose
rendered response already ends with one gets no extra EOS (``data/tokenization``): both read this
one rule.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def generation_config_eos_ids(tokenizer: Any) -> tuple[int, ...]:
    """The ``eos_token_id`` (an int or a list) of ``generation_config.json`` in the directory the
    tokenizer was loaded from (``tokenizer.name_or_path``), or () without one."""
    name = getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None
    path = Path(str(name)) / "generation_config.json" if name else None
    if path is None or not path.is_file():
        return ()
    try:
        return tuple(_ids(json.loads(path.read_text()).get("eos_token_id")))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError):
        return ()


def stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """The tokenizer's EOS id followed by the other ids of :func:`generation_config_eos_ids`
    (no duplicates; () for no tokenizer)."""
    ids = _ids(getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None)
    for e in generation_config_eos_ids(tokenizer):
        if e not in ids:
            ids.append(e)
    return tuple(ids)
