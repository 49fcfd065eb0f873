"""The process-wide loaded models: each model is loaded once per process and kept for the run."""

from __future__ import annotations

from collections import Counter
from typing import Any

from pipeline.config import BaseConfig, ModelsConfig
from pipeline.errors import ModelFileError
from pipeline.models import load_model
from pipeline.models.identity import weights_identity

# (role, models and runtime settings) -> the loaded model. Under Dask each worker process keeps
# its own between shards.
_LOADED: dict[tuple[str, str], Any] = {}
# Loads by role in this process since it started: the extraction steps record their increase in
# their timings (`model_loads`), which shows each model loaded once per process.
_LOADS: Counter[str] = Counter()


def loaded_model(role: str, models: ModelsConfig, base: BaseConfig) -> Any:
    """The model playing `role`, loaded once per process (Dask workers keep theirs between
    shards); refused when its weights changed since it was loaded."""
    key = (role, repr((models, base.seed, base.device, base.dtype)))
    if key not in _LOADED:
        _LOADED[key] = load_model(role, models, base)
        _LOADS[role] += 1
    loaded = getattr(_LOADED[key], "weights_id", None)
    expected = weights_identity(role, models, base.seed)
    if loaded != expected:
        # The rows of this run are keyed by `expected`; never write rows of other weights.
        del _LOADED[key]
        raise ModelFileError(
            f"the {role} weights changed during the run (loaded {loaded}, now {expected}); "
            "rerun the stage"
        )
    return _LOADED[key]


def forget_loaded_models() -> None:
    """Drop every model this process has loaded (the next `loaded_model` loads it again)."""
    _LOADED.clear()


def model_loads() -> dict[str, int]:
    """How many times this process has loaded each role's model (`loaded_model`)."""
    return dict(_LOADS)
