"""The metrics module: one home for scores, metrics, thresholds and calibration."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit

from pipeline.evaluation import calibration
from pipeline.heads import SVMHead, svm

ROOT = Path(__file__).resolve().parents[1]


def _imports(module: str) -> set[str]:
    tree = ast.parse((ROOT / "pipeline" / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_train_and_evaluate_do_not_import_each_other_and_metrics_is_a_leaf():
    assert "pipeline.evaluation.evaluate" not in _imports("train")
    assert not {m for m in _imports("evaluation/metrics") if m.startswith("pipeline.")} - {
        # Leaf modules of their own: file writing, the error types, the provenance record.
        "pipeline.rows.atomic",
        "pipeline.errors",
        "pipeline.provenance",
    }
    assert "pipeline.evaluation.metrics" in _imports(
        "train"
    ) and "pipeline.evaluation.metrics" in _imports("evaluation/evaluate")


def test_one_platt_fit_for_the_svm_and_post_hoc_calibration():
    assert svm.fit_platt is calibration.fit_platt
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 3000)
    # A slope below 1 (over-confident scores): inside the bracket that keeps the ranking.
    y = (rng.random(3000) < expit(0.6 * z - 0.5)).astype(int)
    a, b = calibration.fit_platt(z, y == 1)
    cal = calibration.fit_calibration("platt", expit(z), y)
    # Same fit: post-hoc Platt on logit(p) is fit_platt with the sign convention flipped.
    assert cal["a"] == pytest.approx(-a, rel=1e-4) and cal["b"] == pytest.approx(-b, abs=1e-4)
    assert cal["a"] == pytest.approx(0.6, rel=0.1) and cal["b"] == pytest.approx(-0.5, abs=0.1)
    # A slope above 1 would sharpen distinct scores near 1 into ties: it is clamped to 1.
    sharp = (rng.random(3000) < expit(1.5 * z - 0.5)).astype(int)
    assert calibration.fit_calibration("platt", expit(z), sharp)["a"] == 1.0


def test_svm_is_not_calibrated_twice(tmp_path):
    from pipeline.config import TrainConfig
    from pipeline.train import train_heads
    from tests.helpers import write_features

    feats = write_features(tmp_path / "f")
    cfg = TrainConfig(heads=["svm"], calibration="temperature")
    info = train_heads(feats, tmp_path / "models", cfg=cfg, kind="item", seed=0)["svm"]
    assert SVMHead.calibrates_on_val
    assert info["calibration"] == {"method": "none", "a": 1.0, "b": 0.0}
