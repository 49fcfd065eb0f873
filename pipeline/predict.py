"""Score new images with a trained head, through the same extraction code and row cache."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Params
from pipeline.data.ingest import ingest_records
from pipeline.data.manifest import IMAGE_EXTENSIONS, Record, write_csv
from pipeline.errors import ConfigError, DatasetError, ModelFileError, shown
from pipeline.evalsets import extract_ingested, planned_settings
from pipeline.evaluation.calibration import apply_calibration
from pipeline.evaluation.metrics import p_generated
from pipeline.features import (
    feature_settings,
    load_features,
    object_explanations,
    settings_differences,
)
from pipeline.heads import load_head
from pipeline.provenance import models_text, recorded, run_provenance, warn_if_tiny
from pipeline.rows import store
from pipeline.train import ATTRIBUTION_HEADS, REAL, read_train_info

logger = logging.getLogger(__name__)

# top_object / top_object_misalign: the phrase of the image's most misaligned grounded object
# and its 1 - cos(crop, phrase) (empty when nothing was grounded); preset / models: what made
# the head's training features; head: the head folder used.
COLUMNS = (
    "path",
    "id",
    "p_generated",
    "decision",
    "generator",
    "caption",
    "top_object",
    "top_object_misalign",
    "preset",
    "models",
    "head",
)


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, and every image file under the given folders (sorted)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser().resolve()
        if path.is_dir():
            files += sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
        elif path.exists():
            files.append(path)
        else:
            raise DatasetError(f"{item} does not exist; give image files or folders")
    if not files:
        raise DatasetError(f"no image files found in {list(map(str, inputs))}")
    return files


def check_settings(head_dir: Path, info: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse features made otherwise than the head's training features (other weights, dtype,
    step versions or feature params): the head's numbers would not mean what they meant.

    `now` is `features.feature_settings` of the new features, or, before any extraction,
    `evalsets.planned_settings` of the params."""
    trained = info.get("feature_settings")
    if trained is None:
        raise ConfigError(
            f"{head_dir} does not record the settings of its training features (trained by an "
            "older misalign); retrain it (dvc repro train) so that predict can check them"
        )
    diffs = settings_differences(trained, now)
    if diffs:
        raise ConfigError(
            f"the features of these images are not made the way {head_dir} was trained "
            f"(kind {shown(info.get('kind'))}): "
            + "; ".join(diffs)
            + ". Run predict with the params "
            "the head was trained with (same models, base.dtype, feature settings and code "
            "version), or retrain the head with these"
        )


def _score_text(score: float) -> str:
    return "" if np.isnan(score) else f"{score:.4f}"


def predict(
    head_dir: str | Path,
    inputs: Sequence[str | Path],
    out_csv: str | Path,
    params: Params,
    cache: str | Path = "cache/predict",
    threshold: str | float = "val",
) -> list[dict[str, Any]]:
    """Caption, ground, encode and score `inputs` with the head in `head_dir`; write a CSV.

    Args:
        threshold: "val" for the threshold chosen on val at training time (0.5 if none was),
            or a number.
    Returns:
        One dict per scored image with the columns of `COLUMNS`, in input order.
    """
    head_dir, cache = Path(head_dir), Path(cache)
    files = expand_inputs(inputs)  # a typo is reported before the head and models load
    info = read_train_info(head_dir)
    made_by = recorded(info) or run_provenance(params)
    warn_if_tiny(made_by, f"head {head_dir}")
    head = load_head(head_dir)  # a bad head file is reported before any extraction work
    # Params that would make other features than the head's are refused before any work; the
    # features made are checked again below.
    check_settings(head_dir, info, planned_settings(params))
    records = [Record(path=str(f), label=0, generator="unknown", split="test") for f in files]
    # The paths stay absolute (a root joined with an absolute path is that path); the root is
    # the inputs' common folder, which messages about them name.
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    # Every file given is scored: no per-class draw (ingest.max_per_class) among them.
    ingest_cfg = dataclasses.replace(params.ingest, max_per_class=0)
    result = ingest_records(
        root, records, cache / "ingest", cfg=ingest_cfg, base=params.base, dataset="predict"
    )
    for path, reason in result.quarantined:
        logger.error("cannot score %s: %s", path, reason)
    features_dir = extract_ingested(cache, "predict", params)
    check_settings(head_dir, info, feature_settings(features_dir))

    fs = load_features(features_dir, info["kind"])
    if fs.X.shape[1] != head.n_features_in_:
        raise ModelFileError(
            f"the head in {head_dir} takes {head.n_features_in_} features but these images give "
            f"{fs.X.shape[1]} (feature kind {shown(info['kind'])}); predict with the models and "
            "params the head was trained with (--params)"
        )
    prob = apply_calibration(info.get("calibration", {}), p_generated(head, fs.X))
    cut = float(info.get("val_threshold", 0.5)) if threshold == "val" else float(threshold)
    pred = head.predict(fs.X) if info["head"] in ATTRIBUTION_HEADS else None
    captions = store.concat_rows(
        [store.read_shard(s, ["ids", "caption"]) for s in store.list_shards(cache / "captions")]
    )
    caption_of = dict(zip(captions["ids"], captions["caption"]))
    explained = object_explanations(features_dir, cache / "objects")
    row_of = {cid: i for i, cid in enumerate(fs.ids)}
    rows = []
    for item in result.items:
        i = row_of[item.id]
        attributed = "" if pred is None or pred[i] == REAL else str(pred[i])
        rows.append(
            {
                "path": item.path,
                "id": item.id,
                "p_generated": float(prob[i]),
                "decision": "generated" if prob[i] > cut else "real",
                "generator": attributed,
                "caption": str(caption_of[item.id]),
                "top_object": explained[item.id][0],
                "top_object_misalign": _score_text(explained[item.id][1]),
                "preset": made_by.get("preset", ""),
                "models": models_text(made_by),
                "head": str(head_dir),
            }
        )
    by_path = {r["path"]: r for r in rows}
    for dropped, kept in result.duplicates:  # same bytes as an earlier input: same answer
        rows.append({**by_path[kept], "path": dropped})
    write_csv(Path(out_csv), COLUMNS, ([r[k] for k in COLUMNS] for r in rows))
    logger.info(
        "scored %d images with %s (threshold %.3f) -> %s", len(rows), head_dir, cut, out_csv
    )
    return rows
