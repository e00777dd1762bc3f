"""Frozen-dataclass configs: dotted `key=value` overrides, type-checked, and JSON round trips.

`apply_overrides(recipe, ["train.epochs=3", "loss.depth=silog"])` returns a new recipe; unknown
keys fail with the closest valid key, values that don't parse as the field's type fail naming
the type. Supported field types: bool, int, float, str, Literal[...], X | None, tuple[T, ...],
and nested dataclasses.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, Literal, Sequence, get_args, get_origin

from core.registry import suggest


class ConfigError(ValueError):
    """A bad override or config file; the message names the key, the value and the fix."""


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def flat_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a (nested) config dataclass."""
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += flat_keys(value, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def parse_value(text: str, typ: Any, key: str) -> Any:
    """Parse `text` as `typ`; raise ConfigError naming the key and the expected type."""
    origin, args = get_origin(typ), get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return parse_value(text, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}={text!r}: expected {typ}")
    if origin is Literal:
        if text in args:
            return text
        raise ConfigError(f"{key}={text!r}: must be one of {', '.join(map(repr, args))}.{suggest(text, list(args))}")
    if origin is tuple:
        inner = args[0]
        items = [t.strip() for t in text.strip("()[] ").split(",") if t.strip()]
        return tuple(parse_value(item, inner, key) for item in items)
    if typ is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={text!r}: expected a boolean (true/false)")
    if typ in (int, float):
        try:
            value = typ(text)
            finite = math.isfinite(value)   # OverflowError: an int beyond any float
        except (ValueError, OverflowError):
            raise ConfigError(f"{key}={text!r}: expected {typ.__name__}") from None
        if not finite:   # nan passes every `< 0` check and switches options off unseen
            raise ConfigError(f"{key}={text!r}: expected a finite number")
        return value
    if typ is str:
        return text
    raise ConfigError(f"{key}: fields of type {typ} cannot be set from the command line")


def closest_key(key: str, valid: list[str]) -> str:
    """' Did you mean "train.amp"?' for a misspelt or unqualified dotted key."""
    leaf_matches = [k for k in valid if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    if len(leaf_matches) == 1:
        return f' Did you mean "{leaf_matches[0]}"?'
    longer = [k for k in valid if k.startswith(key + "_")]   # train.lr: train.lr_encoder and train.lr_decoder
    if longer:
        return " Did you mean " + " or ".join(f'"{k}"' for k in longer) + "?"
    return suggest(key, valid)


def set_key(cfg: Any, key: str, text: str, path: str = "") -> Any:
    """Return a copy of `cfg` with dotted `key` set from `text` (`path`: the key's full prefix)."""
    head, _, rest = key.partition(".")
    current = getattr(cfg, head)
    if dataclasses.is_dataclass(current):
        return dataclasses.replace(cfg, **{head: set_key(current, rest, text, path + head + ".")})
    return dataclasses.replace(cfg, **{head: parse_value(text, field_types(type(cfg))[head], path + key)})


def override_list(overrides: Sequence[str]) -> list[str]:
    """`overrides` as a list; one string is refused (iterated, it would be a key per letter)."""
    if isinstance(overrides, str):
        raise ConfigError(f"overrides={overrides!r}: give a list of key=value strings, e.g. [{overrides!r}]")
    return list(overrides)


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply `key=value` strings in order; the first bad one raises ConfigError."""
    valid = flat_keys(cfg)
    for item in override_list(overrides):
        key, eq, text = (part.strip() for part in item.partition("="))
        if not eq or not key:
            raise ConfigError(f'override "{item}" is not key=value (e.g. train.epochs=3)')
        if key not in valid:
            section = [k for k in valid if k.startswith(key + ".")]
            if section:
                raise ConfigError(f'"{key}" is a section; set one of its keys: {", ".join(section)}')
            # the recipe's own command lists its keys (distill.evaluate's and distill.ablate's --help do not)
            raise ConfigError(f'unknown key "{key}".{closest_key(key, valid)} List every key with '
                              f"python -m distill.run {getattr(cfg, 'name', '<recipe>')} --help.")
        cfg = set_key(cfg, key, text)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def has_type(value: Any, typ: Any) -> bool:
    """Whether a JSON value fits a field type (the types `parse_value` supports; others pass)."""
    origin, args = get_origin(typ), get_args(typ)
    if origin in (typing.Union, types.UnionType):
        return any(has_type(value, arg) for arg in args)
    if typ is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(has_type(v, args[0]) for v in value)
    if typ is bool:
        return isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is str:
        return isinstance(value, str)
    return True


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Rebuild a config dataclass from `to_dict` output (JSON lists become tuples); ConfigError
    naming the key for a value of the wrong type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path.rstrip('.') or cls.__name__}: expected a section (a JSON object), got {data!r}")
    hints, kwargs = field_types(cls), {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, typ = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(typ):
            value = from_dict(typ, value, f"{path}{f.name}.")
        elif not has_type(value, typ) or (isinstance(value, float) and not math.isfinite(value)):
            raise ConfigError(f"{path}{f.name}={value!r}: expected {typ}" + (" (finite)" if typ is float else ""))
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown keys {sorted(unknown)} (config from another version?)")
    return cls(**kwargs)


def dumps(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=False)
