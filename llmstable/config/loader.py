"""Loading a config: conversion from plain mappings (Hydra's DictConfig, YAML, JSON) to the typed schemas, and
validation in one pass. Every problem (unknown key, wrong type, impossible value, values that do not fit together)
is collected and raised once as a `ConfigError`, each line naming the dotted key, the bad value, what is allowed
and the fix.

The schemas are also registered with Hydra's ConfigStore (`llmstable_schema`, for `--cfg` inspection and for
users' own structured configs). Composition itself stays on plain YAML because Hydra's structured-config checks
stop at the first error and do not list the valid keys; the conversion here does both.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any

from llmstable.config.checks import ConfigError
from llmstable.config.run import TrainConfig


def load_config(raw: Any) -> TrainConfig:
    """DictConfig or dict -> validated TrainConfig. Raises one ConfigError listing every problem."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(raw, DictConfig):
        raw = OmegaConf.to_container(raw, resolve=True)
    problems: list[str] = []
    cfg = _convert(TrainConfig, raw or {}, "", problems)
    if not problems:
        cfg.validate(problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def to_dict(cfg: Any) -> dict:
    """A dataclass config -> plain nested dict (tuples become lists), ready for YAML or JSON."""
    return _plain(dataclasses.asdict(cfg))


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested config dict as {dotted key: value} (an empty dict stays a value)."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def schema_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key the schema accepts, e.g. ['model.dim', ..., 'data.tokenizer.kind', ...]."""
    if hasattr(cls, "variant"):  # the union of every variant's keys
        return sorted({k for variant in cls.variants.values() for k in _fields_keys(variant, prefix)})
    return _fields_keys(cls, prefix)


def _fields_keys(cls: type, prefix: str) -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub = _dataclass_of(hints[f.name])
        keys.extend(schema_keys(sub, f"{prefix}{f.name}.") if sub else [f"{prefix}{f.name}"])
    return keys


def _convert(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
        return cls()
    if hasattr(cls, "variant"):  # e.g. the optimizer: its name picks the schema
        name = data.get("name", cls.name)
        chosen = cls.variant(name)
        if chosen is None:
            problems.append(f"{prefix}name={name!r} is not one of: {', '.join(cls.variants)}")
            return cls()
        cls = chosen
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{near[0]}?)" if near else ""
            problems.append(f"unknown key {prefix}{key}{hint}; valid keys: {', '.join(names)}")
    values = {}
    for name in names:
        if name not in data:
            continue
        sub = _dataclass_of(hints[name])
        if data[name] == "???":  # OmegaConf's marker for a mandatory value left unset
            problems.append(f"{prefix}{name} is required but not set: pass {prefix}{name}=VALUE")
            values[name] = None
        elif sub and data[name] is not None:
            values[name] = _convert(sub, data[name], f"{prefix}{name}.", problems)
        elif sub:
            values[name] = None
        else:
            values[name] = _coerce(hints[name], data[name], f"{prefix}{name}", problems)
    return cls(**values)


def _coerce(tp: Any, value: Any, key: str, problems: list[str]) -> Any:
    """Check value against the annotation; ints are accepted where floats are expected."""
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, problems) if len(inner) == 1 else value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            problems.append(f"{key}={value!r} must be a list of {len(args)} numbers, e.g. [0.9, 0.95]")
            return value
        return tuple(_coerce(a, v, f"{key}[{i}]", problems) for i, (a, v) in enumerate(zip(args, value)))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) < 2**1023 else math.inf  # (too large for a float: refused below)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, float):
        if not math.isfinite(value):  # inf or nan would run, and turn the run into NaNs a few steps later
            problems.append(f"{key}={value} must be a finite number: inf and nan cannot train (where the key "
                            "allows null, null switches its feature off)")
        return value
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        problems.append(f"{key}={value!r} must be {_KINDS.get(tp, f'of type {tp.__name__}')}, e.g. "
                        f"{key}={_EXAMPLES.get(tp, '...')}")
    return value


_KINDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}
_EXAMPLES = {int: 100, float: 0.001, bool: "true", str: "NAME"}


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass an annotation holds: X or X | None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else None
    return tp if dataclasses.is_dataclass(tp) else None


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def register_schemas() -> None:
    """Register the schema with Hydra's ConfigStore (name `llmstable_schema`)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="llmstable_schema", node=TrainConfig)
