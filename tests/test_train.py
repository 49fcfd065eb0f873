"""Train and evaluate on synthetic feature shards: no test rows read, calibration, pseudo-labels,
every head wired end to end."""

import json
import logging

import numpy as np
import pytest
from scipy.special import expit, logit
from sklearn.linear_model import LogisticRegression

from pipeline.config import ConfigError, EvaluateConfig, TrainConfig
from pipeline.evaluation.calibration import apply_calibration, fit_calibration
from pipeline.evaluation.evaluate import run_evaluate
from pipeline.heads import load_head
from pipeline.train import train_heads
from tests.helpers import GENERATORS, write_features


def test_default_training_never_reads_test_rows(tmp_path):
    clean = write_features(tmp_path / "clean")
    poisoned = write_features(tmp_path / "poisoned", poison_test=True)
    cfg = TrainConfig(
        heads=["mlp", "svm", "multitask", "tip_adapter", "meta"],
        mlp={"epochs": 5},
        multitask={"epochs": 5},
        tip_adapter={"finetune": True, "epochs": 3},
        meta={"n_folds": 3},
    )
    train_heads(clean, tmp_path / "m1", cfg=cfg, kind="item", seed=0)
    train_heads(poisoned, tmp_path / "m2", cfg=cfg, kind="item", seed=0)
    X = np.random.default_rng(1).normal(3, 1, (20, 6))
    for name in cfg.heads:
        a, b = load_head(tmp_path / "m1" / name), load_head(tmp_path / "m2" / name)
        np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
        info1 = json.loads((tmp_path / "m1" / name / "train.json").read_text())
        info2 = json.loads((tmp_path / "m2" / name / "train.json").read_text())
        assert info1["calibration"] == info2["calibration"]
        assert info1["val_threshold"] == info2["val_threshold"]


def test_a_meta_heads_tip_adapter_gets_the_class_prompts(tmp_path):
    """Trained on image features, a Tip-Adapter inside the meta head has the zero-shot term
    of the class prompts, as the top-level one does."""
    feats = write_features(tmp_path / "f")
    cfg = TrainConfig(heads=["meta"], meta={"base_heads": ["svm", "tip_adapter"], "n_folds": 3})
    train_heads(feats, tmp_path / "models", cfg=cfg, kind="image", seed=0)
    meta = load_head(tmp_path / "models" / "meta")
    tip = meta.base_heads_[1]
    assert tip.text_weights_ is not None and tip.text_weights_.shape == (2, 6)
    info = json.loads((tmp_path / "models" / "meta" / "train.json").read_text())
    assert info["zero_shot_prompts"] is True
    assert info["params"]["base_heads"] == ["svm", "tip_adapter"]


def test_every_head_trains_and_is_evaluated(tmp_path):
    feats = write_features(tmp_path / "f")
    cfg = TrainConfig(
        heads=["mlp", "svm", "multitask", "tip_adapter", "meta"],
        mlp={"epochs": 20},
        multitask={"epochs": 30},
        meta={"n_folds": 3},
    )
    train_heads(feats, tmp_path / "models", cfg=cfg, kind="item", seed=0)
    info = json.loads((tmp_path / "models" / "tip_adapter" / "train.json").read_text())
    assert info["kind"] == "image" and info["zero_shot_prompts"] is True
    metrics = run_evaluate(
        feats,
        tmp_path / "models",
        tmp_path / "eval.json",
        tmp_path / "scores",
        tmp_path / "plots",
        cfg=EvaluateConfig(),
    )
    assert set(metrics) == set(cfg.heads)
    for name, block in metrics.items():
        assert block["overall"]["acc"] > 0.8, (name, block["overall"])
        assert set(block["per_generator"]) == set(GENERATORS)
        assert "acc_at_val_threshold" in block["overall"]
    mt = metrics["multitask"]["overall"]
    for key in ("f1", "f1_macro", "f1_weighted"):
        assert 0 <= mt[key] <= 1
    assert (tmp_path / "plots" / "confusion" / "multitask.csv").exists()
    assert (tmp_path / "plots" / "confusion" / "mlp.csv").exists()  # every head has one
    for curve, columns in (("roc", "head,fpr,tpr"), ("pr", "head,recall,precision")):
        lines = (tmp_path / "plots" / curve / "svm.csv").read_text().splitlines()
        # The head's name on every row: the plots' templates head each plot with it.
        assert lines[0] == columns and {line.split(",")[0] for line in lines[1:]} == {"svm"}
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["mlp"]["overall"]["acc"] == pytest.approx(metrics["mlp"]["overall"]["acc"])


