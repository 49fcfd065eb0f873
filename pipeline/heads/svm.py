"""Linear SVM head with Platt-calibrated probabilities (the internship report's first detector)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from scipy.special import expit
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import LinearSVC

from pipeline.errors import ConfigError, DataUnusable
from pipeline.heads._base import (
    BaseHead,
    State,
    check_positive,
    fit_standardiser,
    seed_from,
    standardise,
)
from pipeline.metrics import fit_platt

logger = logging.getLogger(__name__)


class SVMHead(BaseHead):
    """One-vs-rest linear SVM on standardised features, calibrated with Platt's sigmoid.

    Every one-vs-rest score gets its own sigmoid P(class | score) = 1 / (1 + exp(a·score + b));
    with more than two classes the per-class probabilities are renormalised to sum to 1, as
    scikit-learn's CalibratedClassifierCV does. The coefficients and sigmoid parameters are
    plain arrays so the head saves without pickle.

    Parameters:
        C: regularisation used when no validation data is given.
        C_grid: candidates tried when `fit` gets validation data; the value with the best
            validation accuracy is kept in `C_` (ties go to the smaller, more regularised C).
        n_calibration_folds: without validation data, the sigmoids are fitted on stratified
            out-of-fold scores from this many folds of the training rows, and the SVM itself is
            refitted on all of them.
        max_iter: liblinear iteration cap; `n_iter_` is the count used by the kept SVM.
        random_state: seeds the fold split and liblinear's coordinate order.

    With validation data, the SVM is fitted on the training rows for each C in `C_grid` and the
    sigmoids are fitted on the validation scores of the chosen C.
    """

    #: Its probabilities are already Platt-calibrated on the validation rows `fit` gets, so the
    #: train stage fits no second calibration on the same rows.
    calibrates_on_val = True

    def __init__(
        self,
        C: float = 1.0,
        C_grid: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0),
        n_calibration_folds: int = 3,
        max_iter: int = 10000,
        random_state: Any = 0,
    ) -> None:
        self.C = C
        self.C_grid = C_grid
        self.n_calibration_folds = n_calibration_folds
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(self, X: Any, y: Any, *, X_val: Any = None, y_val: Any = None) -> SVMHead:
        """Fit on (X, y); optional (X_val, y_val) pick C and calibrate the sigmoids.

        Returns:
            self.
        """
        check_positive("C", self.C)
        check_positive("n_calibration_folds", self.n_calibration_folds, integer=True)
        check_positive("max_iter", self.max_iter, integer=True)
        if self.n_calibration_folds < 2:
            raise ConfigError(f"n_calibration_folds must be >= 2, got {self.n_calibration_folds}")
        X, classes, y_idx = self._validate_train(X, y)
        val = self._validate_val(X_val, y_val, classes)
        self.classes_ = classes
        self.mean_, self.scale_ = fit_standardiser(X)
        Z = standardise(X, self.mean_, self.scale_)
        seed = seed_from(self.random_state)

        if val is not None:
            grid = tuple(self.C_grid)
            if not grid:
                raise ConfigError("C_grid is empty; give at least one C to select on validation")
            for c in grid:
                check_positive("C_grid entry", c)
            Zv = standardise(val[0], self.mean_, self.scale_)
            best: tuple[float, float] | None = None
            for c in sorted(grid):
                svm = self._svm(c, seed).fit(Z, y_idx)
                acc = float(np.mean(svm.predict(Zv) == val[1]))
                if best is None or acc > best[0]:
                    best, coef, intercept, n_iter = (acc, c), svm.coef_, svm.intercept_, svm.n_iter_
            assert best is not None
            self.C_ = best[1]
            logger.info("SVMHead: C=%g has the best validation accuracy %.4f", best[1], best[0])
            scores, score_targets = Zv @ coef.T + intercept, val[1]
        else:
            self.C_ = float(self.C)
            scores, score_targets = self._out_of_fold_scores(Z, y_idx, seed)
            svm = self._svm(self.C_, seed).fit(Z, y_idx)
            coef, intercept, n_iter = svm.coef_, svm.intercept_, svm.n_iter_

        self.n_iter_ = int(n_iter)
        self.coef_ = np.asarray(coef, dtype=np.float64)
        self.intercept_ = np.asarray(intercept, dtype=np.float64)
        if len(classes) == 2:
            self.platt_ = fit_platt(scores[:, 0], score_targets == 1)[None, :]
        else:
            self.platt_ = np.stack(
                [fit_platt(scores[:, k], score_targets == k) for k in range(len(classes))]
            )
        return self

    def _svm(self, c: float, seed: int) -> LinearSVC:
        return LinearSVC(C=c, max_iter=self.max_iter, random_state=seed)

    def _out_of_fold_scores(
        self, Z: np.ndarray, y_idx: np.ndarray, seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        counts = np.bincount(y_idx)
        if counts.min() < self.n_calibration_folds:
            raise DataUnusable(
                f"SVMHead calibrates on {self.n_calibration_folds} stratified folds but class "
                f"{self.classes_[counts.argmin()]!r} has only {counts.min()} rows; pass "
                "X_val/y_val to calibrate on validation rows, or lower n_calibration_folds"
            )
        folds = StratifiedKFold(self.n_calibration_folds, shuffle=True, random_state=seed)
        n_scores = 1 if len(counts) == 2 else len(counts)
        scores = np.zeros((len(Z), n_scores))
        for train, held in folds.split(Z, y_idx):
            svm = self._svm(self.C_, seed).fit(Z[train], y_idx[train])
            scores[held] = Z[held] @ svm.coef_.T + svm.intercept_
        return scores, y_idx

    def decision_scores(self, X: Any) -> np.ndarray:
        """Raw one-vs-rest SVM scores, shape (n, 1) for two classes else (n, n_classes)."""
        X = self._validate_predict(X)
        return standardise(X, self.mean_, self.scale_) @ self.coef_.T + self.intercept_

    def predict_proba(self, X: Any) -> np.ndarray:
        """Calibrated class probabilities, columns in `classes_` order."""
        scores = self.decision_scores(X)
        p = expit(-(self.platt_[:, 0] * scores + self.platt_[:, 1]))
        if len(self.classes_) == 2:
            return np.column_stack([1.0 - p[:, 0], p[:, 0]])
        total = p.sum(axis=1, keepdims=True)
        uniform = np.full_like(p, 1.0 / p.shape[1])
        return np.where(total > 0, p / np.where(total > 0, total, 1.0), uniform)

    def _get_state(self) -> State:
        arrays = {
            "mean_": self.mean_,
            "scale_": self.scale_,
            "coef_": self.coef_,
            "intercept_": self.intercept_,
            "platt_": self.platt_,
        }
        return {"C_": self.C_, "n_iter_": self.n_iter_}, arrays

    def _set_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.C_, self.n_iter_ = meta["C_"], meta["n_iter_"]
        for key in ("mean_", "scale_", "coef_", "intercept_", "platt_"):
            setattr(self, key, arrays[key])
