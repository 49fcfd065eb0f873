"""Typed, closed configuration: one dataclass per `params.yaml` section, unknown keys rejected.

- `schema`: the sections, each field with its default and its range or choices beside it;
- `head_rules`: the heads' names, hyperparameters and their ranges (without the heads);
- `typecheck`, `checks`: building typed params from a mapping, and every check after that;
- `load`: reading `params.yaml`; `hashing`: plain-dict views.
"""

from pipeline.config.checks import check_names, check_ranges
from pipeline.config.hashing import to_dict
from pipeline.config.head_rules import HEAD_NAMES, HEAD_PARAMS, HEAD_RANGES
from pipeline.config.load import load_params, params_from_dict
from pipeline.config.rules import Range
from pipeline.config.schema import (
    CHOICES_OF,
    RANGES,
    BaseConfig,
    CaptionConfig,
    DataConfig,
    EncodeConfig,
    EvaluateConfig,
    FeaturesConfig,
    GroundConfig,
    IngestConfig,
    ModelsConfig,
    ModelSpec,
    Params,
    TrainConfig,
)
from pipeline.errors import ConfigError

__all__ = [
    "CHOICES_OF",
    "HEAD_NAMES",
    "HEAD_PARAMS",
    "HEAD_RANGES",
    "RANGES",
    "BaseConfig",
    "CaptionConfig",
    "ConfigError",
    "DataConfig",
    "EncodeConfig",
    "EvaluateConfig",
    "FeaturesConfig",
    "GroundConfig",
    "IngestConfig",
    "ModelSpec",
    "ModelsConfig",
    "Params",
    "Range",
    "TrainConfig",
    "check_names",
    "check_ranges",
    "load_params",
    "params_from_dict",
    "to_dict",
]
