"""Logging for the stages and the CLI: this project's INFO lines, other libraries' warnings."""

from __future__ import annotations

import logging
import os


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
