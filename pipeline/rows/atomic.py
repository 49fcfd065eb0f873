"""One way to write a file: into a temporary name beside it, then an atomic rename, so that a
reader never sees half a file and an interrupted write leaves nothing behind."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from pipeline.errors import OutputError, output_error


def writable_dir(path: str | os.PathLike[str]) -> Path:
    """Create folder `path` if needed and check that files can be written in it.

    Raises:
        OutputError: naming the folder and the reason (read-only, not permitted, disk full),
            before any work whose results could not be kept.
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(
            f"cannot write to the output folder {folder}: {err.strerror or err}; make it "
            "writable (or point the stage at another folder) and rerun"
        ) from err
    return folder


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path``.

    The caller writes the temporary file by any means (h5py, safetensors, ...). On any error,
    including KeyboardInterrupt, the temporary file is removed and ``path`` is untouched.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as err:
        raise output_error(err, target) or OutputError(
            f"cannot write {target}: {err.strerror or err}; make {target.parent} writable and rerun"
        ) from err
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, mode)  # mkstemp makes the file private; outputs are meant to be shared
        os.replace(tmp, target)
    except OSError as err:
        clear = output_error(err, target)
        if clear is None:
            raise
        raise clear from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike[str], text: bool = True, newline: str | None = ""
) -> Iterator[IO[Any]]:
    """Open a temporary file for writing (UTF-8 text or binary); rename it over ``path`` when
    the block ends without error."""
    with atomic_path(path) as tmp:
        if text:
            with tmp.open("w", encoding="utf-8", newline=newline) as fh:
                yield fh
        else:
            with tmp.open("wb") as fh:
                yield fh


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path) as fh:
        fh.write(text)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path, text=False) as fh:
        fh.write(data)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, ndigits: int | None = 6) -> None:
    """Write ``obj`` as JSON (sorted keys, indent 2) via a temporary file and a rename.

    Numpy scalars and arrays become plain numbers and lists; floats are rounded to ``ndigits``
    decimals (``None`` keeps them exact). NaN and infinity raise ``ValueError`` instead of
    producing JSON that DVC cannot parse: report undefined values as ``None``.
    """
    text = json.dumps(_jsonable(obj, ndigits, "$"), indent=2, sort_keys=True, allow_nan=False)
    write_text(path, text + "\n")


def _jsonable(obj: Any, ndigits: int | None, where: str) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, ndigits, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list | tuple | np.ndarray):
        items = obj.tolist() if isinstance(obj, np.ndarray) else obj
        return [_jsonable(v, ndigits, f"{where}[{i}]") for i, v in enumerate(items)]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, bool | int | str) or obj is None:
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(
                f"{where} is {obj}, which JSON cannot hold; report undefined metrics as None"
            )
        return round(obj, ndigits) if ndigits is not None else obj
    raise TypeError(f"{where} has type {type(obj).__name__}, which cannot be written as JSON")
