"""Pure metrics: per-image scores, detection/attribution metrics, the balanced-accuracy
threshold (probability calibration is `calibration`, caption sources `caption_sources`). Used by `train`,
`evaluate`, the evaluation sets and the report."""

from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

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

from pipeline.errors import DataUnusable
from pipeline.rows.atomic import atomic_open

logger = logging.getLogger(__name__)

#: True class of real images in attribution metrics; a generator may not use this name.
REAL_CLASS = "real"

#: Column order of the per-image scores CSV (``pred_class`` only for attribution heads).
SCORE_COLUMNS = ("id", "label", "generator", "split", "p_generated", "subset")
#: Metrics averaged over the per-generator blocks into a head's ``mean`` block (the papers'
#: "Avg.": ITEM's Table I, UniversalFakeDetect's per-folder results).
MEAN_KEYS = ("acc", "ap", "r_acc", "f_acc")

Metrics = dict[str, float | int | None]


@dataclass(eq=False)  # arrays make field-wise == ambiguous
class Scores:
    """Per-image scores of one head on one evaluation set, one row per scored image.

    ``label`` is 0 (real) or 1 (generated); ``p_generated`` is the head's probability that the
    image is generated, in [0, 1]; ``pred_class`` (attribution heads only) is the predicted
    class name: ``"real"`` or a generator name. The ``generator`` of real rows is not used by
    any metric. ``subset`` is the dataset folder of each image (``""`` when the dataset has
    none; ``None`` means none for every row): it decides which real images a generator's
    block holds (:func:`evaluate_scores`). ``decision`` (heads with a decision rule of their
    own, the SVM's margin > 0; ``None`` for the others) is 1 where the head itself calls the
    image generated: the accuracies at threshold 0.5 are at this decision, not at
    ``p_generated > 0.5``. Fields are coerced to numpy arrays and validated on construction.
    """

    ids: np.ndarray
    label: np.ndarray
    generator: np.ndarray
    split: np.ndarray
    p_generated: np.ndarray
    pred_class: np.ndarray | None = None
    subset: np.ndarray | None = None
    decision: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=str)
        if self.subset is None:
            self.subset = np.full(len(self.ids), "", dtype=str)
        self.subset = np.asarray(self.subset, dtype=str)
        self.generator = np.asarray(self.generator, dtype=str)
        self.split = np.asarray(self.split, dtype=str)
        self.p_generated = np.asarray(self.p_generated, dtype=np.float64)
        if self.pred_class is not None:
            self.pred_class = np.asarray(self.pred_class, dtype=str)
        if self.decision is not None:
            self.decision = as_binary_label(np.asarray(self.decision).ravel())
        self.label = as_binary_label(self.label)

        n = len(self.ids)
        columns = {
            "label": self.label,
            "generator": self.generator,
            "split": self.split,
            "p_generated": self.p_generated,
            "subset": self.subset,
        }
        if self.pred_class is not None:
            columns["pred_class"] = self.pred_class
        if self.decision is not None:
            columns["decision"] = self.decision
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

    def take(self, mask: ArrayLike) -> Scores:
        """Rows where ``mask`` is true (boolean mask or integer indices), e.g. one split."""
        index = np.asarray(mask)
        assert self.subset is not None  # set by __post_init__
        return Scores(
            ids=self.ids[index],
            label=self.label[index],
            generator=self.generator[index],
            split=self.split[index],
            p_generated=self.p_generated[index],
            pred_class=None if self.pred_class is None else self.pred_class[index],
            subset=self.subset[index],
            decision=None if self.decision is None else self.decision[index],
        )

    def to_csv(
        self, path: str | os.PathLike[str], provenance: dict[str, Any] | None = None
    ) -> None:
        """Write the scores as CSV, atomically (temporary file, then rename).

        Probabilities are written with Python's shortest round-trip repr, so reading them back
        with :meth:`from_csv` or ``pandas.read_csv`` gives the same floats and the same
        metrics, bit for bit. With `provenance` (`{"preset", "models"}` of the head), every
        row also says which preset and models made it (columns ``preset``, ``models``).
        """
        from pipeline.provenance import models_text

        header = list(SCORE_COLUMNS)
        if self.pred_class is not None:
            header.append("pred_class")
        if self.decision is not None:
            header.append("decision")
        tail = [] if provenance is None else [provenance.get("preset", ""), models_text(provenance)]
        if provenance is not None:
            header += ["preset", "models"]

        with atomic_open(path) as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            for i in range(len(self)):
                row = [
                    self.ids[i],
                    int(self.label[i]),
                    self.generator[i],
                    self.split[i],
                    repr(float(self.p_generated[i])),
                    self.subset[i] if self.subset is not None else "",
                ]
                if self.pred_class is not None:
                    row.append(self.pred_class[i])
                if self.decision is not None:
                    row.append(int(self.decision[i]))
                writer.writerow(row + tail)
        logger.info("wrote %d scores to %s", len(self), path)

    @classmethod
    def from_csv(cls, path: str | os.PathLike[str]) -> Scores:
        """Read a scores CSV written by :meth:`to_csv` (extra columns are ignored)."""
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            # Files written before the subset column existed are still readable.
            missing = [c for c in SCORE_COLUMNS if c not in fields and c != "subset"]
            if missing:
                raise DataUnusable(
                    f"scores CSV {path} lacks columns {missing}; found {fields}, "
                    f"expected {list(SCORE_COLUMNS)} (+ pred_class for attribution heads)"
                )
            rows = list(reader)
        has_pred = "pred_class" in fields
        has_decision = "decision" in fields
        return cls(
            ids=np.array([r["id"] for r in rows], dtype=str),
            label=np.array([int(r["label"]) for r in rows], dtype=np.int64),
            generator=np.array([r["generator"] for r in rows], dtype=str),
            split=np.array([r["split"] for r in rows], dtype=str),
            p_generated=np.array([float(r["p_generated"]) for r in rows], dtype=np.float64),
            pred_class=np.array([r["pred_class"] for r in rows], dtype=str) if has_pred else None,
            subset=np.array([r.get("subset") or "" for r in rows], dtype=str),
            decision=np.array([int(r["decision"]) for r in rows]) if has_decision else None,
        )


