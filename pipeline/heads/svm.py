"""Linear SVM head with Platt-calibrated probabilities (the internship report's first detector);
its decision is its own margin, not the probabilities' 0.5."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import scipy.linalg
from scipy.special import expit
from sklearn.model_selection import StratifiedKFold

from pipeline.errors import ConfigError, DataUnusable
from pipeline.evaluation.calibration import fit_platt
from pipeline.heads.blocks import fit_standardiser, float64_blocks, map_row_blocks, standardise
from pipeline.heads.contract import BaseHead, State, check_positive
from pipeline.heads.registry import register
from pipeline.heads.torch_loop import seed_from
from pipeline.heads.warm import warm_start_head

logger = logging.getLogger(__name__)


@register("svm")
class SVMHead(BaseHead):
    """One-vs-rest linear SVM on standardised features, calibrated with Platt's sigmoid.

    Each one-vs-rest SVM solves the problem of scikit-learn's `LinearSVC` (liblinear's
    L2-regularised squared-hinge primal, the intercept regularised like a feature of value 1,
    `intercept_scaling=1`):

        min over (w, b) of ½(‖w‖² + b²) + C · Σᵢ max(0, 1 − yᵢ(w·zᵢ + b))²

    with zᵢ the standardised rows. It is solved here by Newton's method on row blocks (see
    `fit_squared_hinge`), so training holds no copy of the features: liblinear keeps a
    float64 copy plus its own 16-bytes-per-value copy of the matrix, about 6x the float32
    features. The optimum is the same (tested against `LinearSVC`).

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
        tol: stopping tolerance, liblinear's: the gradient norm falls to `tol` ·
            max(min(#positive, #negative), 1) / #rows times its norm at w = 0.
        max_iter: Newton iteration cap; `n_iter_` is the count used by the kept SVM.
        random_state: seeds the fold split (the solver itself is deterministic).
        warm_start_from: folder of a saved SVM head to fine-tune: Newton starts from its
            coefficients (each C of the grid, and the final fit) and the saved input
            standardisation is kept, so the coefficients stay in the space they were learned
            in. The problem is convex: the start changes the iterations, not the optimum for
            these rows. Its classes and width must match the rows.

    With validation data, the SVM is fitted on the training rows for each C in `C_grid` and the
    sigmoids are fitted on the validation scores of the chosen C.
    """

    #: Its probabilities are already Platt-calibrated on the validation rows `fit` gets, so the
    #: train stage fits no second calibration on the same rows.
    calibrates_on_val: ClassVar[bool] = True

    def __init__(
        self,
        C: float = 1.0,
        C_grid: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0),
        n_calibration_folds: int = 3,
        tol: float = 1e-4,
        max_iter: int = 100,
        random_state: Any = 0,
        warm_start_from: str | None = None,
    ) -> None:
        self.C = C
        self.C_grid = C_grid
        self.n_calibration_folds = n_calibration_folds
        self.tol = tol
        self.max_iter = max_iter
        self.random_state = random_state
        self.warm_start_from = warm_start_from

    def fit(self, X: Any, y: Any, *, X_val: Any = None, y_val: Any = None) -> SVMHead:
        """Fit on (X, y); optional (X_val, y_val) pick C and calibrate the sigmoids.

        Returns:
            self.
        """
        check_positive("C", self.C)
        check_positive("n_calibration_folds", self.n_calibration_folds, integer=True)
        check_positive("max_iter", self.max_iter, integer=True)
        check_positive("tol", self.tol)
        if self.n_calibration_folds < 2:
            raise ConfigError(f"n_calibration_folds must be >= 2, got {self.n_calibration_folds}")
        X, classes, y_idx = self._validate_train(X, y)
        val = self._validate_val(X_val, y_val, classes)
        self.classes_ = classes
        saved = warm_start_head(self, X.shape[1], classes)
        start = None
        if saved is None:
            self.mean_, self.scale_ = fit_standardiser(X)
        else:
            self.mean_, self.scale_ = saved.mean_, saved.scale_
            start = np.column_stack([saved.coef_, saved.intercept_])
        seed = seed_from(self.random_state)

        if val is not None:
            grid = tuple(self.C_grid)
            if not grid:
                raise ConfigError("C_grid is empty; give at least one C to select on validation")
            for c in grid:
                check_positive("C_grid entry", c)
            best: tuple[float, float] | None = None
            # Each C starts from the previous one's solution (same optimum); the first from
            # the warm-start head's, if any.
            theta = start
            gram = augmented_gram(X, self.mean_, self.scale_)
            for c in sorted(grid):
                theta, n_iter_c = self._solve(X, y_idx, c, None, theta, gram)
                acc = float(np.mean(self._argmax(self._scores(val[0], theta)) == val[1]))
                if best is None or acc > best[0]:
                    best, kept, n_iter = (acc, c), theta, n_iter_c
            assert best is not None
            self.C_ = best[1]
            logger.info("SVMHead: C=%g has the best validation accuracy %.4f", best[1], best[0])
            scores, score_targets = self._scores(val[0], kept), val[1]
        else:
            self.C_ = float(self.C)
            scores, score_targets = self._out_of_fold_scores(X, y_idx, seed)
            gram = augmented_gram(X, self.mean_, self.scale_)
            kept, n_iter = self._solve(X, y_idx, self.C_, None, start, gram)

        self.n_iter_ = int(n_iter)
        self.coef_, self.intercept_ = kept[:, :-1].copy(), kept[:, -1].copy()
        if len(classes) == 2:
            self.platt_ = fit_platt(scores[:, 0], score_targets == 1)[None, :]
        else:
            self.platt_ = np.stack(
                [fit_platt(scores[:, k], score_targets == k) for k in range(len(classes))]
            )
        return self

    def _solve(
        self,
        X: np.ndarray,
        y_idx: np.ndarray,
        c: float,
        rows: np.ndarray | None,
        init: np.ndarray | None,
        gram: np.ndarray,
    ) -> tuple[np.ndarray, int]:
        """One-vs-rest (w, b) rows for each score column (one column for two classes) and the
        largest Newton iteration count among them; `gram` is `augmented_gram` of the rows."""
        n_scores = 1 if len(self.classes_) == 2 else len(self.classes_)
        y = y_idx if rows is None else y_idx[rows]
        thetas, iters = [], []
        for k in range(n_scores):
            positive = 1 if n_scores == 1 else k
            theta, n_iter = fit_squared_hinge(
                X,
                self.mean_,
                self.scale_,
                np.where(y == positive, 1.0, -1.0),
                c,
                rows=rows,
                tol=self.tol,
                max_iter=self.max_iter,
                init=None if init is None else init[k],
                gram=gram,
            )
            thetas.append(theta)
            iters.append(n_iter)
        return np.stack(thetas), max(iters)

    def _scores(
        self, X: np.ndarray, theta: np.ndarray, rows: np.ndarray | None = None
    ) -> np.ndarray:
        def block(Xb: np.ndarray) -> np.ndarray:
            return standardise(Xb, self.mean_, self.scale_) @ theta[:, :-1].T + theta[:, -1]

        return map_row_blocks(block, X, rows)  # type: ignore[no-any-return]

    def _argmax(self, scores: np.ndarray) -> np.ndarray:
        return (scores[:, 0] > 0).astype(np.int64) if scores.shape[1] == 1 else scores.argmax(1)

    def _out_of_fold_scores(
        self, X: np.ndarray, y_idx: np.ndarray, seed: int
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
        scores = np.zeros((len(X), n_scores))
        for train, held in folds.split(np.zeros((len(X), 1)), y_idx):
            gram = augmented_gram(X, self.mean_, self.scale_, train)
            theta, _ = self._solve(X, y_idx, self.C_, train, None, gram)
            scores[held] = self._scores(X, theta, held)
        return scores, y_idx

    def decision_scores(self, X: Any) -> np.ndarray:
        """Raw one-vs-rest SVM scores, shape (n, 1) for two classes else (n, n_classes)."""
        X = self._validate_predict(X)
        return self._scores(X, np.column_stack([self.coef_, self.intercept_]))

    def predict(self, X: Any) -> np.ndarray:
        """The SVM's own decision: the class whose one-vs-rest margin is largest (with two
        classes, `classes_[1]` when the margin is > 0), as `LinearSVC.predict` decides. The
        Platt sigmoids only make probabilities: fitted on val, their 0.5 point need not sit at
        margin 0, so the argmax of `predict_proba` can differ from this decision."""
        scores = self.decision_scores(X)  # checks that the head is fitted
        return self.classes_[self._argmax(scores)]

    def decides_generated(self, X: Any) -> np.ndarray:
        """Whether the SVM's own decision (`predict`) calls each row generated: the class 1,
        or any class but "real" for attribution targets. `metrics.evaluate_scores` reports
        the accuracies at 0.5 at this decision (seed 003 reports the SVM's accuracy)."""
        pred = self.predict(X)
        if 1 in list(self.classes_):
            return np.asarray(pred == 1)
        return np.asarray(pred.astype(str) != "real")

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


def _standardised_blocks(
    X: np.ndarray, mean: np.ndarray, scale: np.ndarray, rows: np.ndarray | None
) -> Iterator[tuple[slice, np.ndarray]]:
    """(block, standardised float64 rows) over X's rows (or `rows`), one block copy each."""
    for blk, z in float64_blocks(X, rows):
        z -= mean
        z /= scale
        yield blk, z


def _add_outer(H: np.ndarray, z: np.ndarray) -> None:
    """H += Σ aᵢaᵢᵀ over the rows of z, aᵢ = (zᵢ, 1)."""
    d = z.shape[1]
    H[:d, :d] += z.T @ z
    side = z.sum(axis=0)
    H[:d, d] += side
    H[d, :d] += side
    H[d, d] += len(z)


def augmented_gram(
    X: np.ndarray, mean: np.ndarray, scale: np.ndarray, rows: np.ndarray | None = None
) -> np.ndarray:
    """Σ aᵢaᵢᵀ with aᵢ = (zᵢ, 1) over the rows: lets `fit_squared_hinge` build its Hessian
    from the inactive rows when most rows are active. One pass; share it across C values
    and classes fitted on the same rows."""
    G = np.zeros((X.shape[1] + 1, X.shape[1] + 1))
    for _, z in _standardised_blocks(X, mean, scale, rows):
        _add_outer(G, z)
    return G


def fit_squared_hinge(
    X: np.ndarray,
    mean: np.ndarray,
    scale: np.ndarray,
    y: np.ndarray,
    C: float,
    *,
    rows: np.ndarray | None = None,
    tol: float = 1e-4,
    max_iter: int = 100,
    init: np.ndarray | None = None,
    gram: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Minimise ½‖θ‖² + C Σᵢ max(0, 1 − yᵢ(w·zᵢ + b))² over θ = (w, b), zᵢ = (xᵢ − mean) / scale.

    This is liblinear's L2-regularised L2-loss primal problem with the bias regularised.
    Newton's method with the generalised Hessian I + 2C·Σ_active aᵢaᵢᵀ, aᵢ = (zᵢ, 1) (an exact
    (d+1)² system, d is small), and a backtracking line search. Each iteration is one pass over
    row blocks standardised on the fly in float64, so no copy of X is made. With `gram`
    (`augmented_gram` of the same rows) the Hessian is summed over whichever of the active
    and inactive rows were fewer at the previous iteration (gram − inactive when most are
    active): the same matrix, at a fraction of the cost.

    Args:
        y: ±1 per row of X (or of `rows`).
        rows: indices of the rows to fit on (e.g. a fold); all rows when None.
        tol, max_iter: liblinear's stopping rule (see `SVMHead`) and an iteration cap.
        init: starting θ (a previous solution); zeros when None.
        gram: `augmented_gram(X, mean, scale, rows)`, or None.

    Returns:
        θ (d + 1 values, the bias last) and the iterations used.
    """
    n, d = (len(X) if rows is None else len(rows)), X.shape[1]

    def evaluate(
        theta: np.ndarray, hessian: bool, complement: bool
    ) -> tuple[float, np.ndarray, np.ndarray | None, int]:
        w, b = theta[:d], theta[d]
        f, g = 0.5 * float(theta @ theta), theta.copy()
        summed = np.zeros((d + 1, d + 1)) if hessian else None
        n_active = 0
        for blk, z in _standardised_blocks(X, mean, scale, rows):
            yb = y[blk]
            viol = 1.0 - yb * (z @ w + b)
            act = viol > 0
            n_active += int(act.sum())
            za, va = z[act], viol[act]
            f += C * float(va @ va)
            coef = -2.0 * C * yb[act] * va
            g[:d] += za.T @ coef
            g[d] += coef.sum()
            if summed is not None:
                _add_outer(summed, z[~act] if complement else za)
        if summed is None:
            return f, g, None, n_active
        data = gram - summed if complement and gram is not None else summed
        return f, g, np.eye(d + 1) + 2.0 * C * data, n_active

    n_pos = int((y > 0).sum())
    theta = np.zeros(d + 1) if init is None else np.asarray(init, dtype=np.float64).copy()
    # At θ = 0 every row is active, so the Hessian there is I + 2C·gram.
    complement = gram is not None
    f, g, H, n_active = evaluate(theta, True, complement)
    g0 = g if init is None else evaluate(np.zeros(d + 1), False, False)[1]
    stop = tol * max(min(n_pos, n - n_pos), 1) / max(n, 1) * float(np.linalg.norm(g0))
    for iteration in range(max_iter):
        if np.linalg.norm(g) <= stop:
            return theta, iteration
        assert H is not None
        step = scipy.linalg.solve(H, -g, assume_a="pos")
        slope, t = float(g @ step), 1.0
        complement = gram is not None and 2 * n_active > n
        while True:  # Armijo backtracking; the full Newton step is almost always taken
            trial = theta + t * step
            f_new, g_new, H_new, active_new = evaluate(trial, True, complement)
            if f_new <= f + 0.01 * t * slope or t < 1e-10:
                break
            t *= 0.5
        theta, f, g, H, n_active = trial, f_new, g_new, H_new, active_new
    if np.linalg.norm(g) > stop:
        logger.warning(
            "SVM (C=%g) stopped at max_iter=%d before the gradient met tol=%g; raise max_iter",
            C,
            max_iter,
            tol,
        )
    return theta, max_iter
