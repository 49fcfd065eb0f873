"""Detection and attribution metrics, per-image score files and curves for DVC metrics/plots."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from pipeline.atomic import atomic_open, write_text

logger = logging.getLogger(__name__)

#: True class of real images in attribution metrics; a generator may not use this name.
REAL_CLASS = "real"

#: Column order of the per-image scores CSV (``pred_class`` only for attribution heads).
SCORE_COLUMNS = ("id", "label", "generator", "split", "p_generated")

Metrics = dict[str, float | int | None]


@dataclass(eq=False)  # arrays make field-wise == ambiguous
class Scores:
    """Per-image scores of one head on one evaluation set, one row per scored image.

    ``label`` is 0 (real) or 1 (generated); ``p_generated`` is the head's probability that the
    image is generated, in [0, 1]; ``pred_class`` (attribution heads only) is the predicted
    class name: ``"real"`` or a generator name. The ``generator`` of real rows is not used by
    any metric. Fields are coerced to numpy arrays and validated on construction.
    """

    ids: np.ndarray
    label: np.ndarray
    generator: np.ndarray
    split: np.ndarray
    p_generated: np.ndarray
    pred_class: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=str)
        self.generator = np.asarray(self.generator, dtype=str)
        self.split = np.asarray(self.split, dtype=str)
        self.p_generated = np.asarray(self.p_generated, dtype=np.float64)
        if self.pred_class is not None:
            self.pred_class = np.asarray(self.pred_class, dtype=str)
        self.label = _as_binary_label(self.label)

        n = len(self.ids)
        columns = {
            "label": self.label,
            "generator": self.generator,
            "split": self.split,
            "p_generated": self.p_generated,
        }
        if self.pred_class is not None:
            columns["pred_class"] = self.pred_class
        for name, values in columns.items():
            if values.shape != (n,):
                raise ValueError(
                    f"Scores.{name} has shape {values.shape}, expected ({n},) to match ids; "
                    "pass one value per scored image"
                )
        _check_probabilities(self.p_generated)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def true_class(self) -> np.ndarray:
        """True attribution class: ``"real"`` for real images, the generator name otherwise."""
        return np.where(self.label == 1, self.generator, REAL_CLASS)

    def subset(self, mask: ArrayLike) -> Scores:
        """Rows where ``mask`` is true (boolean mask or integer indices), e.g. one split."""
        index = np.asarray(mask)
        return Scores(
            ids=self.ids[index],
            label=self.label[index],
            generator=self.generator[index],
            split=self.split[index],
            p_generated=self.p_generated[index],
            pred_class=None if self.pred_class is None else self.pred_class[index],
        )

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write the scores as CSV, atomically (temporary file, then rename).

        Probabilities are written with Python's shortest round-trip repr, so reading them back
        with :meth:`from_csv` or ``pandas.read_csv`` gives the same floats and the same
        metrics, bit for bit.
        """
        header = list(SCORE_COLUMNS)
        if self.pred_class is not None:
            header.append("pred_class")

        def write(f: IO[Any]) -> None:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            for i in range(len(self)):
                row = [
                    self.ids[i],
                    int(self.label[i]),
                    self.generator[i],
                    self.split[i],
                    repr(float(self.p_generated[i])),
                ]
                if self.pred_class is not None:
                    row.append(self.pred_class[i])
                writer.writerow(row)

        with atomic_open(path) as fh:
            write(fh)
        logger.info("wrote %d scores to %s", len(self), path)

    @classmethod
    def from_csv(cls, path: str | os.PathLike[str]) -> Scores:
        """Read a scores CSV written by :meth:`to_csv` (extra columns are ignored)."""
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            missing = [c for c in SCORE_COLUMNS if c not in fields]
            if missing:
                raise ValueError(
                    f"scores CSV {path} lacks columns {missing}; found {fields}, "
                    f"expected {list(SCORE_COLUMNS)} (+ pred_class for attribution heads)"
                )
            rows = list(reader)
        has_pred = "pred_class" in fields
        return cls(
            ids=np.array([r["id"] for r in rows], dtype=str),
            label=np.array([int(r["label"]) for r in rows], dtype=np.int64),
            generator=np.array([r["generator"] for r in rows], dtype=str),
            split=np.array([r["split"] for r in rows], dtype=str),
            p_generated=np.array([float(r["p_generated"]) for r in rows], dtype=np.float64),
            pred_class=np.array([r["pred_class"] for r in rows], dtype=str) if has_pred else None,
        )


