"""Post-hoc calibration keeps the ranking (issue 19, item 3); blocks say how balanced they are
(item 5)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy.special import expit
from sklearn.metrics import average_precision_score, roc_auc_score

from pipeline.evaluation.calibration import (
    PLATT_SLOPE_BRACKET,
    TEMPERATURE_BRACKET,
    apply_calibration,
    fit_calibration,
)
from pipeline.evaluation.metrics import Scores, evaluate_scores
from pipeline.evaluation.summary import head_summary


def _test_rows(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw scores over the whole range, extreme ones included (beyond a 1e-7 clip), and labels
    that follow them."""
    rng = np.random.default_rng(seed)
    p = expit(rng.normal(0.0, 12.0, 3000))
    p[:4] = [0.0, 1e-12, 1e-9, 1.0]
    return p, (rng.random(len(p)) < p).astype(int)


@pytest.mark.parametrize("method", ["temperature", "platt"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_val_without_signal_leaves_ap_and_auc_as_raw(method, seed):
    rng = np.random.default_rng(100 + seed)
    # Val rows whose labels have nothing to do with the scores: the old unbounded fit ran the
    # temperature off to ~1e21 here and every calibrated score became exactly 0.5.
    p_val, y_val = expit(rng.normal(0.0, 5.0, 400)), rng.integers(0, 2, 400)
    cal = fit_calibration(method, p_val, y_val)
    p, y = _test_rows(seed)
    q = apply_calibration(cal, p)
    assert len(np.unique(q)) == len(np.unique(p))  # no two distinct scores merged
    assert abs(average_precision_score(y, q) - average_precision_score(y, p)) <= 1e-9
    assert abs(roc_auc_score(y, q) - roc_auc_score(y, p)) <= 1e-9
    if method == "temperature":
        assert TEMPERATURE_BRACKET[0] <= cal["temperature"] <= TEMPERATURE_BRACKET[1]
        assert cal["temperature"] == pytest.approx(TEMPERATURE_BRACKET[1])  # no signal: top
    else:
        assert PLATT_SLOPE_BRACKET[0] <= cal["a"] <= PLATT_SLOPE_BRACKET[1]


def test_anticorrelated_val_cannot_reverse_the_ranking():
    rng = np.random.default_rng(3)
    z = rng.normal(0.0, 2.0, 2000)
    y_val = (rng.random(2000) < expit(-z)).astype(int)  # val says: high score means real
    cal = fit_calibration("platt", expit(z), y_val)
    assert cal["a"] == PLATT_SLOPE_BRACKET[0]
    p, y = _test_rows(3)
    assert roc_auc_score(y, apply_calibration(cal, p)) == pytest.approx(
        roc_auc_score(y, p), abs=1e-12
    )


def test_underconfident_scores_are_not_sharpened_past_the_bracket():
    rng = np.random.default_rng(4)
    z = rng.normal(0.0, 3.0, 4000)
    y = (rng.random(4000) < expit(z)).astype(int)
    cal = fit_calibration("temperature", expit(z / 4), y)  # wants T = 1/4
    assert cal["temperature"] == TEMPERATURE_BRACKET[0] and cal["a"] == 1.0


# ------------------------------------------------------------------------------- balance


def _manifest_scores(n_real: int, fakes: dict[str, int]) -> Scores:
    """A manifest-like set: every real image shared, no folder has reals of its own."""
    gens = ["real"] * n_real + [g for g, n in fakes.items() for _ in range(n)]
    n = len(gens)
    label = np.array([0] * n_real + [1] * (n - n_real))
    return Scores(
        ids=[f"i{k}" for k in range(n)],
        label=label,
        generator=gens,
        split=["test"] * n,
        p_generated=np.full(n, 0.2),  # calls every image real
        subset=[""] * n,
    )


def test_mean_counts_own_and_all_blocks_and_all_blocks_warn(caplog):
    scores = _manifest_scores(12, {"a": 1, "b": 2})
    with caplog.at_level(logging.WARNING, logger="pipeline.evaluation.metrics"):
        block = evaluate_scores(scores)
    assert block["mean"]["n_blocks"] == 2
    assert block["mean"]["n_all"] == 2 and block["mean"]["n_own"] == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "a (12 real / 1 generated)" in warned[0]
    assert "b (12 real / 2 generated)" in warned[0]
    # The summary shows what acc hides: everything called real scores bacc 0.5.
    summary = head_summary(block)
    assert summary["mean"]["acc"] == pytest.approx((12 / 13 + 12 / 14) / 2)
    assert summary["mean"]["bacc"] == pytest.approx(0.5)
    assert summary["bacc"] == pytest.approx(0.5)
    assert summary["mean"]["n_all"] == 2


def test_balanced_all_blocks_and_own_blocks_do_not_warn(caplog):
    balanced = _manifest_scores(4, {"a": 3, "b": 4})
    folders = Scores(
        ids=["r1", "r2", "r3", "f1"],
        label=[0, 0, 0, 1],
        generator=["real", "real", "real", "g"],
        split=["test"] * 4,
        p_generated=[0.1, 0.2, 0.3, 0.9],
        subset=["g", "g", "g", "g"],  # 3:1, but the folder's own reals, as UFD scores it
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.evaluation.metrics"):
        assert evaluate_scores(balanced)["mean"]["n_all"] == 2
        own = evaluate_scores(folders)["mean"]
    assert own["n_own"] == 1 and own["n_all"] == 0
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
