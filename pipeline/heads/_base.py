"""Shared machinery for heads: validation, standardisation, numerics and torch training helpers."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
from scipy.special import expit, log_softmax, softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from pipeline.errors import ConfigError, DataUnusable

State = tuple[dict[str, Any], dict[str, np.ndarray]]

logger = logging.getLogger(__name__)


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


# --- standardisation -----------------------------------------------------------------------------


def check_sgd_params(head: Any) -> None:
    """Validate the hyperparameters shared by the torch-trained heads (MLP, multi-task)."""
    check_positive("hidden", head.hidden, integer=True)
    check_positive("epochs", head.epochs, integer=True)
    check_positive("batch_size", head.batch_size, integer=True)
    check_positive("lr", head.lr)
    check_positive("weight_decay", head.weight_decay, allow_zero=True)


# Bytes of one float64 row block: whole-matrix temporaries (a float64 or standardised copy,
# hidden activations) are made block by block instead, so they stay this small.
_BLOCK_BYTES = 8 << 20


def row_blocks(n: int, width: int) -> list[slice]:
    """Consecutive row slices covering range(n), each a float64 block of `width` columns of
    about `_BLOCK_BYTES` (at least one row)."""
    rows = max(1, _BLOCK_BYTES // (8 * max(1, width)))
    return [slice(s, min(s + rows, n)) for s in range(0, n, rows)]


def float64_blocks(
    X: np.ndarray, rows: np.ndarray | None = None
) -> Iterator[tuple[slice, np.ndarray]]:
    """(block, float64 copy of its rows) over consecutive blocks of X's rows, or of the rows
    `rows` selects (gathered a block at a time, never all at once); the copy is the caller's
    to modify."""
    n = len(X) if rows is None else len(rows)
    for b in row_blocks(n, X.shape[1]):
        yield b, np.array(X[b] if rows is None else X[rows[b]], dtype=np.float64)


def map_row_blocks(
    fn: Callable[[np.ndarray], Any], X: np.ndarray, rows: np.ndarray | None = None
) -> Any:
    """`fn` applied to float64 copies of consecutive row blocks of X (or of `X[rows]`), its
    outputs (an array or a tuple of arrays, one row per input row) stacked in row order.

    Every head's per-row computation goes through this, so predicting on a float32 matrix
    never holds a float64 copy, a standardised copy or hidden activations of all its rows;
    the values equal those of the whole matrix at once because each row is computed alone.
    """
    outs = [fn(z) for _, z in float64_blocks(X, rows)] or [fn(np.zeros((0, X.shape[1])))]
    if isinstance(outs[0], tuple):
        return tuple(np.concatenate(parts) for parts in zip(*outs))
    return np.concatenate(outs)


def fit_standardiser(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and scale (float64, two passes over row blocks, so no temporary of X's
    size); constant features get scale 1 so they map to 0, not NaN."""
    n = max(1, len(X))
    mean = np.zeros(X.shape[1], np.float64)
    for b in row_blocks(len(X), X.shape[1]):
        mean += X[b].sum(axis=0, dtype=np.float64)
    mean /= n
    var = np.zeros(X.shape[1], np.float64)
    for b in row_blocks(len(X), X.shape[1]):
        var += np.square(X[b] - mean).sum(axis=0)
    std = np.sqrt(var / n)
    # Relative threshold: CLIP differences can share an offset far larger than their spread.
    tiny = 1e-10 * np.maximum(1.0, np.abs(mean))
    scale = np.where(std > tiny, std, 1.0)
    return mean, scale


