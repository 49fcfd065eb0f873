"""Typed, closed configuration: one dataclass per `params.yaml` section, unknown keys rejected."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A `params.yaml` value is missing, unknown or of the wrong type."""


@dataclass
class BaseConfig:
    seed: int = 0
    # "auto" picks cuda when torch sees a GPU, else cpu.
    device: str = "auto"
    # "auto" is float16 on cuda and float32 on cpu (bf16 autocast is ~5x slower on CPUs without
    # bf16 instructions, so it is never chosen automatically).
    dtype: str = "auto"
    # "local" runs shards one after another in this process; "dask" sends each shard to a
    # Dask distributed cluster (dask_address, or a LocalCluster of n_workers when empty).
    scheduler: str = "local"
    dask_address: str = ""
    n_workers: int = 2


@dataclass
class ModelSpec:
    # Upstream name of the model (Hugging Face id, or open_clip architecture name).
    id: str = ""
    # open_clip pretrained tag (CLIP only), e.g. "openai".
    pretrained: str = ""
    # A local checkpoint file (open_clip) or save_pretrained directory (transformers);
    # empty means the library's own cache (~/.cache/huggingface, ~/.cache/clip).
    path: str = ""


@dataclass
class ModelsConfig:
    # "paper": the real weights the seeds used; "tiny": small random models, offline, for smoke
    # runs and tests (their outputs are meaningless and marked so in every shard).
    preset: str = "paper"
    clip: ModelSpec = field(default_factory=lambda: ModelSpec("ViT-L-14", "openai"))
    blip2: ModelSpec = field(default_factory=lambda: ModelSpec("Salesforce/blip2-opt-2.7b"))
    grounding: ModelSpec = field(
        default_factory=lambda: ModelSpec("IDEA-Research/grounding-dino-base")
    )
    bert: ModelSpec = field(default_factory=lambda: ModelSpec("bert-base-uncased"))
    dinov2: ModelSpec = field(default_factory=lambda: ModelSpec("facebook/dinov2-base"))


@dataclass
class DataConfig:
    # Name of the dataset's folder under cache/.
    name: str = "sample"
    # A folder holding manifest.csv, a folder in a known layout, or a manifest CSV.
    path: str = "data/sample"


@dataclass
class IngestConfig:
    # Images per shard: a shard is the unit of resumption and of parallel work.
    shard_size: int = 64
    # train/val/test fractions used only when the manifest gives no split.
    split_fractions: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])
    # Images smaller than this on either side are quarantined (CLIP upsamples them to 224 px,
    # which says more about the resampler than about the image).
    min_side: int = 16


@dataclass
class CaptionConfig:
    # "dataset": the manifest's captions; "blip2": always BLIP-2; "dataset_else_blip2": the
    # manifest's caption where present, BLIP-2 for the rest.
    source: str = "dataset"
    batch_size: int = 8
    # Optional text prompt for BLIP-2 (empty: unconditional captioning, as in ITEM).
    prompt: str = ""
    num_beams: int = 3
    max_new_tokens: int = 30


@dataclass
class GroundConfig:
    # Whether to ground objects at all; without grounding D_local follows features.empty_local.
    enabled: bool = True
    batch_size: int = 4
    # GroundingDINO's defaults from its model card.
    box_threshold: float = 0.35
    text_threshold: float = 0.25
    max_objects: int = 10
    # Fraction of the box size added on every side of a crop before CLIP sees it.
    crop_padding: float = 0.1


@dataclass
class EncodeConfig:
    batch_size: int = 16
    # Template for each grounded phrase before the CLIP text encoder ("{}" = the phrase itself).
    phrase_template: str = "{}"
    # Also cache BERT caption features (CT2 text variant) and DINOv2 image features.
    bert: bool = False
    dinov2: bool = False
    # Colour histograms (RGB, HSV, YCbCr) of the decoded image, bins per channel (0 = off).
    color_bins: int = 0


@dataclass
class FeaturesConfig:
    # Which feature set the heads consume: item, item_global, item_local, tidy, image, text,
    # image_text (see pipeline.features.KINDS).
    kind: str = "item"
    # D = w1*D_global + w2*D_local; ITEM sets both to 1.0.
    w1: float = 1.0
    w2: float = 1.0
    # D_local of an image with no grounded object: "zeros" (no local evidence) or "global"
    # (fall back to D_global, i.e. treat the whole image as its only object).
    empty_local: str = "zeros"


@dataclass
class TrainConfig:
    # Heads to train, by registry name (pipeline.heads.HEADS).
    heads: list[str] = field(default_factory=lambda: ["mlp", "svm"])
    # Hyperparameters per head; keys are checked against the head's get_params().
    mlp: dict[str, Any] = field(default_factory=dict)
    svm: dict[str, Any] = field(default_factory=dict)
    multitask: dict[str, Any] = field(default_factory=dict)
    tip_adapter: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvaluateConfig:
    # Split scored into metrics/eval.json. Only evaluate ever reads it.
    split: str = "test"
    threshold: float = 0.5


@dataclass
class Params:
    base: BaseConfig = field(default_factory=BaseConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    ground: GroundConfig = field(default_factory=GroundConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


_CHOICES: dict[str, tuple[str, ...]] = {
    "base.device": ("auto", "cpu", "cuda", "mps"),
    "base.dtype": ("auto", "float32", "float16", "bfloat16"),
    "base.scheduler": ("local", "dask"),
    "models.preset": ("paper", "tiny"),
    "caption.source": ("dataset", "blip2", "dataset_else_blip2"),
    "features.empty_local": ("zeros", "global"),
    "evaluate.split": ("train", "val", "test"),
}


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return _build(hint, value, where)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def _build(cls: Any, values: dict[str, Any], where: str) -> Any:
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
            choices = _CHOICES.get(key)
            if choices and kwargs[name] not in choices:
                raise ConfigError(
                    f"{key} = {kwargs[name]!r} is not one of: {', '.join(choices)}"
                )
    return cls(**kwargs)


def params_from_dict(values: dict[str, Any]) -> Params:
    """Build `Params` from a parsed params mapping, rejecting unknown keys and wrong types."""
    params: Params = _build(Params, values or {}, "")
    if len(params.ingest.split_fractions) != 3 or abs(sum(params.ingest.split_fractions) - 1) > 1e-6:
        raise ConfigError(
            f"ingest.split_fractions must be three fractions (train, val, test) summing to 1, "
            f"got {params.ingest.split_fractions}"
        )
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate `params.yaml`.

    Raises:
        ConfigError: on a missing file, an unknown key or a value of the wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} not found; run from the project root or pass --params")
    with path.open() as fh:
        values = yaml.safe_load(fh) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(values).__name__}")
    try:
        return params_from_dict(values)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain-dict view of a config dataclass (for hashing and provenance attributes)."""
    return dataclasses.asdict(cfg)


def params_hash(*parts: Any) -> str:
    """Stable short hash of the configuration that shaped an output."""
    blob = json.dumps(
        [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
