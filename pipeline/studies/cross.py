"""Cross-group studies: train on each group and test on each (`train_sets`), and leave one
group out (`logo`)."""

from __future__ import annotations

import functools
from typing import Any

from pipeline.studies.base import Study, StudyInputs, fit_and_score, load_rows, prefixed


class TrainSets(Study):
    """Train on each group, test on each: one cell per (train, test) pair."""

    name = "train_sets"
    summary = "train on each generator / subset / dataset, test on each (one cell per pair)"
    reproduces = "ITEM Fig. 6; GenImage's cross-generator table"

    def run(self, inputs: StudyInputs) -> dict[str, Any]:
        rows = load_rows(inputs)
        trainable, testable, _ = rows.usable()
        cells = []
        for train in trainable:
            tr, va = rows.of(train, "train"), rows.of(train, "val")
            tests = {test: rows.of(test, "test") for test in testable}
            cells += self.cached(
                inputs,
                {"train": tr, "val": va, **prefixed(tests)},
                functools.partial(fit_and_score, inputs, tr, va, tests, {"train": train}),
                labels={"train": train},
            )
        return {**self.header(inputs, rows), "cells": cells}


class LeaveOneOut(Study):
    """Train on every group but one, test on each group: the left-out one is unseen. Only
    groups with generated test rows are left out (an unseen group must be scored)."""

    name = "logo"
    summary = "leave one generator (or subset, dataset) out of training; test on each"
    reproduces = "unseen-generator generalisation (GenImage; the internship report on CLIP-feature detectors)"

    def run(self, inputs: StudyInputs) -> dict[str, Any]:
        rows = load_rows(inputs)
        names = rows.names()
        _, testable, _ = rows.usable()
        cells = []
        for held_out in testable:
            seen = [g for g in names if g != held_out]
            if not rows.trainable(seen):
                continue
            tr, va = rows.of(seen, "train"), rows.of(seen, "val")
            tests = {test: rows.of(test, "test") for test in testable}
            labels = {"held_out": held_out}
            fitted = self.cached(
                inputs,
                {"train": tr, "val": va, **prefixed(tests)},
                functools.partial(fit_and_score, inputs, tr, va, tests, labels),
                labels=labels,
            )
            cells += [{**c, "unseen": c["test"] == held_out} for c in fitted]
        return {**self.header(inputs, rows), "cells": cells}
