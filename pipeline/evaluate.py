"""The evaluate stage: score trained heads on an evaluation set, write metrics, per-image
score files and curves for DVC metrics/plots. The metrics themselves are in `metrics`."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path
from typing import IO, Any

import numpy as np

from pipeline.atomic import atomic_open, write_text
from pipeline.errors import DataUnusable
from pipeline.metrics import (
    REAL_CLASS,
    Scores,
    apply_calibration,
    binary_metrics,
    evaluate_scores,
    own_decision,
    p_generated,
    pr_points,
    roc_points,
)

logger = logging.getLogger(__name__)


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


def run_evaluate(
    features_dir: str | Path,
    heads_dir: str | Path,
    metrics_path: str | Path,
    scores_dir: str | Path,
    plots_dir: str | Path,
    cfg: Any,
    split: str | None = None,
    summary_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Score every trained head on one evaluation set and write metrics, scores and curves.

    Each head reads the feature kind it was trained on and applies the calibration fitted on
    val. Writes `metrics_path` (DESIGN.md's shape, plus the metrics at the threshold chosen on
    val), `<scores_dir>/<head>.csv` (per-image scores from which every metric can be
    recomputed), `<plots_dir>/{roc,pr,confusion}/<head>.csv` for DVC plots (the confusion of
    an attribution head is over classes, that of a detection head real / generated at
    `cfg.threshold`).

    Args:
        split: rows to score; `cfg.split` by default, "all" for every row (other datasets).
        summary_dir: where to write the compact per-head summaries DVC shows
            (`pipeline.summary`); none when not given.
    """
    from pipeline.features import load_features
    from pipeline.heads import load_head
    from pipeline.provenance import recorded, warn_if_tiny
    from pipeline.train import ATTRIBUTION_HEADS, read_train_info, trained_heads

    split = split or cfg.split
    scores_dir, plots_dir = Path(scores_dir), Path(plots_dir)
    for sub in ("roc", "pr", "confusion"):
        (plots_dir / sub).mkdir(parents=True, exist_ok=True)
        for old in (plots_dir / sub).glob("*.csv"):
            old.unlink()
    scores_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {}
    by_kind: dict[str, Any] = {}
    from pipeline.features import caption_provenance_of
    from pipeline.metrics import warn_if_correlated

    provenance = caption_provenance_of(features_dir, split)
    if provenance is not None:
        warn_if_correlated(provenance, f"the {split!r} rows of {features_dir}")
    warned = False
    for head_dir in trained_heads(heads_dir):
        name, info = head_dir.name, read_train_info(head_dir)
        kind = info["kind"]
        if kind not in by_kind:
            by_kind[kind] = load_features(
                features_dir, kind, splits=None if split == "all" else (split,)
            )
        fs = by_kind[kind]
        if not len(fs.y):
            raise DataUnusable(f"the {split!r} split of {features_dir} is empty; nothing to score")
        head = load_head(head_dir)
        made_by = recorded(info)
        if made_by.get("preset") == "tiny" and not warned:
            warn_if_tiny(made_by, f"head {head_dir}")
            warned = True
        p = apply_calibration(info.get("calibration", {}), p_generated(head, fs.X))
        attribution = info.get("head", name) in ATTRIBUTION_HEADS
        # A head attributing families is scored against families (per_generator then holds
        # one block per family), so that its predicted and true classes are comparable.
        by_family = attribution and info.get("attribution_target") == "family"
        scores = Scores(
            ids=fs.ids,
            label=fs.y,
            generator=fs.family if by_family else fs.generator,
            split=fs.split,
            p_generated=np.clip(p, 0.0, 1.0),
            pred_class=np.asarray(head.predict(fs.X), dtype=str) if attribution else None,
            subset=fs.subset,
            # The SVM's accuracies at 0.5 are at its own margin, not at its Platt sigmoid's 0.5.
            decision=own_decision(head, fs.X),
        )
        scores.to_csv(scores_dir / f"{name}.csv", made_by or None)
        block = evaluate_scores(scores, cfg.threshold)
        block.update(made_by)
        if "val_threshold" in info:
            at_val = binary_metrics(scores.label, scores.p_generated, info["val_threshold"])
            block["overall"]["val_threshold"] = info["val_threshold"]
            for key in ("acc", "r_acc", "f_acc"):
                block["overall"][f"{key}_at_val_threshold"] = at_val[key]
        if info.get("contaminated"):
            block["contaminated"] = True
        if provenance is not None:
            block["caption_provenance"] = provenance
        metrics[name] = block
        if len(np.unique(fs.y)) == 2:
            for sub, points in (
                ("roc", roc_points(fs.y, scores.p_generated)),
                ("pr", pr_points(fs.y, scores.p_generated)),
            ):
                _write_points(plots_dir / sub / f"{name}.csv", points)
        if attribution and scores.pred_class is not None:
            true, pred = scores.true_class, scores.pred_class
        else:  # detection heads: real / generated at the threshold of `acc`
            true = np.where(scores.label == 1, "generated", REAL_CLASS)
            called = scores.p_generated > cfg.threshold
            if scores.decision is not None and cfg.threshold == 0.5:
                called = scores.decision == 1
            pred = np.where(called, "generated", REAL_CLASS)
        rows = [{"actual": str(a), "predicted": str(b)} for a, b in zip(true, pred)]
        _write_points(plots_dir / "confusion" / f"{name}.csv", rows)
        logger.info(
            "%s: %s",
            name,
            ", ".join(f"{k} {_fmt(block['overall'].get(k))}" for k in ("acc", "ap", "auc")),
        )
    Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(metrics_path, metrics)
    if summary_dir is not None:
        from pipeline.summary import write_summaries

        write_summaries(metrics, summary_dir)
    return metrics


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{float(x):.3f}"


def _write_points(path: Path, points: list[dict[str, Any]]) -> None:
    """A plot's CSV, `<plots>/<curve>/<head>.csv`. Its first column, `head`, is the file's
    name on every row: DVC gives a plot's template only the rows, and the project's templates
    (plots_template/) title each plot with it."""
    keys = [k for k in points[0] if k != "threshold"] if points else []

    def write(fh: IO[Any]) -> None:
        writer = csv.writer(fh)
        writer.writerow(["head", *keys])
        for p in points:
            writer.writerow([path.stem, *(p[k] for k in keys)])

    with atomic_open(path) as fh:
        write(fh)