def binary_metrics(label: ArrayLike, p_generated: ArrayLike, threshold: float = 0.5) -> Metrics:
    """Real-vs-generated metrics of one block of images.

    An image is predicted generated when ``p_generated > threshold`` (strictly, as in the
    CNNDetection / UnivFD evaluation code, so a score of exactly 0.5 counts as real).
    Metrics that are undefined for the block are ``None`` (``null`` in JSON), never NaN:
    ``r_acc`` without real images, ``f_acc`` without generated images, and ``ap`` and ``auc``
    unless both classes are present.

    Args:
        label: 0 (real) or 1 (generated) per image.
        p_generated: probability that each image is generated, in [0, 1].
        threshold: decision threshold for the three accuracies.

    Returns:
        ``acc``, ``r_acc``, ``f_acc``, ``ap``, ``auc``, ``f1`` as fractions in [0, 1] (or
        ``None``), and the counts ``n``, ``n_real``, ``n_generated``.
    """
    y = _as_binary_label(label)
    p = np.asarray(p_generated, dtype=np.float64)
    if p.shape != y.shape:
        raise ValueError(f"label has shape {y.shape} but p_generated has shape {p.shape}")
    if len(y) == 0:
        raise ValueError("cannot compute metrics of an empty block: no images were scored")
    _check_probabilities(p)

    correct = (p > threshold).astype(np.int64) == y
    real, generated = y == 0, y == 1
    both = bool(real.any() and generated.any())
    return {
        "acc": float(correct.mean()),
        "r_acc": float(correct[real].mean()) if real.any() else None,
        "f_acc": float(correct[generated].mean()) if generated.any() else None,
        "ap": float(average_precision_score(y, p)) if both else None,
        "auc": float(roc_auc_score(y, p)) if both else None,
        # Binary F1 with "generated" as the positive class (CT2 task A's metric).
        "f1": float(f1_score(y, (p > threshold).astype(np.int64), zero_division=0))
        if generated.any()
        else None,
        "n": len(y),
        "n_real": int(real.sum()),
        "n_generated": int(generated.sum()),
    }


