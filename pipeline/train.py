"""Train heads on cached features: fit on train, select and calibrate on val, never read test.

Each head is saved to `<out>/<name>/` (head.json + weights.safetensors) with `train.json`: the
feature kind it consumes, its params, the calibration fitted on val, the balanced-accuracy
threshold found on val, and pseudo-labelling counts.
"""

from __future__ import annotations

import inspect
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, logit

from pipeline import store
from pipeline.config import ConfigError, TrainConfig
from pipeline.features import CLASS_PROMPTS, FeatureSet, load_features

logger = logging.getLogger(__name__)

# Heads whose targets are class names ('real' or a generator/family) rather than 0/1.
ATTRIBUTION_HEADS = ("multitask",)
TRAIN_INFO = "train.json"
REAL = "real"


def head_params(cfg: TrainConfig, name: str, seed: int) -> dict[str, Any]:
    from pipeline.heads import HEADS, valid_params

    if name not in HEADS:
        raise ConfigError(
            f"train.heads names unknown head {name!r}; known heads: {', '.join(sorted(HEADS))}"
        )
    params = dict(getattr(cfg, name, {}) or {})
    if "random_state" in valid_params(name):
        params.setdefault("random_state", seed)
    return params


def head_kind(cfg: TrainConfig, name: str, default_kind: str) -> str:
    return cfg.head_kinds.get(name, default_kind)


def targets(fs: FeatureSet, name: str, attribution_target: str = "generator") -> np.ndarray:
    """0/1 labels for detection heads; class names ('real' or the generator) for attribution."""
    if name in ATTRIBUTION_HEADS:
        source = fs.family if attribution_target == "family" else fs.generator
        return np.where(fs.y == 0, REAL, source).astype(str)
    return fs.y


def p_generated(head: Any, X: np.ndarray) -> np.ndarray:
    """Probability that each row is generated, whatever the head's classes."""
    if hasattr(head, "p_generated"):
        return np.asarray(head.p_generated(X), dtype=np.float64)
    proba = head.predict_proba(X)
    classes = list(head.classes_)
    if 1 in classes:
        return np.asarray(proba[:, classes.index(1)], dtype=np.float64)
    if REAL in classes:
        return 1.0 - np.asarray(proba[:, classes.index(REAL)], dtype=np.float64)
    raise ValueError(f"cannot tell which class of {classes} means 'generated'")


# ----------------------------------------------------------------------------- calibration


def _logit(p: np.ndarray) -> np.ndarray:
    return np.asarray(logit(np.clip(p, 1e-7, 1 - 1e-7)), dtype=np.float64)


