"""Logging for the stages and the CLI: this project's INFO lines, other libraries' warnings."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

#: Set (to "1") while a stage run that has announced the tiny preset works; worker processes
#: it starts (Dask's LocalCluster) inherit it with the environment.
TINY_ANNOUNCED = "MISALIGN_TINY_ANNOUNCED"


def setup_logging(fmt: str = "%(levelname)s %(name)s: %(message)s") -> None:
    """INFO from this project, WARNING and above from everything else.

    A root logger at INFO would let libraries that log through the root (open_clip) print
    dozens of lines; transformers' and huggingface_hub's loading bars are turned off too
    (the stages show their own progress). Call once, before those libraries are imported.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=logging.WARNING, format=fmt)
    for name in ("pipeline", "stages", "__main__"):
        logging.getLogger(name).setLevel(logging.INFO)


@contextmanager
def tiny_announced() -> Iterator[None]:
    """Within: this stage run has said once that the tiny preset's models are random, so
    `warn_tiny` (each model load, each tiny head) says it again at DEBUG only."""
    before = os.environ.get(TINY_ANNOUNCED)
    os.environ[TINY_ANNOUNCED] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(TINY_ANNOUNCED, None)
        else:
            os.environ[TINY_ANNOUNCED] = before


def warn_tiny(log: logging.Logger, message: str, *args: object) -> None:
    """A warning that a model or head of the tiny preset is random: at WARNING, except within
    `tiny_announced` (a stage run that has warned once already), where it goes to DEBUG."""
    announced = os.environ.get(TINY_ANNOUNCED) == "1"
    log.log(logging.DEBUG if announced else logging.WARNING, message, *args)