def evaluate_scores(scores: Scores, threshold: float = 0.5) -> dict[str, Any]:
    """One head's ``metrics/eval.json`` entry: ``{"overall": ..., "per_generator": {...}}``.

    Every row of ``scores`` is scored; select an evaluation set first if needed
    (``scores.subset(scores.split == "test")``).

    - ``overall``: :func:`binary_metrics` over all images.
    - ``per_generator[g]``: :func:`binary_metrics` over the generated images of ``g`` together
      with all real images, so ``n = n_generated(g) + n_real``. Real images get no block of
      their own (their accuracy is ``r_acc`` in every block).
    - When ``scores.pred_class`` is set (attribution heads), ``overall`` adds ``f1_macro`` and
      ``f1_weighted`` of ``pred_class`` against :attr:`Scores.true_class`, over the union of
      true and predicted classes, with 0 for a class that is never predicted or never true
      (``zero_division=0``). They are only in ``overall``: inside a per-generator block,
      classes that are predicted but absent from the block would score 0 and pull a macro
      average down for reasons unrelated to that generator.

    Binary metrics always come from ``p_generated``, also for attribution heads, so they can
    differ slightly from ``pred_class != "real"`` when the class probabilities are split.
    """
    generated = scores.label == 1
    bad = sorted(set(scores.generator[generated]) & {"", REAL_CLASS})
    if bad:
        raise ValueError(
            f"generated images have generator name(s) {bad}; every generated image needs a "
            f"generator name other than '' and {REAL_CLASS!r} (use e.g. 'unknown')"
        )
    overall = binary_metrics(scores.label, scores.p_generated, threshold)
    if scores.pred_class is not None:
        true = scores.true_class
        labels = sorted(set(true) | set(scores.pred_class))
        for average in ("macro", "weighted"):
            overall[f"f1_{average}"] = float(
                f1_score(true, scores.pred_class, labels=labels, average=average, zero_division=0)
            )

    real = scores.label == 0
    per_generator = {}
    for name in sorted(set(scores.generator[generated])):
        block = real | (generated & (scores.generator == name))
        per_generator[name] = binary_metrics(
            scores.label[block], scores.p_generated[block], threshold
        )
    logger.info(
        "evaluated %d images (%d real, %d generators, splits %s) at threshold %g",
        len(scores),
        int(real.sum()),
        len(per_generator),
        sorted(set(scores.split)),
        threshold,
    )
    return {"overall": overall, "per_generator": per_generator}


def threshold_for_balanced_accuracy(label: ArrayLike, p: ArrayLike) -> float:
    """Threshold maximising balanced accuracy under the rule ``p > threshold`` → generated.

    Fit it on validation scores and pass it to :func:`evaluate_scores` on test scores.
    Candidates are the midpoints between consecutive distinct scores, plus the largest score
    (everything real). Among equally good thresholds the one closest to 0.5 wins, so the
    default is kept whenever it is optimal.

    Raises:
        ValueError: when ``label`` lacks one of the two classes.
    """
    y = _as_binary_label(label)
    s = np.asarray(p, dtype=np.float64)
    if s.shape != y.shape:
        raise ValueError(f"label has shape {y.shape} but p has shape {s.shape}")
    n_pos, n_neg = int(y.sum()), int((y == 0).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"a threshold needs real and generated images; got {n_neg} real and {n_pos} "
            "generated (fit it on a validation split that holds both)"
        )
    values = np.unique(s)
    candidates = np.concatenate([(values[:-1] + values[1:]) / 2, values[-1:]])
    order = np.sort(s[y == 1])
    order_neg = np.sort(s[y == 0])
    # p > t: positives above t are true positives, negatives at or below t true negatives.
    tpr = (n_pos - np.searchsorted(order, candidates, side="right")) / n_pos
    tnr = np.searchsorted(order_neg, candidates, side="right") / n_neg
    balanced = (tpr + tnr) / 2
    best = np.flatnonzero(balanced == balanced.max())
    chosen = best[np.argmin(np.abs(candidates[best] - 0.5))]
    return float(candidates[chosen])


def roc_points(
    label: ArrayLike, p: ArrayLike, max_points: int | None = None
) -> list[dict[str, float | None]]:
    """ROC curve as ``[{"fpr", "tpr", "threshold"}, ...]`` rows for ``dvc plots``.

    Points come from :func:`sklearn.metrics.roc_curve` (a point's ``threshold`` means
    ``p >= threshold`` → generated); the first point (0, 0) has ``threshold`` ``None``, as its
    sklearn threshold is infinite. ``max_points`` thins the curve evenly, keeping both ends.
    """
    y, s = _curve_inputs(label, p, "ROC")
    fpr, tpr, thresholds = roc_curve(y, s)
    rows = [
        {"fpr": float(f), "tpr": float(t), "threshold": _finite_or_none(th)}
        for f, t, th in zip(fpr, tpr, thresholds, strict=True)
    ]
    return _thin(rows, max_points)


