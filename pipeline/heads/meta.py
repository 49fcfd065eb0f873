"""Meta-classifier: logistic regression stacked on out-of-fold probabilities of other heads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from pipeline.errors import ConfigError, DataUnusable, shown
from pipeline.heads.blocks import binary_proba, map_row_blocks, softmax_rows
from pipeline.heads.contract import BaseHead, State, check_positive
from pipeline.heads.registry import make_head, name_of, register
from pipeline.heads.torch_loop import seed_from

FINALS = ("logistic",)


@register("meta")
class MetaHead(BaseHead):
    """Stack base heads: a logistic regression on their concatenated class probabilities.

    As in the internship report's meta-classifier, each base head's probabilities are
    concatenated into one vector per row. The final model is fitted on *out-of-fold*
    probabilities (stratified K-fold, seeded) so it learns how much to trust each head on rows
    that head did not see; the base heads are then refitted on all training rows for
    prediction.

    Parameters:
        base_heads: entries are a registry name (``"mlp"``) or a ``(name, params)`` pair
            (``("mlp", {"hidden": 256})``), resolved with `make_head`. A base head without an
            explicit ``random_state`` gets one derived from this head's `random_state`.
        n_folds: folds for the out-of-fold probabilities; every class needs at least this many
            training rows.
        final: the stacker; only ``"logistic"`` (L2 logistic regression, C=1) exists.
        random_state: seeds the fold split and the base heads.

    Validation data given to `fit` is passed to every base head fit (each uses it for its own
    selection, see their docs); the stacker itself is fitted on training rows only.
    """

    stacks_base_heads: ClassVar[bool] = True

    def __init__(
        self,
        base_heads: tuple[Any, ...] = ("mlp", "svm"),
        n_folds: int = 5,
        final: str = "logistic",
        random_state: Any = 0,
    ) -> None:
        self.base_heads = base_heads
        self.n_folds = n_folds
        self.final = final
        self.random_state = random_state

    def _specs(self) -> list[tuple[str, dict[str, Any]]]:
        specs: list[tuple[str, dict[str, Any]]] = []
        for entry in self.base_heads:
            if isinstance(entry, str):
                specs.append((entry, {}))
            elif (
                isinstance(entry, (tuple, list))
                and len(entry) == 2
                and isinstance(entry[0], str)
                and isinstance(entry[1], Mapping)
            ):
                specs.append((entry[0], dict(entry[1])))
            else:
                raise ConfigError(
                    f"base_heads entry {shown(entry)} is neither a head name nor a (name, params) "
                    "pair; write e.g. ('mlp', ('svm', {'C': 0.1}))"
                )
        if not specs:
            raise ConfigError("base_heads is empty; give at least one head name")
        return specs

    def _build(self, seed: int) -> list[BaseHead]:
        heads = []
        for i, (name, params) in enumerate(self._specs()):
            params.setdefault("random_state", seed + i)
            heads.append(make_head(name, params))
        return heads

    def fit(self, X: Any, y: Any, *, X_val: Any = None, y_val: Any = None) -> MetaHead:
        """Fit the stacker on out-of-fold base probabilities, then refit the base heads.

        Returns:
            self.
        """
        if self.final not in FINALS:
            raise ConfigError(f"final={shown(self.final)} is not supported; valid values: {FINALS}")
        check_positive("n_folds", self.n_folds, integer=True)
        if self.n_folds < 2:
            raise ConfigError(f"n_folds must be >= 2 for out-of-fold stacking, got {self.n_folds}")
        X, classes, y_idx = self._validate_train(X, y)
        val = self._validate_val(X_val, y_val, classes)
        self.classes_ = classes
        labels = classes[y_idx]
        val_kwargs = {} if val is None else {"X_val": val[0], "y_val": classes[val[1]]}
        seed = seed_from(self.random_state)
        self._build(seed)  # reject bad names and params before any training
        counts = np.bincount(y_idx)
        if counts.min() < self.n_folds:
            raise DataUnusable(
                f"MetaHead needs at least n_folds={self.n_folds} rows of every class for "
                f"stratified out-of-fold stacking, but class {classes[counts.argmin()]!r} has "
                f"{counts.min()}; lower n_folds or add rows"
            )

        folds = StratifiedKFold(self.n_folds, shuffle=True, random_state=seed)
        blocks: list[np.ndarray | None] = [None] * len(self._specs())
        for train, held in folds.split(X, y_idx):
            for i, head in enumerate(self._build(seed)):
                head.fit(X[train], labels[train], **val_kwargs)
                # The held-out rows are predicted a block at a time (no copy of the fold).
                proba = map_row_blocks(head.predict_proba, X, held)
                block = blocks[i]
                if block is None:
                    block = blocks[i] = np.zeros((len(X), proba.shape[1]))
                block[held] = proba
        stacked = np.hstack([b for b in blocks if b is not None])

        final = LogisticRegression(C=1.0, max_iter=1000).fit(stacked, y_idx)
        self.final_coef_ = np.asarray(final.coef_, dtype=np.float64)
        self.final_intercept_ = np.asarray(final.intercept_, dtype=np.float64)
        self.base_heads_ = [head.fit(X, labels, **val_kwargs) for head in self._build(seed)]
        return self

    def stacked_features(self, X: Any) -> np.ndarray:
        """Concatenated base-head probabilities, the input of the final logistic regression."""
        X = self._validate_predict(X)
        return np.hstack([head.predict_proba(X) for head in self.base_heads_])

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities of the stacker, columns in `classes_` order."""
        z = self.stacked_features(X) @ self.final_coef_.T + self.final_intercept_
        if len(self.classes_) == 2:
            return binary_proba(z[:, 0])
        return softmax_rows(z)

    def _get_state(self) -> State:
        arrays = {"final_coef_": self.final_coef_, "final_intercept_": self.final_intercept_}
        return {}, arrays

    def _set_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.final_coef_ = arrays["final_coef_"]
        self.final_intercept_ = arrays["final_intercept_"]

    def _children(self) -> list[tuple[str, BaseHead]]:
        return [(f"base_{i:02d}_{name_of(h)}", h) for i, h in enumerate(self.base_heads_)]

    def _set_children(self, children: list[BaseHead]) -> None:
        self.base_heads_ = children
