"""Load params: read `params.yaml`, build the typed params and run every check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.config.checks import check_names, check_ranges
from pipeline.config.schema import Params
from pipeline.config.typecheck import build
from pipeline.errors import ConfigError


def params_from_dict(values: dict[str, Any]) -> Params:
    """Build `Params` from a parsed params mapping, rejecting unknown keys, wrong types and
    values out of range (see `check_ranges`), then names unknown to the registries."""
    params: Params = build(Params, values or {}, "")
    check_ranges(params)
    check_names(params)
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate `params.yaml`.

    Raises:
        ConfigError: on a missing file, an unknown key or a value of the wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"params file {path} not found; run from the project root or pass --params"
        )
    with path.open() as fh:
        values = yaml.safe_load(fh) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(values).__name__}")
    try:
        return params_from_dict(values)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