def pr_points(
    label: ArrayLike, p: ArrayLike, max_points: int | None = None
) -> list[dict[str, float | None]]:
    """Precision-recall curve as ``[{"recall", "precision", "threshold"}, ...]`` rows.

    Points come from :func:`sklearn.metrics.precision_recall_curve`, generated being the
    positive class; the final point (recall 0, precision 1) has ``threshold`` ``None``.
    ``max_points`` thins the curve evenly, keeping both ends.
    """
    y, s = _curve_inputs(label, p, "precision-recall")
    precision, recall, thresholds = precision_recall_curve(y, s)
    rows: list[dict[str, float | None]] = []
    for i, (pr, rc) in enumerate(zip(precision, recall, strict=True)):
        threshold = float(thresholds[i]) if i < len(thresholds) else None
        rows.append({"recall": float(rc), "precision": float(pr), "threshold": threshold})
    return _thin(rows, max_points)


def confusion(
    true_class: ArrayLike, pred_class: ArrayLike, labels: list[str] | None = None
) -> tuple[list[str], np.ndarray]:
    """Attribution confusion matrix: rows are true classes, columns predicted classes.

    Args:
        true_class: true class per image (``Scores.true_class``).
        pred_class: predicted class per image.
        labels: class order; by default ``"real"`` first (when present), then the other
            classes seen in either argument, sorted.

    Returns:
        The class order and the ``(k, k)`` int64 count matrix.
    """
    true = np.asarray(true_class, dtype=str)
    pred = np.asarray(pred_class, dtype=str)
    if true.shape != pred.shape:
        raise ValueError(f"true_class has shape {true.shape} but pred_class has {pred.shape}")
    if labels is None:
        seen = set(true) | set(pred)
        labels = [REAL_CLASS] * (REAL_CLASS in seen) + sorted(seen - {REAL_CLASS})
    matrix = confusion_matrix(true, pred, labels=labels).astype(np.int64)
    return list(labels), matrix


def write_json_atomic(path: str | os.PathLike[str], obj: Any, ndigits: int | None = 6) -> None:
    """Write ``obj`` as JSON (sorted keys, indent 2) via a temporary file and a rename.

    Numpy scalars and arrays become plain numbers and lists; floats are rounded to ``ndigits``
    decimals (``None`` keeps them exact). NaN and infinity raise ``ValueError`` instead of
    producing JSON that DVC cannot parse: report undefined values as ``None``.
    """
    text = json.dumps(_jsonable(obj, ndigits, "$"), indent=2, sort_keys=True, allow_nan=False)
    write_text(path, text + "\n")


def _as_binary_label(label: ArrayLike) -> np.ndarray:
    y = np.asarray(label)
    if y.ndim != 1:
        raise ValueError(f"label must be one-dimensional, got shape {y.shape}")
    if y.dtype == bool:
        return y.astype(np.int64)
    if y.size and not np.isin(y, (0, 1)).all():
        bad = sorted({v.item() for v in np.unique(y)} - {0, 1})[:5]
        raise ValueError(f"label must be 0 (real) or 1 (generated); found {bad}")
    return y.astype(np.int64)


def _check_probabilities(p: np.ndarray) -> None:
    if p.ndim != 1:
        raise ValueError(f"p_generated must be one-dimensional, got shape {p.shape}")
    bad = ~np.isfinite(p) | (p < 0) | (p > 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"p_generated must be a probability in [0, 1]; {int(bad.sum())} value(s) are not, "
            f"first at row {i}: {p[i]!r} (apply the head's predict_proba, not decision scores)"
        )


