"""Row blocks and the numerics heads compute on them: float64 blocks of a float32 matrix,
standardisation, normalisation and probabilities, with no temporary of the whole matrix."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from scipy.special import expit, log_softmax, softmax

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
