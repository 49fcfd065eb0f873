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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ConfigError, TrainConfig
from pipeline.errors import DataUnusable, ModelFileError, shown
from pipeline.evaluation.calibration import apply_calibration, fit_calibration
from pipeline.evaluation.caption_sources import format_counts
from pipeline.evaluation.metrics import REAL_CLASS, p_generated, threshold_for_balanced_accuracy
from pipeline.features import (
    CLASS_PROMPTS,
    FeatureSet,
    feature_settings,
    load_feature_union,
)
from pipeline.heads import HEADS, head_class, make_head, save_head, valid_params
from pipeline.rows import store
from pipeline.rows.atomic import write_text

logger = logging.getLogger(__name__)

# Heads whose targets are class names ('real' or a generator/family) rather than 0/1.
# Heads that attribute images to their source (their registry capability).
ATTRIBUTION_HEADS = tuple(name for name, cls in HEADS.items() if cls.attributes_sources)
TRAIN_INFO = "train.json"
REAL = REAL_CLASS


def head_params(cfg: TrainConfig, name: str, seed: int) -> dict[str, Any]:
    if name not in HEADS:
        raise ConfigError(
            f"train.heads names unknown head {shown(name)}; known heads: {', '.join(sorted(HEADS))}"
        )
    params = dict(getattr(cfg, name, {}) or {})
    if "random_state" in valid_params(name):
        params.setdefault("random_state", seed)
    return params


def head_kind(cfg: TrainConfig, name: str, default_kind: str) -> str:
    """The features kind head `name` reads: `train.head_kinds`, else `default_kind`; a head
    made for one kind (its class's `feature_kind`, the UFD probe's `image_raw`) reads that
    one, and refuses another in `train.head_kinds`."""
    fixed = HEADS[name].feature_kind if name in HEADS else None
    if fixed is None:
        return cfg.head_kinds.get(name, default_kind)
    if cfg.head_kinds.get(name, fixed) != fixed:
        raise ConfigError(
            f"train.head_kinds.{name} = {shown(cfg.head_kinds[name])}, but {name} reads only the "
            f"features kind {shown(fixed)}; remove the entry or set it to {shown(fixed)}"
        )
    return str(fixed)


def targets(fs: FeatureSet, name: str, attribution_target: str = "generator") -> np.ndarray:
    """0/1 labels for detection heads; class names ('real' or the generator) for attribution."""
    if name in ATTRIBUTION_HEADS:
        source = fs.family if attribution_target == "family" else fs.generator
        return np.where(fs.y == 0, REAL, source).astype(str)
    return fs.y


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