def fit_calibration(method: str, p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Fit temperature (p' = σ(logit p / T)) or Platt (p' = σ(a·logit p + b)) on val by NLL."""
    if method == "none" or len(np.unique(y)) < 2:
        return {"a": 1.0, "b": 0.0}
    z = _logit(p)

    def nll(theta: np.ndarray) -> float:
        a, b = (theta[0], theta[1]) if method == "platt" else (np.exp(-theta[0]), 0.0)
        q = np.clip(expit(a * z + b), 1e-12, 1 - 1e-12)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))

    start = np.array([1.0, 0.0]) if method == "platt" else np.array([0.0])
    theta = minimize(nll, start, method="Nelder-Mead").x
    if method == "platt":
        return {"a": float(theta[0]), "b": float(theta[1])}
    return {"a": float(np.exp(-theta[0])), "b": 0.0, "temperature": float(np.exp(theta[0]))}


def apply_calibration(cal: dict[str, float], p: np.ndarray) -> np.ndarray:
    if cal.get("a", 1.0) == 1.0 and cal.get("b", 0.0) == 0.0:
        return np.asarray(p, dtype=np.float64)
    return np.asarray(expit(cal["a"] * _logit(p) + cal["b"]), dtype=np.float64)


# ------------------------------------------------------------------------------ training


def fit_head(head: Any, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray) -> Any:
    """Fit `head`, passing the val rows of known classes when the head selects on val."""
    accepts_val = "X_val" in inspect.signature(head.fit).parameters
    if accepts_val and len(X_val):
        # Validation rows of a class the head never saw in train cannot inform selection.
        keep = np.isin(y_val, np.unique(y))
        if keep.all():  # the usual case: no copy of the validation matrix
            return head.fit(X, y, X_val=X_val, y_val=y_val)
        if keep.any():
            return head.fit(X, y, X_val=X_val[keep], y_val=y_val[keep])
    return head.fit(X, y)


def _class_text_emb(features_dir: Path, n_classes: int) -> np.ndarray | None:
    path = Path(features_dir) / CLASS_PROMPTS
    if not path.exists():
        return None
    emb = store.read_shard(path, ["text_emb"])["text_emb"]
    return emb if len(emb) == n_classes else None


def _confident(head: Any, X: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose binary (and, for attribution heads, class) confidence reach `threshold`."""
    p = p_generated(head, X)
    keep = np.maximum(p, 1 - p) >= threshold
    pred = head.predict(X)
    if hasattr(head, "p_generated"):
        proba = head.predict_proba(X)
        classes = list(head.classes_)
        gen_cols = [i for i, c in enumerate(classes) if c != REAL]
        within = proba[:, gen_cols] / np.maximum(proba[:, gen_cols].sum(1, keepdims=True), 1e-12)
        keep &= (pred == REAL) | (within.max(1) >= threshold)
    return keep, pred


def pseudo_label(head: Any, pool: FeatureSet, threshold: float, seed: int) -> dict[str, Any]:
    """Confident predictions on `pool`, split 80/20 into train/val additions (seeded)."""
    keep, pred = _confident(head, pool.X, threshold)
    idx = np.flatnonzero(keep)
    rng = np.random.default_rng(seed)
    rng.shuffle(idx)
    n_train = int(round(0.8 * len(idx)))
    labels, counts = np.unique(pred[idx].astype(str), return_counts=True)
    return {
        "train": idx[:n_train],
        "val": idx[n_train:],
        "pred": pred,
        "report": {
            "n_pool": int(len(pool.y)),
            "n_added_train": n_train,
            "n_added_val": int(len(idx) - n_train),
            "threshold": threshold,
            "per_class": {str(k): int(v) for k, v in zip(labels, counts)},
        },
    }


def train_heads(
    features_dir: str | Path,
    out_dir: str | Path,
    cfg: TrainConfig,
    kind: str,
    seed: int,
    eval_split: str = "test",
) -> dict[str, Any]:
    """Fit every head of `cfg.heads` on train (val for selection and calibration).

    Rows of `eval_split` are never loaded, unless pseudo-labelling is explicitly allowed to
    use them as its unlabelled pool (then every head's `train.json` says `contaminated`).
    """
    from pipeline.heads import make_head, save_head

    pool_split = cfg.pseudo_pool if cfg.pseudo_label else None
    contaminated = pool_split == eval_split
    if contaminated and not cfg.pseudo_allow_eval_split:
        raise ConfigError(
            f"train.pseudo_pool={pool_split!r} is the evaluation split: pseudo-labels from it "
            "leak test information into training. Use another split, or set "
            "train.pseudo_allow_eval_split=true to accept contaminated metrics"
        )
    splits = ("train", "val") + ((pool_split,) if pool_split else ())
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    report: dict[str, Any] = {}
    # Each kind is read once and shared by the heads that use it (train/val are views of it).
    by_kind: dict[str, FeatureSet] = {}
    for name in cfg.heads:
        params = head_params(cfg, name, seed)
        name_kind = head_kind(cfg, name, kind)
        if name_kind not in by_kind:
            by_kind[name_kind] = load_features(features_dir, name_kind, splits=splits)
        fs = by_kind[name_kind]
        train, val = fs.where("train"), fs.where("val")
        if len(np.unique(train.y)) < 2:
            raise ValueError(
                f"the train split of {features_dir} has {len(train.y)} rows of a single class; "
                "a detector needs real and generated images in train"
            )
        y_train = targets(train, name, cfg.attribution_target)
        y_val = targets(val, name, cfg.attribution_target)
        if name == "tip_adapter" and "class_text_emb" not in params:
            emb = _class_text_emb(Path(features_dir), len(np.unique(y_train)))
            if emb is not None and name_kind == "image":
                params["class_text_emb"] = emb
            else:
                logger.warning(
                    "tip_adapter: no zero-shot term (needs features kind 'image' and the "
                    "class prompts of the encode stage; kind is %r)",
                    name_kind,
                )
        head = make_head(name, params)
        logger.info(
            "training %s on %d rows (%s features, dim %d)",
            name,
            len(train.y),
            name_kind,
            train.X.shape[1],
        )
        fit_head(head, train.X, y_train, val.X, y_val)
        info: dict[str, Any] = {
            "head": name,
            "kind": name_kind,
            "params": {k: v for k, v in params.items() if k != "class_text_emb"},
            "zero_shot_prompts": "class_text_emb" in params,
            "n_train": int(len(train.y)),
            "n_val": int(len(val.y)),
            "features_dir": str(features_dir),
            "contaminated": contaminated,
        }
        if name in ATTRIBUTION_HEADS:
            info["attribution_target"] = cfg.attribution_target
        pool = fs.where(pool_split) if pool_split else None
        if pool is not None and not len(pool.y):
            logger.warning("pseudo-labelling: the %r split is empty; nothing to add", pool_split)
            info["pseudo_labels"] = {"n_pool": 0}
        elif pool is not None:
            pl = pseudo_label(head, pool, cfg.pseudo_threshold, seed)
            pred = pl["pred"]
            pseudo_y = (
                pred.astype(str) if name in ATTRIBUTION_HEADS else (pred != 0).astype(np.int64)
            )
            X_tr = np.concatenate([train.X, pool.X[pl["train"]]])
            y_tr = np.concatenate([y_train, pseudo_y[pl["train"]]])
            X_va = np.concatenate([val.X, pool.X[pl["val"]]])
            y_va = np.concatenate([y_val, pseudo_y[pl["val"]]])
            head = make_head(name, params)
            fit_head(head, X_tr, y_tr, X_va, y_va)
            info["pseudo_labels"] = pl["report"]
            logger.info("%s pseudo-labels: %s", name, pl["report"])
        cal = {"a": 1.0, "b": 0.0}
        if len(val.y) and len(np.unique(val.y)) == 2:
            from pipeline.evaluate import threshold_for_balanced_accuracy

            p_val = p_generated(head, val.X)
            cal = fit_calibration(cfg.calibration, p_val, val.y)
            p_val = apply_calibration(cal, p_val)
            info["val_threshold"] = float(threshold_for_balanced_accuracy(val.y, p_val))
        info["calibration"] = {"method": cfg.calibration, **cal}
        save_head(head, out_dir / name)
        (out_dir / name / TRAIN_INFO).write_text(json.dumps(info, indent=2, default=str) + "\n")
        report[name] = info
    return report


def trained_heads(heads_dir: str | Path) -> list[Path]:
    found = sorted(p.parent for p in Path(heads_dir).glob(f"*/{TRAIN_INFO}"))
    if not found:
        raise FileNotFoundError(f"no trained heads in {heads_dir}; run the train stage first")
    return found


def read_train_info(head_dir: str | Path) -> dict[str, Any]:
    info: dict[str, Any] = json.loads((Path(head_dir) / TRAIN_INFO).read_text())
    return info