def test_temperature_and_platt_calibration():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 4000)
    y = (rng.random(4000) < expit(z)).astype(int)
    overconfident = expit(3 * z)
    cal = fit_calibration("temperature", overconfident, y)
    assert cal["temperature"] == pytest.approx(3.0, rel=0.1)
    np.testing.assert_allclose(apply_calibration(cal, overconfident), expit(z), atol=0.03)
    shifted = expit(2 * z + 1)
    platt = fit_calibration("platt", shifted, y)
    ref = LogisticRegression(C=1e6).fit(logit(shifted)[:, None], y)
    assert platt["a"] == pytest.approx(ref.coef_[0, 0], rel=0.02)
    assert platt["b"] == pytest.approx(ref.intercept_[0], abs=0.03)
    assert fit_calibration("none", shifted, y) == {"a": 1.0, "b": 0.0}


def test_pseudo_labels_and_contamination(tmp_path, caplog):
    n = 240
    splits = np.array(["train", "val", "test", "unlabelled"])[(np.arange(n) // 2) % 4]
    feats = write_features(tmp_path / "f", n=n, splits=splits)
    cfg = TrainConfig(heads=["svm", "multitask"], multitask={"epochs": 30}, pseudo_label=True)
    with caplog.at_level(logging.INFO, logger="pipeline.train"):
        train_heads(feats, tmp_path / "m", cfg=cfg, kind="item", seed=0)
    for name in cfg.heads:
        info = json.loads((tmp_path / "m" / name / "train.json").read_text())
        pl = info["pseudo_labels"]
        added = pl["n_added_train"] + pl["n_added_val"]
        assert pl["n_pool"] == n // 4 and 0 < added <= pl["n_pool"]
        assert sum(pl["per_class"].values()) == added
        assert abs(pl["n_added_train"] - 0.8 * added) <= 1
        assert info["contaminated"] is False
        assert "real" in pl["per_class"]  # class names, also for the binary SVM's 0/1
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith(name))
        assert line == (
            f"{name} pseudo-labels: {added} of {n // 4} pool rows above threshold 0.800 "
            f"({pl['n_added_train']} to train, {pl['n_added_val']} to val; per class: "
            + ", ".join(f"{k} {v}" for k, v in pl["per_class"].items())
            + ")"
        )
    bad = TrainConfig(heads=["svm"], pseudo_label=True, pseudo_pool="test")
    with pytest.raises(ConfigError, match="pseudo_allow_eval_split"):
        train_heads(feats, tmp_path / "m2", cfg=bad, kind="item", seed=0)
    allowed = TrainConfig(
        heads=["svm"], pseudo_label=True, pseudo_pool="test", pseudo_allow_eval_split=True
    )
    train_heads(feats, tmp_path / "m3", cfg=allowed, kind="item", seed=0)
    metrics = run_evaluate(
        feats,
        tmp_path / "m3",
        tmp_path / "e.json",
        tmp_path / "s",
        tmp_path / "p",
        cfg=EvaluateConfig(),
    )
    assert metrics["svm"]["contaminated"] is True


def test_qf_matrix_fits_every_head_like_the_train_stage(tmp_path):
    """QF matrix heads go through the train stage's fit: multitask gets class names (not 0/1,
    which made every p_generated 1) and tip_adapter its class-prompt embeddings."""
    from pipeline.config import Params
    from pipeline.evaluation.metrics import p_generated
    from pipeline.evaluation.qf_matrix import qf_matrix
    from pipeline.features import load_features
    from pipeline.train import fit_configured_head

    params = Params()
    params.train.multitask = {"hidden": 32, "epochs": 20}
    dirs = {q: write_features(tmp_path / f"q{q}", seed=k) for k, q in enumerate((40, 65, 90))}
    heads = ["svm", "multitask", "tip_adapter"]
    matrix = qf_matrix(dirs, params, "test", heads)
    for name in heads:
        for q_train, row in matrix[name].items():
            for q_test, cell in row.items():
                # Constant scores have AUC 0.5; these classes are separable.
                assert cell["auc"] > 0.75, (name, q_train, q_test, cell)
    fs = load_features(dirs[40], "image")
    head, info = fit_configured_head(
        "tip_adapter",
        params.train,
        fs.where("train"),
        fs.where("val"),
        kind="image",
        seed=0,
        features_dir=dirs[40],
    )
    assert info["zero_shot_prompts"]
    assert np.std(p_generated(head, fs.where("test").X)) > 0.01


def test_a_head_trained_without_val_warns_and_is_not_calibrated(tmp_path, caplog):
    n = 120
    no_val = np.array(["train", "test"])[(np.arange(n) // 2) % 2]
    feats = write_features(tmp_path / "f", n=n, splits=no_val)
    cfg = TrainConfig(heads=["mlp"], mlp={"epochs": 2})
    with caplog.at_level(logging.WARNING, logger="pipeline.train"):
        train_heads(feats, tmp_path / "models", cfg=cfg, kind="item", seed=0)
    assert "head mlp trains with an empty val split" in caplog.text
    info = json.loads((tmp_path / "models" / "mlp" / "train.json").read_text())
    assert info["calibration"] == {"method": "none", "a": 1.0, "b": 0.0}
    assert "val_threshold" not in info
