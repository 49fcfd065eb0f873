"""HDF5 shards: schema-v1 writer (atomic rename), readers, and ragged row helpers.

Every shard checks itself: the writer stores a sha256 of each dataset's values in the root
attribute `checksums` (JSON, name -> hex), and every reader verifies the datasets it reads, so
a flipped byte, a dataset deleted or rewritten by hand, or a truncated file is a `ShardError`
naming the shard and the fix, never data used as if it were good. A content hash (rather than
HDF5's fletcher32 filter) because fletcher32 needs chunked layout, covers only the pointers of
variable-length strings (not the captions themselves) and is recomputed by whoever rewrites a
dataset through h5py, so a hand edit would pass it. The hash is of values, not of file bytes:
writing the same rows gives the same checksums. Shards written before checksums existed carry
no `checksums` attribute and are read unverified (`has_checksums` tells them apart; the runner
rewrites them once).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline import __version__
from pipeline.errors import ShardError
from pipeline.rows.atomic import atomic_path

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
OFFSETS = "obj_offsets"
_SHARD_RE = re.compile(r"^shard_(\d{5})\.h5$")
_STR = h5py.string_dtype(encoding="utf-8")
CHECKSUMS = "checksums"
# What to do about a damaged shard a stage reads: its writer recomputes it.
REBUILD = "delete it and rerun the stage that writes it (`dvc repro` does)"

Arrays = dict[str, np.ndarray]


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.h5"


def list_shards(directory: str | Path) -> list[Path]:
    """Complete shards of a stage directory, in index order (temporary files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _SHARD_RE.match(p.name))


def _as_dataset(value: np.ndarray) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind in ("U", "O"):
        return np.asarray([str(v) for v in arr.reshape(-1)], dtype=object).reshape(arr.shape)
    return arr


