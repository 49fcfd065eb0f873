"""Warm starts: the saved head a head's `warm_start_from` names, checked against the new fit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, DataUnusable
from pipeline.heads.contract import BaseHead
from pipeline.heads.io import load_head


def warm_start_head(head: BaseHead, n_features: int, classes: np.ndarray) -> Any:
    """The fitted head saved at `head.warm_start_from`, or None when it names none.

    Fine-tuning continues the saved head's fit, so the saved head must be of the same class,
    read rows of the same width and predict the same classes as the fit about to start.
    """
    source = getattr(head, "warm_start_from", None)
    if source is None or source == "":
        return None
    saved = load_head(Path(source))
    if type(saved) is not type(head):
        raise ConfigError(
            f"warm_start_from={source!r} holds a {type(saved).__name__}, not a "
            f"{type(head).__name__}; point it at a saved head of the same kind"
        )
    if int(saved.n_features_in_) != int(n_features):
        raise DataUnusable(
            f"the head at {source} reads {saved.n_features_in_} features, these rows have "
            f"{n_features}; fine-tune on features of the same kind and model"
        )
    saved_classes = np.asarray(saved.classes_)
    if saved_classes.tolist() != np.asarray(classes).tolist():
        raise DataUnusable(
            f"the head at {source} predicts classes {saved_classes.tolist()}, these rows have "
            f"{np.asarray(classes).tolist()}; fine-tune on rows of the same classes"
        )
    return saved


def load_torch_weights(module: Any, weights: dict[str, np.ndarray]) -> None:
    """Copy a saved head's `weights_` (parameter name -> array) into `module`, in place; the
    shapes must match (a saved head of another `hidden` width is refused)."""
    import torch

    own = module.state_dict()
    wrong = sorted(
        k for k in own if k not in weights or tuple(weights[k].shape) != tuple(own[k].shape)
    )
    if wrong:
        raise ConfigError(
            f"the warm-start head's weights do not fit this head's layers ({', '.join(wrong)}); "
            "use the saved head's hidden width"
        )
    device = next(iter(own.values())).device
    module.load_state_dict({k: torch.as_tensor(weights[k]).to(device) for k in own})