def standardise(X: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (X - mean) / scale


def standardise_f32(X: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """`standardise` computed in float64 block by block and stored as float32 (no float64
    matrix of X's size)."""
    out = np.empty(X.shape, np.float32)
    for b in row_blocks(len(X), X.shape[1]):
        np.divide(X[b] - mean, scale, out=out[b], casting="same_kind")
    return out


class StandardisedRows:
    """The standardised rows of X, made on demand for each minibatch or block as float32
    tensors on `device`, so a torch head never holds a standardised copy of its training or
    validation matrix (the values are `standardise_f32`'s, row for row).

    On CUDA the raw matrix is copied to the device once and standardised there (float64
    arithmetic, like the CPU path); on the CPU the rows are gathered from X itself.
    """

    def __init__(self, X: np.ndarray, mean: np.ndarray, scale: np.ndarray, device: Any) -> None:
        import torch

        self.device = device
        self._mean, self._scale = mean, scale
        self._on_device = device.type != "cpu"
        self._X: Any
        if self._on_device:
            self._X = torch.from_numpy(np.ascontiguousarray(X)).to(device)
            self._mean_t = torch.as_tensor(mean, dtype=torch.float64, device=device)
            self._scale_t = torch.as_tensor(scale, dtype=torch.float64, device=device)
        else:
            self._X = X

    def __len__(self) -> int:
        return len(self._X)

    def rows(self, idx: Any) -> Any:
        """Standardised float32 rows at `idx` (a tensor of row indices or a slice)."""
        import torch

        if self._on_device:
            picked = self._X[idx.to(self.device) if isinstance(idx, torch.Tensor) else idx]
            return ((picked.double() - self._mean_t) / self._scale_t).float()
        picked = self._X[idx.numpy() if isinstance(idx, torch.Tensor) else idx]
        return torch.from_numpy(standardise_f32(picked, self._mean, self._scale))

    def blocks(self) -> Iterator[tuple[slice, Any]]:
        """(row slice, standardised rows) over consecutive blocks covering every row."""
        for b in row_blocks(len(self), self._X.shape[1]):
            yield b, self.rows(b)


def threads_for(rows: int, width: int, hidden: int) -> int:
    """Torch threads for minibatch steps of `rows` × `width` → `hidden` matmuls: one thread
    below ~64 M multiply-adds a step (the default thread pool costs more than it gives there:
    4.7x slower wall time measured on 2 cores), else torch's default."""
    import torch

    return 1 if rows * width * hidden < 1 << 26 else torch.get_num_threads()


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` torch intra-op threads, restoring the caller's count after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def l2_normalise(X: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation; all-zero rows stay zero."""
    norm = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norm, 1e-12)


def binary_proba(logit: np.ndarray) -> np.ndarray:
    """Two-column probabilities [P(class 0), P(class 1)] from one logit per row."""
    p1 = expit(logit)
    return np.column_stack([1.0 - p1, p1])


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    return np.asarray(softmax(logits, axis=1))


def cross_entropy(logits: np.ndarray, y_idx: np.ndarray) -> float:
    """Mean multiclass cross-entropy of integer targets under row logits."""
    logp = log_softmax(logits, axis=1)
    return float(-logp[np.arange(len(y_idx)), y_idx].mean())


# --- torch helpers -------------------------------------------------------------------------------


def seed_from(random_state: Any) -> int:
    """An int seed for torch from an sklearn-style random_state (int, None or RandomState)."""
    return int(check_random_state(random_state).randint(0, 2**31 - 1))


@contextmanager
def torch_seeded(seed: int) -> Iterator[Any]:
    """Seed torch's global CPU RNG inside the block and restore the caller's state after.

    Layer initialisation draws from the global generator; forking keeps fitting a head from
    changing the random stream of the code around it.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)


def minibatches(n: int, batch_size: int, generator: Any) -> list[Any]:
    """Shuffled index batches covering range(n) once; the last batch may be short."""
    import torch

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(n, generator=generator)
    return list(torch.split(order, batch_size))


def check_device(device: str) -> Any:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"device={device!r} is not a torch device; use 'cpu' or 'cuda'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} requested but CUDA is not available; use 'cpu'")
    return dev


def to_numpy_state(module: Any) -> dict[str, np.ndarray]:
    """Copy a torch module's parameters to float32 numpy arrays keyed by parameter name."""
    return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in module.state_dict().items()}


def check_positive(
    name: str, value: Any, *, integer: bool = False, allow_zero: bool = False
) -> None:
    """Raise a ValueError naming the hyperparameter when it is not a positive (int) number."""
    ok_type = isinstance(value, numbers.Integral if integer else numbers.Real)
    ok_type = ok_type and not isinstance(value, bool)
    if not ok_type or not (value >= 0 if allow_zero else value > 0):
        kind = "integer" if integer else "number"
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be a {kind} {bound}, got {value!r}")


def train_torch(
    module: Any,
    batch_loss: Callable[[Any], Any],
    *,
    n_rows: int,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    generator: Any,
    val_loss: Callable[[], float] | None = None,
) -> tuple[int, float | None]:
    """Train `module` with AdamW on shuffled minibatches; keep the best epoch on validation.

    Args:
        module: the torch module whose parameters are optimised; on return it holds the
            weights of the selected epoch.
        batch_loss: maps a tensor of row indices to a scalar loss.
        val_loss: evaluated after each epoch; the epoch with the lowest value is kept. Without
            it the weights after the last epoch are kept.

    Returns:
        The selected epoch (1-based) and its validation loss (None without validation).
    """

    largest = max((p.numel() for p in module.parameters()), default=1)
    with torch_threads(threads_for(min(batch_size, n_rows), 1, largest)):
        return _train_torch(
            module, batch_loss, n_rows, epochs, lr, weight_decay, batch_size, generator, val_loss
        )


def _train_torch(
    module: Any,
    batch_loss: Callable[[Any], Any],
    n_rows: int,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    generator: Any,
    val_loss: Callable[[], float] | None,
) -> tuple[int, float | None]:
    import torch

    optimiser = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    best_epoch, best_loss, best_state = epochs, None, None
    for epoch in range(1, epochs + 1):
        module.train()
        for idx in minibatches(n_rows, batch_size, generator):
            optimiser.zero_grad(set_to_none=True)
            loss = batch_loss(idx)
            loss.backward()
            optimiser.step()
        if val_loss is not None:
            module.eval()
            with torch.no_grad():
                current = float(val_loss())
            logger.debug("epoch %d/%d: validation loss %.5f", epoch, epochs, current)
            if not np.isfinite(current):
                continue
            if best_loss is None or current < best_loss:
                best_epoch, best_loss = epoch, current
                best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if best_state is not None:
        module.load_state_dict(best_state)
        logger.info("kept epoch %d/%d (validation loss %.5f)", best_epoch, epochs, best_loss)
    module.eval()
    return best_epoch, best_loss