def write_shard(path: str | Path, data: Arrays, attrs: dict[str, Any]) -> None:
    """Write one shard atomically: a temporary file in the same folder, renamed when complete.

    `data` must hold `ids`; every dataset with a leading dimension of len(ids) is row-aligned,
    and ragged per-object datasets (`obj_*`) are indexed by `obj_offsets`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if "ids" not in data:
        raise ShardError(f"refusing to write {path}: no 'ids' dataset")
    n = len(data["ids"])
    if OFFSETS in data:
        offsets = np.asarray(data[OFFSETS])
        if len(offsets) != n + 1 or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
            raise ShardError(f"refusing to write {path}: malformed {OFFSETS}")
    # No wall-clock time in here: a stage that recomputes the same rows writes the same bytes,
    # so DVC sees an unchanged output and reruns nothing downstream (times go to timings/).
    meta = {
        "schema_version": SCHEMA_VERSION,
        "package_version": __version__,
        **attrs,
    }
    arrays = {key: _as_dataset(value) for key, value in data.items()}
    meta[CHECKSUMS] = json.dumps({k: checksum(a) for k, a in arrays.items()}, sort_keys=True)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as fh:
        for key, value in meta.items():
            fh.attrs[key] = value if not isinstance(value, (dict, list)) else repr(value)
        for key, arr in arrays.items():
            if arr.dtype == object:
                fh.create_dataset(key, data=arr, dtype=_STR, track_times=False)
            else:
                fh.create_dataset(key, data=arr, track_times=False)


def checksum(arr: np.ndarray) -> str:
    """sha256 of a dataset's values as stored: dtype, shape and bytes; strings as UTF-8, each
    prefixed by its length (so that ["ab", "c"] and ["a", "bc"] differ)."""
    h = hashlib.sha256()
    if arr.dtype == object:
        h.update(f"str|{arr.shape}|".encode())
        for value in arr.reshape(-1):
            blob = str(value).encode("utf-8")
            h.update(len(blob).to_bytes(8, "little"))
            h.update(blob)
    else:
        flat = np.ascontiguousarray(arr)
        h.update(f"{flat.dtype.str}|{flat.shape}|".encode())
        h.update(flat.view(np.uint8).reshape(-1).data if flat.size else b"")
    return h.hexdigest()


def read_attrs(path: str | Path) -> dict[str, Any]:
    with open_shard(path) as fh:
        return {k: _attr(v) for k, v in fh.attrs.items()}


def has_checksums(path: str | Path) -> bool:
    """Whether the shard carries checksums (shards written before they existed do not)."""
    with open_shard(path) as fh:
        return CHECKSUMS in fh.attrs


def _checksums(fh: h5py.File, path: str | Path, fix: str) -> dict[str, str] | None:
    raw = fh.attrs.get(CHECKSUMS)
    if raw is None:
        return None
    try:
        sums = json.loads(_attr(raw))
    except (TypeError, ValueError) as err:
        raise ShardError(f"shard {path} is damaged: its checksums cannot be read; {fix}") from err
    if not isinstance(sums, dict):
        raise ShardError(f"shard {path} is damaged: its checksums cannot be read; {fix}")
    return {str(k): str(v) for k, v in sums.items()}


def _attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def open_shard(
    path: str | Path, fix: str = "delete it and rerun the stage that writes it"
) -> h5py.File:
    """Open a shard for reading.

    Args:
        fix: what the user should do when it cannot be read; the default suits a stage's own
            inputs, a command reading a path the user typed says what to give instead.

    Raises:
        ShardError: missing, unreadable or not HDF5, naming the path, the reason and `fix`.
    """
    try:
        return h5py.File(path, "r")
    except OSError as err:
        # h5py's text ("Unable to synchronously open file (file signature not found)") names
        # neither the file nor what is wrong with it in a user's words.
        text = " ".join(str(err).split())
        if err.errno:
            reason = os.strerror(err.errno)
        elif "file signature not found" in text:
            reason = "not an HDF5 file"
        else:
            reason = text
        raise ShardError(f"cannot read shard {path}: {reason}; {fix}") from err


def read_shard(
    path: str | Path, keys: Iterable[str] | None = None, *, fix: str = REBUILD
) -> Arrays:
    """Read datasets of one shard into numpy (strings as `str` object arrays), each verified
    against the checksum written with it.

    Args:
        keys: datasets to read; None reads all (and checks that none was removed). Only what
            is asked for is loaded.
        fix: what the user should do when the shard is damaged (see `open_shard`).

    Raises:
        ShardError: the shard is unreadable, lacks a dataset, or a dataset's values differ from
            those written (a flipped byte, a hand edit), naming the shard, the dataset and `fix`.
    """
    out: Arrays = {}
    with open_shard(path, fix) as fh:
        sums = _checksums(fh, path, fix)
        if keys is None:
            names = list(fh.keys())
            lost = sorted(set(sums or ()) - set(names))
            if lost:
                raise ShardError(f"shard {path} is damaged: dataset {lost[0]!r} was removed; {fix}")
        else:
            names = list(keys)
        for key in names:
            if key not in fh:
                if sums is not None and key in sums:
                    raise ShardError(f"shard {path} is damaged: dataset {key!r} was removed; {fix}")
                raise ShardError(
                    f"shard {path} has no dataset {key!r} (it holds {sorted(fh.keys())}); {fix}"
                )
            try:
                ds = fh[key]
                if h5py.check_string_dtype(ds.dtype) is not None:
                    value = np.asarray(ds.asstr()[()], dtype=object)
                else:
                    value = ds[()]
            except (OSError, ValueError, UnicodeDecodeError) as err:
                raise ShardError(
                    f"shard {path} is damaged: dataset {key!r} cannot be read "
                    f"({' '.join(str(err).split())[:120]}); {fix}"
                ) from err
            if sums is not None and sums.get(key) != checksum(_as_dataset(value)):
                raise ShardError(
                    f"shard {path} is damaged: dataset {key!r} differs from what was written "
                    f"(checksum mismatch: changed on disk or edited by hand); {fix}"
                )
            out[key] = value
    return out


def verify_shard(path: str | Path, *, fix: str = REBUILD) -> None:
    """Read every dataset of a shard, raising `ShardError` unless all match their checksums."""
    read_shard(path, None, fix=fix)


def read_ids(path: str | Path) -> np.ndarray:
    return read_shard(path, ["ids"])["ids"]


def ragged_keys(data: Arrays) -> list[str]:
    return [k for k in data if k.startswith("obj_") and k != OFFSETS]


def take_rows(data: Arrays, rows: Sequence[int]) -> Arrays:
    """Select image rows (and their objects, through `obj_offsets`) from a shard's arrays."""
    index = np.asarray(rows, dtype=np.int64)
    n = len(data["ids"])
    out: Arrays = {}
    for key, value in data.items():
        if key == OFFSETS or key.startswith("obj_"):
            continue
        if len(value) == n:
            out[key] = value[index]
    if OFFSETS in data:
        offsets = np.asarray(data[OFFSETS], dtype=np.int64)
        starts, ends = offsets[index], offsets[index + 1]
        obj_index = (
            np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)])
            if len(index)
            else np.zeros(0, dtype=np.int64)
        ).astype(np.int64)
        out[OFFSETS] = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
        for key in ragged_keys(data):
            out[key] = data[key][obj_index]
    return out


