"""Score trained heads on an evaluation set: metrics, per-image score files and curves for DVC
metrics and plots. The metrics themselves are in `pipeline.evaluation.metrics`."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import IO, Any

import numpy as np

from pipeline.errors import DataUnusable
from pipeline.evaluation.calibration import apply_calibration
from pipeline.evaluation.caption_sources import warn_if_correlated
from pipeline.evaluation.metrics import (
    REAL_CLASS,
    Scores,
    binary_metrics,
    evaluate_scores,
    own_decision,
    p_generated,
    pr_points,
    roc_points,
)
from pipeline.evaluation.shortcut import shortcut_audit
from pipeline.evaluation.summary import headline, write_summaries
from pipeline.features import FeatureSet, caption_provenance_of, load_features
from pipeline.heads import load_head
from pipeline.provenance import recorded, warn_if_tiny
from pipeline.rows.atomic import atomic_open, write_json_atomic
from pipeline.train import ATTRIBUTION_HEADS, read_train_info, trained_heads

logger = logging.getLogger(__name__)

_CURVES = ("roc", "pr", "confusion")


def run_evaluate(
    features_dir: str | Path,
    heads_dir: str | Path,
    metrics_path: str | Path,
    scores_dir: str | Path,
    plots_dir: str | Path,
    *,
    cfg: Any,
    split: str | None = None,
    summary_dir: str | Path | None = None,
    ingest_dir: str | Path | None = None,
    shortcut_path: str | Path | None = None,
    headline_path: str | Path | None = None,
) -> dict[str, Any]:
    """Score every trained head on one evaluation set and write metrics, scores and curves.

    Each head reads the feature kind it was trained on and applies the calibration fitted on
    val. Writes `metrics_path` (one block per head: overall, per generator and their mean, as
    `pipeline.evaluation.metrics.evaluate_scores` makes it, plus the metrics at the threshold
    chosen on val), `<scores_dir>/<head>.csv` (per-image scores from which every metric can be
    recomputed), `<plots_dir>/{roc,pr,confusion}/<head>.csv` for DVC plots (the confusion of
    an attribution head is over classes, that of a detection head real / generated at
    `cfg.threshold`).

    Args:
        cfg: the evaluate section of the params (`threshold`, `split`).
        split: rows to score; `cfg.split` by default, "all" for every row (other datasets).
        summary_dir: where to write the compact per-head summaries DVC shows
            (`pipeline.evaluation.summary`); none when not given.
        ingest_dir, shortcut_path: with both, the shortcut audit
            (`pipeline.evaluation.shortcut`) fits a metadata-only baseline on the same
            train rows, scores it on the same split, writes `shortcut_path` (its metrics
            beside every head's AUC) and puts its AUC in every head's block
            (`metadata_baseline_auc`).
        headline_path: where to write the experiments table's line, every head's AUC
            (`pipeline.evaluation.summary.headline`); none when not given.
    """
    split = split or cfg.split
    scores_dir, plots_dir = Path(scores_dir), Path(plots_dir)
    _prepare_outputs(scores_dir, plots_dir)
    provenance = caption_provenance_of(features_dir, split)
    if provenance is not None:
        warn_if_correlated(provenance, f"the {split!r} rows of {features_dir}")
    metrics: dict[str, Any] = {}
    by_kind: dict[str, FeatureSet] = {}
    warned = False
    for head_dir in trained_heads(heads_dir):
        name, info = head_dir.name, read_train_info(head_dir)
        if info["kind"] not in by_kind:
            by_kind[info["kind"]] = _rows_to_score(features_dir, info["kind"], split)
        made_by = recorded(info)
        if made_by.get("preset") == "tiny" and not warned:
            warn_if_tiny(made_by, f"head {head_dir}")
            warned = True
        scores = _score_head(head_dir, info, by_kind[info["kind"]])
        scores.to_csv(scores_dir / f"{name}.csv", made_by or None)
        block = _metrics_block(
            scores, info, threshold=cfg.threshold, made_by=made_by, provenance=provenance
        )
        metrics[name] = block
        _write_plots(plots_dir, name, scores, cfg.threshold)
        logger.info(
            "%s: %s",
            name,
            ", ".join(f"{k} {_fmt(block['overall'].get(k))}" for k in ("acc", "ap", "auc")),
        )
    if ingest_dir is not None and shortcut_path is not None:
        _audit(ingest_dir, shortcut_path, metrics, split=split, threshold=cfg.threshold)
    Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(metrics_path, metrics)
    if summary_dir is not None:
        write_summaries(metrics, summary_dir)
    if headline_path is not None:
        write_json_atomic(headline_path, headline(metrics), ndigits=4)
    return metrics


def _audit(
    ingest_dir: str | Path,
    path: str | Path,
    metrics: dict[str, Any],
    *,
    split: str,
    threshold: float,
) -> None:
    """The shortcut audit of the rows scored, written to `path`; its AUC goes beside each
    head's in `metrics`."""
    heads = {name: block["overall"].get("auc") for name, block in metrics.items()}
    audit = shortcut_audit(ingest_dir, eval_split=split, threshold=threshold, head_auc=heads)
    baseline = audit.get("metadata_baseline") or {}
    for block in metrics.values():
        block["metadata_baseline_auc"] = baseline.get("auc")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, audit)


