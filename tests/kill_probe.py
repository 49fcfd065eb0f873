"""Run a stage script that stops at a chosen point of its progress, for the kill -9 test.

    python -m tests.kill_probe COUNTS MARKER PHASE N stages.<x> [stage args...]

Counts how often the runner enters each phase (`model`: a model forward over one batch;
`write`: writing one finished shard) and writes the counts to COUNTS as JSON when the stage
exits. With PHASE and N (N >= 1) the stage, on entering PHASE for the N-th time (`model`, or
`write` before the shard is written) or leaving it (`written`: after the shard is written),
creates MARKER and waits there; the test then kills it. PHASE `batch` stops ingest when its
decode workers have handed over their N-th batch of inspected images (the workers still busy
with the next ones). The kill moment is thus a point of the
work, not a number of seconds, and a busy machine cannot move it. PHASE `none` runs freely.

Only the test uses this; the stages themselves have no hook.
"""

from __future__ import annotations

import atexit
import json
import runpy
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.data import ingest
from pipeline.rows import runner


def main() -> None:
    counts_path, marker, phase, n, module, *args = sys.argv[1:]
    target, at = phase, int(n)
    counts: Counter[str] = Counter()
    atexit.register(lambda: Path(counts_path).write_text(json.dumps(counts)))
    enter = runner.Timer.__call__

    def stop(phase: str) -> None:
        if phase == target and counts[phase] == at:
            Path(marker).write_text(phase)
            while True:  # the test kills the process here
                time.sleep(60)

    @contextmanager
    def probed(self: runner.Timer, phase: str) -> Iterator[None]:
        with enter(self, phase):
            counts[phase] += 1
            stop(phase)
            yield
        if phase == "write":
            counts["written"] += 1
            stop("written")

    batches = ingest.read_batches

    def probed_batches(*args, **kwargs):  # type: ignore[no-untyped-def]
        for batch in batches(*args, **kwargs):
            counts["batch"] += 1
            stop("batch")
            yield batch

    runner.Timer.__call__ = probed  # type: ignore[method-assign]
    ingest.read_batches = probed_batches  # type: ignore[assignment]
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