def concat_rows(parts: Sequence[Arrays]) -> Arrays:
    """Concatenate row blocks (the inverse of `take_rows`), re-basing `obj_offsets`."""
    parts = [p for p in parts if len(p["ids"])] or list(parts[:1])
    out: Arrays = {}
    for key in parts[0]:
        if key == OFFSETS:
            pieces, base = [np.zeros(1, dtype=np.int64)], 0
            for p in parts:
                off = np.asarray(p[OFFSETS], dtype=np.int64)
                pieces.append(off[1:] + base)
                base += int(off[-1])
            out[key] = np.concatenate(pieces)
        else:
            out[key] = np.concatenate([np.asarray(p[key]) for p in parts])
    return out


# Attributes every shard of one stage folder must share: shards that differ in any of them were
# made by different code, weights, dtype or settings and must not be read as one dataset.
CONSISTENT_ATTRS = (
    "schema_version",
    "stage",
    "model",
    "dtype",
    "device_class",
    "step_version",
    "provenance",
    "params_hash",
)


def dataset_attrs(directory: str | Path) -> dict[str, Any]:
    """Attributes of a stage folder's shards, refusing a folder whose shards disagree.

    Raises:
        ShardError: no shard, or shards made with different settings, naming which and the fix.
    """
    directory = Path(directory)
    shards = list_shards(directory)
    if not shards:
        raise ShardError(f"no shards in {directory}; run the stage that writes it first")
    attrs = [read_attrs(p) for p in shards]
    problems = []
    for key in CONSISTENT_ATTRS:
        groups: dict[str, list[str]] = {}
        for path, a in zip(shards, attrs):
            groups.setdefault(str(a.get(key, "<missing>")), []).append(path.name)
        if len(groups) > 1:
            problems.append(
                f"{key}: "
                + "; ".join(f"{_names(names)} have {value!r}" for value, names in groups.items())
            )
    if problems:
        raise ShardError(
            f"the shards of {directory} were made by different runs (other code, weights, dtype "
            "or settings) and cannot be read as one dataset: "
            + " | ".join(problems)
            + f". Rebuild them: delete {directory} and rerun the stage that writes it "
            f"(e.g. `rm -r {directory} && dvc repro`)"
        )
    return attrs[0]


def _names(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 4 else f"{names[0]} … {names[-1]} ({len(names)})"


def check_aligned(directory: str | Path, reference: str | Path) -> None:
    """Raise unless the shards of `directory` hold the same ids, in order, as `reference`."""
    mine, theirs = list_shards(directory), list_shards(reference)
    if len(mine) != len(theirs):
        raise ShardError(
            f"{directory} has {len(mine)} shards but {reference} has {len(theirs)}; "
            "rerun the stage that writes it"
        )
    for a, b in zip(mine, theirs):
        if not np.array_equal(read_ids(a), read_ids(b)):
            raise ShardError(f"{a} is not row-aligned with {b}; rerun the stage that writes it")
