"""Train heads on cached features (train split; selection on val only) and score them."""

from __future__ import annotations

import inspect
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import TrainConfig
from pipeline.features import FeatureSet, load_features

logger = logging.getLogger(__name__)

# Heads whose targets are generator names (attribution) rather than 0/1.
ATTRIBUTION_HEADS = ("multitask",)
TRAIN_INFO = "train.json"


def head_params(cfg: TrainConfig, name: str, seed: int) -> dict[str, Any]:
    from pipeline.heads import HEADS

    if name not in HEADS:
        raise ValueError(f"train.heads names unknown head {name!r}; known heads: {sorted(HEADS)}")
    params = dict(getattr(cfg, name, {}) or {})
    if "random_state" in HEADS[name]().get_params():
        params.setdefault("random_state", seed)
    return params


def targets(fs: FeatureSet, name: str) -> np.ndarray:
    """0/1 labels for detection heads; class names ('real' or the generator) for attribution."""
    if name in ATTRIBUTION_HEADS:
        return np.where(fs.y == 0, "real", fs.generator).astype(str)
    return fs.y


def _fit(head: Any, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray) -> Any:
    accepts_val = "X_val" in inspect.signature(head.fit).parameters
    if accepts_val and len(X_val):
        # Validation rows whose class the head never saw in train cannot inform selection.
        keep = np.isin(y_val, np.unique(y))
        if keep.any():
            return head.fit(X, y, X_val=X_val[keep], y_val=y_val[keep])
    return head.fit(X, y)


def train_heads(features_dir: str | Path, out_dir: str | Path, cfg: TrainConfig, kind: str,
                seed: int) -> dict[str, Any]:  # fmt: skip
    """Fit every head of `cfg.heads` on train (val for selection) and save each to out_dir/<name>.

    Test rows are never loaded here.
    """
    from pipeline.heads import make_head, save_head

    out_dir = Path(out_dir)
    fs = load_features(features_dir, kind, splits=("train", "val"))
    train, val = fs.where("train"), fs.where("val")
    if len(np.unique(train.y)) < 2:
        raise ValueError(
            f"the train split of {features_dir} has {len(train.y)} rows of a single class; a "
            "detector needs real and generated images in train"
        )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    report: dict[str, Any] = {}
    for name in cfg.heads:
        params = head_params(cfg, name, seed)
        head = make_head(name, params)
        logger.info("training %s on %d rows (%s features, dim %d)", name, len(train.y), kind,
                    train.X.shape[1])  # fmt: skip
        _fit(head, train.X, targets(train, name), val.X, targets(val, name))
        save_head(head, out_dir / name)
        info = {
            "head": name,
            "kind": kind,
            "params": params,
            "n_train": int(len(train.y)),
            "n_val": int(len(val.y)),
            "features_dir": str(features_dir),
        }
        if len(val.y) and len(np.unique(val.y)) == 2:
            from pipeline.evaluate import threshold_for_balanced_accuracy

            p_val = p_generated(head, val.X)
            info["val_threshold_balanced_acc"] = float(
                threshold_for_balanced_accuracy(val.y, p_val)
            )
        (out_dir / name / TRAIN_INFO).write_text(json.dumps(info, indent=2, default=str) + "\n")
        report[name] = info
    return report


def p_generated(head: Any, X: np.ndarray) -> np.ndarray:
    """Probability that each row is generated, whatever the head's classes."""
    if hasattr(head, "p_generated"):
        return np.asarray(head.p_generated(X), dtype=np.float64)
    proba = head.predict_proba(X)
    classes = list(head.classes_)
    if 1 in classes:
        return proba[:, classes.index(1)]
    if "real" in classes:
        return 1.0 - proba[:, classes.index("real")]
    raise ValueError(f"cannot tell which class of {classes} means 'generated'")


def trained_heads(heads_dir: str | Path) -> list[Path]:
    found = sorted(p.parent for p in Path(heads_dir).glob(f"*/{TRAIN_INFO}"))
    if not found:
        raise FileNotFoundError(f"no trained heads in {heads_dir}; run the train stage first")
    return found
