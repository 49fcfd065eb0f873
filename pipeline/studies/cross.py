"""Cross-group studies: train on each group and test on each (`train_sets`), and leave one
group out (`logo`)."""

from __future__ import annotations

from typing import Any

from pipeline.studies.base import Study, StudyInputs, fit_head, load_rows, score


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
            head, cal = fit_head(inputs, rows.of(train, "train"), rows.of(train, "val"))
            for test in testable:
                metrics = score(head, cal, rows.of(test, "test"), inputs.threshold)
                cells.append({"train": train, "test": test, **metrics})
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
            head, cal = fit_head(inputs, rows.of(seen, "train"), rows.of(seen, "val"))
            for test in testable:
                metrics = score(head, cal, rows.of(test, "test"), inputs.threshold)
                cells.append(
                    {"held_out": held_out, "test": test, "unseen": test == held_out, **metrics}
                )
        return {**self.header(inputs, rows), "cells": cells}
