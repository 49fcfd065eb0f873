"""Checks of built params: ranges, consistency between fields, and names known to registries.

Pure Python (nothing heavy imported), so that a bad value is reported in well under a
second, before any stage does any work.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pipeline.config.head_rules import (
    HEAD_BOOLS,
    HEAD_GRIDS,
    HEAD_NAMES,
    HEAD_PARAMS,
    HEAD_RANGES,
    STACKED_HEADS,
)
from pipeline.config.messages import lookup, refuse
from pipeline.config.schema import CAPTIONERS, RANGES, Params, TrainConfig
from pipeline.errors import ConfigError, shown
from pipeline.feature_kinds import KINDS

# A plain folder name: it becomes cache/<name>/ and is interpolated into dvc.yaml paths.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_ranges(params: Params) -> None:
    """Range and consistency checks of every param.

    Raises:
        ConfigError: naming the key, the value, what is allowed and the fix.
    """
    for key, rule in RANGES.items():
        value = lookup(params, key)
        if not rule.ok(value):
            raise refuse(key, value, rule.allowed())
    _check_split_fractions(params.ingest.split_fractions)
    if params.features.w1 == 0 and params.features.w2 == 0:
        raise ConfigError(
            "features.w1 = 0 and features.w2 = 0 make every ITEM feature zero; at least one "
            "weight must be non-zero. Fix: set features.w1 and/or features.w2 (ITEM: 1.0 each)"
        )
    _check_plain_name("data.name", params.data.name)
    if not params.data.path.strip():
        raise refuse("data.path", params.data.path, "a dataset folder or manifest CSV")
    for role in ("clip", *CAPTIONERS, "grounding", "bert", "dinov2"):
        spec = getattr(params.models, role)
        if not spec.id.strip() and not spec.path.strip():
            raise refuse(f"models.{role}.id", spec.id, f"a model name (or set models.{role}.path)")
    _check_encode_texts(params)
    for key, names in (
        ("train.heads", params.train.heads),
        ("evaluate.qf_heads", params.evaluate.qf_heads),
    ):
        if len(set(names)) != len(names):
            raise refuse(key, names, "a list of head names without repeats")
    if not params.train.heads:
        raise refuse("train.heads", [], "a non-empty list of head names")
    _check_head_params(params.train)
    _check_evaluate(params)


def check_names(params: Params) -> None:
    """Cross-field checks against the registries (heads, feature kinds, perturbations)."""
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
        b for b in base_heads if not isinstance(b, str) or b not in HEAD_NAMES or b in STACKED_HEADS
    ]
    if unknown:
        raise ConfigError(
            f"train.meta.base_heads names {unknown}, which are not base heads; choose among "
            f"{sorted(set(HEAD_NAMES) - set(STACKED_HEADS))}"
        )
    _check_kinds(params)
    _check_perturbations(params.evaluate.perturbations)


def _check_split_fractions(fractions: list[float]) -> None:
    key = "ingest.split_fractions"
    if len(fractions) != 3 or not all(math.isfinite(f) and 0 <= f <= 1 for f in fractions):
        raise refuse(key, fractions, "three fractions (train, val, test), each in [0, 1]")
    if abs(sum(fractions) - 1) > 1e-6:
        raise refuse(
            key, fractions, f"three fractions summing to 1 (these sum to {sum(fractions):g})"
        )
    if fractions[0] == 0:
        raise refuse(key, fractions, "fractions with a non-empty train split (train > 0)")


def _check_plain_name(key: str, name: str) -> None:
    if not _PLAIN_NAME.fullmatch(name) or ".." in name:
        raise refuse(
            key,
            name,
            "a plain name of letters, digits, '_', '-' or '.' (no '/', '\\', '..' or leading "
            "'.'), since it names a folder under cache/",
            "sample" if key == "data.name" else "other",
        )


def _check_encode_texts(params: Params) -> None:
    template = params.encode.phrase_template
    try:
        ok = "\x00" in template.format("\x00")
    except (IndexError, KeyError, ValueError):
        ok = False
    if not ok:
        raise refuse(
            "encode.phrase_template",
            template,
            "a text with one '{}' where the phrase goes (other braces doubled: '{{' '}}')",
        )
    prompts = params.encode.class_prompts
    if len(prompts) != 2 or not all(p.strip() for p in prompts):
        raise refuse(
            "encode.class_prompts", prompts, "two non-empty prompts: class 0 (real), class 1"
        )


def _check_head_params(train: TrainConfig) -> None:
    for head in HEAD_NAMES:
        given = getattr(train, head, None)
        if given is None:
            continue
        if not isinstance(given, dict):
            raise refuse(f"train.{head}", given, "a mapping of hyperparameters", {})
        for name, value in given.items():
            _check_head_param(f"train.{head}.{name}", name, value)


def _check_head_param(key: str, name: str, value: Any) -> None:
    rule = HEAD_RANGES.get(name)
    if rule is not None and not rule.ok(value):
        raise refuse(key, value, rule.allowed(), rule.example)
    if name in HEAD_BOOLS and not isinstance(value, bool):
        raise refuse(key, value, "true or false", True)
    if name in HEAD_GRIDS:
        item = HEAD_RANGES[HEAD_GRIDS[name]]
        if not isinstance(value, (list, tuple)) or not value:
            raise refuse(key, value, f"a non-empty list of {item.allowed()}", [1.0])
        for v in value:
            if not item.ok(v):
                raise refuse(key, value, f"a non-empty list of {item.allowed()}", [1.0])
    if name == "base_heads":
        bases = [h for h in HEAD_NAMES if h not in STACKED_HEADS]
        if (
            not isinstance(value, (list, tuple))
            or not value
            or not all(isinstance(b, str) and b in bases for b in value)
        ):
            raise refuse(
                key, value, f"a non-empty list of head names among {bases}", ["mlp", "svm"]
            )


def _check_evaluate(params: Params) -> None:
    qualities = params.evaluate.qf_matrix
    for q in qualities:
        if not 1 <= q <= 100:
            raise refuse("evaluate.qf_matrix", qualities, "JPEG qualities, integers in 1..100")
    if len(set(qualities)) != len(qualities):
        raise refuse("evaluate.qf_matrix", qualities, "qualities without repeats")
    if qualities and not params.evaluate.qf_heads:
        raise refuse("evaluate.qf_heads", [], "a non-empty list of heads when qf_matrix is set")
    for name, path in params.evaluate.datasets.items():
        _check_plain_name("evaluate.datasets", str(name))
        if not isinstance(path, str) or not path.strip():
            raise refuse(f"evaluate.datasets.{name}", path, "a dataset folder or manifest CSV")


def _check_kinds(params: Params) -> None:
    kinds = {"features.kind": params.features.kind} | {
        f"train.head_kinds.{h}": k for h, k in params.train.head_kinds.items()
    }
    for key, kind in kinds.items():
        if kind not in KINDS:
            raise ConfigError(
                f"{key} = {shown(kind)} is not a feature kind; choose one of {sorted(KINDS)}"
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
                raise ConfigError(
                    f"{key} = {shown(kind)} needs {flag} to be on in the encode stage"
                )


def _check_perturbations(names: list[str]) -> None:
    # pipeline.perturb imports numpy and PIL at its top for the perturbations themselves; the
    # names are checked only here, so the import waits until a params file is checked.
    from pipeline.perturb import parse_perturbation

    for name in names:
        try:
            parse_perturbation(name)
        except ValueError as err:
            raise ConfigError(f"evaluate.perturbations: {err}") from None
