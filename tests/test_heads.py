"""Heads: scikit-learn API checks, accuracy against the Bayes rate, save/load, registry."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax
from scipy.stats import norm
from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks

from pipeline.errors import ModelFileError
from pipeline.heads import (
    HEADS,
    MetaHead,
    MLPHead,
    MultiTaskHead,
    SVMHead,
    TipAdapterHead,
    UFDProbeHead,
    load_head,
    make_head,
    save_head,
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    # Heads are tiny: a second OpenMP thread on a 2-core box only adds contention.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- scikit-learn estimator checks ---------------------------------------------------------------

CHECKED_HEADS = [
    MLPHead(hidden=64),
    SVMHead(),
    MultiTaskHead(hidden=64),
    TipAdapterHead(),
    TipAdapterHead(finetune=True),
    # Torch-free base heads keep the stacking checks fast; MLP inside MetaHead is exercised by
    # the accuracy and save/load tests below.
    MetaHead(base_heads=("svm", "tip_adapter"), n_folds=3),
]


def _expected_failures(estimator: object) -> dict[str, str]:
    if isinstance(estimator, MetaHead):
        return {
            "check_fit2d_1feature": (
                "10 rows in 3 classes: the nested stratified folds (3 stacking folds, then 3 SVM "
                "calibration folds) leave a class with fewer rows than folds, and SVMHead raises "
                "a ValueError naming that class rather than calibrating on too few rows"
            )
        }
    return {}


@parametrize_with_checks(
    CHECKED_HEADS, expected_failed_checks=_expected_failures, xfail_strict=True
)
def test_sklearn_compatible(estimator: object, check: Callable[[object], None]) -> None:
    check(estimator)


# --- synthetic problems with a known Bayes accuracy ----------------------------------------------


@dataclass
class Problem:
    """Labelled samples in CLIP-like coordinates: big common offset, scales over 3 decades."""

    sample: Callable[[int, np.random.RandomState], tuple[np.ndarray, np.ndarray]]
    bayes_accuracy: float


def _clip_like(d: int, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    offset = 50.0 + 10.0 * rng.randn(d)
    scales = np.logspace(-2, 1, d)
    return offset, scales


def gaussian_pair(d: int = 16, delta: float = 2.5) -> Problem:
    """Two equiprobable Gaussians with shared diagonal covariance and Mahalanobis distance delta.

    The Bayes rule is linear and its accuracy is Φ(delta / 2).
    """
    rng = np.random.RandomState(0)
    direction = rng.randn(d)
    half_gap = 0.5 * delta * direction / np.linalg.norm(direction)
    offset, scales = _clip_like(d, rng)

    def sample(n: int, r: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
        y = r.randint(0, 2, n)
        z = r.randn(n, d) + np.where(y[:, None] == 1, half_gap, -half_gap)
        return offset + scales * z, y

    return Problem(sample, float(norm.cdf(delta / 2)))


def gaussian_xor(d: int = 8, a: float = 2.0) -> Problem:
    """Unit Gaussians at (±a, ±a) in two of d dimensions, label = same signs (XOR).

    The Bayes rule is sign(x1·x2) (the posterior ratio is cosh(a(x1+x2)) / cosh(a(x1−x2))), so
    a row is classified correctly iff both coordinates keep their sign or both flip:
    Φ(a)² + (1 − Φ(a))². No linear rule beats chance.
    """
    rng = np.random.RandomState(1)
    offset, scales = _clip_like(d, rng)

    def sample(n: int, r: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
        signs = r.choice([-1.0, 1.0], size=(n, 2))
        z = r.randn(n, d)
        z[:, :2] += a * signs
        return offset + scales * z, (signs[:, 0] == signs[:, 1]).astype(int)

    return Problem(sample, float(norm.cdf(a) ** 2 + norm.cdf(-a) ** 2))


def _splits(problem: Problem, n_train: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    r = np.random.RandomState(2)
    return {
        "train": problem.sample(n_train, r),
        "val": problem.sample(1000, r),
        "test": problem.sample(20000, r),
    }


@pytest.fixture(scope="module")
def gaussian_data() -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
    problem = gaussian_pair()
    return _splits(problem, 4000), problem.bayes_accuracy


@pytest.fixture(scope="module")
def xor_data() -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
    problem = gaussian_xor()
    return _splits(problem, 4000), problem.bayes_accuracy


def _accuracy(head: object, data: dict, use_val: bool, labels: Callable = lambda y: y) -> float:
    X, y = data["train"]
    kwargs = {}
    if use_val:
        kwargs = {"X_val": data["val"][0], "y_val": labels(data["val"][1])}
    head.fit(X, labels(y), **kwargs)  # type: ignore[attr-defined]
    X_test, y_test = data["test"]
    return float(np.mean(head.predict(X_test) == labels(y_test)))  # type: ignore[attr-defined]


def _as_real_or_generated(y: np.ndarray) -> np.ndarray:
    return np.where(y == 1, "sdxl", "real")


# Upper tolerance: 20 000 test rows give a standard error of about 0.2 points on the accuracy.
SAMPLING_SLACK = 0.01

GAUSSIAN_CASES = {
    # name: (head, fit with validation rows, label transform)
    "mlp_val": (MLPHead(), True, None),
    "mlp_small_no_val": (MLPHead(hidden=128), False, None),
    "svm": (SVMHead(), False, None),
    "svm_val": (SVMHead(), True, None),
    "multitask_val": (MultiTaskHead(hidden=128), True, _as_real_or_generated),
    # A kernel classifier over every training row (not the paper's 16-shot default).
    "tip_adapter": (TipAdapterHead(n_shots=None, standardize=True), False, None),
    "tip_adapter_f_val": (TipAdapterHead(finetune=True, n_shots=64, standardize=True), True, None),
    "meta": (MetaHead(base_heads=(("mlp", {"hidden": 64}), "svm"), n_folds=3), False, None),
}


@pytest.mark.parametrize("case", list(GAUSSIAN_CASES))
def test_linear_gaussians_reach_bayes(gaussian_data: tuple, case: str) -> None:
    data, bayes = gaussian_data
    head, use_val, labels = GAUSSIAN_CASES[case]
    accuracy = _accuracy(clone(head), data, use_val, labels or (lambda y: y))
    assert accuracy >= 0.98 * bayes, f"{case}: accuracy {accuracy:.4f}, Bayes {bayes:.4f}"
    assert accuracy <= bayes + SAMPLING_SLACK, f"{case}: {accuracy:.4f} beats Bayes {bayes:.4f}"


XOR_CASES = {
    "mlp_val": (MLPHead(), True, None),
    "multitask": (MultiTaskHead(hidden=128), False, _as_real_or_generated),
}


@pytest.mark.parametrize("case", list(XOR_CASES))
def test_xor_reaches_bayes(xor_data: tuple, case: str) -> None:
    data, bayes = xor_data
    head, use_val, labels = XOR_CASES[case]
    accuracy = _accuracy(clone(head), data, use_val, labels or (lambda y: y))
    assert accuracy >= 0.98 * bayes, f"{case}: accuracy {accuracy:.4f}, Bayes {bayes:.4f}"
    assert accuracy <= bayes + SAMPLING_SLACK


def test_xor_defeats_a_linear_head(xor_data: tuple) -> None:
    # The XOR problem really needs the hidden layer: the same check on a linear SVM fails.
    data, bayes = xor_data
    accuracy = _accuracy(SVMHead(), data, use_val=False)
    assert accuracy < 0.6 < 0.98 * bayes


# --- multi-task head: detection plus attribution -------------------------------------------------

GENERATORS = ("dalle3", "midjourney", "sd21", "sdxl")
PRIORS = np.array([0.4, 0.15, 0.15, 0.15, 0.15])  # real first, then GENERATORS


@pytest.fixture(scope="module")
def generator_data() -> dict:
    """Real rows plus four generators: Gaussians with one shared anisotropic covariance."""
    d = 12
    rng = np.random.RandomState(3)
    offset, scales = _clip_like(d, rng)
    means = 0.6 * rng.randn(len(PRIORS), d)  # in whitened coordinates
    names = np.array(("real", *GENERATORS))

    def sample(n: int, r: np.random.RandomState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k = r.choice(len(PRIORS), size=n, p=PRIORS)
        z = r.randn(n, d) + means[k]
        # Exact posterior: equal covariances, so log p(k | x) = −|z − μ_k|²/2 + log π_k + c.
        log_post = -0.5 * ((z[:, None, :] - means[None]) ** 2).sum(-1) + np.log(PRIORS)
        post = np.exp(log_post - logsumexp(log_post, axis=1, keepdims=True))
        return offset + scales * z, names[k], post

    r = np.random.RandomState(4)
    X, y, _ = sample(6000, r)
    X_val, y_val, _ = sample(1000, r)
    X_test, y_test, post = sample(20000, r)
    return {
        "train": (X, y),
        "val": (X_val, y_val),
        "test": (X_test, y_test, post),
        "names": names,
    }


@pytest.fixture(scope="module")
def fitted_multitask(generator_data: dict) -> MultiTaskHead:
    X, y = generator_data["train"]
    X_val, y_val = generator_data["val"]
    return MultiTaskHead(hidden=128).fit(X, y, X_val=X_val, y_val=y_val)


def test_multitask_attribution_reaches_bayes(
    generator_data: dict, fitted_multitask: MultiTaskHead
) -> None:
    X_test, y_test, post = generator_data["test"]
    names = generator_data["names"]
    head = fitted_multitask
    assert head.classes_.tolist() == sorted(names.tolist())

    bayes_full = np.mean(names[post.argmax(1)] == y_test)
    accuracy = np.mean(head.predict(X_test) == y_test)
    assert accuracy >= 0.98 * bayes_full, f"{accuracy:.4f} vs Bayes {bayes_full:.4f}"

    is_real_bayes = np.mean((post[:, 0] > 0.5) == (y_test == "real"))
    is_real = np.mean((head.p_generated(X_test) < 0.5) == (y_test == "real"))
    assert is_real >= 0.98 * is_real_bayes

    # Attribution among generated rows: the conditional argmax over generators.
    generated = y_test != "real"
    bayes_attr = np.mean(names[1:][post[generated, 1:].argmax(1)] == y_test[generated])
    proba = head.predict_proba(X_test[generated])
    gen_cols = [head.classes_.tolist().index(g) for g in GENERATORS]
    attr = np.array(GENERATORS)[proba[:, gen_cols].argmax(1)]
    attribution = np.mean(attr == y_test[generated])
    assert attribution >= 0.98 * bayes_attr, f"{attribution:.4f} vs Bayes {bayes_attr:.4f}"
    assert attribution <= bayes_attr + SAMPLING_SLACK


def test_multitask_outputs_are_consistent(
    generator_data: dict, fitted_multitask: MultiTaskHead
) -> None:
    X_test = generator_data["test"][0][:2000]
    head = fitted_multitask
    pred = head.predict(X_test)
    proba = head.predict_proba(X_test)
    p_gen = head.p_generated(X_test)
    assert set(pred.tolist()) <= {"real", *GENERATORS}
    assert {"real", *GENERATORS} <= set(pred.tolist())
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    real_col = head.classes_.tolist().index("real")
    np.testing.assert_allclose(proba[:, real_col], 1.0 - p_gen, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(pred == "real", p_gen < 0.5)
    generated = pred != "real"
    top = head.classes_[np.argmax(np.where(np.arange(5) == real_col, -1.0, proba), axis=1)]
    np.testing.assert_array_equal(pred[generated], top[generated])


def test_multitask_family_map(generator_data: dict) -> None:
    X, y = generator_data["train"]
    family_map = {"sd21": "stable_diffusion", "sdxl": "stable_diffusion"}
    family_map |= {"dalle3": "dalle", "midjourney": "midjourney"}
    head = MultiTaskHead(hidden=32, epochs=5, family_map=family_map).fit(X[:1500], y[:1500])
    assert head.classes_.tolist() == ["dalle", "midjourney", "real", "stable_diffusion"]
    assert set(head.predict(X[:500]).tolist()) <= set(head.classes_.tolist())

    partial = {"sd21": "stable_diffusion"}
    with pytest.raises(ValueError, match=r"\['dalle3', 'midjourney', 'sdxl'\].*family_map"):
        MultiTaskHead(family_map=partial).fit(X[:100], y[:100])


def test_multitask_without_real_rows_attributes_only() -> None:
    rng = np.random.RandomState(0)
    X = rng.randn(200, 4) + 100.0
    y = np.where(X[:, 0] > 100.0, "sdxl", "dalle3")
    head = MultiTaskHead(hidden=32).fit(X, y)
    assert head.classes_.tolist() == ["dalle3", "sdxl"]
    np.testing.assert_array_equal(head.p_generated(X), 1.0)
    assert np.mean(head.predict(X) == y) > 0.9


# --- Tip-Adapter formula --------------------------------------------------------------------------


def test_tip_adapter_logits_match_hand_computation() -> None:
    # Cache: three training rows, text embeddings for the two classes, one query row.
    X_train = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y_train = np.array(["fake", "real", "real"])
    text = np.array([[1.0, 1.0], [1.0, -1.0]])  # "fake", "real" prompts
    head = TipAdapterHead(
        alpha=1.5, beta=2.0, class_text_emb=text, clip_logit_scale=10.0, standardize=False
    ).fit(X_train, y_train)
    # Query (3, 4) normalises to (0.6, 0.8); cosines with the keys are 0.6, 0.8 and 1.4/√2.
    expected_fake = 1.5 * math.exp(-2.0 * (1 - 0.6)) + 10.0 * (0.6 + 0.8) / math.sqrt(2)
    expected_real = 1.5 * (
        math.exp(-2.0 * (1 - 0.8)) + math.exp(-2.0 * (1 - 1.4 / math.sqrt(2)))
    ) + 10.0 * (0.6 - 0.8) / math.sqrt(2)
    logits = head.logits(np.array([[3.0, 4.0]]))
    np.testing.assert_allclose(logits, [[expected_fake, expected_real]], rtol=1e-12)
    proba = head.predict_proba(np.array([[3.0, 4.0]]))
    np.testing.assert_allclose(proba, softmax(logits, axis=1), rtol=1e-12)
    assert head.predict(np.array([[3.0, 4.0]])).tolist() == ["fake"]

    # Without text embeddings the zero-shot term is dropped.
    cache_only = TipAdapterHead(alpha=1.5, beta=2.0, standardize=False).fit(X_train, y_train)
    zero_shot = 10.0 * np.array([1.4, -0.2]) / math.sqrt(2)
    np.testing.assert_allclose(
        cache_only.logits(np.array([[3.0, 4.0]])), logits - zero_shot, rtol=1e-12
    )


def test_tip_adapter_standardises_cache_features() -> None:
    rng = np.random.RandomState(0)
    X = 30.0 + rng.randn(12, 3) * [0.1, 1.0, 5.0]
    y = np.array([0, 1] * 6)
    text = rng.randn(2, 3)
    head = TipAdapterHead(
        alpha=0.7, beta=4.0, class_text_emb=text, clip_logit_scale=100.0, standardize=True
    )
    head.fit(X, y)
    query = 30.0 + rng.randn(5, 3)

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    mean, std = X.mean(0), X.std(0)
    keys, f = unit((X - mean) / std), unit((query - mean) / std)
    cache = np.exp(-4.0 * (1.0 - f @ keys.T)) @ np.eye(2)[y]
    expected = 0.7 * cache + 100.0 * unit(query) @ unit(text).T
    np.testing.assert_allclose(head.logits(query), expected, rtol=1e-10)


def test_tip_adapter_rejects_mismatched_text_embeddings() -> None:
    X, y = np.eye(4), np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"class_text_emb has shape \(3, 4\).*\(2, 4\)"):
        TipAdapterHead(class_text_emb=np.ones((3, 4))).fit(X, y)


def test_tip_adapter_f_changes_keys_and_selects_on_val(gaussian_data: tuple) -> None:
    data, _ = gaussian_data
    (X, y), (X_val, y_val) = data["train"], data["val"]
    plain = TipAdapterHead(n_shots=16).fit(X, y)
    tuned = TipAdapterHead(n_shots=16, finetune=True, epochs=5).fit(X, y, X_val=X_val, y_val=y_val)
    assert not np.allclose(plain.cache_keys_, tuned.cache_keys_)
    assert 1 <= tuned.best_epoch_ <= 5
    assert tuned.alpha_ in TipAdapterHead().alpha_grid
    assert tuned.beta_ in TipAdapterHead().beta_grid
    assert tuned.alpha == 1.0 and tuned.beta == 5.5  # hyperparameters are left untouched


# --- save / load ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_multiclass() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(5)
    means = rng.randn(3, 6) * 2
    k = rng.randint(0, 3, 240)
    X = 20.0 + (means[k] + rng.randn(240, 6)) * np.logspace(-1, 1, 6)
    return X, np.array(["dalle3", "real", "sdxl"])[k]


SAVE_CASES = {
    "mlp": MLPHead(hidden=32, epochs=10),
    "svm": SVMHead(),
    "multitask": MultiTaskHead(hidden=32, epochs=10, family_map={"dalle3": "dalle", "sdxl": "sd"}),
    "tip_adapter": TipAdapterHead(class_text_emb=np.random.RandomState(6).randn(3, 6)),
    "tip_adapter_f": TipAdapterHead(finetune=True, epochs=3, n_shots=20),
    "meta": MetaHead(base_heads=(("mlp", {"hidden": 16, "epochs": 5}), "svm"), n_folds=3),
}


@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_save_load_round_trip(case: str, small_multiclass: tuple, tmp_path: Path) -> None:
    X, y = small_multiclass
    head = clone(SAVE_CASES[case]).fit(X[:200], y[:200])
    save_head(head, tmp_path / case)

    files = sorted(p.relative_to(tmp_path / case).as_posix() for p in (tmp_path / case).rglob("*"))
    assert "head.json" in files and "weights.safetensors" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".joblib"))]
    meta = json.loads((tmp_path / case / "head.json").read_text())
    assert meta["head"] == case.removesuffix("_f") and meta["class"] == type(head).__name__

    loaded = load_head(tmp_path / case)
    assert type(loaded) is type(head)
    np.testing.assert_array_equal(loaded.classes_, head.classes_)
    assert loaded.classes_.dtype == head.classes_.dtype
    np.testing.assert_allclose(loaded.predict_proba(X), head.predict_proba(X), rtol=1e-12, atol=0)
    np.testing.assert_array_equal(loaded.predict(X), head.predict(X))
    for key, value in head.get_params(deep=False).items():
        np.testing.assert_equal(loaded.get_params(deep=False)[key], value)


def test_meta_saves_base_heads_in_subdirectories(small_multiclass: tuple, tmp_path: Path) -> None:
    X, y = small_multiclass
    head = clone(SAVE_CASES["meta"]).fit(X, y)
    save_head(head, tmp_path)
    assert json.loads((tmp_path / "head.json").read_text())["children"] == [
        "base_00_mlp",
        "base_01_svm",
    ]
    assert (tmp_path / "base_00_mlp" / "weights.safetensors").is_file()
    assert json.loads((tmp_path / "base_01_svm" / "head.json").read_text())["head"] == "svm"


def test_integer_labels_keep_their_dtype(tmp_path: Path) -> None:
    rng = np.random.RandomState(0)
    X, y = rng.randn(60, 3), np.array([3, 7] * 30, dtype=np.int32)
    head = SVMHead().fit(X, y)
    save_head(head, tmp_path)
    loaded = load_head(tmp_path)
    assert loaded.classes_.dtype == np.int32 and loaded.predict(X).dtype == np.int32


def test_save_rejects_unfitted_and_foreign_estimators(tmp_path: Path) -> None:
    from sklearn.exceptions import NotFittedError
    from sklearn.linear_model import LogisticRegression

    with pytest.raises(NotFittedError):
        save_head(MLPHead(), tmp_path)
    with pytest.raises(ValueError, match="LogisticRegression is not a registered head"):
        save_head(LogisticRegression(), tmp_path)
    with pytest.raises(ModelFileError, match="no head.json"):
        load_head(tmp_path / "missing")


# --- registry, validation, determinism -----------------------------------------------------------


def test_registry_names() -> None:
    assert HEADS == {
        "mlp": MLPHead,
        "svm": SVMHead,
        "multitask": MultiTaskHead,
        "tip_adapter": TipAdapterHead,
        "meta": MetaHead,
        "ufd_probe": UFDProbeHead,
    }
    assert make_head("mlp", {"hidden": 8}).get_params()["hidden"] == 8
    for name, cls in HEADS.items():
        assert type(make_head(name, {})) is cls


def test_make_head_rejects_unknown_names_with_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown head 'xgboost'.*\['meta', 'mlp', 'multitask'"):
        make_head("xgboost", {})
    with pytest.raises(ValueError, match=r"\['hiden'\] for head 'mlp'.*'hidden', 'epochs'"):
        make_head("mlp", {"hiden": 16})


def test_meta_rejects_bad_configuration_before_training() -> None:
    X, y = np.random.RandomState(0).randn(40, 3), np.array([0, 1] * 20)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['depth'\] for head 'svm'"):
        MetaHead(base_heads=("mlp", ("svm", {"depth": 3}))).fit(X, y)
    with pytest.raises(ValueError, match=r"final='xgboost'.*\('logistic',\)"):
        MetaHead(final="xgboost").fit(X, y)
    with pytest.raises(ValueError, match="n_folds=5 rows of every class.*has 3"):
        MetaHead(base_heads=("svm",)).fit(X[:23], np.r_[y[:20], [2, 2, 2]])


def test_validation_data_is_checked() -> None:
    X, y = np.random.RandomState(0).randn(40, 3), np.array(["a", "b"] * 20)
    with pytest.raises(ValueError, match="only one of X_val / y_val"):
        SVMHead().fit(X, y, X_val=X)
    with pytest.raises(ValueError, match=r"labels \['c'\] that are not in the training classes"):
        MLPHead(epochs=1).fit(X, y, X_val=X[:2], y_val=["a", "c"])
    with pytest.raises(ValueError, match="X_val has 2 features but X has 3"):
        TipAdapterHead().fit(X, y, X_val=X[:, :2], y_val=y)


def test_torch_heads_are_repeatable_and_leave_global_rng_alone() -> None:
    rng = np.random.RandomState(0)
    X, y = rng.randn(100, 5), rng.randint(0, 3, 100)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = MLPHead(hidden=16, epochs=5, random_state=7).fit(X, y).predict_proba(X)
    again = MLPHead(hidden=16, epochs=5, random_state=7).fit(X, y).predict_proba(X)
    other = MLPHead(hidden=16, epochs=5, random_state=8).fit(X, y).predict_proba(X)
    assert torch.equal(before, torch.random.get_rng_state())
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


def test_mlp_picks_best_epoch_on_validation(gaussian_data: tuple) -> None:
    data, _ = gaussian_data
    (X, y), (X_val, y_val) = data["train"], data["val"]
    head = MLPHead(hidden=64, epochs=30).fit(X[:1000], y[:1000], X_val=X_val, y_val=y_val)
    assert 1 <= head.best_epoch_ <= 30 and head.val_loss_ is not None
    proba = head.predict_proba(X_val)
    val_loss = -np.mean(np.log(proba[np.arange(len(y_val)), y_val]))
    assert val_loss == pytest.approx(head.val_loss_, rel=1e-4)
    no_val = MLPHead(hidden=64, epochs=30).fit(X[:1000], y[:1000])
    assert no_val.best_epoch_ == 30 and no_val.val_loss_ is None


def test_tip_adapter_defaults_are_the_official_formula() -> None:
    """TipAdapterHead() on L2-normalised features against Tip-Adapter's main.py, written out:
    affinity = f·Fᵀ, cache_logits = exp(−(β − β·affinity))·L, clip = 100·f·Wᵀ,
    tip_logits = clip + α·cache, over a seeded cache of 16 shots per class."""
    rng = np.random.RandomState(3)
    n, d = 400, 32
    y = rng.randint(0, 2, n)
    X = rng.randn(n, d) + 0.8 * np.outer(2 * y - 1, rng.randn(d))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    text = rng.randn(2, d)
    query = rng.randn(50, d)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    head = TipAdapterHead(class_text_emb=text).fit(X, y)

    rows = head.cache_rows_
    assert len(rows) == 32 and np.bincount(y[rows]).tolist() == [16, 16]
    again = TipAdapterHead(class_text_emb=text).fit(X, y)
    np.testing.assert_array_equal(again.cache_rows_, rows)  # seeded
    # Official Tip-Adapter (torch code in main.py), in numpy:
    cache_keys = X[rows].T  # (d, n_cache), already L2-normalised
    cache_values = np.eye(2)[y[rows]]
    clip_weights = (text / np.linalg.norm(text, axis=1, keepdims=True)).T
    alpha, beta = 1.0, 5.5
    affinity = query @ cache_keys
    cache_logits = np.exp((-1) * (beta - beta * affinity)) @ cache_values
    clip_logits = 100.0 * query @ clip_weights
    tip_logits = clip_logits + cache_logits * alpha
    expected = softmax(tip_logits, axis=1)
    assert np.max(np.abs(head.predict_proba(query) - expected)) <= 1e-6


# --- the SVM's own solver, and heads that hold no copy of their features -------------------------


def _svm_data(n: int, d: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, d))
    # A common offset and unequal spreads, as CLIP difference features have.
    X = (centres[y] + rng.normal(size=(n, d))) * rng.uniform(0.2, 3.0, d) + 4.0
    return X, y


@pytest.mark.parametrize("C", [0.01, 1.0, 30.0])
@pytest.mark.parametrize("classes", [2, 3])
def test_svm_solves_linearsvcs_problem(C: float, classes: int) -> None:
    """The Newton solver reaches liblinear's optimum (LinearSVC, primal, bias regularised),
    one-vs-rest, on the head's own standardisation."""
    from sklearn.svm import LinearSVC

    from pipeline.heads.blocks import standardise

    X, y = _svm_data(600, 10, classes)
    head = SVMHead(C=C, tol=1e-10).fit(X, y)
    Z = standardise(X, head.mean_, head.scale_)
    ref = LinearSVC(C=C, dual=False, tol=1e-12, max_iter=100_000).fit(Z, y)
    scale = np.abs(ref.coef_).max()
    np.testing.assert_allclose(head.coef_, ref.coef_, atol=1e-6 * scale)
    np.testing.assert_allclose(head.intercept_, ref.intercept_, atol=1e-6 * scale)