def _prepare_outputs(scores_dir: Path, plots_dir: Path) -> None:
    """Create the output folders and empty the plots' folders of an earlier run's heads."""
    for sub in _CURVES:
        (plots_dir / sub).mkdir(parents=True, exist_ok=True)
        for old in (plots_dir / sub).glob("*.csv"):
            old.unlink()
    scores_dir.mkdir(parents=True, exist_ok=True)


def _rows_to_score(features_dir: str | Path, kind: str, split: str) -> FeatureSet:
    """The features of kind `kind` of the rows to score; refuses an empty split."""
    fs = load_features(features_dir, kind, splits=None if split == "all" else (split,))
    if not len(fs.y):
        raise DataUnusable(f"the {split!r} split of {features_dir} is empty; nothing to score")
    return fs


def _score_head(head_dir: Path, info: dict[str, Any], fs: FeatureSet) -> Scores:
    """The per-image scores of one trained head: its calibrated p_generated and, for an
    attribution head, its predicted class."""
    head = load_head(head_dir)
    p = apply_calibration(info.get("calibration", {}), p_generated(head, fs.X))
    attribution = info.get("head", head_dir.name) in ATTRIBUTION_HEADS
    # A head attributing families is scored against families (per_generator then holds
    # one block per family), so that its predicted and true classes are comparable.
    by_family = attribution and info.get("attribution_target") == "family"
    return Scores(
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


def _metrics_block(
    scores: Scores,
    info: dict[str, Any],
    *,
    threshold: float,
    made_by: dict[str, Any],
    provenance: dict[str, Any] | None,
) -> dict[str, Any]:
    """One head's block of the metrics file: its metrics at `threshold` and at the threshold
    chosen on val, what made it, and the warnings that qualify its numbers."""
    block = evaluate_scores(scores, threshold)
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
    return block


def _write_plots(plots_dir: Path, name: str, scores: Scores, threshold: float) -> None:
    """One head's ROC and PR curves (when both classes are present) and confusion pairs."""
    if len(np.unique(scores.label)) == 2:
        for sub, points in (
            ("roc", roc_points(scores.label, scores.p_generated)),
            ("pr", pr_points(scores.label, scores.p_generated)),
        ):
            _write_points(plots_dir / sub / f"{name}.csv", points)
    if scores.pred_class is not None:
        true, pred = scores.true_class, scores.pred_class
    else:  # detection heads: real / generated at the threshold of `acc`
        true = np.where(scores.label == 1, "generated", REAL_CLASS)
        called = scores.p_generated > threshold
        if scores.decision is not None and threshold == 0.5:
            called = scores.decision == 1
        pred = np.where(called, "generated", REAL_CLASS)
    rows = [{"actual": str(a), "predicted": str(b)} for a, b in zip(true, pred)]
    _write_points(plots_dir / "confusion" / f"{name}.csv", rows)


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
