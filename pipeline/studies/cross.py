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
        names = rows.names()
        cells = []
        for train in names:
            head, cal = fit_head(inputs, rows.of(train, "train"), rows.of(train, "val"))
            for test in names:
                metrics = score(head, cal, rows.of(test, "test"), inputs.threshold)
                cells.append({"train": train, "test": test, **metrics})
        return {**self.header(inputs, rows), "cells": cells}


class LeaveOneOut(Study):
    """Train on every group but one, test on each group: the left-out one is unseen."""

    name = "logo"
    summary = "leave one generator (or subset, dataset) out of training; test on each"
    reproduces = "unseen-generator generalisation (GenImage, seed 003)"

    def run(self, inputs: StudyInputs) -> dict[str, Any]:
        rows = load_rows(inputs)
        names = rows.names()
        cells = []
        for held_out in names:
            seen = [g for g in names if g != held_out]
            head, cal = fit_head(inputs, rows.of(seen, "train"), rows.of(seen, "val"))
            for test in names:
                metrics = score(head, cal, rows.of(test, "test"), inputs.threshold)
                cells.append(
                    {"held_out": held_out, "test": test, "unseen": test == held_out, **metrics}
                )
        return {**self.header(inputs, rows), "cells": cells}
