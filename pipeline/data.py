"""Datasets: layouts and manifests, content ids, decoding checks, quarantine, seeded group split."""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
SPLITS = ("train", "val", "test")
REAL = "real"
_REAL_LABELS = {"0", "real", "nature", "0_real"}
_FAKE_LABELS = {"1", "fake", "generated", "ai", "synthetic", "1_fake"}


class DatasetError(ValueError):
    """The dataset cannot be read as given (bad layout, bad manifest, path escaping root)."""


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


@dataclass
class Item(Record):
    """A record that decoded cleanly, with its content id and size."""

    id: str = ""
    width: int = 0
    height: int = 0


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
    candidate = (root / rel).resolve()
    try:
        relative = candidate.relative_to(root.resolve())
    except ValueError:
        raise DatasetError(
            f"{where}: path {rel!r} escapes the dataset root {root}; manifest paths must be "
            "relative to the manifest's folder and stay inside it"
        ) from None
    return relative.as_posix()


def read_manifest(path: str | Path) -> list[Record]:
    """Read a manifest CSV: columns path (or file), label, generator; optional caption, split,
    group, family. Paths are relative to the CSV's folder and may not leave it."""
    path = Path(path)
    root = path.parent
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or [])
        path_col = "path" if "path" in columns else "file" if "file" in columns else None
        missing = [c for c in ("label",) if c not in columns]
        if path_col is None or missing:
            raise DatasetError(
                f"manifest {path} needs columns path (or file) and label, and should have "
                f"generator; it has {sorted(columns)}"
            )
        records = []
        for i, row in enumerate(reader, start=2):
            where = f"{path}:{i}"
            label = parse_label(row["label"], where)
            generator = (row.get("generator") or "").strip() or (REAL if label == 0 else "unknown")
            if label == 0:
                generator = REAL
            split = (row.get("split") or "").strip().lower()
            if split and split not in SPLITS:
                raise DatasetError(f"{where}: split {split!r} is not one of {SPLITS}")
            records.append(
                Record(
                    path=_inside(root, row[path_col].strip(), where),
                    label=label,
                    generator=generator,
                    caption=(row.get("caption") or "").strip(),
                    split=split,
                    group=(row.get("group") or "").strip(),
                    family=(row.get("family") or "").strip(),
                )
            )
    return records


def _images_under(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
    )


def read_folder_layout(root: str | Path) -> list[Record]:
    """Read `<root>/<generator>/[<class>/]0_real|1_fake/<files>` (CNNDetection /
    UniversalFakeDetect). Every file under a label folder is taken, whatever its extension, so
    that non-images are quarantined rather than silently skipped."""
    root = Path(root)
    records = []
    for label_dir in sorted(p for p in root.rglob("*") if p.is_dir()):
        if label_dir.name not in ("0_real", "1_fake"):
            continue
        parts = label_dir.relative_to(root).parts
        if len(parts) < 2:
            raise DatasetError(
                f"{label_dir} is directly under the root; expected "
                "<root>/<generator>/[<class>/]0_real|1_fake/"
            )
        generator = parts[0]
        label = 0 if label_dir.name == "0_real" else 1
        for file in _images_under(label_dir):
            records.append(
                Record(
                    path=file.relative_to(root).as_posix(),
                    label=label,
                    generator=REAL if label == 0 else generator,
                    # Real images of one generator's folder are its paired reals: keep the
                    # source folder as group so they stay on one side of a split.
                    group="",
                    family=generator,
                )
            )
    if not records:
        raise DatasetError(
            f"no images found in {root}: expected a manifest.csv there, or the layout "
            "<root>/<generator>/[<class>/]0_real|1_fake/<images>"
        )
    return records


def resolve_dataset(path: str | Path) -> tuple[Path, list[Record]]:
    """Find the dataset at `path` (manifest CSV, folder with manifest.csv, or folder layout).

    Returns:
        The dataset root (paths are relative to it) and its records.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(
            f"dataset path {path} does not exist; set data.path to a folder or a manifest CSV"
        )
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DatasetError(f"data.path {path} is a file but not a manifest .csv")
        return path.parent, read_manifest(path)
    if (path / "manifest.csv").is_file():
        return path, read_manifest(path / "manifest.csv")
    return path, read_folder_layout(path)


def check_image(path: Path, min_side: int = 1) -> tuple[int, int] | str:
    """Decode the whole image; return (width, height), or the reason it cannot be used."""
    try:
        size = path.stat().st_size
    except OSError as err:
        return f"cannot read file: {err.strerror or err}"
    if size == 0:
        return "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # full decode: catches truncated data that verify() misses
                width, height = img.size
                img.convert("RGB")
    except UnidentifiedImageError:
        return "not an image (no decoder recognises the file's content)"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return f"image too large to decode safely: {err}"
    except (OSError, SyntaxError, ValueError) as err:
        return f"truncated or corrupt image data: {err}"
    if min(width, height) < min_side:
        return f"image is {width}x{height} px, smaller than ingest.min_side={min_side}"
    return width, height


def _group_key(record: Record) -> str:
    if record.group:
        return "group:" + record.group
    if record.caption:
        # Images made from the same prompt (or paired with the same caption) are
        # near-duplicates in content: they must not straddle a split.
        return "caption:" + " ".join(record.caption.lower().split())
    return "path:" + record.path


def _stable_unit(seed: int, key: str) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(items: Sequence[Record], fractions: Sequence[float], seed: int) -> list[str]:
    """Seeded train/val/test split that keeps each group on one side and each generator
    spread over the splits in proportion to `fractions`.

    Groups come from the `group` column, else the caption/prompt, else the file itself. Each
    group is assigned as a whole to the split with the largest unfilled quota of its main
    generator; quotas are rounded by seeded largest remainder, so a generator with a single
    image lands in train, val or test with probabilities `fractions`.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        groups[_group_key(item)].append(i)
    by_generator: dict[str, list[str]] = defaultdict(list)
    for key, members in groups.items():
        main = Counter(items[i].generator for i in members).most_common(1)[0][0]
        by_generator[main].append(key)
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
) -> IngestResult:
    """Decode-check every record, drop exact duplicates, and fill in missing splits."""
    items: list[Item] = []
    quarantined: list[tuple[str, str]] = []
    duplicates: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for record in tqdm(records, desc="ingest", unit="img"):
        file = root / record.path
        checked = check_image(file, min_side)
        if isinstance(checked, str):
            quarantined.append((record.path, checked))
            continue
        cid = content_id(file)
        if cid in seen:
            duplicates.append((record.path, seen[cid]))
            continue
        seen[cid] = record.path
        items.append(Item(**asdict(record), id=cid, width=checked[0], height=checked[1]))
    missing = [i for i, it in enumerate(items) if not it.split]
    if missing and len(missing) < len(items):
        raise DatasetError(
            f"{len(missing)} of {len(items)} manifest rows have no split (e.g. "
            f"{items[missing[0]].path}); give every row a split or none"
        )
    if missing:
        for item, split in zip(items, assign_splits(items, fractions, seed)):
            item.split = split
    return IngestResult(items, quarantined, duplicates)


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Write a CSV atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


def item_columns() -> list[str]:
    return [f.name for f in fields(Item)]


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as RGB (ingest has already checked that it decodes)."""
    with Image.open(path) as img:
        return img.convert("RGB")
