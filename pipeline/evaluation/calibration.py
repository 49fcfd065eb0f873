"""Probability calibration that keeps the order of the scores: one Platt fit (used by the SVM
for its probabilities and by post-hoc calibration alike), a bounded temperature, and applying
a fitted calibration. Calibrated AP and AUC equal those of the raw scores."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize_scalar
from scipy.special import expit, logit

from pipeline.errors import shown
from pipeline.evaluation.metrics import as_binary_label


def fit_platt(scores: ArrayLike, positive: ArrayLike, max_iter: int = 100) -> np.ndarray:
    """Platt's sigmoid (a, b) with P(positive | s) = 1 / (1 + exp(a·s + b)).

    Newton's method with backtracking (Lin, Lin and Weng's robust form of Platt's fit), on
    Platt's smoothed targets (N+ + 1) / (N+ + 2) and 1 / (N- + 2), which keep the fit finite
    when the scores separate the classes perfectly. The one Platt fit of the project: the SVM
    head calibrates its scores with it, and ``train.calibration: platt`` applies it to logits.
    """
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    n_pos = float(np.sum(pos))
    n_neg = float(len(pos) - n_pos)
    t = np.where(pos, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))

    def loss(a: float, b: float) -> float:
        z = a * s + b  # P(positive) = expit(-z)
        return float(np.sum(t * np.logaddexp(0.0, z) + (1.0 - t) * np.logaddexp(0.0, -z)))

    a, b = 0.0, float(np.log((n_neg + 1.0) / (n_pos + 1.0)))
    value = loss(a, b)
    for _ in range(max_iter):
        p = expit(-(a * s + b))
        d1 = t - p  # d loss / d z
        grad = np.array([np.sum(d1 * s), np.sum(d1)])
        if np.max(np.abs(grad)) < 1e-5:
            break
        w = p * (1.0 - p)
        hess = np.array(
            [[np.sum(w * s * s) + 1e-12, np.sum(w * s)], [np.sum(w * s), np.sum(w) + 1e-12]]
        )
        step = np.linalg.solve(hess, grad)
        size = 1.0
        while size >= 1e-10:
            new_a, new_b = a - size * step[0], b - size * step[1]
            new_value = loss(new_a, new_b)
            if new_value < value + 1e-4 * size * float(grad @ -step):
                break
            size /= 2.0
        else:
            break  # no decrease along the Newton direction: at the optimum up to rounding
        a, b, value = new_a, new_b, new_value
    return np.array([a, b])


def _logit(p: np.ndarray) -> np.ndarray:
    """Log-odds for fitting: clipped to ±16.1 (p in [1e-7, 1 − 1e-7]) so that the NLL stays
    finite. Never used to apply a calibration: the clip would tie distinct extreme scores."""
    return np.asarray(logit(np.clip(p, 1e-7, 1 - 1e-7)), dtype=np.float64)


def _exact_logit(p: np.ndarray) -> np.ndarray:
    """Log-odds without clipping: 0 and 1 become −inf and +inf, which `expit` maps back to 0
    and 1, so no two distinct scores share a log-odds."""
    with np.errstate(divide="ignore"):
        return np.asarray(logit(np.asarray(p, dtype=np.float64)), dtype=np.float64)


CALIBRATIONS = ("none", "temperature", "platt")
#: Bracket of the fitted temperature. Below 1 a temperature sharpens, and σ(z / T) reaches
#: exactly 1.0 in float64 once z / T > 36.7, so distinct scores near 1 would tie and AP / AUC
#: would change; at and above 1 nothing saturates (the top log-odds a float64 probability
#: below 1 carries is 36.7), and only scores fewer than about T float64 steps apart can merge.
#: Above 100 the scores are squeezed towards 0.5 for no gain: a val set without signal lands
#: on the upper bound.
TEMPERATURE_BRACKET = (1.0, 100.0)
#: Bracket of the post-hoc Platt slope `a` (of ``σ(a·logit p + b)``), for the same reasons:
#: a positive slope keeps the order, a slope above 1 could saturate distinct scores to 1.0.
PLATT_SLOPE_BRACKET = (0.01, 1.0)


def fit_calibration(method: str, p: ArrayLike, y: ArrayLike) -> dict[str, float]:
    """Post-hoc calibration of ``p_generated`` on val rows: ``p' = σ(a·logit p + b)``.

    - ``temperature``: ``a = 1/T``, ``b = 0``, T fitted by NLL (Guo et al.) as a bounded
      search over ``log T`` in :data:`TEMPERATURE_BRACKET`;
    - ``platt``: ``(a, b)`` by :func:`fit_platt` on ``logit p``; a slope outside
      :data:`PLATT_SLOPE_BRACKET` is clamped to it and ``b`` refitted for that slope;
    - ``none``, or val rows of one class: the identity.

    Every result is a strictly increasing map of the raw score, so AP and AUC of the
    calibrated scores equal those of the raw scores (also when the val rows carry no signal:
    the temperature then stops at the bracket's top instead of running off to infinity,
    which made every score exactly 0.5).
    """
    if method not in CALIBRATIONS:
        raise ValueError(f"calibration {shown(method)} is not one of {CALIBRATIONS}")
    y = as_binary_label(y)
    if method == "none" or len(np.unique(y)) < 2:
        return {"a": 1.0, "b": 0.0}
    z = _logit(np.asarray(p, dtype=np.float64))
    if method == "platt":
        a, b = (-float(v) for v in fit_platt(z, y == 1))
        low, high = PLATT_SLOPE_BRACKET
        if not low <= a <= high:
            a = float(np.clip(a, low, high))
            b = _fit_offset(a * z, y)
        return {"a": a, "b": b}

    def nll(log_t: float) -> float:
        return _nll(z * math.exp(-log_t), y)

    low, high = (math.log(t) for t in TEMPERATURE_BRACKET)
    log_t = float(minimize_scalar(nll, bounds=(low, high), method="bounded").x)
    # The bounded search stops within its tolerance of an end; an end that is as good is kept.
    for end in (low, high):
        if nll(end) <= nll(log_t):
            log_t = end
    t = float(np.clip(math.exp(log_t), *TEMPERATURE_BRACKET))  # exp(log 100) > 100
    return {"a": 1.0 / t, "b": 0.0, "temperature": t}


def _nll(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of labels `y` under ``σ(logits)``."""
    return float(np.mean(np.logaddexp(0.0, logits) - y * logits))


def _fit_offset(logits: np.ndarray, y: np.ndarray) -> float:
    """The offset b minimising the NLL of ``σ(logits + b)`` (a convex one-dimensional fit)."""
    return float(
        minimize_scalar(lambda b: _nll(logits + b, y), bounds=(-50.0, 50.0), method="bounded").x
    )


def apply_calibration(cal: dict[str, float], p: ArrayLike) -> np.ndarray:
    """Apply a calibration from :func:`fit_calibration` (an empty dict is the identity).

    The log-odds are taken without clipping, so distinct scores stay distinct (a clip at
    1e-7 would tie every score beyond it)."""
    if cal.get("a", 1.0) == 1.0 and cal.get("b", 0.0) == 0.0:
        return np.asarray(p, dtype=np.float64)
    z = _exact_logit(np.asarray(p, dtype=np.float64))
    return np.asarray(expit(cal["a"] * z + cal["b"]), dtype=np.float64)