def _curve_inputs(label: ArrayLike, p: ArrayLike, what: str) -> tuple[np.ndarray, np.ndarray]:
    y = _as_binary_label(label)
    s = np.asarray(p, dtype=np.float64)
    if s.shape != y.shape:
        raise ValueError(f"label has shape {y.shape} but p has shape {s.shape}")
    if not (y == 0).any() or not (y == 1).any():
        raise ValueError(
            f"a {what} curve needs real and generated images; got {int((y == 0).sum())} real "
            f"and {int(y.sum())} generated"
        )
    return y, s


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _thin(rows: list[dict[str, float | None]], max_points: int | None) -> list[dict[str, Any]]:
    if max_points is None or len(rows) <= max_points:
        return rows
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2 to keep both curve ends, got {max_points}")
    keep = np.unique(np.linspace(0, len(rows) - 1, max_points).round().astype(np.int64))
    return [rows[i] for i in keep]


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
) -> dict[str, Any]:
    """Score every trained head on one evaluation set and write metrics, scores and curves.

    Each head reads the feature kind it was trained on and applies the calibration fitted on
    val. Writes `metrics_path` (DESIGN.md's shape, plus the metrics at the threshold chosen on
    val), `<scores_dir>/<head>.csv` (per-image scores from which every metric can be
    recomputed), `<plots_dir>/{roc,pr}/<head>.csv` and, for attribution heads,
    `<plots_dir>/confusion/<head>.csv`, for DVC plots.

    Args:
        split: rows to score; `cfg.split` by default, "all" for every row (other datasets).
    """
    from pipeline.features import load_features
    from pipeline.heads import load_head
    from pipeline.train import (
        ATTRIBUTION_HEADS,
        apply_calibration,
        p_generated,
        read_train_info,
        trained_heads,
    )

    split = split or cfg.split
    scores_dir, plots_dir = Path(scores_dir), Path(plots_dir)
    for sub in ("roc", "pr", "confusion"):
        (plots_dir / sub).mkdir(parents=True, exist_ok=True)
        for old in (plots_dir / sub).glob("*.csv"):
            old.unlink()
    scores_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {}
    by_kind: dict[str, Any] = {}
    for head_dir in trained_heads(heads_dir):
        name, info = head_dir.name, read_train_info(head_dir)
        kind = info["kind"]
        if kind not in by_kind:
            by_kind[kind] = load_features(
                features_dir, kind, splits=None if split == "all" else (split,)
            )
        fs = by_kind[kind]
        if not len(fs.y):
            raise ValueError(f"the {split!r} split of {features_dir} is empty; nothing to score")
        head = load_head(head_dir)
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
        )
        scores.to_csv(scores_dir / f"{name}.csv")
        block = evaluate_scores(scores, cfg.threshold)
        if "val_threshold" in info:
            at_val = binary_metrics(scores.label, scores.p_generated, info["val_threshold"])
            block["overall"]["val_threshold"] = info["val_threshold"]
            for key in ("acc", "r_acc", "f_acc"):
                block["overall"][f"{key}_at_val_threshold"] = at_val[key]
        if info.get("contaminated"):
            block["contaminated"] = True
        metrics[name] = block
        if len(np.unique(fs.y)) == 2:
            for sub, points in (
                ("roc", roc_points(fs.y, scores.p_generated)),
                ("pr", pr_points(fs.y, scores.p_generated)),
            ):
                _write_points(plots_dir / sub / f"{name}.csv", points)
        if attribution and scores.pred_class is not None:
            rows = [
                {"actual": a, "predicted": b} for a, b in zip(scores.true_class, scores.pred_class)
            ]
            _write_points(plots_dir / "confusion" / f"{name}.csv", rows)
        logger.info("%s: %s", name, {k: block["overall"].get(k) for k in ("acc", "ap", "auc")})
    Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(metrics_path, metrics)
    return metrics


def _write_points(path: Path, points: list[dict[str, Any]]) -> None:
    keys = [k for k in points[0] if k != "threshold"] if points else []

    def write(fh: IO[Any]) -> None:
        writer = csv.writer(fh)
        writer.writerow(keys)
        for p in points:
            writer.writerow([p[k] for k in keys])

    with atomic_open(path) as fh:
        write(fh)
