"""The SVM's accuracy at 0.5 is at its own decision, margin > 0 (issue 19, item 4); Platt's
sigmoid only makes its probabilities."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score
from sklearn.svm import LinearSVC

from pipeline.evaluation.metrics import Scores, evaluate_scores, own_decision, p_generated
from pipeline.heads import SVMHead
from pipeline.heads.blocks import standardise


def _rows(n: int, seed: int, share_generated: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < share_generated).astype(int)
    X = rng.normal(size=(n, 6)) * rng.uniform(0.5, 2.0, 6) + 3.0
    X[:, 0] += 1.2 * y  # overlapping classes: many rows near the margin
    return X, y


@pytest.mark.parametrize("C", [0.01, 1.0])
def test_svm_acc_equals_linearsvc_score(tmp_path, C):
    X, y = _rows(800, 0, 0.5)
    # A val set of mostly real images: Platt's 0.5 point moves away from margin 0.
    X_val, y_val = _rows(300, 1, 0.15)
    X_te, y_te = _rows(600, 2, 0.5)
    head = SVMHead(C_grid=(C,), tol=1e-10).fit(X, y, X_val=X_val, y_val=y_val)
    p = p_generated(head, X_te)
    decision = own_decision(head, X_te)
    assert decision is not None
    # The test can fail: at p > 0.5 some rows are decided otherwise than by the margin.
    assert np.sum((p > 0.5) != (decision == 1)) > 0

    scores = Scores(
        ids=[str(i) for i in range(len(y_te))],
        label=y_te,
        generator=np.where(y_te == 1, "g", "real"),
        split=["test"] * len(y_te),
        p_generated=p,
        decision=decision,
    )
    block = evaluate_scores(scores)
    ref = LinearSVC(C=C, dual=False, tol=1e-12, max_iter=100_000)
    ref.fit(standardise(X, head.mean_, head.scale_), y)
    expected = ref.score(standardise(X_te, head.mean_, head.scale_), y_te)
    assert block["overall"]["acc"] == pytest.approx(expected, abs=1e-12)
    assert block["per_generator"]["g"]["acc"] == pytest.approx(expected, abs=1e-12)
    assert head.score(X_te, y_te) == pytest.approx(expected, abs=1e-12)
    # AP still ranks the Platt probabilities; the decision survives the scores CSV.
    assert block["overall"]["ap"] == pytest.approx(average_precision_score(y_te, p))
    scores.to_csv(tmp_path / "svm.csv")
    again = evaluate_scores(Scores.from_csv(tmp_path / "svm.csv"))
    assert again["overall"]["acc"] == block["overall"]["acc"]
    # At another threshold the accuracies are at p_generated, as for every head.
    at_07 = evaluate_scores(scores, threshold=0.7)["overall"]["acc"]
    assert at_07 == pytest.approx(np.mean((p > 0.7) == y_te))


def test_heads_without_a_rule_of_their_own_decide_at_half():
    from pipeline.heads import MLPHead

    X, y = _rows(200, 3, 0.5)
    assert own_decision(MLPHead(epochs=2).fit(X, y), X) is None
