"""Ingest: decode-check and hash every record, drop exact duplicates, split, write the ingest shards.

Ingest also records each file's size and mtime (`file_size`, `file_mtime_ns`) beside its
content id, so that extraction can check, cheaply, that a file is still the one ingest saw
(`pipeline.rows.key.check_unchanged`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import BaseConfig, IngestConfig
from pipeline.data.images import ImageInfo, inspect_image
from pipeline.data.layouts import resolve_dataset
from pipeline.data.manifest import Item, Record, item_columns, write_csv
from pipeline.data.split import assign_splits, carve_val
from pipeline.data.subsets import balanced_subset
from pipeline.errors import DatasetError
from pipeline.logs import progress
from pipeline.rows import store
from pipeline.rows.atomic import writable_dir
from pipeline.rows.key import content_id, file_stamp, params_hash
from pipeline.rows.reader import read_batches, resolve_workers
from pipeline.rows.store import Arrays

logger = logging.getLogger(__name__)

_CHECK_BATCH = 16
# The ingest settings' one home is IngestConfig.
_DEFAULTS = IngestConfig()


@dataclass
class _CheckFile:
    """`inspect_image` then, for a usable file, its content id (run in a decode worker)."""

    min_side: int
    max_aspect_ratio: float | None
    exif_transpose: bool

    def __call__(self, path: str) -> tuple[ImageInfo | str, str, tuple[int, int]]:
        # Stamped before reading: a file rewritten while it is checked gets a newer mtime than
        # recorded, so extraction hashes it again.
        stamp = file_stamp(path)
        checked = inspect_image(
            Path(path), self.min_side, self.max_aspect_ratio, self.exif_transpose
        )
        return checked, "" if isinstance(checked, str) else content_id(path), stamp


@dataclass
class IngestResult:
    items: list[Item]
    quarantined: list[tuple[str, str]]  # (path, reason)
    duplicates: list[tuple[str, str]]  # (dropped path, kept path)
    stamps: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (size, mtime_ns)


def ingest(
    root: Path,
    records: Sequence[Record],
    *,
    fractions: Sequence[float],
    seed: int,
    min_side: int = 1,
    workers: int = 0,
    caption_similarity: float = _DEFAULTS.caption_similarity,
    caption_containment: float = _DEFAULTS.caption_containment,
    max_aspect_ratio: float | None = None,
    exif_transpose: bool = True,
    val_from_train: float = _DEFAULTS.val_from_train,
    max_per_class: int = _DEFAULTS.max_per_class,
) -> IngestResult:
    """Keep at most `max_per_class` records per folder and class (`balanced_subset`; 0 keeps
    all), decode-check them, drop exact duplicates, and fill in missing splits.

    `workers` processes check and hash the files (0: this process); results do not depend
    on it.
    """
    records = balanced_subset(records, max_per_class, seed)
    items: list[Item] = []
    quarantined: list[tuple[str, str]] = []
    duplicates: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    stamps: dict[str, tuple[int, int]] = {}
    # Files are checked and hashed in `workers` processes, one file per process at a time, and
    # only (size or reason, hash) comes back: memory does not grow with the images' bytes.
    checks = read_batches(
        [str(root / r.path) for r in records],
        _CheckFile(min_side, max_aspect_ratio, exif_transpose),
        _CHECK_BATCH,
        workers,
    )
    results = (result for batch in checks for result in batch)
    for record, (checked, cid, stamp) in progress(
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
        stamps[cid] = stamp
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
        splits = assign_splits(
            items, fractions, seed, caption_similarity, caption_containment=caption_containment
        )
        for item, split in zip(items, splits):
            item.split = split
        return IngestResult(items, quarantined, duplicates, stamps)
    # Datasets that ship train and test only (GenImage: its val is our test) get a val carved
    # from train, for model selection, calibration and the val threshold.
    carved = carve_val(
        items, val_from_train, seed, caption_similarity, caption_containment=caption_containment
    )
    n_carved = sum(item.split != split for item, split in zip(items, carved))
    if n_carved:
        logger.info(
            "the dataset has no val split: %d of its %d train images (ingest.val_from_train="
            "%g of each generator's, seeded) are val",
            n_carved,
            sum(item.split == "train" for item in items),
            val_from_train,
        )
        for item, split in zip(items, carved):
            item.split = split
    return IngestResult(items, quarantined, duplicates, stamps)


def run_ingest(
    data_path: str | Path,
    out_dir: str | Path,
    *,
    cfg: IngestConfig,
    base: BaseConfig,
    dataset: str,
    layout: str = "auto",
) -> IngestResult:
    """Read the dataset, quarantine what does not decode, write ingest shards and CSVs.

    Writes `manifest.csv` (resolved, one row per kept image), `quarantine.csv`,
    `duplicates.csv` and `shard_*.h5` (ids, path, label, generator, split, caption, ...).
    """
    root, records = resolve_dataset(data_path, layout)
    return ingest_records(root, records, out_dir, cfg=cfg, base=base, dataset=dataset)


def ingest_records(
    root: Path,
    records: Sequence[Record],
    out_dir: str | Path,
    *,
    cfg: IngestConfig,
    base: BaseConfig,
    dataset: str,
) -> IngestResult:
    """`run_ingest` for records already in hand (e.g. the files given to `misalign predict`)."""
    out_dir = writable_dir(out_dir)
    result = ingest(
        root,
        records,
        fractions=cfg.split_fractions,
        seed=base.seed,
        min_side=cfg.min_side,
        workers=resolve_workers(base.decode_workers),
        caption_similarity=cfg.caption_similarity,
        caption_containment=cfg.caption_containment,
        max_aspect_ratio=cfg.max_aspect_ratio,
        exif_transpose=cfg.exif_transpose,
        val_from_train=cfg.val_from_train,
        max_per_class=cfg.max_per_class,
    )
    if not records:
        raise DatasetError(f"the dataset at {root} lists no images; nothing to ingest")
    if not result.items:
        shown = "; ".join(f"{p}: {r}" for p, r in result.quarantined[:3])
        raise DatasetError(
            f"no usable image in {root}: all {len(records)} were quarantined or duplicates "
            f"(e.g. {shown or 'none'}); nothing was written to {out_dir}"
        )
    attrs = {
        "stage": "ingest",
        "dataset": dataset,
        "data_root": str(Path(root).resolve()),
        "model": "",
        "preset": "",
        "params_hash": params_hash(cfg, base.seed),
        # How every later stage decodes these files (pipeline.data.images.decode_image).
        "exif_transpose": cfg.exif_transpose,
    }
    # Every shard is built (and every value checked) before the first file is written, so a
    # bad row fails the stage with the old outputs untouched.
    shards: list[Arrays] = []
    for start in range(0, len(result.items), cfg.shard_size):
        chunk = result.items[start : start + cfg.shard_size]
        shard: Arrays = {
            "ids": np.array([it.id for it in chunk], dtype=object),
            "label": np.array([it.label for it in chunk], dtype=np.int8),
            "width": np.array([it.width for it in chunk], dtype=np.int32),
            "height": np.array([it.height for it in chunk], dtype=np.int32),
            "file_size": np.array([result.stamps[it.id][0] for it in chunk], dtype=np.int64),
            "file_mtime_ns": np.array([result.stamps[it.id][1] for it in chunk], dtype=np.int64),
        }
        for key in ("path", "generator", "split", "caption", "group", "family", "subset"):
            shard[key] = np.array([getattr(it, key) for it in chunk], dtype=object)
        shards.append(shard)
    n_shards = len(shards)
    for k, shard in enumerate(shards):
        if not _same_shard(out_dir / store.shard_name(k), shard, attrs):
            store.write_shard(out_dir / store.shard_name(k), shard, attrs)
    for stale in store.list_shards(out_dir)[n_shards:]:
        stale.unlink()
    columns = item_columns()
    write_csv(out_dir / "quarantine.csv", ["path", "reason"], result.quarantined)
    write_csv(out_dir / "duplicates.csv", ["path", "duplicate_of"], result.duplicates)
    write_csv(
        out_dir / "manifest.csv", columns, ([asdict(it)[c] for c in columns] for it in result.items)
    )
    for path, reason in result.quarantined:
        logger.warning("quarantined %s: %s", path, reason)
    if result.duplicates:
        logger.warning(
            "%d exact duplicates kept once (see %s)",
            len(result.duplicates),
            out_dir / "duplicates.csv",
        )
    logger.info(
        "ingest: %d images kept in %d shards, %d quarantined (see %s), %d duplicates dropped",
        len(result.items),
        n_shards,
        len(result.quarantined),
        out_dir / "quarantine.csv",
        len(result.duplicates),
    )
    return result


def _same_shard(path: Path, data: Arrays, attrs: dict[str, Any]) -> bool:
    """Whether `path` already holds exactly `data` (then it is left as is, so that DVC sees no
    change and reruns nothing downstream)."""
    if not path.exists():
        return False
    try:
        old_attrs = store.read_attrs(path)
        if any(old_attrs.get(k) != v for k, v in attrs.items()):
            return False
        old = store.read_shard(path)
    except store.ShardError:
        return False
    return set(old) == set(data) and all(
        np.array_equal(np.asarray(old[k]), np.asarray(data[k])) for k in data
    )
