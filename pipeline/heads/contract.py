"""The heads' contract: the base estimator every head extends (validation, `predict`, the
(de)serialisation hooks and the capabilities the trainer asks about) and hyperparameter checks."""

from __future__ import annotations

import numbers
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from pipeline.errors import ConfigError, DataUnusable, shown

State = tuple[dict[str, Any], dict[str, np.ndarray]]


class BaseHead(ClassifierMixin, BaseEstimator):
    """Common validation, `predict` and (de)serialisation hooks for every head.

    Subclasses implement `fit` and `predict_proba`; `predict` is the argmax of `predict_proba`
    unless a subclass has a documented decision rule of its own.

    A head declares what it needs from the trainer in class attributes, which the trainer
    reads from the registry (`pipeline.heads.registry.head_class`) instead of its name.
    """

    # --- capabilities ---------------------------------------------------------------------------

    #: Takes the CLIP text embeddings of the class prompts (`class_text_emb`) for a zero-shot
    #: term, which the trainer gives it when the features are CLIP image embeddings.
    needs_class_prompts: ClassVar[bool] = False
    #: Is stacked on other heads, named by registry name in its `base_heads` parameter (which
    #: the trainer gives the class prompts of those that need them).
    stacks_base_heads: ClassVar[bool] = False
    #: Attributes images to their source (generator or family): trained on class names
    #: ('real' or the source) instead of 0/1, and scored on its predicted classes.
    attributes_sources: ClassVar[bool] = False
    #: Calibrates its own probabilities on val; post-hoc calibration would do it twice.
    calibrates_on_val: ClassVar[bool] = False
    #: Reads only this features kind, whatever `features.kind` is (None: any kind).
    feature_kind: ClassVar[str | None] = None

    # --- validation -----------------------------------------------------------------------------

    def _validate_train(self, X: Any, y: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Validate X, y; return X (float32 kept as is, anything else as float64: a
        million-row float32 matrix is not copied), the sorted classes and y as indices."""
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        classes, y_idx = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise DataUnusable(
                f"{type(self).__name__} needs at least 2 classes in y, got 1 class "
                f"({classes[0]!r}); pass rows of every class you want to predict"
            )
        return X, classes, y_idx.astype(np.int64)

    def _validate_val(
        self, X_val: Any, y_val: Any, classes: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Validate the optional validation pair against the training classes and width."""
        if X_val is None and y_val is None:
            return None
        if X_val is None or y_val is None:
            raise ValueError(
                f"{type(self).__name__}.fit got only one of X_val / y_val; pass both or neither"
            )
        X_val = check_array(X_val, dtype=[np.float64, np.float32])
        if X_val.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X_val has {X_val.shape[1]} features but X has {self.n_features_in_}; "
                "validation rows must come from the same feature extractor"
            )
        y_val = np.asarray(y_val).ravel()
        if len(y_val) != len(X_val):
            raise ValueError(f"X_val has {len(X_val)} rows but y_val has {len(y_val)} labels")
        unknown = sorted({str(v) for v in np.setdiff1d(np.unique(y_val), classes)})
        if unknown:
            raise DataUnusable(
                f"y_val contains labels {unknown} that are not in the training classes "
                f"{classes.tolist()}; validation labels must be a subset of training labels"
            )
        return X_val, np.searchsorted(classes, y_val).astype(np.int64)

    def _validate_predict(self, X: Any) -> np.ndarray:
        """Validate prediction rows; float32 is kept as is (no float64 copy of a big matrix:
        heads compute on float64 row blocks, see `map_row_blocks`)."""
        check_is_fitted(self)
        return validate_data(self, X, dtype=[np.float64, np.float32], reset=False)

    # --- prediction -----------------------------------------------------------------------------

    def predict_proba(self, X: Any) -> np.ndarray:  # pragma: no cover - always overridden
        raise NotImplementedError

    def predict(self, X: Any) -> np.ndarray:
        """Predict the class with the highest probability."""
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    # --- (de)serialisation hooks used by pipeline.heads.io ----------------------------------------

    def _get_state(self) -> State:
        """Return JSON-able metadata and the named arrays that fully describe the fitted head."""
        raise NotImplementedError

    def _set_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Restore the fitted attributes written by `_get_state`."""
        raise NotImplementedError

    def _children(self) -> list[tuple[str, BaseHead]]:
        """Fitted sub-heads saved in their own subdirectories (only the meta head has any)."""
        return []

    def _set_children(self, children: list[BaseHead]) -> None:
        """Attach sub-heads loaded from the subdirectories named by `_children`."""
        if children:
            raise ValueError(f"{type(self).__name__} has no sub-heads but {len(children)} given")


def check_sgd_params(head: Any) -> None:
    """Validate the hyperparameters shared by the torch-trained heads (MLP, multi-task)."""
    check_positive("hidden", head.hidden, integer=True)
    # A warm-started head may take zero epochs: it then keeps the saved weights.
    warm = getattr(head, "warm_start_from", None) not in (None, "")
    check_positive("epochs", head.epochs, integer=True, allow_zero=warm)
    check_positive("batch_size", head.batch_size, integer=True)
    check_positive("lr", head.lr)
    check_positive("weight_decay", head.weight_decay, allow_zero=True)


def check_positive(
    name: str, value: Any, *, integer: bool = False, allow_zero: bool = False
) -> None:
    """Raise a ValueError naming the hyperparameter when it is not a positive (int) number."""
    ok_type = isinstance(value, numbers.Integral if integer else numbers.Real)
    ok_type = ok_type and not isinstance(value, bool)
    if not ok_type or not (value >= 0 if allow_zero else value > 0):
        kind = "integer" if integer else "number"
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be a {kind} {bound}, got {shown(value)}")
