"""Typed, frozen configuration: YAML files plus ``key=value`` command-line overrides.

Every sub-system owns a frozen dataclass for its options (``DataConfig`` in ``dcd_jax.data``,
``ObjectiveConfig`` in ``dcd_jax.objectives``, ...). This module only knows how to build any such
dataclass from nested mappings, with clear errors for unknown keys and wrong types, and how to
merge YAML files (``base:`` inheritance) and dotted overrides. YAML is read with ``yaml.safe_load``
and override values are parsed as YAML scalars: nothing a user writes is ever executed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

from dcd_jax.errors import ConfigError

__all__ = ["ConfigError", "deep_merge", "from_dict", "load_config", "read_yaml", "replace", "to_dict"]

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert containers/dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} does not match {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (tuple, Sequence, list) or tp in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build the frozen dataclass ``cls`` from a nested mapping, validating every field.

    Unknown keys are an error (a typo must not be silently ignored); missing keys take the
    dataclass default. ``where`` is the dotted path used in error messages.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where or cls.__name__}: unknown option(s) {unknown}; valid options: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field without default
        raise ConfigError(f"{where or cls.__name__}: {e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def hash_by_value(obj: Any) -> int:
    """Hash of a frozen config dataclass whose fields may hold dicts (hashed by their sorted items),
    so it stays usable as a key or a static jit argument; use as ``__hash__ = hash_by_value``."""
    return hash(tuple((f.name, tuple(sorted(v.items())) if isinstance(v, dict) else v)
                      for f in dataclasses.fields(obj) for v in [getattr(obj, f.name)]))


def to_dict(obj: Any) -> Any:
    """Inverse of :func:`from_dict`: plain nested dicts/lists, ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base`` (mappings merge, the rest replaces)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config, following ``base: other.yaml`` (relative to the file) recursively."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:
        data = deep_merge(read_yaml(path.parent / base), data)
    return data


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn ``["a.b=3", "c=[1, 2]"]`` into ``{"a": {"b": 3}, "c": [1, 2]}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-5)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override")
        node[parts[-1]] = value
    return out


def _fix_yaml_floats(data: Any) -> Any:
    """YAML 1.1 parses ``1e-5`` (no dot) as a string; turn such strings back into floats."""
    if isinstance(data, dict):
        return {k: _fix_yaml_floats(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_fix_yaml_floats(v) for v in data]
    if isinstance(data, str):
        try:
            if any(c in data for c in "eE") and data.strip()[0] in "+-.0123456789":
                return float(data)
        except (ValueError, IndexError):
            return data
    return data


def nest_dotted(values: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1, "a.c": 2}`` -> ``{"a": {"b": 1, "c": 2}}`` (values kept as they are, not parsed)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def load_config(
    cls: type[T], path: str | Path | Sequence[str | Path] | None = None, overrides: Sequence[str] = (),
    flags: Mapping[str, Any] | None = None,
) -> T:
    """Load ``cls`` from YAML file(s), command-line flags and dotted ``key=value`` overrides.

    Several files merge left to right, so a baseline can be a one-line file applied on top of a
    model config (``--config configs/qwen2.5-1.5b-dcd.yaml --config configs/objectives/sft.yaml``).
    ``flags`` maps dotted keys to already-typed values (what a command's sugar flags set, see
    ``dcd_jax.cli``); they apply after the files and before the overrides, so ``--topk 8`` is exactly
    ``score.topk=8``.
    """
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    data: dict[str, Any] = {}
    for p in paths:
        data = deep_merge(data, read_yaml(p))
    data = deep_merge(data, nest_dotted(flags or {}))
    data = deep_merge(data, parse_overrides(overrides))
    where = " + ".join(str(p) for p in paths) or cls.__name__
    try:
        return from_dict(cls, _fix_yaml_floats(data))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def replace(obj: T, **changes: Any) -> T:
    """``dataclasses.replace`` that also re-runs the dataclass's ``validate``."""
    new = dataclasses.replace(obj, **changes)
    validate = getattr(new, "validate", None)
    if callable(validate):
        validate()
    return new
