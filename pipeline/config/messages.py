"""The one-line refusals of a bad param: the key, the value, what is allowed and the fix."""

from __future__ import annotations

import json
from typing import Any

from pipeline.config.schema import Params
from pipeline.errors import ConfigError, shown


def lookup(node: Any, key: str) -> Any:
    """The value of a dotted key in a config dataclass, or None where there is no such key."""
    for part in key.split("."):
        if not hasattr(node, part):
            return None
        node = getattr(node, part)
    return node


def fix(key: str, example: Any = None) -> str:
    """How to set `key`, showing `example` or else the key's default."""
    example = lookup(Params(), key) if example is None else example
    if example is None:
        shown = "<value>"
    elif isinstance(example, str) and example:
        shown = example
    else:
        shown = json.dumps(example, separators=(",", ":"))
    return f"set {key} in params.yaml (or dvc exp run -S {key}={shown})" + (
        f", e.g. the default {shown}" if example is not None else ""
    )


def refuse(key: str, value: Any, allowed: str, example: Any = None) -> ConfigError:
    """The error for `key` = `value` when it must be `allowed`."""
    return ConfigError(
        f"{key} = {shown(value)} is not allowed: it must be {allowed}. Fix: {fix(key, example)}"
    )
