"""Manifests: the record of one image, labels, and the checked reading of a manifest CSV."""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from pipeline.errors import DatasetError, shown
from pipeline.rows.atomic import atomic_open

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
SPLITS = ("train", "val", "test")
# Extra split a manifest may declare: images whose labels are not used for training but that
# pseudo-labelling may draw from (train.pseudo_pool).
POOL_SPLITS = ("unlabelled",)
REAL = "real"
_REAL_LABELS = {"0", "real", "nature", "0_real"}
_FAKE_LABELS = {"1", "fake", "generated", "ai", "synthetic", "1_fake"}


@dataclass
class Record:
    """One image of a dataset, as declared (before decoding)."""

    path: str  # relative to the dataset root, with forward slashes
    label: int  # 0 real, 1 generated
    generator: str  # "real" for real images
    caption: str = ""
    split: str = ""
    group: str = ""
    family: str = ""
    # The dataset folder the image came from (a CNNDetection / UniversalFakeDetect / GenImage
    # generator folder, with its own real images); real rows keep theirs. Empty when the
    # dataset has no such folders (its real images are shared by every generator).
    subset: str = ""


@dataclass
class Item(Record):
    """A record that decoded cleanly, with its content id and size."""

    id: str = ""
    width: int = 0
    height: int = 0
    # Frames in the file (animated GIF/WebP, multi-page TIFF); only the first is used.
    n_frames: int = 1


def parse_label(value: str, where: str) -> int:
    v = str(value).strip().lower()
    if v in _REAL_LABELS:
        return 0
    if v in _FAKE_LABELS:
        return 1
    raise DatasetError(
        f"{where}: label {shown(value)} is neither real ({sorted(_REAL_LABELS)}) "
        f"nor generated ({sorted(_FAKE_LABELS)})"
    )


def inside_root(root: Path, rel: str, where: str) -> str:
    """`rel` as a clean relative path, refused when its text leaves `root` ('..', absolute).
    A symlink inside the dataset is followed wherever it leads, as in the folder layouts
    (datasets are often assembled from links); a dangling one is quarantined by ingest."""
    if not rel or os.path.isabs(rel) or Path(rel).drive:
        clean = None
    else:
        clean = os.path.normpath(rel.replace("\\", "/"))
    if clean is None or clean == ".." or clean.startswith("../") or clean == ".":
        raise DatasetError(
            f"{where}: path {shown(rel)} escapes the dataset root {root}; manifest paths must be "
            "relative to the manifest's folder and stay inside it"
        )
    return Path(clean).as_posix()


def read_manifest(path: str | Path) -> list[Record]:
    """Read a manifest CSV: columns path (or file), label, generator; optional caption, split,
    group, family, subset. Paths are relative to the CSV's folder and may not leave it. The whole file
    is read and checked before anything is returned (see `read_csv`); a file listed twice with
    different labels, generators or splits is refused naming both rows."""
    path = Path(path)
    root = path.parent
    header, rows = read_csv(path)
    columns = set(header)
    path_col = "path" if "path" in columns else "file" if "file" in columns else None
    missing = [c for c in ("label",) if c not in columns]
    if path_col is None or missing:
        raise DatasetError(
            f"manifest {path} needs columns path (or file) and label, and should have "
            f"generator; it has {sorted(columns)}"
        )
    records = []
    first_row: dict[str, tuple[int, Record]] = {}
    for i, row in enumerate(rows, start=2):
        where = f"{path}:{i}"
        label = parse_label(row["label"] or "", where)
        generator = (row.get("generator") or "").strip() or (REAL if label == 0 else "unknown")
        if label == 0:
            generator = REAL
        split = (row.get("split") or "").strip().lower()
        if split and split not in SPLITS + POOL_SPLITS:
            raise DatasetError(
                f"{where}: split {shown(split)} is not one of {SPLITS + POOL_SPLITS}"
            )
        rel = (row[path_col] or "").strip()
        if not rel:
            raise DatasetError(
                f"{where}: the {path_col} cell is empty; give each image's path relative to {root}"
            )
        record = Record(
            path=inside_root(root, rel, where),
            label=label,
            generator=generator,
            caption=(row.get("caption") or "").strip(),
            split=split,
            group=(row.get("group") or "").strip(),
            family=(row.get("family") or "").strip(),
            subset=(row.get("subset") or "").strip(),
        )
        seen = first_row.get(record.path)
        if seen is not None:
            line, other = seen
            for name in ("label", "generator", "split"):
                if getattr(other, name) != getattr(record, name):
                    raise DatasetError(
                        f"{path}: {record.path} is listed twice with different {name}s: "
                        f"{shown(getattr(other, name))} on line {line} and "
                        f"{shown(getattr(record, name))} on line {i}; keep one row per file"
                    )
            continue
        first_row[record.path] = (i, record)
        records.append(record)
    return records


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Read a whole CSV (manifest or CT2-style) and check its text before anything uses it:
    UTF-8 (a byte-order mark, as Excel writes, is accepted), no NUL bytes, a header and at
    least one row. Each problem is a DatasetError naming the file and the line."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"cannot read {path}: {err.strerror or err}") from err
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        guess = "latin-1 / Windows-1252" if _looks_latin1(raw) else "not UTF-8"
        raise DatasetError(
            f"{path}:{line}: the CSV is not UTF-8 text (byte 0x{raw[err.start]:02x}; it looks "
            f"{guess}); re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > "
            f"utf8.csv`"
        ) from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise DatasetError(
            f"{path}:{line}: the CSV holds a NUL byte (a binary file, or text saved as UTF-16?); "
            "remove it or re-save the file as UTF-8 text"
        )
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        for row in reader:
            if None in row:
                # reader.line_num is the line the row ends on (a quoted cell may span lines).
                raise DatasetError(
                    f"{path}:{reader.line_num}: the row has more cells than the header's "
                    f"{len(reader.fieldnames or [])} columns ({shown(row[None])} left over); "
                    "quote cells that contain commas"
                )
            rows.append(row)
    except csv.Error as err:
        raise DatasetError(f"{path}:{reader.line_num}: not a readable CSV ({err})") from None
    header = [h.strip() for h in (reader.fieldnames or [])]
    if not header:
        raise DatasetError(f"{path} is empty: it has no header line and no rows")
    if not rows:
        raise DatasetError(f"{path} has a header ({', '.join(header)}) but no rows")
    rows = [{k.strip(): v for k, v in row.items()} for row in rows]
    return header, rows


def _looks_latin1(raw: bytes) -> bool:
    try:
        text = raw.decode("cp1252")
    except UnicodeDecodeError:
        return False
    return not any(ord(c) < 32 and c not in "\r\n\t" for c in text)


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Write a CSV atomically (temporary file, then rename)."""
    with atomic_open(path) as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def item_columns() -> list[str]:
    return [f.name for f in fields(Item)]
