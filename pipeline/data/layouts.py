"""Dataset layouts: find a dataset's records in a folder layout, a CT2-style CSV or a manifest.

About 500 lines because the four published layouts' readers and `detect_layout`, which must
tell them apart, share one set of folder-walking rules; keeping them together keeps those
rules in one reading.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.manifest import (
    IMAGE_EXTENSIONS,
    POOL_SPLITS,
    REAL,
    SPLITS,
    Record,
    inside_root,
    read_csv,
    read_manifest,
)
from pipeline.errors import DatasetError, shown

logger = logging.getLogger(__name__)

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
# Object-class folders of CNNDetection / UniversalFakeDetect: ProGAN's 20 LSUN classes and the
# class folders of the StyleGAN, StyleGAN2 and CycleGAN test sets. A folder whose every
# `<folder>/0_real|1_fake` sits in such a class folder is one generator's set (`progan_train`),
# not a set of generators called "airplane", "bicycle", ...
OBJECT_CLASS_FOLDERS = frozenset(
    "airplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike "
    "person pottedplant sheep sofa train tvmonitor bedroom church church_outdoor apple orange "
    "zebra summer winter".split()
)
# `progan_train` → generator `progan`.
_SPLIT_SUFFIXES = ("_train", "_val", "_test")
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


def _class_level_generator(root: Path, label_dirs: list[tuple[str, ...]]) -> str | None:
    """The generator of a folder that holds one generator's object classes directly
    (`progan_train/<class>/0_real|1_fake`): the folder's name without a `_train`/`_val`/
    `_test` suffix. None when the top folders are not all object classes
    (OBJECT_CLASS_FOLDERS) right above their label folders."""
    if not label_dirs or any(
        len(p) != 2 or p[0].lower() not in OBJECT_CLASS_FOLDERS for p in label_dirs
    ):
        return None
    name = root.resolve().name
    for suffix in _SPLIT_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def read_folder_layout(root: str | Path) -> list[Record]:
    """Read `<root>/<generator>/[<class>/]0_real|1_fake/<files>` (CNNDetection /
    UniversalFakeDetect). Every file under a label folder is taken, whatever its extension, so
    that non-images are quarantined rather than silently skipped; hidden files and metadata
    (METADATA_EXTENSIONS) are left out.

    The generator is the first folder under `root`, and `subset` too. CNNDetection's training
    set, `progan_train/<class>/0_real|1_fake`, has object classes there instead (every top
    folder one of OBJECT_CLASS_FOLDERS): its generator is then `root`'s own name without a
    `_train`/`_val`/`_test` suffix (`progan`). `family` is the object class folder where there
    is one (`airplane`), else the generator.
    """
    root = Path(root)
    records = []
    label_dirs = _label_dirs(root, _is_cnn_dir)
    whole = _class_level_generator(root, label_dirs)
    if whole is not None:
        logger.info(
            "%s holds object-class folders (%s, ...): one generator, %r, named after the folder",
            root,
            label_dirs[0][0],
            whole,
        )
    for parts in label_dirs:
        label_dir = root.joinpath(*parts)
        if len(parts) < 2:
            raise _no_generator_folder(root, label_dir, _LAYOUT_HELP["cnndetection"])
        generator = whole or parts[0]
        # The object class: the folder right above the label folder, below the generator's.
        object_class = parts[-2] if whole or len(parts) >= 3 else generator
        label = _CNN_LABELS[parts[-1]]
        for file in _data_files(label_dir):
            records.append(
                Record(
                    path=file.relative_to(root).as_posix(),
                    label=label,
                    generator=REAL if label == 0 else generator,
                    family=object_class,
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
    header, rows = read_csv(path)
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
            raise DatasetError(
                f"{where}: split {shown(split)} is not one of {SPLITS + POOL_SPLITS}"
            )
        for column, generator, label in sources:
            cell = (row.get(column) or "").strip()
            if not cell:
                continue
            records.append(
                Record(
                    path=inside_root(root, cell, where),
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
    header, rows = read_csv(path)
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
        raise DatasetError(f"dataset layout {shown(layout)} is not one of {list(LAYOUTS)}")
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
                f"layout {shown(layout)} reads a folder but data.path {path} is a file; set "
                f"data.path to the dataset folder, or the layout to 'auto', 'manifest' or 'ct2'"
            )
        csv_path, root = path, path.parent
    else:
        csv_path, root = path / "manifest.csv", path
        if layout in _CSV_READERS and not csv_path.is_file():
            raise DatasetError(
                f"layout {shown(layout)} reads a CSV but {path} has no manifest.csv; set data.path "
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
