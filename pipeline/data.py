"""Datasets: layouts and manifests, content ids, decoding checks, quarantine, seeded group split."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import os
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.atomic import atomic_open
from pipeline.errors import DatasetError
from pipeline.logs import progress

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


def content_id(path: str | Path) -> str:
    """sha256 of the file's bytes: the id every stage keys its rows by."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_label(value: str, where: str) -> int:
    v = str(value).strip().lower()
    if v in _REAL_LABELS:
        return 0
    if v in _FAKE_LABELS:
        return 1
    raise DatasetError(
        f"{where}: label {value!r} is neither real ({sorted(_REAL_LABELS)}) "
        f"nor generated ({sorted(_FAKE_LABELS)})"
    )


def _inside(root: Path, rel: str, where: str) -> str:
    """`rel` as a clean relative path, refused when its text leaves `root` ('..', absolute).
    A symlink inside the dataset is followed wherever it leads, as in the folder layouts
    (datasets are often assembled from links); a dangling one is quarantined by ingest."""
    if not rel or os.path.isabs(rel) or Path(rel).drive:
        clean = None
    else:
        clean = os.path.normpath(rel.replace("\\", "/"))
    if clean is None or clean == ".." or clean.startswith("../") or clean == ".":
        raise DatasetError(
            f"{where}: path {rel!r} escapes the dataset root {root}; manifest paths must be "
            "relative to the manifest's folder and stay inside it"
        )
    return Path(clean).as_posix()


def read_manifest(path: str | Path) -> list[Record]:
    """Read a manifest CSV: columns path (or file), label, generator; optional caption, split,
    group, family, subset. Paths are relative to the CSV's folder and may not leave it. The whole file
    is read and checked before anything is returned (see `_read_csv`); a file listed twice with
    different labels, generators or splits is refused naming both rows."""
    path = Path(path)
    root = path.parent
    header, rows = _read_csv(path)
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
            raise DatasetError(f"{where}: split {split!r} is not one of {SPLITS + POOL_SPLITS}")
        record = Record(
            path=_inside(root, (row[path_col] or "").strip(), where),
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
                        f"{getattr(other, name)!r} on line {line} and "
                        f"{getattr(record, name)!r} on line {i}; keep one row per file"
                    )
            continue
        first_row[record.path] = (i, record)
        records.append(record)
    return records


# ------------------------------------------------------------------------------ folder layouts

# Files with these extensions (and hidden files and folders) inside a folder layout are
# dataset metadata, not images: they are skipped. Every other file is recorded whatever its
# extension, so that ingest quarantines it with a reason instead of dropping it unseen.
METADATA_EXTENSIONS = frozenset({".csv", ".json", ".txt", ".md"})
# Synthbuster-style real folders (compared case-insensitively): RAISE is Synthbuster's own
# source of real photos, `nature` is GenImage's word, `0_real` CNNDetection's.
REAL_FOLDER_NAMES = ("real", "raise", "0_real", "nature", "real_images")
# GenImage ships train and val only; its val is the set every GenImage result is reported on,
# so it becomes our test split (and the dataset has no val split of its own).
GENIMAGE_SPLITS = {"train": "train", "val": "test"}
CAPTION_COLUMNS = ("caption", "captions", "prompt", "prompts")
# Real-image columns of CT2-style CSVs: `coco_image` (Defactify / VCT² COCO) and
# `twitter_image` (VCT² Twitter) are the published names.
REAL_COLUMNS = ("real", "real_image", "real_path", "coco_image", "twitter_image")
_GENIMAGE_LABELS = {"ai": 1, "nature": 0}
_CNN_LABELS = {"0_real": 0, "1_fake": 1}

_LAYOUT_HELP = {
    "manifest": "a CSV (data.path, or <folder>/manifest.csv) with columns path (or file) and "
    "label, optionally generator, caption, split, group, family",
    "cnndetection": "<root>/<generator>/[<class>/]0_real|1_fake/<images> "
    "(CNNDetection, UniversalFakeDetect)",
    "genimage": "<root>/<generator>/[<subset>/]train|val/ai|nature/<images> (GenImage)",
    "synthbuster": "<root>/<generator>/<images> next to <root>/<real folder>/<images>, the real "
    f"folder named one of {list(REAL_FOLDER_NAMES)} in any case (Synthbuster)",
    "ct2": "a CSV with a caption (or prompt) column, a real image column (one of "
    f"{list(REAL_COLUMNS)}) and one image-path column per generator (CT2 / Defactify)",
}
LAYOUTS = ("auto", *_LAYOUT_HELP)


