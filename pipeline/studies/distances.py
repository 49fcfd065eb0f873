"""The distances study (ITEM Fig. 5): global distance only, local only, and both."""

from __future__ import annotations

import functools
from typing import Any

from pipeline.studies.base import Study, StudyInputs, fit_and_score, load_rows, prefixed

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
            tests = {"all": rows.fs.where("test"), **{t: rows.of(t, "test") for t in names}}
            cells += self.cached(
                inputs,
                {"train": rows.fs.where("train"), "val": rows.fs.where("val"), **prefixed(tests)},
                functools.partial(
                    fit_and_score,
                    inputs,
                    rows.fs.where("train"),
                    rows.fs.where("val"),
                    tests,
                    {"kind": kind},
                    kind,
                ),
                kind=kind,
                labels={"kind": kind},
            )
        return {**self.header(inputs, rows), "kinds": list(DISTANCE_KINDS), "cells": cells}
