"""The project's own error types: what a user can fix (bad params, bad data, missing or broken
model files). Stages and the CLI turn exactly these into one-line messages; anything else is a
bug and keeps its traceback."""

from __future__ import annotations

import errno
import os
import reprlib
from pathlib import Path
from typing import Any


class MisalignError(Exception):
    """Base of every error that means bad input, not a bug; its message names the fix."""


class ConfigError(MisalignError, ValueError):
    """A `params.yaml` value is missing, unknown, of the wrong type or out of range."""


class DatasetError(MisalignError, ValueError):
    """The dataset cannot be read as given (bad layout, bad manifest, path escaping root)."""


class ShardError(MisalignError, RuntimeError):
    """A shard is missing, unreadable, does not follow the schema, or disagrees with others."""


class CaptionsMissing(MisalignError, RuntimeError):
    """caption.source=dataset but some images have no caption in the dataset."""


class ModelFileError(MisalignError, RuntimeError):
    """A saved head, checkpoint or model file is broken, tampered with or of a refused kind."""


class DataUnusable(MisalignError, ValueError):
    """The data is readable but cannot serve the step (one class only, an empty split...)."""


class OutputError(MisalignError, OSError):
    """An output folder cannot be written (read-only, not permitted, no space left)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input or missing weights: stages and commands report the message
    (which names the fix), not a traceback. Everything the library raises for such input is a
    `MisalignError`; any other exception (a ValueError deep in numpy, a KeyError) is a bug and
    keeps its traceback. (Here, not in the CLI, so that a stage script imports only what it
    runs: dvc.yaml's deps follow the imports.)"""
    return (MisalignError,)


def one_line(err: BaseException) -> str:
    """The message of a user error on one line. An error raised in a decode worker reaches the
    main process re-wrapped by torch's DataLoader, its message then a whole traceback whose
    last line holds the original message: that line is what the user needs."""
    text = str(err)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


# Bounded in the work done, not only in the text kept: a YAML "billion laughs" value is a
# small graph of shared lists whose full repr would be gigabytes.
_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = _REPR.maxset = 6
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlong = 40
SHOWN_MAX = 120


def shown(value: Any, limit: int = SHOWN_MAX) -> str:
    """`repr(value)` cut to at most `limit` characters (with "…"), computed without walking
    more of the value than it shows: use it wherever a user's value goes into a message."""
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - e.g. an int beyond Python's digit limit for str()
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# OS errors a user fixes by freeing space or granting permission, not bugs.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NO_PERMISSION = {errno.EACCES, errno.EPERM, errno.EROFS}


def output_error(err: OSError, path: str | os.PathLike[str] | None = None) -> OutputError | None:
    """The one-line `OutputError` for an OS error a user can fix while writing `path` (disk
    full, quota, read-only or not permitted), or None for any other error (a bug)."""
    if isinstance(err, OutputError) or err.errno not in _NO_SPACE | _NO_PERMISSION:
        return None
    where = Path(path if path is not None else err.filename or "the output")
    if err.errno in _NO_SPACE:
        fix = "free space there (or point the output elsewhere) and rerun; finished shards are kept"
    else:
        fix = f"make {where.parent} writable (or point the output elsewhere) and rerun"
    return OutputError(f"cannot write {where}: {os.strerror(err.errno or 0)}; {fix}")
