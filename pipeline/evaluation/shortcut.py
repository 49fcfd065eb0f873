"""Shortcut audit: how well file metadata alone (format, JPEG quality, size, bytes per pixel,
EXIF) tells the classes apart, on the same split as the heads.

A metadata-only logistic regression is fitted on the train rows and scored on the evaluation
rows. When its AUC is high, the dataset can be told apart by how its files were saved, and a
detector's numbers on it may measure the format rather than the picture.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.evaluation.metrics import binary_metrics
from pipeline.rows import store

logger = logging.getLogger(__name__)

#: Metadata AUC from which the audit warns that the data has a file-format shortcut.
WARN_AUC = 0.9
#: File formats given a column of their own; any other is `format_other`.
FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP")
COLUMNS = (
    *(f"format_{f.lower()}" for f in FORMATS),
    "format_other",
    "jpeg_quality",
    "width",
    "height",
    "bytes_per_pixel",
    "exif",
)
# The IJG (libjpeg) luminance quantisation table at quality 50, in natural (row-major) order.
_IJG_LUMA = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=np.float64,
).ravel()


def jpeg_quality(tables: dict[int, Any] | None) -> float:
    """The IJG quality (1-100) whose scaled luminance table is closest to table 0, from
    libjpeg's scaling rule (scale = 5000/q below 50, 200 − 2q from 50); 100 for files
    without quantisation tables (lossless formats)."""
    if not tables or 0 not in tables:
        return 100.0
    luma = np.asarray(list(tables[0]), dtype=np.float64)
    if luma.size != 64:
        return 100.0
    # The ratio of the tables' sums (whatever their order) is the IJG scale factor.
    scale = 100.0 * float(luma.sum()) / float(_IJG_LUMA.sum())
    quality = (200.0 - scale) / 2.0 if scale <= 100.0 else 5000.0 / scale
    return float(np.clip(quality, 1.0, 100.0))


def image_metadata(path: str | Path) -> np.ndarray:
    """The `COLUMNS` of one file, read from its header (the pixels are not decoded)."""
    path = Path(path)
    with Image.open(path) as img:
        fmt = (img.format or "").upper()
        width, height = img.size
        tables = getattr(img, "quantization", None) if fmt == "JPEG" else None
        exif = bool(img.info.get("exif")) or len(img.getexif()) > 0
    onehot = [float(fmt == f) for f in FORMATS] + [float(fmt not in FORMATS)]
    n_bytes = path.stat().st_size
    return np.array(
        [
            *onehot,
            jpeg_quality(tables),
            float(width),
            float(height),
            n_bytes / max(1, width * height),
            float(exif),
        ]
    )


def ingest_rows(ingest_dir: str | Path) -> dict[str, np.ndarray]:
    """ids, label, split and absolute path of every row of the ingest shards."""
    shards = store.list_shards(ingest_dir)
    if not shards:
        raise store.ShardError(f"no ingest shards in {ingest_dir}; run the ingest stage first")
    root = Path(str(store.dataset_attrs(ingest_dir).get("data_root", "")))
    parts = [store.read_shard(p, ["ids", "label", "split", "path"]) for p in shards]
    rows = {k: np.concatenate([p[k] for p in parts]) for k in ("ids", "label", "split", "path")}
    rows["path"] = np.array([str(root / p) for p in rows["path"]], dtype=object)
    return rows


def metadata_matrix(paths: np.ndarray) -> np.ndarray:
    """`image_metadata` of each path; an unreadable file gets NaN (then the audit refuses)."""
    out = np.full((len(paths), len(COLUMNS)), np.nan)
    for i, p in enumerate(paths):
        try:
            out[i] = image_metadata(p)
        except (OSError, UnidentifiedImageError) as err:
            logger.warning("shortcut audit: cannot read %s (%s)", p, err)
    return out


def shortcut_audit(
    ingest_dir: str | Path,
    *,
    eval_split: str = "test",
    threshold: float = 0.5,
    head_auc: dict[str, float | None] | None = None,
) -> dict[str, Any]:
    """Fit the metadata-only baseline on the train rows and score it on `eval_split`.

    Returns:
        `metadata_baseline` (the evaluate stage's metrics of the baseline, `auc` first),
        `warning` (whether its AUC reaches `WARN_AUC`), a one-line `message`, the `columns`,
        and `heads` (each head's AUC, as given, beside the baseline's).
    """
    rows = ingest_rows(ingest_dir)
    X = metadata_matrix(rows["path"])
    readable = np.isfinite(X).all(1)
    y = rows["label"].astype(np.int64)
    train = readable & (rows["split"] == "train")
    test = readable & (rows["split"] == eval_split)
    out: dict[str, Any] = {"columns": list(COLUMNS), "warn_auc": WARN_AUC, "heads": head_auc or {}}
    out["n_unreadable"] = int((~readable).sum())
    if len(X) and not readable.any():
        # The images are gone (a cache pulled without its data): the heads' metrics stand,
        # the audit says why it is missing.
        message = (
            f"no audit: none of the images of {ingest_dir} can be read; restore the data "
            "folder the ingest stage read to audit file metadata"
        )
        logger.warning("%s", message)
        out.update(metadata_baseline=None, warning=False, message=message)
        return out
    if len(np.unique(y[train])) < 2 or not test.any():
        out.update(
            metadata_baseline=None,
            warning=False,
            message=f"no audit: the train split needs both classes and {eval_split!r} rows",
        )
        return out
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(X[train], y[train])
    p = model.predict_proba(X[test])[:, 1]
    metrics = dict(binary_metrics(y[test], p, threshold))
    metrics["n_train"] = int(train.sum())
    auc = metrics.get("auc")
    warn = auc is not None and auc >= WARN_AUC
    out["metadata_baseline"] = metrics
    out["warning"] = bool(warn)
    if warn:
        out["message"] = (
            f"SHORTCUT: file metadata alone (format, JPEG quality, size, EXIF) separates real "
            f"from generated with AUC {auc:.3f} on the {eval_split!r} split; the heads' numbers "
            "may measure how the files were saved. Re-save every image in one format (or "
            "evaluate on data without this difference) before trusting them"
        )
        logger.warning("%s", out["message"])
    else:
        shown = "undefined" if auc is None else f"{auc:.3f}"
        out["message"] = f"metadata-only AUC {shown}: below {WARN_AUC}, no format shortcut found"
    return out
