"""The finetune study (seed 003's pair training): train on group A, fine-tune on group B
from the saved head (`warm_start_from`), test on every group C, before and after."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError
from pipeline.heads import HEADS, save_head, valid_params
from pipeline.studies.base import (
    Rows,
    Study,
    StudyInputs,
    fit_head,
    load_rows,
    prefixed,
    score,
)


class Finetune(Study):
    """For each (A, B) pair of groups (or the one given by the options `train` and
    `finetune`): the head fitted on A is saved, fitted again on B starting from it, and both
    are scored on each group's test rows. The option `epochs` sets the fine-tuning epochs of a
    torch head (its configured epochs otherwise)."""

    name = "finetune"
    summary = "train on A, fine-tune on B from the saved head, test on each C"
    reproduces = "the internship report on CLIP-feature detectors: pair training (one dataset, then a second)"

    def run(self, inputs: StudyInputs) -> dict[str, Any]:
        if "warm_start_from" not in valid_params(inputs.head):
            warm = [h for h in HEADS if "warm_start_from" in valid_params(h)]
            raise ConfigError(
                f"head {inputs.head!r} cannot fine-tune a saved head; use one of {warm}"
            )
        rows = load_rows(inputs)
        trainable, names, _ = rows.usable()
        pairs = _pairs(trainable, inputs.options.get("train"), inputs.options.get("finetune"))
        tuning: dict[str, Any] = {}
        if inputs.options.get("epochs") is not None:
            tuning["epochs"] = int(inputs.options["epochs"])
        cells = []
        for a, b in pairs:
            blocks = {
                "train": rows.of(a, "train"),
                "val": rows.of(a, "val"),
                "finetune_train": rows.of(b, "train"),
                "finetune_val": rows.of(b, "val"),
                **prefixed({c: rows.of(c, "test") for c in names}),
            }
            cells += self.cached(
                inputs,
                blocks,
                functools.partial(_pair, inputs, rows, names, a, b, tuning),
                labels={"train": a, "finetune": b, "finetune_params": tuning},
            )
        return {**self.header(inputs, rows), "finetune_params": tuning, "cells": cells}


def _pair(
    inputs: StudyInputs,
    rows: Rows,
    names: list[str],
    a: str,
    b: str,
    tuning: dict[str, Any],
) -> list[dict[str, Any]]:
    """The cells of one (A, B) pair: fit on A, save, fine-tune on B from the saved head."""
    with tempfile.TemporaryDirectory(prefix="misalign-finetune-") as tmp:
        first, cal_a = fit_head(inputs, rows.of(a, "train"), rows.of(a, "val"))
        saved = Path(tmp) / f"{a}__{b}"
        save_head(first, saved)
        tuned, cal_b = fit_head(
            inputs,
            rows.of(b, "train"),
            rows.of(b, "val"),
            params={**tuning, "warm_start_from": str(saved)},
        )
        return _scored(rows, names, a, b, (first, cal_a), (tuned, cal_b), inputs)


def _pairs(names: list[str], a: str | None, b: str | None) -> list[tuple[str, str]]:
    for given in (a, b):
        if given is not None and given not in names:
            raise ConfigError(
                f"group {given!r} cannot be trained on (absent, or its train rows lack a "
                f"class); groups that can: {names}"
            )
    return [
        (x, y)
        for x in names
        for y in names
        if x != y and (a is None or x == a) and (b is None or y == b)
    ]


def _scored(
    rows: Rows,
    names: list[str],
    a: str,
    b: str,
    before: tuple[Any, dict[str, Any]],
    after: tuple[Any, dict[str, Any]],
    inputs: StudyInputs,
) -> list[dict[str, Any]]:
    out = []
    for c in names:
        test = rows.of(c, "test")
        out.append(
            {
                "train": a,
                "finetune": b,
                "test": c,
                "before": score(*before, test, inputs.threshold),
                **score(*after, test, inputs.threshold),
            }
        )
    return out
