"""Build the typed params from a parsed mapping: unknown keys, wrong types and choices refused."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from pipeline.config.messages import fix
from pipeline.config.schema import CHOICES_OF
from pipeline.errors import ConfigError, shown


def build(cls: Any, values: dict[str, Any], where: str) -> Any:
    """An instance of the config dataclass `cls` from `values` (the mapping at dotted key
    `where`, "" for the root), its fields' types and choices checked."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown key {where + '.' if where else ''}{unknown[0]} in params; "
            f"known keys{' of ' + where if where else ''}: {', '.join(known)}"
        )
    kwargs = {}
    for name in known:
        if name in values:
            key = f"{where}.{name}" if where else name
            kwargs[name] = _check_type(values[name], hints[name], key)
            choices = CHOICES_OF.get(key)
            if choices and kwargs[name] not in choices:
                raise ConfigError(
                    f"{key} = {shown(kwargs[name])} is not one of: {', '.join(choices)}. Fix: {fix(key)}"
                )
    return cls(**kwargs)


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {shown(value)}. Fix: {fix(where)}")
        return build(hint, value, where)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {shown(value)}. Fix: {fix(where)}")
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {shown(value)}. Fix: {fix(where)}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(
                f"{where} must be true or false, got {shown(value)}. Fix: {fix(where)}"
            )
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(
                f"{where} must be an integer, got {shown(value)} (numbers are written without "
                f"quotes; true/false are not numbers). Fix: {fix(where)}"
            )
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(
                f"{where} must be a number, got {shown(value)} (numbers are written without "
                f"quotes). Fix: {fix(where)}"
            )
        return float(value)
    if hint is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {shown(value)}. Fix: {fix(where)}")
        return value
    return value