def binary_metrics(
    label: ArrayLike,
    p_generated: ArrayLike,
    threshold: float = 0.5,
    decision: ArrayLike | None = None,
) -> Metrics:
    """Real-vs-generated metrics of one block of images.

    An image is predicted generated when ``p_generated > threshold`` (strictly, as in the
    CNNDetection / UnivFD evaluation code, so a score of exactly 0.5 counts as real), or,
    with ``decision`` (0/1 per image, the head's own decision), where ``decision`` is 1: the
    accuracies and F1 then follow it and ``threshold`` is not used.
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
    y = as_binary_label(label)
    p = np.asarray(p_generated, dtype=np.float64)
    if p.shape != y.shape:
        raise ValueError(f"label has shape {y.shape} but p_generated has shape {p.shape}")
    if len(y) == 0:
        raise ValueError("cannot compute metrics of an empty block: no images were scored")
    _check_probabilities(p)
    if decision is None:
        pred = (p > threshold).astype(np.int64)
    else:
        pred = as_binary_label(np.asarray(decision).ravel())
        if pred.shape != y.shape:
            raise ValueError(f"label has shape {y.shape} but decision has shape {pred.shape}")

    correct = pred == y
    real, generated = y == 0, y == 1
    both = bool(real.any() and generated.any())
    return {
        "acc": float(correct.mean()),
        "r_acc": float(correct[real].mean()) if real.any() else None,
        "f_acc": float(correct[generated].mean()) if generated.any() else None,
        "ap": float(average_precision_score(y, p)) if both else None,
        "auc": float(roc_auc_score(y, p)) if both else None,
        # Binary F1 with "generated" as the positive class (CT2 task A's metric).
        "f1": float(f1_score(y, pred, zero_division=0)) if generated.any() else None,
        "n": len(y),
        "n_real": int(real.sum()),
        "n_generated": int(generated.sum()),
    }


def evaluate_scores(scores: Scores, threshold: float = 0.5) -> dict[str, Any]:
    """One head's ``metrics/eval.json`` entry: ``{"overall", "per_generator", "mean"}``.

    Every row of ``scores`` is scored; select an evaluation set first if needed
    (``scores.take(scores.split == "test")``).

    - ``overall``: :func:`binary_metrics` over all images.
    - ``per_generator[g]``: :func:`binary_metrics` over the generated images of ``g`` and a
      set of real images, named by the block's ``"reals"``:

      - ``"own"``: the real images of the subsets (dataset folders) that ``g``'s images come
        from, when every one of them has real images of its own. This is how
        UniversalFakeDetect's ``validate.py`` and ITEM's Table I score a test folder
        (``<folder>/0_real`` with ``<folder>/1_fake``).
      - ``"all"``: every real image of the evaluation set, when ``g``'s images have no subset
        or a subset without real images (a manifest whose reals are shared).

      Real images get no block of their own.
    - ``mean``: ``acc``, ``ap``, ``r_acc``, ``f_acc`` averaged, unweighted, over the
      per-generator blocks (the papers' "Avg."; a metric that is ``None`` in a block is left
      out of its mean), with ``n_blocks``.
    - When ``scores.pred_class`` is set (attribution heads), ``overall`` adds ``f1_macro`` and
      ``f1_weighted`` of ``pred_class`` against :attr:`Scores.true_class`, over the union of
      true and predicted classes, with 0 for a class that is never predicted or never true
      (``zero_division=0``). They are only in ``overall``: inside a per-generator block,
      classes that are predicted but absent from the block would score 0 and pull a macro
      average down for reasons unrelated to that generator.

    Binary metrics always come from ``p_generated``, also for attribution heads, so they can
    differ slightly from ``pred_class != "real"`` when the class probabilities are split.
    When ``scores.decision`` is set and ``threshold`` is 0.5, the accuracies and F1 are at
    the head's own decision instead (:func:`own_decision`); AP and AUC still rank
    ``p_generated``.
    """
    generated = scores.label == 1
    bad = sorted(set(scores.generator[generated]) & {"", REAL_CLASS})
    if bad:
        raise DataUnusable(
            f"generated images have generator name(s) {bad}; every generated image needs a "
            f"generator name other than '' and {REAL_CLASS!r} (use e.g. 'unknown')"
        )
    decision = scores.decision if threshold == 0.5 else None
    overall = binary_metrics(scores.label, scores.p_generated, threshold, decision)
    if scores.pred_class is not None:
        true = scores.true_class
        labels = sorted(set(true) | set(scores.pred_class))
        for average in ("macro", "weighted"):
            overall[f"f1_{average}"] = float(
                f1_score(true, scores.pred_class, labels=labels, average=average, zero_division=0)
            )

    real = scores.label == 0
    subset = np.asarray(scores.subset, dtype=str)
    with_reals = set(subset[real]) - {""}
    per_generator: dict[str, dict[str, Any]] = {}
    for name in sorted(set(scores.generator[generated])):
        fakes = generated & (scores.generator == name)
        folders = set(subset[fakes])
        own = folders <= with_reals
        reals = real & np.isin(subset, sorted(folders)) if own else real
        block = fakes | reals
        per_generator[name] = {
            **binary_metrics(
                scores.label[block],
                scores.p_generated[block],
                threshold,
                None if decision is None else decision[block],
            ),
            "reals": "own" if own else "all",
        }
    warn_unbalanced(per_generator)
    logger.info(
        "evaluated %d images (%d real, %d generators, split(s) %s) at threshold %.3f",
        len(scores),
        int(real.sum()),
        len(per_generator),
        ", ".join(sorted(map(str, set(scores.split)))),
        threshold,
    )
    return {"overall": overall, "per_generator": per_generator, "mean": mean_block(per_generator)}


def mean_block(per_generator: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Unweighted mean of :data:`MEAN_KEYS` over per-generator blocks (``None`` when no block
    defines a metric), with ``n_blocks`` and how many blocks hold their own folder's reals
    (``n_own``) or every real image (``n_all``, see :func:`evaluate_scores`): an ``all``
    block is as unbalanced as the set's reals outnumber that generator's images, and its
    ``acc`` then rewards calling everything real (read ``r_acc`` and ``f_acc``)."""
    out: dict[str, Any] = {"n_blocks": len(per_generator)}
    for reals in ("own", "all"):
        out[f"n_{reals}"] = sum(1 for b in per_generator.values() if b.get("reals") == reals)
    for key in MEAN_KEYS:
        values = [b[key] for b in per_generator.values() if b.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


#: An ``all`` block warns when one class outnumbers the other by more than this factor.
UNBALANCED_RATIO = 2.0


def unbalanced_blocks(per_generator: dict[str, dict[str, Any]]) -> list[str]:
    """Names of the ``all`` blocks whose larger class (real or generated) holds more than
    :data:`UNBALANCED_RATIO` times the images of the smaller one."""
    out = []
    for name, block in per_generator.items():
        if block.get("reals") != "all":
            continue
        n_real, n_gen = int(block.get("n_real") or 0), int(block.get("n_generated") or 0)
        if max(n_real, n_gen) > UNBALANCED_RATIO * min(n_real, n_gen):
            out.append(name)
    return out


def warn_unbalanced(per_generator: dict[str, dict[str, Any]]) -> None:
    """One warning naming the unbalanced ``all`` blocks (:func:`unbalanced_blocks`)."""
    names = unbalanced_blocks(per_generator)
    if not names:
        return
    counts = ", ".join(
        f"{n} ({per_generator[n]['n_real']} real / {per_generator[n]['n_generated']} generated)"
        for n in names
    )
    logger.warning(
        "UNBALANCED BLOCKS: %d per-generator block(s) pool every real image of the set: %s. "
        "Their acc (and mean.acc) rewards calling everything real; read r_acc and f_acc (or "
        "bacc in the DVC summary), or give each generator's folder its own reals",
        len(names),
        counts,
    )


def threshold_for_balanced_accuracy(label: ArrayLike, p: ArrayLike) -> float:
    """Threshold maximising balanced accuracy under the rule ``p > threshold`` → generated.

    Fit it on validation scores and pass it to :func:`evaluate_scores` on test scores.
    Candidates are the midpoints between consecutive distinct scores, plus the largest score
    (everything real). Among equally good thresholds the one closest to 0.5 wins, so the
    default is kept whenever it is optimal.

    Raises:
        ValueError: when ``label`` lacks one of the two classes.
    """
    y = as_binary_label(label)
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


def as_binary_label(label: ArrayLike) -> np.ndarray:
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
    y = as_binary_label(label)
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


# ------------------------------------------------------------------------ probabilities


def p_generated(head: Any, X: np.ndarray) -> np.ndarray:
    """Probability that each row is generated, whatever the head's classes (0/1 or class
    names with ``"real"``)."""
    if hasattr(head, "p_generated"):
        return np.asarray(head.p_generated(X), dtype=np.float64)
    proba = head.predict_proba(X)
    classes = list(head.classes_)
    if 1 in classes:
        return np.asarray(proba[:, classes.index(1)], dtype=np.float64)
    if REAL_CLASS in classes:
        return 1.0 - np.asarray(proba[:, classes.index(REAL_CLASS)], dtype=np.float64)
    raise ValueError(f"cannot tell which class of {classes} means 'generated'")


def own_decision(head: Any, X: np.ndarray) -> np.ndarray | None:
    """0/1 per row where the head calls it generated by a decision rule of its own (the SVM's
    margin > 0, ``decides_generated``); ``None`` for heads that decide by
    ``p_generated > 0.5``."""
    if not hasattr(head, "decides_generated"):
        return None
    return np.asarray(head.decides_generated(X), dtype=np.int64)