def _walk(folder: Path) -> Iterator[tuple[tuple[str, ...], list[str], list[str]]]:
    """os.walk yielding (parts relative to `folder`, subfolders, files): sorted, hidden entries
    left out, symlinked folders followed (datasets are often assembled from links) except those
    leading back up the path walked so far, which would loop forever."""
    chains: dict[str, tuple[str, ...]] = {}  # folder still to visit -> realpaths above it
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        chain = (*chains.pop(dirpath, ()), os.path.realpath(dirpath))
        keep = []
        for name in sorted(dirnames):
            child = os.path.join(dirpath, name)
            if name.startswith(".") or os.path.realpath(child) in chain:
                continue
            keep.append(name)
            chains[child] = chain
        # Assigning in place is what steers os.walk's descent.
        dirnames[:] = keep
        files = sorted(f for f in filenames if not f.startswith("."))
        yield Path(dirpath).relative_to(folder).parts, dirnames, files


def _is_data_file(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() not in METADATA_EXTENSIONS


def _data_files(folder: Path) -> list[Path]:
    """Every file under `folder` except hidden files and metadata (METADATA_EXTENSIONS)."""
    return [
        folder.joinpath(*parts, name)
        for parts, _, files in _walk(folder)
        for name in files
        if _is_data_file(name)
    ]


def _has_data_file(folder: Path) -> bool:
    return any(_is_data_file(name) for _, _, files in _walk(folder) for name in files)


def _label_dirs(root: Path, match: Callable[[tuple[str, ...]], bool]) -> list[tuple[str, ...]]:
    """Folders under `root` (as parts) for which `match` holds, not descending into them, so
    a label folder nested in another one is not read twice."""
    found = []
    for parts, dirnames, _ in _walk(root):
        keep = []
        for name in dirnames:
            if match((*parts, name)):
                found.append((*parts, name))
            else:
                keep.append(name)
        dirnames[:] = keep
    return found


def _is_cnn_dir(parts: tuple[str, ...]) -> bool:
    return parts[-1] in _CNN_LABELS


def _is_genimage_dir(parts: tuple[str, ...]) -> bool:
    return (
        len(parts) >= 2
        and parts[-1].lower() in _GENIMAGE_LABELS
        and parts[-2].lower() in GENIMAGE_SPLITS
    )


def _is_any_label_dir(parts: tuple[str, ...]) -> bool:
    return _is_cnn_dir(parts) or _is_genimage_dir(parts)


def _no_generator_folder(root: Path, label_dir: Path, expected: str) -> DatasetError:
    return DatasetError(
        f"{label_dir} has no generator folder above it; expected {expected}. Point data.path "
        f"at {root.resolve().parent} to make {root.resolve().name!r} the generator"
    )


def read_folder_layout(root: str | Path) -> list[Record]:
    """Read `<root>/<generator>/[<class>/]0_real|1_fake/<files>` (CNNDetection /
    UniversalFakeDetect). Every file under a label folder is taken, whatever its extension, so
    that non-images are quarantined rather than silently skipped; hidden files and metadata
    (METADATA_EXTENSIONS) are left out."""
    root = Path(root)
    records = []
    for parts in _label_dirs(root, _is_cnn_dir):
        label_dir = root.joinpath(*parts)
        if len(parts) < 2:
            raise _no_generator_folder(root, label_dir, _LAYOUT_HELP["cnndetection"])
        generator = parts[0]
        label = _CNN_LABELS[parts[-1]]
        for file in _data_files(label_dir):
            records.append(
                Record(
                    path=file.relative_to(root).as_posix(),
                    label=label,
                    generator=REAL if label == 0 else generator,
                    family=generator,
                    subset=generator,
                )
            )
    if not records:
        raise DatasetError(
            f"no images found in {root}: expected a manifest.csv there, or the layout "
            f"{_LAYOUT_HELP['cnndetection']}"
        )
    return records


def read_genimage(root: str | Path) -> list[Record]:
    """Read GenImage: `<root>/<generator>/[<subset>/]train|val/ai|nature/<files>`.

    The generator is the first folder under `root` (e.g. `stable_diffusion_v_1_4`, above the
    subset folder `imagenet_ai_0419_sdv4`); `ai` images are generated by it, `nature` images are
    real. The split follows GenImage's folders: `train` → train and `val` → test, because
    GenImage's val set is the one its benchmark reports on; there is no val split. Files are
    taken as in `read_folder_layout`.
    """
    root = Path(root)
    records = []
    for parts in _label_dirs(root, _is_genimage_dir):
        label_dir = root.joinpath(*parts)
        if len(parts) < 3:
            raise _no_generator_folder(root, label_dir, _LAYOUT_HELP["genimage"])
        generator = parts[0]
        label = _GENIMAGE_LABELS[parts[-1].lower()]
        split = GENIMAGE_SPLITS[parts[-2].lower()]
        for file in _data_files(label_dir):
            records.append(
                Record(
                    path=file.relative_to(root).as_posix(),
                    label=label,
                    generator=REAL if label == 0 else generator,
                    split=split,
                    family=generator,
                    subset=generator,
                )
            )
    if not records:
        raise DatasetError(f"no images found in {root}: expected {_LAYOUT_HELP['genimage']}")
    return records


def _top_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_real_folder(name: str) -> bool:
    return name.lower() in REAL_FOLDER_NAMES


def read_synthbuster(root: str | Path) -> list[Record]:
    """Read a folder per generator next to a real folder: `<root>/<generator>/<files>` and
    `<root>/<real folder>/<files>` (Synthbuster with RAISE), the real folder named one of
    REAL_FOLDER_NAMES (`real`, `raise`, `0_real`, `nature`, `real_images`, any case).

    Files may sit in subfolders of a top folder; the top folder decides label and generator
    and is kept as `family`. Files directly under `root` belong to no class and are skipped.
    No split is set. Files are taken as in `read_folder_layout`.
    """
    root = Path(root)
    tops = _top_folders(root)
    if not any(_is_real_folder(t.name) for t in tops):
        raise DatasetError(
            f"{root} has no real folder: the synthbuster layout needs one named one of "
            f"{list(REAL_FOLDER_NAMES)} (any case) next to the generator folders; found "
            f"folders {[t.name for t in tops][:20]}"
        )
    records = []
    for top in tops:
        label = 0 if _is_real_folder(top.name) else 1
        for file in _data_files(top):
            records.append(
                Record(
                    path=file.relative_to(root).as_posix(),
                    label=label,
                    generator=REAL if label == 0 else top.name,
                    family=top.name,
                    subset=top.name,
                )
            )
    loose = [p.name for p in root.iterdir() if p.is_file() and _is_data_file(p.name)]
    if loose:
        logger.info(
            "%d files directly under %s are in no class folder and were skipped (e.g. %s)",
            len(loose),
            root,
            sorted(loose)[0],
        )
    counts = Counter(r.label for r in records)
    if not counts[0] or not counts[1]:
        missing = "real" if not counts[0] else "generated"
        raise DatasetError(
            f"no {missing} images found in {root}: expected {_LAYOUT_HELP['synthbuster']}"
        )
    return records


# -------------------------------------------------------------------------- CT2 / Defactify CSV

# Columns that never hold a generator's images, whatever their values look like.
_CT2_RESERVED = {"id", "group", "split", "family", "label", "generator", "path", "file"}
# `sd21_image` → generator `sd21`.
_GENERATOR_SUFFIXES = ("_images", "_image", "_img", "_path", "_file")


@dataclass
class _Ct2Columns:
    caption: str
    real: str
    generators: dict[str, str]  # column -> generator name
    id: str | None
    split: str | None


def _column(header: Sequence[str], names: Sequence[str]) -> str | None:
    lowered = {h.strip().lower(): h for h in header}
    return next((lowered[n] for n in names if n in lowered), None)


def _is_image_column(values: Sequence[str]) -> bool:
    """At least half the non-empty cells are image paths (URLs do not count: they are not
    files under the CSV's folder)."""
    cells = [v.strip() for v in values if v and v.strip()]
    hits = sum(1 for v in cells if "://" not in v and Path(v).suffix.lower() in IMAGE_EXTENSIONS)
    return bool(cells) and 2 * hits >= len(cells)


def _generator_name(column: str) -> str:
    name = column.strip()
    for suffix in _GENERATOR_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
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
    try:
        rows = list(reader)
    except csv.Error as err:
        raise DatasetError(f"{path}:{reader.line_num}: not a readable CSV ({err})") from None
    header = [h.strip() for h in (reader.fieldnames or [])]
    if not header:
        raise DatasetError(f"{path} is empty: it has no header line and no rows")
    if not rows:
        raise DatasetError(f"{path} has a header ({', '.join(header)}) but no rows")
    for row in rows:
        if None in row:
            raise DatasetError(
                f"{path}: a row has more cells than the header's {len(header)} columns "
                f"({row[None]!r} left over); quote cells that contain commas"
            )
    rows = [{k.strip(): v for k, v in row.items()} for row in rows]
    return header, rows


def _looks_latin1(raw: bytes) -> bool:
    try:
        text = raw.decode("cp1252")
    except UnicodeDecodeError:
        return False
    return not any(ord(c) < 32 and c not in "\r\n\t" for c in text)


def _ct2_columns(header: Sequence[str], rows: Sequence[dict[str, str]]) -> _Ct2Columns | str:
    """The CT2 reading of a CSV's columns, or why it is not one."""
    caption = _column(header, CAPTION_COLUMNS)
    real = _column(header, REAL_COLUMNS)
    image_cols = [
        c
        for c in header
        if c not in (caption, real)
        and c.strip().lower() not in _CT2_RESERVED
        and _is_image_column([r.get(c) or "" for r in rows])
    ]
    n_images = len(image_cols) + (real is not None)
    if caption is None or n_images < 2:
        return (
            f"needs a caption column (one of {list(CAPTION_COLUMNS)}) and at least 2 image-path "
            f"columns; it has {'a' if caption else 'no'} caption column and {n_images} "
            "image-path columns"
        )
    if real is None:
        return (
            f"needs a real image column named one of {list(REAL_COLUMNS)}; its image-path "
            f"columns are {image_cols}"
        )
    generators = {c: _generator_name(c) for c in image_cols}
    clash = [g for g, n in Counter(generators.values()).items() if n > 1 or g.lower() == REAL]
    if clash:
        return f"columns {image_cols} give the generator names {clash} twice or name one 'real'"
    return _Ct2Columns(
        caption=caption,
        real=real,
        generators=generators,
        id=_column(header, ("id",)),
        split=_column(header, ("split",)),
    )


def read_ct2(path: str | Path) -> list[Record]:
    """Read a CT2 / Defactify-style CSV: one row per caption, with a real image column and one
    image column per generator (e.g. `caption, coco_image, sd21_image, sdxl_image, ...`).

    Each row becomes one real record plus one record per generator with a non-empty cell, all
    with the row's caption and the same group (the `id` column, else the row's index from 0),
    so a group-aware split keeps a caption's images on one side. Generator names are the column
    names without a `_image`/`_img`/`_path`/`_file` suffix; `family` is that name too. An
    optional `split` column is honoured. Image-path columns are those whose non-empty cells are
    mostly paths with an image extension. Paths are relative to the CSV's folder and may not
    leave it.
    """
    path = Path(path)
    root = path.parent
    header, rows = _read_csv(path)
    columns = _ct2_columns(header, rows)
    if isinstance(columns, str):
        raise DatasetError(f"{path} is not a CT2-style CSV: it {columns} (columns: {header})")
    sources = [(columns.real, REAL, 0), *((c, g, 1) for c, g in columns.generators.items())]
    records = []
    for i, row in enumerate(rows):
        where = f"{path}:{i + 2}"
        group = (row.get(columns.id) or "").strip() if columns.id else ""
        split = (row.get(columns.split) or "").strip().lower() if columns.split else ""
        if split and split not in SPLITS + POOL_SPLITS:
            raise DatasetError(f"{where}: split {split!r} is not one of {SPLITS + POOL_SPLITS}")
        for column, generator, label in sources:
            cell = (row.get(column) or "").strip()
            if not cell:
                continue
            records.append(
                Record(
                    path=_inside(root, cell, where),
                    label=label,
                    generator=generator,
                    caption=(row.get(columns.caption) or "").strip(),
                    split=split,
                    group=group or str(i),
                    family=_generator_name(column) if label == 0 else generator,
                )
            )
    if not records:
        raise DatasetError(f"{path} has CT2 columns but no image paths in its {len(rows)} rows")
    return records


# --------------------------------------------------------------------------------- detection


def _csv_layout(path: Path) -> str:
    """'manifest' or 'ct2', by the CSV's columns."""
    header, rows = _read_csv(path)
    if "label" in header:
        return "manifest"
    ct2 = _ct2_columns(header, rows)
    if isinstance(ct2, _Ct2Columns):
        return "ct2"
    raise DatasetError(
        f"{path} is neither a manifest (needs columns path (or file) and label; it has no label "
        f"column) nor a CT2-style CSV (it {ct2}); its columns are {header}. Accepted: "
        f"manifest = {_LAYOUT_HELP['manifest']}; ct2 = {_LAYOUT_HELP['ct2']}"
    )


def _show(parts: Sequence[tuple[str, ...]]) -> str:
    shown = ", ".join("/".join(p) for p in parts[:3])
    return f"{len(parts)} (e.g. {shown})" if parts else "none"


def _detect_folder(root: Path) -> str:
    label_dirs = _label_dirs(root, _is_any_label_dir)
    genimage = [p for p in label_dirs if _is_genimage_dir(p)]
    # A label folder straight under the root is CNNDetection's only if it is 1_fake: a lone
    # 0_real next to generator folders is a Synthbuster real folder.
    cnn = [p for p in label_dirs if _is_cnn_dir(p) and (len(p) > 1 or p[0] == "1_fake")]
    tops = _top_folders(root)
    reals = [t.name for t in tops if _is_real_folder(t.name) and _has_data_file(t)]
    gens = []
    if reals:
        gens = [
            t.name
            for t in tops
            if not _is_real_folder(t.name) and t.name != "1_fake" and _has_data_file(t)
        ]
    found = {
        "genimage": bool(genimage),
        "cnndetection": bool(cnn),
        "synthbuster": bool(reals and gens),
    }
    matches = [name for name, hit in found.items() if hit]
    if len(matches) == 1:
        return matches[0]
    evidence = (
        f"no manifest.csv; train|val/ai|nature folders: {_show(genimage)}; 0_real|1_fake "
        f"folders: {_show(cnn)}; top-level real folders with files: {reals or 'none'}; other "
        f"top-level folders: {[t.name for t in tops if t.name not in reals][:10]}"
    )
    accepted = "; ".join(f"{name} = {_LAYOUT_HELP[name]}" for name in LAYOUTS[1:])
    if not matches:
        raise DatasetError(
            f"cannot recognise the dataset layout of {root}: found {evidence}. Accepted layouts: "
            f"{accepted}. Arrange the folder in one of them or write a manifest.csv"
        )
    raise DatasetError(
        f"the dataset layout of {root} is ambiguous: it looks like {' and '.join(matches)} "
        f"({evidence}). Pass the layout explicitly (one of {list(LAYOUTS[1:])}), or keep one "
        f"layout per folder. Accepted layouts: {accepted}"
    )


def detect_layout(path: str | Path) -> str:
    """The layout `resolve_dataset(path)` would read: one of LAYOUTS other than "auto".

    A CSV (or a folder holding manifest.csv) is a manifest if it has a `label` column, else
    CT2-style if it has a caption/prompt column and at least 2 image-path columns. A folder is
    genimage if it holds `…/train|val/ai|nature/` folders, cnndetection if it holds
    `<generator>/…/0_real|1_fake/` folders, synthbuster if it has a top-level real folder
    (REAL_FOLDER_NAMES) and other top-level folders with files. If none or several of the
    folder layouts match, DatasetError says what was found.
    """
    path = Path(path)
    if path.is_file():
        return _csv_layout(path)
    if (path / "manifest.csv").is_file():
        return _csv_layout(path / "manifest.csv")
    return _detect_folder(path)


_CSV_READERS: dict[str, Callable[[Path], list[Record]]] = {
    "manifest": read_manifest,
    "ct2": read_ct2,
}
_FOLDER_READERS: dict[str, Callable[[Path], list[Record]]] = {
    "cnndetection": read_folder_layout,
    "genimage": read_genimage,
    "synthbuster": read_synthbuster,
}


def resolve_dataset(path: str | Path, layout: str = "auto") -> tuple[Path, list[Record]]:
    """Find the dataset at `path` and read its records.

    Args:
        path: a CSV (manifest or CT2-style), a folder holding manifest.csv, or a folder in the
            cnndetection, genimage or synthbuster layout.
        layout: one of LAYOUTS; "auto" detects it (see `detect_layout`), any other value reads
            `path` in that layout (a CSV layout given a folder reads its manifest.csv; a folder
            layout ignores a manifest.csv).

    Returns:
        The dataset root (paths are relative to it) and its records.
    """
    if layout not in LAYOUTS:
        raise DatasetError(f"dataset layout {layout!r} is not one of {list(LAYOUTS)}")
    path = Path(path)
    if not path.exists():
        raise DatasetError(
            f"dataset path {path} does not exist; set data.path to a folder or a manifest CSV"
        )
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DatasetError(
                f"data.path {path} is a file but not a .csv (manifest or CT2-style); a folder "
                f"layout ({', '.join(_FOLDER_READERS)}) needs data.path to be the folder"
            )
        if layout in _FOLDER_READERS:
            raise DatasetError(
                f"layout {layout!r} reads a folder but data.path {path} is a file; set "
                f"data.path to the dataset folder, or the layout to 'auto', 'manifest' or 'ct2'"
            )
        csv_path, root = path, path.parent
    else:
        csv_path, root = path / "manifest.csv", path
        if layout in _CSV_READERS and not csv_path.is_file():
            raise DatasetError(
                f"layout {layout!r} reads a CSV but {path} has no manifest.csv; set data.path "
                "to the CSV file"
            )
        if layout == "auto" and not csv_path.is_file():
            layout = _detect_folder(path)
    if layout == "auto":
        layout = _csv_layout(csv_path)
    if layout in _CSV_READERS:
        records = _CSV_READERS[layout](csv_path)
    else:
        records = _FOLDER_READERS[layout](root)
    logger.info("dataset %s: %s layout, %d records", path, layout, len(records))
    return root, records


@dataclass
class ImageInfo:
    """What decoding found: the size as the models see it (after EXIF orientation), the
    number of frames (only the first is used), and the stored mode (e.g. I;16, F, CMYK)."""

    width: int
    height: int
    n_frames: int = 1
    mode: str = ""


def _to_8bit(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale a high-bit-depth or float plane to uint8 without clipping its content away.

    16-bit integers are divided by 257 (65535 -> 255); 32-bit integers within 0..65535 are
    taken as 16-bit (Pillow opens 16-bit PNGs so) and wider ones are stretched from their
    minimum to their maximum; floats within [0, 1] are multiplied by 255, within [0, 255]
    kept, and any other range stretched. Non-finite floats are refused by the caller.
    """
    a = arr.astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode == "F":
        if lo >= 0 and hi <= 1:
            a = a * 255.0
        elif lo < 0 or hi > 255:
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    elif lo >= 0 and hi <= 255 and not mode.startswith("I;16"):
        pass
    elif lo >= 0 and hi <= 65535:
        a = a / 257.0
    else:
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _rgb(img: Image.Image) -> Image.Image:
    """The RGB picture of any Pillow mode, keeping its content (see `_to_8bit`)."""
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode in ("I", "F") or mode.startswith("I;16"):
        arr = np.asarray(img)
        if mode == "F" and not np.isfinite(arr).all():
            raise ValueError("float image with NaN or infinite pixels")
        return Image.fromarray(_to_8bit(arr, mode)).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        # Transparent pixels shown on white, as viewers and browsers show them; converting
        # straight to RGB would expose whatever colour sits under alpha 0 (often black).
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    # 1, L, P, CMYK (Pillow undoes Adobe's inverted CMYK JPEGs), YCbCr, LAB, HSV, RGBX.
    return img.convert("RGB")


def decode_image(path: str | Path, exif_transpose: bool = True) -> tuple[Image.Image, ImageInfo]:
    """Decode an image file the one way every stage sees it: the first frame, EXIF orientation
    applied (unless `exif_transpose` is false), any bit depth or mode scaled to 8-bit RGB.

    Raises:
        OSError, SyntaxError, ValueError, Image.DecompressionBombError: what Pillow raises for
            files it cannot decode (ingest turns these into quarantine reasons).
    """
    from PIL import ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            n_frames = int(getattr(img, "n_frames", 1) or 1)
            mode = img.mode
            img.seek(0)
            img.load()  # full decode: catches truncated data that verify() misses
            frame = ImageOps.exif_transpose(img) if exif_transpose else img
            rgb = _rgb(frame)
    return rgb, ImageInfo(rgb.width, rgb.height, n_frames, mode)


def inspect_image(
    path: Path,
    min_side: int = 1,
    max_aspect_ratio: float | None = None,
    exif_transpose: bool = True,
) -> ImageInfo | str:
    """Decode the whole image; return what was found, or the reason it cannot be used."""
    try:
        size = path.stat().st_size
    except OSError as err:
        return f"cannot read file: {err.strerror or err}"
    if size == 0:
        return "empty file (0 bytes)"
    try:
        _, info = decode_image(path, exif_transpose)
    except UnidentifiedImageError:
        return "not an image (no decoder recognises the file's content)"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return f"image too large to decode safely: {err}"
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        return f"truncated or corrupt image data: {err}"
    width, height = info.width, info.height
    if min(width, height) < min_side:
        return f"image is {width}x{height} px, smaller than ingest.min_side={min_side}"
    ratio = max(width, height) / max(1, min(width, height))
    if max_aspect_ratio is not None and ratio > max_aspect_ratio:
        return (
            f"image is {width}x{height} px, aspect ratio {ratio:.1f} above "
            f"ingest.max_aspect_ratio={max_aspect_ratio:g} (the models' resizers would squash "
            "its short side to a few pixels)"
        )
    return info


def check_image(path: Path, min_side: int = 1) -> tuple[int, int] | str:
    """Decode the whole image; return (width, height), or the reason it cannot be used."""
    info = inspect_image(path, min_side)
    return info if isinstance(info, str) else (info.width, info.height)


_CHECK_BATCH = 16


@dataclass
class _CheckFile:
    """`inspect_image` then, for a usable file, its content id (run in a decode worker)."""

    min_side: int
    max_aspect_ratio: float | None
    exif_transpose: bool

    def __call__(self, path: str) -> tuple[ImageInfo | str, str]:
        checked = inspect_image(
            Path(path), self.min_side, self.max_aspect_ratio, self.exif_transpose
        )
        return checked, "" if isinstance(checked, str) else content_id(path)


def caption_words(text: str) -> frozenset[str]:
    """The words of a caption or prompt for near-duplicate grouping: lowercase runs of letters
    and digits (punctuation, case and word order do not count)."""
    return frozenset(re.findall(r"[a-z0-9]+", text.lower()))


def near_duplicate_groups(texts: Sequence[str], threshold: float) -> list[int]:
    """Cluster texts whose word sets (`caption_words`) have a Jaccard similarity
    |A ∩ B| / |A ∪ B| of at least `threshold`, transitively; returns a cluster id per text.

    Prompt variants such as "evening sunset scenery blue sky nature, glass bottle with a galaxy
    in it" and "... glass bottle with a fizzy ice cold freezing rainbow liquid in it" (Jaccard
    0.63) are one cluster at the default 0.5; `threshold=1` groups identical word sets only.
    All pairs are found with prefix filtering (words ordered rarest first: two sets with
    Jaccard >= t share a word among the first |A| - ceil(t·|A|) + 1 of each), so the cost stays
    near linear for captions that share few words.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"caption similarity threshold must be in (0, 1], got {threshold}")
    sets = [caption_words(t) for t in texts]
    freq = Counter(w for s in sets for w in s)
    parent = list(range(len(sets)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    index: dict[str, list[int]] = defaultdict(list)
    for i, words in enumerate(sets):
        if not words:
            continue
        ordered = sorted(words, key=lambda w: (freq[w], w))
        prefix = len(ordered) - math.ceil(threshold * len(ordered) - 1e-9) + 1
        candidates: set[int] = set()
        for w in ordered[:prefix]:
            candidates.update(index[w])
            index[w].append(i)
        for j in candidates:
            if find(i) != find(j) and len(words & sets[j]) >= threshold * len(words | sets[j]):
                parent[find(i)] = find(j)
    return [find(i) for i in range(len(sets))]


def _group_keys(items: Sequence[Record], caption_similarity: float) -> list[str]:
    """The split group of each record: its `group`, else its cluster of near-duplicate
    captions/prompts (`near_duplicate_groups`), else the file itself."""
    captioned = [i for i, r in enumerate(items) if not r.group and caption_words(r.caption)]
    clusters = near_duplicate_groups([items[i].caption for i in captioned], caption_similarity)
    # A cluster is named by its first caption, normalised, so keys stay readable and stable.
    names: dict[int, str] = {}
    keys = []
    for item in items:
        if item.group:
            keys.append("group:" + item.group)
        else:
            keys.append("path:" + item.path)
    for i, cluster in zip(captioned, clusters):
        # Images made from the same (or a near-identical) prompt, or paired with the same
        # caption, are near-duplicates in content: they must not straddle a split.
        names.setdefault(cluster, " ".join(items[i].caption.lower().split()))
        keys[i] = "caption:" + names[cluster]
    return keys


def _stable_unit(seed: int, key: str) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(
    items: Sequence[Record],
    fractions: Sequence[float],
    seed: int,
    caption_similarity: float = 0.5,
) -> list[str]:
    """Seeded train/val/test split that keeps each group on one side and each generator (of
    each subset) spread over the splits in proportion to `fractions`.

    Groups come from the `group` column, else the caption/prompt together with its
    near-duplicates (word-set Jaccard >= `caption_similarity`, see `near_duplicate_groups`),
    else the file itself. Each
    group is assigned as a whole to the split with the largest unfilled quota of its main
    generator; quotas are rounded by seeded largest remainder, so a generator with a single
    image lands in train, val or test with probabilities `fractions`.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, key in enumerate(_group_keys(items, caption_similarity)):
        groups[key].append(i)
    by_generator: dict[str, list[str]] = defaultdict(list)
    for key, members in groups.items():
        # Per subset too, so that each test folder keeps real and generated images of its own.
        main = Counter(f"{items[i].subset}/{items[i].generator}" for i in members)
        by_generator[main.most_common(1)[0][0]].append(key)
    out = [""] * len(items)
    for generator, keys in sorted(by_generator.items()):
        keys.sort(key=lambda k: _stable_unit(seed, k))
        n = sum(len(groups[k]) for k in keys)
        quota = np.floor(np.asarray(fractions) * n)
        remainder = np.asarray(fractions) * n - quota
        for _ in range(int(n - quota.sum())):
            # Seeded draw weighted by what is left, so rounding favours no split.
            u = _stable_unit(seed, f"{generator}:{quota.sum()}")
            j = int(np.searchsorted(np.cumsum(remainder / remainder.sum()), u, side="right"))
            j = min(j, len(SPLITS) - 1)
            quota[j] += 1
            remainder[j] = 0.0
        for key in keys:
            j = int(np.argmax(quota))
            quota[j] -= len(groups[key])
            for i in groups[key]:
                out[i] = SPLITS[j]
    return out


@dataclass
class IngestResult:
    items: list[Item]
    quarantined: list[tuple[str, str]]  # (path, reason)
    duplicates: list[tuple[str, str]]  # (dropped path, kept path)


def ingest(
    root: Path,
    records: Sequence[Record],
    *,
    fractions: Sequence[float],
    seed: int,
    min_side: int = 1,
    workers: int = 0,
    caption_similarity: float = 0.5,
    max_aspect_ratio: float | None = None,
    exif_transpose: bool = True,
) -> IngestResult:
    """Decode-check every record, drop exact duplicates, and fill in missing splits.

    `workers` processes check and hash the files (0: this process); results do not depend
    on it.
    """
    items: list[Item] = []
    quarantined: list[tuple[str, str]] = []
    duplicates: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    from pipeline.reader import read_batches

    # Files are checked and hashed in `workers` processes, one file per process at a time, and
    # only (size or reason, hash) comes back: memory does not grow with the images' bytes.
    checks = read_batches(
        [str(root / r.path) for r in records],
        _CheckFile(min_side, max_aspect_ratio, exif_transpose),
        _CHECK_BATCH,
        workers,
    )
    results = (result for batch in checks for result in batch)
    for record, (checked, cid) in progress(
        zip(records, results), total=len(records), desc="ingest", unit="img"
    ):
        if isinstance(checked, str):
            quarantined.append((record.path, checked))
            continue
        if checked.n_frames > 1:
            logger.warning(
                "%s has %d frames; only the first is used (n_frames in manifest.csv)",
                record.path,
                checked.n_frames,
            )
        if cid in seen:
            duplicates.append((record.path, seen[cid]))
            continue
        seen[cid] = record.path
        items.append(
            Item(
                **asdict(record),
                id=cid,
                width=checked.width,
                height=checked.height,
                n_frames=checked.n_frames,
            )
        )
    missing = [i for i, it in enumerate(items) if not it.split]
    if missing and len(missing) < len(items):
        raise DatasetError(
            f"{len(missing)} of {len(items)} manifest rows have no split (e.g. "
            f"{items[missing[0]].path}); give every row a split or none"
        )
    if missing:
        for item, split in zip(items, assign_splits(items, fractions, seed, caption_similarity)):
            item.split = split
    return IngestResult(items, quarantined, duplicates)


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Write a CSV atomically (temporary file, then rename)."""
    with atomic_open(path) as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def item_columns() -> list[str]:
    return [f.name for f in fields(Item)]


def load_rgb(path: str | Path, exif_transpose: bool = True) -> Image.Image:
    """Open an image as 8-bit RGB exactly as ingest checked it (`decode_image`)."""
    return decode_image(path, exif_transpose)[0]
