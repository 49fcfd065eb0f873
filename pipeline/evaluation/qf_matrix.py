"""The JPEG quality-factor matrix: heads trained on each quality's images, scored on every other.

Apart from `evalsets` (which extracts the qualities' copies) so that extraction does not import
the heads: an edit of a head reruns the matrix, never an extraction stage.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Params
from pipeline.evaluation.metrics import binary_metrics, own_decision, p_generated
from pipeline.features import load_features
from pipeline.train import fit_configured_head, head_kind

logger = logging.getLogger(__name__)


def qf_matrix(
    feature_dirs: dict[int, Path],
    params: Params,
    eval_split: str = "test",
    heads: Sequence[str] = ("svm",),
) -> dict[str, Any]:
    """Train each head on every JPEG quality's train split, test on every quality's eval split.

    Returns:
        `{head: {"<train_qf>": {"<test_qf>": {"acc": .., "ap": .., "auc": .., "n": ..}}}}`.
    """
    out: dict[str, Any] = {}
    for name in heads:
        kind = head_kind(params.train, name, params.features.kind)
        sets = {q: load_features(d, kind) for q, d in feature_dirs.items()}
        out[name] = {}
        for q_train, fs in sets.items():
            head, _ = fit_configured_head(
                name,
                params.train,
                fs.where("train"),
                fs.where("val"),
                kind=kind,
                seed=params.base.seed,
                features_dir=feature_dirs[q_train],
            )
            row = {}
            for q_test, ft in sets.items():
                te = ft.where(eval_split)
                p = np.clip(p_generated(head, te.X), 0, 1)
                m = binary_metrics(te.y, p, decision=own_decision(head, te.X))
                row[str(q_test)] = {k: m[k] for k in ("acc", "ap", "auc", "n")}
            out[name][str(q_train)] = row
            logger.info(
                "QF matrix %s, train QF %s: %s",
                name,
                q_train,
                ", ".join(f"test QF {k} acc {v['acc']:.3f}" for k, v in row.items()),
            )
    return out
