"""UniversalFakeDetect's released linear probe (Ojha et al., CVPR 2023) as a head.

UFD's detector is a frozen CLIP ViT-L/14 and one `Linear(768, 1)` on its image embedding:
`fc(model.encode_image(x))` in their `models/clip_models.py`, the embedding taken as CLIP
gives it (projected, *not* normalised), then `.sigmoid()` in their `validate.py`. They
release the probe as `fc_weights.pth`, the state dict of that layer (`weight` (1, 768),
`bias` (1,)). This head applies it to the cached raw CLIP image embeddings (features kind
`image_raw`), so a run with the real CLIP weights can be checked against UFD's published
per-generator numbers before anything is trained.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from scipy.special import expit

from pipeline.errors import ConfigError, DataUnusable, ModelFileError
from pipeline.heads.blocks import map_row_blocks
from pipeline.heads.contract import BaseHead, State
from pipeline.heads.registry import register

logger = logging.getLogger(__name__)

#: CLIP ViT-L/14's image embedding width: UFD's probe is `Linear(768, 1)`.
UFD_WIDTH = 768


def load_ufd_probe(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The `weight` (1, 768) and `bias` (1,) of UFD's `fc_weights.pth`, as float64 arrays.

    Read with `torch.load(..., weights_only=True)`, which unpickles tensors and plain
    containers only and runs no other pickled code.

    Raises:
        ModelFileError: the file is missing, unreadable, not a plain state dict, or not of a
            `Linear(768, 1)`, with one line naming the problem and the fix.
    """
    import torch

    path = Path(path)
    fix = "give train.ufd_probe.weights the fc_weights.pth of UniversalFakeDetect's release"
    if not path.is_file():
        raise ModelFileError(f"UFD probe weights {path} do not exist; {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a refused file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelFileError(
            f"{path} is not a plain state dict that loads without running pickled code "
            f"({reason}); {fix}"
        ) from None
    if not isinstance(state, dict) or set(state) != {"weight", "bias"}:
        what = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise ModelFileError(
            f"{path} holds {what}, not the state dict of a Linear(768, 1) "
            f"(keys 'weight' and 'bias'); {fix}"
        )
    arrays = {}
    for key, shape in (("weight", (1, UFD_WIDTH)), ("bias", (1,))):
        value = state[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ModelFileError(f"{path}: {key!r} is not a floating-point tensor; {fix}")
        if tuple(value.shape) != shape:
            raise ModelFileError(
                f"{path}: {key!r} has shape {tuple(value.shape)}, a Linear(768, 1) has "
                f"{shape}; {fix}"
            )
        arrays[key] = value.detach().to(torch.float64).numpy().copy()
        if not np.isfinite(arrays[key]).all():
            raise ModelFileError(f"{path}: {key!r} holds NaN or infinite values; {fix}")
    return arrays["weight"], arrays["bias"]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@register("ufd_probe")
class UFDProbeHead(BaseHead):
    """UniversalFakeDetect's released linear probe on raw CLIP ViT-L/14 image embeddings.

    ``p_generated = σ(x·wᵀ + b)`` with x the raw (unnormalised) CLIP image embedding and
    (w, b) the released `fc_weights.pth`, exactly UFD's `validate.py` scores.

    `fit` trains nothing: it loads the probe from `weights` (so the train stage, `evaluate`
    and `predict` use it like any head; it is saved with the probe's arrays and the file's
    SHA-256) and only checks that the rows are 768 wide. The train stage gives it the
    features kind `image_raw` whatever `features.kind` is (`feature_kind`), and fits no
    post-hoc calibration on it (`calibrates_on_val`): its probabilities stay UFD's own, so
    that its numbers compare with UFD's published ones.

    Parameters:
        weights: path of UFD's `fc_weights.pth` (a `Linear(768, 1)` state dict).
    """

    #: The features the probe was trained on: CLIP's raw image embedding.
    feature_kind: ClassVar[str | None] = "image_raw"
    #: Its probabilities are the released probe's; no calibration is fitted on them.
    calibrates_on_val: ClassVar[bool] = True

    def __init__(self, weights: str = "") -> None:
        self.weights = weights

    def fit(self, X: Any, y: Any) -> UFDProbeHead:
        """Load the released probe; `X`, `y` are only checked (768 wide, both classes).

        Returns:
            self.
        """
        if not self.weights:
            raise ConfigError(
                "train.ufd_probe.weights is empty; set it to the path of UniversalFakeDetect's "
                "fc_weights.pth (pretrained_weights/ in their repository)"
            )
        X, classes, _ = self._validate_train(X, y)
        if X.shape[1] != UFD_WIDTH:
            raise DataUnusable(
                f"UFD's probe takes {UFD_WIDTH}-wide CLIP ViT-L/14 image embeddings, these rows "
                f"are {X.shape[1]} wide; use models.clip ViT-L-14 and features kind image_raw"
            )
        if list(classes) != [0, 1]:
            raise DataUnusable(
                f"UFD's probe tells real (0) from generated (1); y has classes {list(classes)}"
            )
        self.weight_, self.bias_ = load_ufd_probe(self.weights)
        self.weights_sha256_ = file_sha256(self.weights)
        self.classes_ = classes
        logger.info("UFD probe %s (sha256 %s…) loaded", self.weights, self.weights_sha256_[:12])
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """The probe's logit x·wᵀ + b per row (float64)."""
        X = self._validate_predict(X)
        w, b = self.weight_[0], float(self.bias_[0])
        return map_row_blocks(lambda z: z @ w + b, X)  # type: ignore[no-any-return]

    def predict_proba(self, X: Any) -> np.ndarray:
        """Columns (real, generated): ``1 − σ(logit)``, ``σ(logit)``."""
        p = expit(self.decision_function(X))
        return np.column_stack([1.0 - p, p])

    def p_generated(self, X: Any) -> np.ndarray:
        """σ(x·wᵀ + b), computed directly (not as 1 − (1 − p), which would round)."""
        return np.asarray(expit(self.decision_function(X)), dtype=np.float64)

    def _get_state(self) -> State:
        return {"weights_sha256_": self.weights_sha256_}, {
            "weight_": self.weight_,
            "bias_": self.bias_,
        }

    def _set_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.weights_sha256_ = meta["weights_sha256_"]
        self.weight_, self.bias_ = arrays["weight_"], arrays["bias_"]
