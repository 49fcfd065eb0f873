"""Registry of heads by config name and a checked constructor."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from pipeline.errors import ConfigError
from pipeline.heads._base import BaseHead
from pipeline.heads.meta import MetaHead
from pipeline.heads.mlp import MLPHead
from pipeline.heads.multitask import MultiTaskHead
from pipeline.heads.svm import SVMHead
from pipeline.heads.tip_adapter import TipAdapterHead
from pipeline.heads.ufd_probe import UFDProbeHead

HEADS: dict[str, type[BaseHead]] = {
    "mlp": MLPHead,
    "svm": SVMHead,
    "multitask": MultiTaskHead,
    "tip_adapter": TipAdapterHead,
    "meta": MetaHead,
    "ufd_probe": UFDProbeHead,
}


def valid_params(name: str) -> list[str]:
    """Hyperparameter names accepted by the head registered as `name`."""
    signature = inspect.signature(_head_class(name).__init__)
    return [p for p in signature.parameters if p != "self"]


def make_head(name: str, params: Mapping[str, Any] | None = None) -> BaseHead:
    """Build an unfitted head from its registry name and hyperparameters.

    Args:
        name: a key of `HEADS`.
        params: hyperparameters; names not accepted by the head are rejected.

    Returns:
        The unfitted estimator.
    """
    cls = _head_class(name)
    params = dict(params or {})
    known = valid_params(name)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {unknown} for head {name!r}; valid parameters: {known}"
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


def _head_class(name: str) -> type[BaseHead]:
    if not isinstance(name, str) or name not in HEADS:
        raise ConfigError(f"unknown head {name!r}; valid heads: {sorted(HEADS)}")
    return HEADS[name]