def test_squared_hinge_rows_and_warm_start_give_the_same_optimum() -> None:
    """Fitting on `rows` equals fitting on the copied rows; a warm start and a Hessian made
    from the Gram matrix minus the inactive rows change nothing; float32 input gives the
    float64 result (standardised in float64 either way)."""
    from pipeline.heads.blocks import fit_standardiser
    from pipeline.heads.svm import augmented_gram, fit_squared_hinge

    X, y = _svm_data(20_000, 6, 2, seed=3)  # more than two row blocks
    mean, scale = fit_standardiser(X)
    pm = np.where(y == 1, 1.0, -1.0)
    rows = np.flatnonzero(np.arange(len(X)) % 3 != 1)
    kw = {"tol": 1e-12, "max_iter": 200}
    on_rows, _ = fit_squared_hinge(X, mean, scale, pm[rows], 0.5, rows=rows, **kw)
    on_copy, _ = fit_squared_hinge(X[rows], mean, scale, pm[rows], 0.5, **kw)
    warm, _ = fit_squared_hinge(X[rows], mean, scale, pm[rows], 0.5, init=on_copy * 3, **kw)
    f32, _ = fit_squared_hinge(X.astype(np.float32), mean, scale, pm, 0.5, **kw)
    f64, _ = fit_squared_hinge(X.astype(np.float32).astype(np.float64), mean, scale, pm, 0.5, **kw)
    gram = augmented_gram(X, mean, scale, rows)
    via_gram, _ = fit_squared_hinge(X, mean, scale, pm[rows], 0.5, rows=rows, gram=gram, **kw)
    np.testing.assert_allclose(via_gram, on_copy, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(on_rows, on_copy, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(warm, on_copy, rtol=1e-7, atol=1e-10)
    np.testing.assert_array_equal(f32, f64)


@pytest.mark.parametrize(
    "head",
    [
        SVMHead(C_grid=(0.1, 1.0)),
        MLPHead(hidden=32, epochs=2, batch_size=256),
        MultiTaskHead(hidden=32, epochs=2, batch_size=256),
        TipAdapterHead(finetune=True, epochs=2, n_shots=4, alpha_grid=(1.0,), beta_grid=(1.0,)),
    ],
    ids=lambda h: type(h).__name__,
)
def test_heads_train_and_predict_without_copying_the_features(
    head: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fitting on float32 train/val views and predicting hold no NumPy temporary larger than
    a small fraction of the matrix (the old code made float64 and standardised copies).
    The row blocks are made small here so that the matrix is many blocks."""
    import tracemalloc

    from pipeline.heads import blocks

    monkeypatch.setattr(blocks, "_BLOCK_BYTES", 128 << 10)
    X, y = _svm_data(24_000, 128, 2, seed=5)
    X = X.astype(np.float32)
    if isinstance(head, MultiTaskHead):
        y = np.where(y == 0, "real", np.where(np.arange(len(y)) % 2, "gen_a", "gen_b"))
    train, val = slice(0, 18_000), slice(18_000, None)
    # Warm-up: the first fit imports modules (torch's optimiser machinery), which tracemalloc
    # would count.
    clone(head).fit(X[:2000], y[:2000], X_val=X[2000:3000], y_val=y[2000:3000])
    tracemalloc.start()
    try:
        head.fit(X[train], y[train], X_val=X[val], y_val=y[val])
        head.predict_proba(X)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.25 * X.nbytes, f"peak NumPy allocation {peak / X.nbytes:.2f}x the features"
