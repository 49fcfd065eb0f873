"""Heads that fine-tune a saved head: zero epochs keep its weights, training starts from them."""

import numpy as np
import pytest

from pipeline.errors import ConfigError, DataUnusable
from pipeline.heads import load_head, make_head, save_head


def _rows(seed, n=120, d=5, shift=2.0):
    rng = np.random.default_rng(seed)
    y = np.tile([0, 1], n // 2)
    X = rng.normal(size=(n, d)) + shift * y[:, None] * np.eye(d)[0]
    return X.astype(np.float32), y


@pytest.mark.parametrize("name", ["mlp", "multitask"])
def test_zero_epochs_keep_the_saved_weights(tmp_path, name):
    X, y = _rows(0)
    if name == "multitask":
        y = np.where(y == 1, "gen", "real")
    saved = make_head(name, {"hidden": 8, "epochs": 3}).fit(X, y)
    save_head(saved, tmp_path / "a")
    X2, y2 = _rows(1, shift=-1.0)
    if name == "multitask":
        y2 = np.where(y2 == 1, "gen", "real")
    tuned = make_head(name, {"hidden": 8, "epochs": 0, "warm_start_from": str(tmp_path / "a")}).fit(
        X2, y2
    )
    for k, v in saved.weights_.items():
        np.testing.assert_array_equal(tuned.weights_[k], v)
    np.testing.assert_array_equal(tuned.mean_, saved.mean_)
    np.testing.assert_allclose(tuned.predict_proba(X2), saved.predict_proba(X2))


def test_one_epoch_starts_from_the_saved_weights(tmp_path):
    """One epoch from the saved head stays near it; from a random start it does not."""
    X, y = _rows(0)
    saved = make_head("mlp", {"hidden": 16, "epochs": 20, "lr": 0.01}).fit(X, y)
    save_head(saved, tmp_path / "a")
    X2, y2 = _rows(1)
    params = {"hidden": 16, "epochs": 1, "lr": 1e-4, "random_state": 3}
    tuned = make_head("mlp", {**params, "warm_start_from": str(tmp_path / "a")}).fit(X2, y2)
    cold = make_head("mlp", params).fit(X2, y2)
    for k, v in saved.weights_.items():
        moved = np.abs(tuned.weights_[k] - v).max()
        assert 0 < moved < 0.01, k
    assert np.abs(cold.weights_["0.weight"] - saved.weights_["0.weight"]).max() > 0.05
    assert load_head(tmp_path / "a").get_params()["warm_start_from"] is None


def test_svm_newton_starts_from_the_saved_coefficients(tmp_path):
    X, y = _rows(0)
    saved = make_head("svm", {"C": 0.1}).fit(X, y)
    save_head(saved, tmp_path / "a")
    # The same rows: the saved optimum is already there, Newton stops at once.
    again = make_head("svm", {"C": 0.1, "warm_start_from": str(tmp_path / "a")}).fit(X, y)
    assert again.n_iter_ == 0
    np.testing.assert_array_equal(again.coef_, saved.coef_)
    # Other rows: the optimum of those rows (in the saved standardisation), fewer iterations.
    X2, y2 = _rows(1)
    warm = make_head("svm", {"C": 0.1, "warm_start_from": str(tmp_path / "a")}).fit(X2, y2)
    assert warm.n_iter_ >= 1
    np.testing.assert_array_equal(warm.mean_, saved.mean_)


def test_warm_start_refuses_another_head_or_other_rows(tmp_path):
    X, y = _rows(0)
    save_head(make_head("svm").fit(X, y), tmp_path / "svm")
    with pytest.raises(ConfigError, match="SVMHead, not a MLPHead"):
        make_head("mlp", {"hidden": 4, "warm_start_from": str(tmp_path / "svm")}).fit(X, y)
    with pytest.raises(DataUnusable, match="reads 5 features"):
        make_head("svm", {"warm_start_from": str(tmp_path / "svm")}).fit(X[:, :3], y)
    save_head(make_head("mlp", {"hidden": 4, "epochs": 1}).fit(X, y), tmp_path / "mlp")
    with pytest.raises(ConfigError, match="hidden width"):
        make_head("mlp", {"hidden": 8, "warm_start_from": str(tmp_path / "mlp")}).fit(X, y)


def test_train_on_several_features_folders(tmp_path):
    """Heads train on the union of the folders' rows; train.json records each folder."""
    import json

    from pipeline.config import TrainConfig
    from pipeline.features import load_feature_union, load_features
    from pipeline.train import train_heads
    from tests.helpers import write_features

    a = write_features(tmp_path / "a", n=60, seed=0)
    b = write_features(tmp_path / "b", n=90, seed=1)
    cfg = TrainConfig(heads=["svm"], calibration="none")
    report = train_heads([a, b], tmp_path / "models", cfg=cfg, kind="item", seed=0)
    info = json.loads((tmp_path / "models" / "svm" / "train.json").read_text())
    assert [d["path"] for d in info["features_dirs"]] == [str(a), str(b)]
    union = load_feature_union([a, b], "item", splits=("train", "val"))
    n_train = len(load_features(a, "item", ("train",)).y) + len(
        load_features(b, "item", ("train",)).y
    )
    assert report["svm"]["n_train"] == n_train == len(union.where("train").y)
    # The same head as fitting the union's rows directly.
    direct = make_head("svm", {"C": 1.0, "random_state": 0}).fit(
        union.where("train").X,
        union.where("train").y,
        X_val=union.where("val").X,
        y_val=union.where("val").y,
    )
    np.testing.assert_allclose(load_head(tmp_path / "models" / "svm").coef_, direct.coef_)


def test_tip_adapter_f_continues_from_the_saved_cache(tmp_path):
    X, y = _rows(0)
    params = {"finetune": True, "epochs": 2, "n_shots": 8, "alpha_grid": None, "beta_grid": None}
    saved = make_head("tip_adapter", {**params, "standardize": True}).fit(X, y)
    save_head(saved, tmp_path / "a")
    X2, y2 = _rows(1)
    warm = {**params, "warm_start_from": str(tmp_path / "a")}
    same = make_head("tip_adapter", {**warm, "epochs": 0}).fit(X2, y2)
    np.testing.assert_array_equal(same.cache_keys_, saved.cache_keys_)
    np.testing.assert_allclose(same.predict_proba(X2), saved.predict_proba(X2))
    tuned = make_head("tip_adapter", {**warm, "epochs": 1, "lr": 1e-4}).fit(X2, y2)
    moved = np.abs(tuned.cache_keys_ - saved.cache_keys_).max()
    assert 0 < moved < 0.01
    np.testing.assert_array_equal(tuned.cache_labels_, saved.cache_labels_)
