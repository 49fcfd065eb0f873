"""Logging for the stages and the CLI: this project's INFO lines, other libraries' warnings."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm

#: A bar's look before its rate is known: no rate, no ETA (with and without a known total).
WARMUP_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<?, warming up]"
WARMUP_FORMAT_NO_TOTAL = "{l_bar}{n_fmt}{unit} [{elapsed}, warming up]"

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


class Progress(tqdm):  # type: ignore[misc]  # tqdm.auto's class is untyped
    """A tqdm bar whose rate and ETA leave out the warm-up (models loading, workers starting).

    Until the bar has advanced once after its first progress, it shows no rate and no ETA; from
    then on the rate is counted from that first progress on, so the first ETA is not that of
    a run as slow as its start-up.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._warm: tuple[float, float] | None = None  # (n, time) at the first progress
        super().__init__(*args, **kwargs)

    @property
    def format_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = super().format_dict
        warm = getattr(self, "_warm", None)  # tqdm's __init__ draws before ours has run
        if warm is None and self.n > 0 and hasattr(self, "start_t"):
            warm = self._warm = (self.n, self._time())
        if warm is None or self.n <= warm[0]:
            values["bar_format"] = WARMUP_FORMAT if self.total else WARMUP_FORMAT_NO_TOTAL
        else:
            values["rate"] = (self.n - warm[0]) / max(self._time() - warm[1], 1e-9)
        return values


def progress(iterable: Any = None, **kwargs: Any) -> Progress:
    """A progress bar (tqdm's arguments) that shows its ETA only once the rate is known."""
    return Progress(iterable, **kwargs)
