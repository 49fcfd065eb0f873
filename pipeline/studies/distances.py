"""The distances study (ITEM Fig. 5): global distance only, local only, and both."""

from __future__ import annotations

from typing import Any

from pipeline.studies.base import Study, StudyInputs, fit_head, load_rows, score

#: The feature kinds compared, all computed from the same cached embeddings.
DISTANCE_KINDS = ("item_global", "item_local", "item")


class Distances(Study):
    """Train the head on each distance kind; score it on all test rows and on each group."""

    name = "distances"
    summary = "global distance only, local only, both (feature kinds, no re-extraction)"
    reproduces = "ITEM Fig. 5"

    def run(self, inputs: StudyInputs) -> dict[str, Any]:
        cells = []
        rows = None
        for kind in DISTANCE_KINDS:
            rows = load_rows(inputs, kind)
            _, names, _ = rows.usable()
            head, cal = fit_head(inputs, rows.fs.where("train"), rows.fs.where("val"), kind=kind)
            cells.append(
                {
                    "kind": kind,
                    "test": "all",
                    **score(head, cal, rows.fs.where("test"), inputs.threshold),
                }
            )
            for test in names:
                metrics = score(head, cal, rows.of(test, "test"), inputs.threshold)
                cells.append({"kind": kind, "test": test, **metrics})
        return {**self.header(inputs, rows), "kinds": list(DISTANCE_KINDS), "cells": cells}
