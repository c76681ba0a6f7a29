"""Typed configuration: dataclasses loaded from YAML with `key=value` overrides.

Every stage owns one dataclass. Loading is strict: an unknown key, a wrong type or a value outside a
`Literal` raises `ConfigError` whose message names the dotted key, before any work starts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, reported as one line naming the offending key."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints are widened to float where asked)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        _, val_tp = get_args(tp) or (Any, Any)
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads `1e-4` (no dot) as a string; a float field takes it as the number it spells
        if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, strictly. Missing keys take the dataclass defaults."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in (data or {}).items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            close = ", ".join(sorted(fields))
            raise ConfigError(f"{key}: unknown key (known here: {close})")
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        obj = cls(**kwargs)
    except TypeError as err:  # a required field without default
        raise ConfigError(f"{prefix or cls.__name__}: {err}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as err:
            raise ConfigError(f"{prefix}.{err}" if prefix else str(err)) from None
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn `a.b=1 c=[1,2]` into a nested mapping; values are parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"{pair}: overrides are key=value")
        key, raw = pair.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: conflicts with an earlier override")
        node[parts[-1]] = value
    return nested


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def rename_keys(data: dict[str, Any], renamed: Mapping[str, str], source: str) -> dict[str, Any]:
    """Top-level keys under an old name move to the new one (a config written before a rename keeps working); both
    names at once is an error rather than a silent choice."""
    out = dict(data)
    for old, new in renamed.items():
        if old in out:
            if new in out:
                raise ConfigError(f"{source}: both `{old}` and `{new}` are given; `{old}` is the old name of `{new}`")
            out[new] = out.pop(old)
    return out


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None, *,
         renamed: Mapping[str, str] | None = None) -> T:
    """Build `cls` from a YAML file, then `key=value` overrides on top. `renamed` maps old top-level section names
    to current ones, in the file and in the overrides alike."""
    renamed = renamed or {}
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path}: not found") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path}: not valid YAML ({err.__class__.__name__})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
    data = rename_keys(data, renamed, f"config file {path}")
    extra = rename_keys(parse_overrides(overrides or []), renamed, "overrides")
    return from_dict(cls, deep_merge(data, extra))


def config_hash(*parts: Any) -> str:
    """A stable short hash of configs/inputs (dataclasses, dicts, strings)."""
    payload = [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def require(cond: bool, key: str, message: str) -> None:
    """For `validate()` methods: raise a ConfigError naming `key` unless `cond` holds."""
    if not cond:
        raise ConfigError(f"{key}: {message}")


__all__ = ["ConfigError", "from_dict", "to_dict", "load", "rename_keys", "parse_overrides", "config_hash", "require", "typing"]