def fit_configured_head(
    name: str,
    cfg: TrainConfig,
    train: FeatureSet,
    val: FeatureSet,
    *,
    kind: str,
    seed: int,
    features_dir: str | Path,
    extra_train: tuple[np.ndarray, np.ndarray] | None = None,
    extra_val: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The one way to fit a configured head: the train stage, the QF matrix and any later
    caller go through it, so every head gets the same inputs wherever it is trained.

    It builds the head from `train.<name>` (seeded), maps labels to the head's targets (0/1,
    or class names for attribution heads, see `targets`), gives Tip-Adapter the CLIP
    embeddings of the class prompts stored next to the features (zero-shot term, kind
    `image` only), and passes val for model selection (`fit_head`).

    Args:
        train, val: feature rows of kind `kind`; `val` may be empty.
        features_dir: where the class prompts (`class_prompts.h5`) are.
        extra_train, extra_val: (X, targets) rows added to train / val, targets already in
            the head's target space (pseudo-labels).

    Returns:
        The fitted head and a description of the fit (for `train.json`).
    """
    params = head_params(cfg, name, seed)
    if len(np.unique(train.y)) < 2:
        raise DataUnusable(
            f"the train split of {features_dir} has {len(train.y)} rows of a single class; "
            "a detector needs real and generated images in train"
        )
    X_tr, y_tr = train.X, targets(train, name, cfg.attribution_target)
    X_va, y_va = val.X, targets(val, name, cfg.attribution_target)
    if extra_train is not None:
        X_tr, y_tr = np.concatenate([X_tr, extra_train[0]]), np.concatenate([y_tr, extra_train[1]])
    if extra_val is not None:
        X_va, y_va = np.concatenate([X_va, extra_val[0]]), np.concatenate([y_va, extra_val[1]])
    zero_shot = _give_class_prompts(name, params, features_dir=features_dir, kind=kind, y=y_tr)
    head = make_head(name, params)
    logger.info(
        "training %s on %d rows (%s features, dim %d)", name, len(y_tr), kind, X_tr.shape[1]
    )
    fit_head(head, X_tr, y_tr, X_va, y_va)
    info: dict[str, Any] = {
        "head": name,
        "kind": kind,
        "params": _described(params),
        "zero_shot_prompts": zero_shot,
        "n_train": int(len(train.y)),
        "n_val": int(len(val.y)),
    }
    if name in ATTRIBUTION_HEADS:
        info["attribution_target"] = cfg.attribution_target
    return head, info


def _give_class_prompts(
    name: str, params: dict[str, Any], *, features_dir: str | Path, kind: str, y: np.ndarray
) -> bool:
    """Add the class prompts' embeddings to `params` where the head (or one of the base heads
    it stacks) needs them for a zero-shot term; whether the head has such a term."""
    cls = head_class(name)
    if "class_text_emb" in params:
        return True
    if cls.needs_class_prompts:
        emb = _zero_shot_prompts(features_dir, kind, y, name)
        if emb is not None:
            params["class_text_emb"] = emb
        return emb is not None
    bases = params.get("base_heads", ()) if cls.stacks_base_heads else ()
    needing = [
        b for b in bases if isinstance(b, str) and b in HEADS and HEADS[b].needs_class_prompts
    ]
    if not needing:
        return False
    # A base head that needs the class prompts gets the same zero-shot term as on its own.
    emb = _zero_shot_prompts(features_dir, kind, y, f"{name}'s {', '.join(needing)}")
    if emb is None:
        return False
    params["base_heads"] = [
        (b, {"class_text_emb": emb}) if b in needing else b for b in params["base_heads"]
    ]
    return True


def _described(params: dict[str, Any]) -> dict[str, Any]:
    """Params for train.json: the class-prompt embeddings given to a Tip-Adapter (directly or
    as a meta head's base head) are arrays, named rather than written."""
    out = {k: v for k, v in params.items() if k != "class_text_emb"}
    if "base_heads" in out:
        out["base_heads"] = [b[0] if isinstance(b, tuple) else b for b in out["base_heads"]]
    return out


def _zero_shot_prompts(
    features_dir: str | Path, kind: str, y: np.ndarray, who: str
) -> np.ndarray | None:
    """The class prompts' CLIP embeddings for Tip-Adapter's zero-shot term, or None (with a
    warning) when the features are not CLIP image embeddings or the prompts are missing."""
    emb = _class_text_emb(Path(features_dir), len(np.unique(y)))
    if emb is not None and kind == "image":
        return emb
    logger.warning(
        "%s: no zero-shot term (needs features kind 'image' and the class prompts of the "
        "encode stage; kind is %r)",
        who,
        kind,
    )
    return None


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
    chosen = pred[idx]
    # Binary heads predict 0/1; train.json and the log name the classes as attribution heads do.
    names = np.where(chosen == 1, "generated", REAL) if chosen.dtype.kind in "biu" else chosen
    labels, counts = np.unique(np.asarray(names, dtype=str), return_counts=True)
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
    features_dir: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    *,
    cfg: TrainConfig,
    kind: str,
    seed: int,
    eval_split: str = "test",
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit every head of `cfg.heads` on train (val for selection and calibration).

    `provenance` (`pipeline.provenance.run_provenance`: the preset and models behind the
    features) goes into every head's `train.json` and `head.json`.

    `features_dir` may be several folders (datasets encoded with the same models): the heads
    train on the union of their train rows and select on the union of their val rows; every
    `train.json` lists the folders (`features_dirs`) and what made each one. The class
    prompts are the first folder's.

    Rows of `eval_split` are never loaded, unless pseudo-labelling is explicitly allowed to
    use them as its unlabelled pool (then every head's `train.json` says `contaminated`).
    """
    pool_split = cfg.pseudo_pool if cfg.pseudo_label else None
    contaminated = pool_split == eval_split
    if contaminated and not cfg.pseudo_allow_eval_split:
        raise ConfigError(
            f"train.pseudo_pool={shown(pool_split)} is the evaluation split: pseudo-labels from it "
            "leak test information into training. Use another split, or set "
            "train.pseudo_allow_eval_split=true to accept contaminated metrics"
        )
    splits = ("train", "val") + ((pool_split,) if pool_split else ())
    dirs = (
        [features_dir] if isinstance(features_dir, (str, Path)) else [Path(d) for d in features_dir]
    )
    if not dirs:
        raise ConfigError("train_heads got no features folder; give at least one")
    features_dir = dirs[0]
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    report: dict[str, Any] = {}
    # Each kind is read once and shared by the heads that use it (train/val are views of it).
    by_kind: dict[str, FeatureSet] = {}
    for name in cfg.heads:
        name_kind = head_kind(cfg, name, kind)
        if name_kind not in by_kind:
            by_kind[name_kind] = load_feature_union(dirs, name_kind, splits=splits)
        fs = by_kind[name_kind]
        train, val = fs.where("train"), fs.where("val")
        _warn_without_val(name, val)
        fit: dict[str, Any] = {"kind": name_kind, "seed": seed, "features_dir": features_dir}
        head, info = fit_configured_head(name, cfg, train, val, **fit)
        info.update(
            {
                "features_dir": str(features_dir),
                # What made the features (weights, dtype, versions); predict refuses others.
                "feature_settings": feature_settings(features_dir),
                "contaminated": contaminated,
                # Every dataset the head was trained on, with what made it (one for most runs).
                "features_dirs": [
                    {"path": str(d), "feature_settings": feature_settings(d)} for d in dirs
                ],
            }
        )
        info = {**(provenance or {}), **info}
        pool = fs.where(pool_split) if pool_split else None
        if pool is not None:
            head, info["pseudo_labels"] = _refit_with_pseudo_labels(
                name, cfg, head, train=train, val=val, pool=pool, fit=fit
            )
        calibration, val_threshold = calibrate_on_val(name, cfg, head, val)
        if val_threshold is not None:
            info["val_threshold"] = val_threshold
        info["calibration"] = calibration
        save_head(head, out_dir / name, provenance)
        write_text(out_dir / name / TRAIN_INFO, json.dumps(info, indent=2, default=str) + "\n")
        report[name] = info
    return report


def _refit_with_pseudo_labels(
    name: str,
    cfg: TrainConfig,
    head: Any,
    *,
    train: FeatureSet,
    val: FeatureSet,
    pool: FeatureSet,
    fit: dict[str, Any],
) -> tuple[Any, dict[str, Any]]:
    """The head refitted with its confident pseudo-labels of `pool` added to train and val
    (`pseudo_label`), and the report of what was added; the head as it is for an empty pool."""
    if not len(pool.y):
        logger.warning("pseudo-labelling: the %r split is empty; nothing to add", cfg.pseudo_pool)
        return head, {"n_pool": 0}
    pl = pseudo_label(head, pool, cfg.pseudo_threshold, fit["seed"])
    pred = pl["pred"]
    pseudo_y = pred.astype(str) if name in ATTRIBUTION_HEADS else (pred != 0).astype(np.int64)
    head, _ = fit_configured_head(
        name,
        cfg,
        train,
        val,
        **fit,
        extra_train=(pool.X[pl["train"]], pseudo_y[pl["train"]]),
        extra_val=(pool.X[pl["val"]], pseudo_y[pl["val"]]),
    )
    rep = pl["report"]
    logger.info(
        "%s pseudo-labels: %d of %d pool rows above threshold %.3f (%d to train, %d to "
        "val; per class: %s)",
        name,
        rep["n_added_train"] + rep["n_added_val"],
        rep["n_pool"],
        rep["threshold"],
        rep["n_added_train"],
        rep["n_added_val"],
        format_counts(rep["per_class"]),
    )
    return head, rep


def _warn_without_val(name: str, val: FeatureSet) -> None:
    """Say so when a head trains without a val split that has both classes: it then gets no
    model selection, no calibration and no val threshold."""
    classes = np.unique(val.y)
    if len(classes) == 2:
        return
    what = "an empty val split" if not len(val.y) else f"a val split of one class ({classes[0]})"
    logger.warning(
        "head %s trains with %s: no model selection, no calibration, no val threshold. Give "
        "the dataset a val split (a split column, or ingest.val_from_train > 0 for a dataset "
        "with train and test only)",
        name,
        what,
    )


def calibrate_on_val(
    name: str, cfg: TrainConfig, head: Any, val: FeatureSet
) -> tuple[dict[str, Any], float | None]:
    """The post-hoc calibration of the head's p_generated fitted on val (identity without
    both classes in val) and the threshold of balanced accuracy on the calibrated val
    scores (None without both classes)."""
    cal = {"a": 1.0, "b": 0.0}
    # A head that calibrates itself on val (the SVM's Platt fit) is not calibrated twice.
    method = "none" if head_class(name).calibrates_on_val else cfg.calibration
    threshold = None
    if len(np.unique(val.y)) < 2:
        # Nothing to fit on: the identity, recorded as such.
        method = "none"
    else:
        p_val = p_generated(head, val.X)
        cal = fit_calibration(method, p_val, val.y)
        p_val = apply_calibration(cal, p_val)
        threshold = float(threshold_for_balanced_accuracy(val.y, p_val))
    return {"method": method, **cal}, threshold


def trained_heads(heads_dir: str | Path) -> list[Path]:
    found = sorted(p.parent for p in Path(heads_dir).glob(f"*/{TRAIN_INFO}"))
    if not found:
        raise ModelFileError(f"no trained heads in {heads_dir}; run the train stage first")
    return found


def read_train_info(head_dir: str | Path) -> dict[str, Any]:
    path = Path(head_dir) / TRAIN_INFO
    if not path.is_file():
        parent = Path(head_dir).parent
        found = sorted(p.parent.name for p in parent.glob(f"*/{TRAIN_INFO}"))
        where = (
            f"heads in {parent}: {', '.join(str(parent / f) for f in found)}"
            if found
            else f"no trained head in {parent} (run `dvc repro` to train the heads)"
        )
        raise ModelFileError(f"{head_dir} is not a trained head (no {TRAIN_INFO}); {where}")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{path} is not valid JSON ({err}); retrain the head") from None
    if not isinstance(info, dict) or not isinstance(info.get("kind"), str):
        raise ModelFileError(f"{path} lacks the feature kind the head was trained on; retrain it")
    return dict(info)
