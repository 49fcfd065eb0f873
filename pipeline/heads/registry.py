"""Registry of heads by config name, with what each head needs, and a checked constructor.

Each head module registers its class with `@register("<name>")`; `pipeline.heads` imports
every head module, so the table is complete wherever the package is imported. The registry
imports no head, so a head built on other heads (the meta head) can use it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pipeline.errors import ConfigError, shown
from pipeline.heads.contract import BaseHead

HEADS: dict[str, type[BaseHead]] = {}

_H = TypeVar("_H", bound=type[BaseHead])


def register(name: str) -> Callable[[_H], _H]:
    """Class decorator: make the head class known under registry name `name`."""

    def add(cls: _H) -> _H:
        if name in HEADS and HEADS[name] is not cls:
            raise ValueError(f"head name {shown(name)} is registered twice")
        HEADS[name] = cls
        return cls

    return add


def head_class(name: str) -> type[BaseHead]:
    """The class registered as `name`; its class attributes say what it needs
    (`needs_class_prompts`, `stacks_base_heads`, `attributes_sources`)."""
    if not isinstance(name, str) or name not in HEADS:
        raise ConfigError(f"unknown head {shown(name)}; valid heads: {sorted(HEADS)}")
    return HEADS[name]


def valid_params(name: str) -> list[str]:
    """Hyperparameter names accepted by the head registered as `name`."""
    signature = inspect.signature(head_class(name).__init__)
    return [p for p in signature.parameters if p != "self"]


def make_head(name: str, params: Mapping[str, Any] | None = None) -> BaseHead:
    """Build an unfitted head from its registry name and hyperparameters.

    Args:
        name: a key of `HEADS`.
        params: hyperparameters; names not accepted by the head are rejected.

    Returns:
        The unfitted estimator.
    """
    cls = head_class(name)
    params = dict(params or {})
    known = valid_params(name)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {unknown} for head {shown(name)}; valid parameters: {known}"
        )
    return cls(**params)


def name_of(head: Any) -> str:
    """Registry name of a head instance (exact class match)."""
    for name, cls in HEADS.items():
        if type(head) is cls:
            return name
    raise ValueError(
        f"{type(head).__name__} is not a registered head; save_head supports "
        f"{sorted(cls.__name__ for cls in HEADS.values())}"
    )
