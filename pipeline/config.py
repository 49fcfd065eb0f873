"""Typed, closed configuration: one dataclass per `params.yaml` section, unknown keys rejected."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError


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
    # Processes that decode and preprocess images while the model runs (pipeline.reader):
    # 0 decodes in the main process; -1 (auto) gives each extraction process on the machine an
    # equal share of its CPUs, at most 8. Rows do not depend on it.
    decode_workers: int = -1
    # On CUDA the caption/ground/encode batch sizes are multiplied by this (the params' sizes
    # suit a CPU; a GPU wants larger batches). 1 takes them as given. Rows do not depend on it.
    cuda_batch_scale: int = 4


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
    # auto | manifest | cnndetection | genimage | synthbuster | ct2 (see pipeline.data).
    layout: str = "auto"


@dataclass
class IngestConfig:
    # Images per shard: a shard is the unit of resumption and of parallel work.
    shard_size: int = 64
    # train/val/test fractions used only when the manifest gives no split.
    split_fractions: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])
    # Images smaller than this on either side are quarantined (CLIP upsamples them to 224 px,
    # which says more about the resampler than about the image).
    min_side: int = 16
    # Captions/prompts whose word sets have a Jaccard similarity of at least this are one split
    # group (prompt variants of one scene must not straddle train and test); 1.0 groups
    # identical word sets only. See pipeline.data.near_duplicate_groups.
    caption_similarity: float = 0.5
    # Images whose long side exceeds this many times the short side are quarantined: the
    # models' processors resize the short side to their input size, so an 8000x16 strip would
    # become a 0-pixel-high tensor (GroundingDINO) or a 224x0.4 px smear (CLIP).
    max_aspect_ratio: float = 20.0
    # Apply the EXIF orientation tag before anything sees the pixels, as every photo viewer
    # does; false keeps the stored pixel order.
    exif_transpose: bool = True


@dataclass
class CaptionConfig:
    # "blip2": every image captioned by the same model, as ITEM does (default: a dataset's own
    # captions are often human COCO captions for real photos and prompts for generated images,
    # so their style tells the label); "dataset": the manifest's captions (CT2-style data,
    # where real and generated images share one caption); "dataset_else_blip2": the
    # manifest's caption where present, BLIP-2 for the rest.
    source: str = "blip2"
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
    # Boxes of one phrase overlapping a higher-scoring box of that phrase by more than this IoU
    # are the same object found twice; only the best is kept (1.0 keeps every box).
    iou_threshold: float = 0.8
    # Boxes with a side shorter than this many pixels are dropped: CLIP would see a few
    # upsampled pixels, not an object.
    min_box_side: int = 8
    # Fraction of the box size added on every side of a crop before CLIP sees it; 0 because
    # ITEM's object image x_i is the grounded region itself.
    crop_padding: float = 0.0


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
    # Also cache CLIP's vision output before its projection (CT2's image feature; kinds
    # image_pooled, bert_image_pooled). ViT models only.
    clip_pooled: bool = False
    # CLIP prompts of the classes (index 0 real, 1 generated) for zero-shot logits, e.g. in
    # Tip-Adapter. Encoded once per run into class_prompts.h5; not part of the rows' cache key.
    class_prompts: list[str] = field(
        default_factory=lambda: ["a real photograph.", "an image generated by AI."]
    )


@dataclass
class FeaturesConfig:
    # Which feature set the heads consume: item, item_global, item_local, tidy, tidy_global,
    # image, image_raw, text, image_text (see pipeline.features.KINDS).
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
    heads: list[str] = field(
        default_factory=lambda: ["mlp", "svm", "multitask", "tip_adapter", "meta"]
    )
    # Hyperparameters per head; keys are checked against the head's constructor.
    mlp: dict[str, Any] = field(
        default_factory=lambda: {"hidden": 512, "epochs": 50, "lr": 0.001, "weight_decay": 0.001}
    )
    svm: dict[str, Any] = field(default_factory=lambda: {"C": 1.0})
    multitask: dict[str, Any] = field(default_factory=lambda: {"hidden": 512, "epochs": 50})
    # Tip-Adapter-F as published: a cache of 16 shots per class (seeded), paper's affinity.
    tip_adapter: dict[str, Any] = field(default_factory=lambda: {"finetune": True, "n_shots": 16})
    meta: dict[str, Any] = field(default_factory=lambda: {"base_heads": ["mlp", "svm"]})
    # UniversalFakeDetect's released linear probe: {weights: path of its fc_weights.pth}; it
    # always reads the features kind image_raw (pipeline.heads.ufd_probe).
    ufd_probe: dict[str, Any] = field(default_factory=dict)
    # Feature kind per head where it differs from features.kind: Tip-Adapter's zero-shot term
    # compares CLIP *image* features with CLIP text embeddings of the class prompts.
    head_kinds: dict[str, str] = field(default_factory=lambda: {"tip_adapter": "image"})
    # Classes of attribution heads (multitask): the generator, or its family (seed 003).
    attribution_target: str = "generator"
    # Post-hoc calibration of p_generated, fitted on val: none | temperature | platt.
    calibration: str = "temperature"
    # Pseudo-labelling (CT2): confident predictions on the pseudo_pool split are added 80/20
    # to train/val and the head is refitted. Using the evaluation split as the pool needs
    # pseudo_allow_eval_split, and marks every metric of the run as contaminated.
    pseudo_label: bool = False
    pseudo_pool: str = "unlabelled"
    pseudo_threshold: float = 0.8
    pseudo_allow_eval_split: bool = False


@dataclass
class EvaluateConfig:
    # Split scored into metrics/eval.json. Only evaluate ever reads it.
    split: str = "test"
    threshold: float = 0.5
    # Perturbed copies of the evaluation split, each scored into metrics/eval_<name>.json
    # (ITEM's robustness study: Gaussian noise σ on [0,1] pixels, Gaussian blur σ, JPEG quality).
    perturbations: list[str] = field(
        default_factory=lambda: [
            "noise_0.001",
            "noise_0.005",
            "noise_0.01",
            "blur_1",
            "blur_2",
            "blur_3",
            "jpeg_75",
            "jpeg_50",
            "jpeg_25",
        ]
    )
    # Other datasets to score, name -> path (folder or manifest); metrics/eval_<name>.json.
    datasets: dict[str, str] = field(default_factory=dict)
    # JPEG qualities of seed 003's train × test matrix (empty: skip), and the heads it trains.
    qf_matrix: list[int] = field(default_factory=lambda: [40, 65, 90])
    qf_heads: list[str] = field(default_factory=lambda: ["svm"])


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
    "data.layout": ("auto", "manifest", "cnndetection", "genimage", "synthbuster", "ct2"),
    "models.preset": ("paper", "tiny"),
    "caption.source": ("dataset", "blip2", "dataset_else_blip2"),
    "features.empty_local": ("zeros", "global"),
    # Only test: train and val shape the heads (selection, calibration, threshold), so scoring
    # them would report optimistic numbers.
    "evaluate.split": ("test",),
    "train.attribution_target": ("generator", "family"),
    "train.calibration": ("none", "temperature", "platt"),
    # train and val already feed the heads; the pool is the manifest's unlabelled rows (or,
    # with train.pseudo_allow_eval_split, the test split).
    "train.pseudo_pool": ("unlabelled", "test"),
}


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}. Fix: {_fix(where)}")
        return _build(hint, value, where)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}. Fix: {_fix(where)}")
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}. Fix: {_fix(where)}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}. Fix: {_fix(where)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(
                f"{where} must be an integer, got {value!r} (numbers are written without "
                f"quotes; true/false are not numbers). Fix: {_fix(where)}"
            )
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(
                f"{where} must be a number, got {value!r} (numbers are written without "
                f"quotes). Fix: {_fix(where)}"
            )
        return float(value)
    if hint is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}. Fix: {_fix(where)}")
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
                    f"{key} = {kwargs[name]!r} is not one of: {', '.join(choices)}. "
                    f"Fix: {_fix(key)}"
                )
    return cls(**kwargs)


@dataclass(frozen=True)
class _Range:
    """What a numeric param may be: an integer or a finite number within bounds."""

    integer: bool
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself is not allowed
    why: str = ""
    optional: bool = False  # null (None) is allowed too

    def allowed(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        bounds = []
        if self.lo is not None:
            bounds.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            bounds.append(f"<= {self.hi:g}")
        text = kind + (" " + " and ".join(bounds) if bounds else "")
        if self.optional:
            text += " (or null)"
        return text + (f" ({self.why})" if self.why else "")

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or value <= self.hi


def _positive_int(why: str) -> _Range:
    return _Range(True, 1, why=why)


def _count(why: str) -> _Range:
    return _Range(True, 0, why=why)


def _fraction(why: str) -> _Range:
    return _Range(False, 0, 1, why=why)


# Every numeric param of params.yaml (typed fields) and its allowed range. Types were already
# checked by _build; these are the values that would crash a stage hours in, or worse, run and
# write something meaningless (an empty caption batch, deleted shards, NaN features).
_RANGES: dict[str, _Range] = {
    "base.seed": _Range(True, 0, 2**32 - 1, why="numpy and torch seeds"),
    "base.n_workers": _positive_int("Dask workers"),
    "base.decode_workers": _Range(
        True, -1, 64, why="decode processes; -1 = auto, 0 = main process"
    ),
    "base.cuda_batch_scale": _positive_int("batch-size multiplier on CUDA"),
    "ingest.shard_size": _positive_int("images per shard"),
    "ingest.min_side": _positive_int("pixels"),
    "ingest.caption_similarity": _Range(
        False, 0, 1, lo_open=True, why="word-set Jaccard at which captions are one split group"
    ),
    "ingest.max_aspect_ratio": _Range(
        False, 1, 50, why="long side / short side; past 50 the models' resizers lose the image"
    ),
    "caption.batch_size": _positive_int("images per batch"),
    "caption.num_beams": _positive_int("beam search width"),
    "caption.max_new_tokens": _positive_int("tokens"),
    "ground.batch_size": _positive_int("images per batch"),
    "ground.box_threshold": _fraction("a score"),
    "ground.text_threshold": _fraction("a score"),
    "ground.max_objects": _count("objects kept per image"),
    "ground.iou_threshold": _fraction(
        "IoU above which boxes of one phrase are merged; 1 keeps all"
    ),
    "ground.min_box_side": _count("pixels; smaller boxes are dropped"),
    "ground.crop_padding": _Range(False, 0, 10, why="fraction of the box size"),
    "encode.batch_size": _positive_int("images per batch"),
    "encode.color_bins": _Range(True, 0, 256, why="bins per channel, 0 = off"),
    "features.w1": _Range(False, why="weight of D_global"),
    "features.w2": _Range(False, why="weight of D_local"),
    "train.pseudo_threshold": _Range(False, 0.5, 1, why="confidence of a pseudo-label"),
    "evaluate.threshold": _fraction("a probability"),
}
# Hyperparameters of the heads (train.<head>.<name>), by name: they are free-form mappings in
# params.yaml, so their types are checked here too ("50" is not an integer).
_HEAD_RANGES: dict[str, _Range] = {
    "hidden": _positive_int("hidden units"),
    "epochs": _positive_int("passes over train"),
    "batch_size": _positive_int("rows per step"),
    "lr": _Range(False, 0, 10, lo_open=True, why="learning rate"),
    "weight_decay": _Range(False, 0, why="AdamW weight decay"),
    "C": _Range(False, 0, lo_open=True, why="SVM regularisation"),
    "n_calibration_folds": _Range(True, 2, why="folds"),
    "max_iter": _positive_int("iterations"),
    "tol": _Range(False, 0, lo_open=True, why="solver tolerance"),
    "n_folds": _Range(True, 2, why="out-of-fold stacking"),
    "alpha": _Range(False, 0, why="Tip-Adapter residual ratio"),
    "beta": _Range(False, 0, why="Tip-Adapter sharpness"),
    "n_shots": _Range(True, 1, optional=True, why="shots per class"),
    "clip_logit_scale": _Range(False, 0, lo_open=True, why="CLIP's logit scale"),
    "random_state": _Range(True, 0, 2**32 - 1, optional=True, why="seed"),
}
_HEAD_BOOLS = ("finetune", "standardize")
_HEAD_GRIDS = {"C_grid": "C", "alpha_grid": "alpha", "beta_grid": "beta"}
# A plain folder name: it becomes cache/<name>/ and is interpolated into dvc.yaml paths.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _lookup(node: Any, key: str) -> Any:
    """The value of a dotted key in a config dataclass, or None where there is no such key."""
    for part in key.split("."):
        if not hasattr(node, part):
            return None
        node = getattr(node, part)
    return node


def _fix(key: str, example: Any = None) -> str:
    example = _lookup(Params(), key) if example is None else example
    if example is None:
        shown = "<value>"
    elif isinstance(example, str) and example:
        shown = example
    else:
        shown = json.dumps(example, separators=(",", ":"))
    return f"set {key} in params.yaml (or dvc exp run -S {key}={shown})" + (
        f", e.g. the default {shown}" if example is not None else ""
    )


def _refuse(key: str, value: Any, allowed: str, example: Any = None) -> ConfigError:
    return ConfigError(
        f"{key} = {value!r} is not allowed: it must be {allowed}. Fix: {_fix(key, example)}"
    )


def _check_plain_name(key: str, name: str) -> None:
    if not _PLAIN_NAME.fullmatch(name) or ".." in name:
        raise _refuse(
            key,
            name,
            "a plain name of letters, digits, '_', '-' or '.' (no '/', '\\', '..' or leading "
            "'.'), since it names a folder under cache/",
            "sample" if key == "data.name" else "other",
        )


# The heads' registry names and constructor parameters (pipeline.heads.HEADS and
# valid_params, equal by test), known here without importing the heads: scikit-learn costs
# seconds to import, and every stage checks its params before anything else.
HEAD_PARAMS: dict[str, tuple[str, ...]] = {
    "mlp": ("hidden", "epochs", "lr", "weight_decay", "batch_size", "random_state", "device"),
    "svm": ("C", "C_grid", "n_calibration_folds", "tol", "max_iter", "random_state"),
    "multitask": (
        "hidden",
        "epochs",
        "lr",
        "weight_decay",
        "batch_size",
        "real_label",
        "family_map",
        "random_state",
        "device",
    ),
    "tip_adapter": (
        "alpha",
        "beta",
        "finetune",
        "epochs",
        "lr",
        "batch_size",
        "n_shots",
        "class_text_emb",
        "clip_logit_scale",
        "standardize",
        "alpha_grid",
        "beta_grid",
        "random_state",
        "device",
    ),
    "meta": ("base_heads", "n_folds", "final", "random_state"),
    "ufd_probe": ("weights",),
}
HEAD_NAMES = tuple(HEAD_PARAMS)


def _check_head_params(train: TrainConfig) -> None:
    for head in HEAD_NAMES:
        given = getattr(train, head, None)
        if given is None:
            continue
        if not isinstance(given, dict):
            raise _refuse(f"train.{head}", given, "a mapping of hyperparameters", {})
        for name, value in given.items():
            key = f"train.{head}.{name}"
            rule = _HEAD_RANGES.get(name)
            if rule is not None and not rule.ok(value):
                raise _refuse(key, value, rule.allowed(), _HEAD_EXAMPLES.get(name))
            if name in _HEAD_BOOLS and not isinstance(value, bool):
                raise _refuse(key, value, "true or false", True)
            if name in _HEAD_GRIDS:
                item = _HEAD_RANGES[_HEAD_GRIDS[name]]
                if not isinstance(value, (list, tuple)) or not value:
                    raise _refuse(key, value, f"a non-empty list of {item.allowed()}", [1.0])
                for v in value:
                    if not item.ok(v):
                        raise _refuse(key, value, f"a non-empty list of {item.allowed()}", [1.0])
            if name == "base_heads":
                bases = [h for h in HEAD_NAMES if h != "meta"]
                if (
                    not isinstance(value, (list, tuple))
                    or not value
                    or not all(isinstance(b, str) and b in bases for b in value)
                ):
                    raise _refuse(
                        key, value, f"a non-empty list of head names among {bases}", ["mlp", "svm"]
                    )


_HEAD_EXAMPLES: dict[str, Any] = {
    "hidden": 512,
    "epochs": 50,
    "batch_size": 64,
    "lr": 0.001,
    "weight_decay": 0.001,
    "C": 1.0,
    "n_calibration_folds": 3,
    "max_iter": 100,
    "tol": 0.0001,
    "n_folds": 5,
    "alpha": 1.0,
    "beta": 5.5,
    "n_shots": 16,
    "clip_logit_scale": 100.0,
    "random_state": 0,
}


def check_ranges(params: Params) -> None:
    """Range and consistency checks of every param, in pure Python (nothing heavy imported),
    so that a bad value is reported in well under a second, before any stage does any work.

    Raises:
        ConfigError: naming the key, the value, what is allowed and the fix.
    """
    for key, rule in _RANGES.items():
        value = _lookup(params, key)
        if not rule.ok(value):
            raise _refuse(key, value, rule.allowed())
    fractions = params.ingest.split_fractions
    key = "ingest.split_fractions"
    if len(fractions) != 3 or not all(math.isfinite(f) and 0 <= f <= 1 for f in fractions):
        raise _refuse(key, fractions, "three fractions (train, val, test), each in [0, 1]")
    if abs(sum(fractions) - 1) > 1e-6:
        raise _refuse(
            key, fractions, f"three fractions summing to 1 (these sum to {sum(fractions):g})"
        )
    if fractions[0] == 0:
        raise _refuse(key, fractions, "fractions with a non-empty train split (train > 0)")
    if params.features.w1 == 0 and params.features.w2 == 0:
        raise ConfigError(
            "features.w1 = 0 and features.w2 = 0 make every ITEM feature zero; at least one "
            "weight must be non-zero. Fix: set features.w1 and/or features.w2 (ITEM: 1.0 each)"
        )
    _check_plain_name("data.name", params.data.name)
    if not params.data.path.strip():
        raise _refuse("data.path", params.data.path, "a dataset folder or manifest CSV")
    for role in ("clip", "blip2", "grounding", "bert", "dinov2"):
        spec = getattr(params.models, role)
        if not spec.id.strip() and not spec.path.strip():
            raise _refuse(f"models.{role}.id", spec.id, "a model name (or set models.{role}.path)")
    template = params.encode.phrase_template
    try:
        ok = "\x00" in template.format("\x00")
    except (IndexError, KeyError, ValueError):
        ok = False
    if not ok:
        raise _refuse(
            "encode.phrase_template",
            template,
            "a text with one '{}' where the phrase goes (other braces doubled: '{{' '}}')",
        )
    prompts = params.encode.class_prompts
    if len(prompts) != 2 or not all(p.strip() for p in prompts):
        raise _refuse(
            "encode.class_prompts", prompts, "two non-empty prompts: class 0 (real), class 1"
        )
    for key, names in (
        ("train.heads", params.train.heads),
        ("evaluate.qf_heads", params.evaluate.qf_heads),
    ):
        if len(set(names)) != len(names):
            raise _refuse(key, names, "a list of head names without repeats")
    if not params.train.heads:
        raise _refuse("train.heads", [], "a non-empty list of head names")
    _check_head_params(params.train)
    for q in params.evaluate.qf_matrix:
        if not 1 <= q <= 100:
            raise _refuse(
                "evaluate.qf_matrix",
                params.evaluate.qf_matrix,
                "JPEG qualities, integers in 1..100",
            )
    if len(set(params.evaluate.qf_matrix)) != len(params.evaluate.qf_matrix):
        raise _refuse("evaluate.qf_matrix", params.evaluate.qf_matrix, "qualities without repeats")
    if params.evaluate.qf_matrix and not params.evaluate.qf_heads:
        raise _refuse("evaluate.qf_heads", [], "a non-empty list of heads when qf_matrix is set")
    for name, path in params.evaluate.datasets.items():
        _check_plain_name("evaluate.datasets", str(name))
        if not isinstance(path, str) or not path.strip():
            raise _refuse(f"evaluate.datasets.{name}", path, "a dataset folder or manifest CSV")


def params_from_dict(values: dict[str, Any]) -> Params:
    """Build `Params` from a parsed params mapping, rejecting unknown keys, wrong types and
    values out of range (see `check_ranges`), then names unknown to the registries."""
    params: Params = _build(Params, values or {}, "")
    check_ranges(params)
    _check_names(params)
    return params


def _check_names(params: Params) -> None:
    """Cross-field checks against the registries (heads, feature kinds, perturbations)."""
    from pipeline.perturb import parse_perturbation

    for head, accepted in HEAD_PARAMS.items():
        given = getattr(params.train, head, {}) or {}
        unknown = sorted(set(given) - set(accepted))
        if unknown:
            raise ConfigError(
                f"unknown key train.{head}.{unknown[0]}; {head} takes: {', '.join(accepted)}"
            )

    for key, names in (
        ("train.heads", params.train.heads),
        ("evaluate.qf_heads", params.evaluate.qf_heads),
        ("train.head_kinds", list(params.train.head_kinds)),
    ):
        unknown = [n for n in names if n not in HEAD_NAMES]
        if unknown:
            raise ConfigError(f"{key} names unknown head(s) {unknown}; known: {sorted(HEAD_NAMES)}")
    base_heads = (params.train.meta or {}).get("base_heads", [])
    unknown = [
        b for b in base_heads if not isinstance(b, str) or b not in HEAD_NAMES or b == "meta"
    ]
    if unknown:
        raise ConfigError(
            f"train.meta.base_heads names {unknown}, which are not base heads; choose among "
            f"{sorted(set(HEAD_NAMES) - {'meta'})}"
        )
    from pipeline.features import KINDS

    kinds = {"features.kind": params.features.kind} | {
        f"train.head_kinds.{h}": k for h, k in params.train.head_kinds.items()
    }
    for key, kind in kinds.items():
        if kind not in KINDS:
            raise ConfigError(
                f"{key} = {kind!r} is not a feature kind; choose one of {sorted(KINDS)}"
            )
    needs = {
        "bert_text": ("encode.bert", params.encode.bert),
        "dinov2": ("encode.dinov2", params.encode.dinov2),
        "color_hist": ("encode.color_bins", params.encode.color_bins > 0),
        "image_pooled": ("encode.clip_pooled", params.encode.clip_pooled),
    }
    for key, kind in kinds.items():
        for dataset in KINDS[kind]:
            flag, on = needs.get(dataset, ("", True))
            if not on:
                raise ConfigError(f"{key} = {kind!r} needs {flag} to be on in the encode stage")
    for name in params.evaluate.perturbations:
        try:
            parse_perturbation(name)
        except ValueError as err:
            raise ConfigError(f"evaluate.perturbations: {err}") from None


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
