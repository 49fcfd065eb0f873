"""Multi-task head of the CT2 system: real/generated detection plus generator attribution."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from scipy.special import expit

from pipeline.errors import DataUnusable
from pipeline.heads.blocks import (
    StandardisedRows,
    fit_standardiser,
    map_row_blocks,
    softmax_rows,
    standardise,
)
from pipeline.heads.contract import BaseHead, State, check_sgd_params
from pipeline.heads.registry import register
from pipeline.heads.torch_loop import (
    check_device,
    seed_from,
    to_numpy_state,
    torch_seeded,
    train_torch,
)
from pipeline.heads.warm import load_torch_weights, warm_start_head


@register("multitask")
class MultiTaskHead(BaseHead):
    """Shared projection feeding a real/generated head and a generator-attribution head.

    Labels are generator names per row, with real rows labelled `real_label`. The loss is
    binary cross-entropy of "generated" on every row plus the attribution cross-entropy on the
    generated rows only (CT2's conditional cross-entropy). Probabilities over `classes_`
    (the real label and the generators) factorise as P(real) = 1 − p_gen and
    P(g) = p_gen · P(g | generated), so rows sum to 1.

    `predict` follows the two-stage CT2 decision: `real_label` when p_gen < 0.5, else the most
    likely generator. This can differ from the argmax of `predict_proba` when p_gen is just
    above 0.5 and spread over several generators.

    If y has no real rows, the detection head is not used: p_gen is 1 and `classes_` holds only
    generators.

    Parameters:
        hidden: width of the shared projection (Linear → ReLU).
        epochs, lr, weight_decay, batch_size: AdamW training as for `MLPHead`. CT2 fine-tuned
            its encoders with lr 2e-5 for 8 epochs; on frozen features the MLP schedule is used.
        real_label: the label of real rows.
        family_map: optional generator → family mapping applied to the labels in `fit`, so the
            attribution head predicts families (the internship report's GEN_TO_GEN). Every
            generator in y must be mapped.
        random_state: seeds initialisation and shuffling.
        device: torch device for training; prediction runs in numpy float64.
        warm_start_from: folder of a saved multi-task head to fine-tune (as for `MLPHead`):
            same classes, same width; `epochs` may then be 0.

    With `fit(..., X_val=, y_val=)` the epoch with the lowest validation loss (sum of both
    terms) is kept in `best_epoch_`; without validation the last epoch is kept.
    """

    attributes_sources: ClassVar[bool] = True

    def __init__(
        self,
        hidden: int = 512,
        epochs: int = 50,
        lr: float = 1e-3,
        weight_decay: float = 1e-3,
        batch_size: int = 64,
        real_label: Any = "real",
        family_map: Mapping[Any, Any] | None = None,
        random_state: Any = 0,
        device: str = "cpu",
        warm_start_from: str | None = None,
    ) -> None:
        self.hidden = hidden
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.real_label = real_label
        self.family_map = family_map
        self.random_state = random_state
        self.device = device
        self.warm_start_from = warm_start_from

    def _map_families(self, y: Any) -> Any:
        if self.family_map is None or y is None:
            return y
        labels = np.asarray(y).ravel()
        unmapped = sorted(
            {str(v) for v in labels.tolist() if v != self.real_label and v not in self.family_map}
        )
        if unmapped:
            raise DataUnusable(
                f"generators {unmapped} are missing from family_map (known: "
                f"{sorted(map(str, self.family_map))}); add them to family_map"
            )
        mapped = [v if v == self.real_label else self.family_map[v] for v in labels.tolist()]
        return np.asarray(mapped, dtype=object if labels.dtype == object else None)

    def fit(self, X: Any, y: Any, *, X_val: Any = None, y_val: Any = None) -> MultiTaskHead:
        """Fit on (X, y); optional (X_val, y_val) select the best epoch.

        Returns:
            self.
        """
        import torch

        check_sgd_params(self)
        device = check_device(self.device)
        X, classes, y_idx = self._validate_train(X, self._map_families(y))
        val = self._validate_val(X_val, self._map_families(y_val), classes)
        self.classes_ = classes
        is_real = np.array([c == self.real_label for c in classes.tolist()], dtype=bool)
        self.real_index_ = int(np.flatnonzero(is_real)[0]) if is_real.any() else -1
        self.generator_indices_ = np.flatnonzero(~is_real).astype(np.int64)
        # Column of each class in the attribution head; -1 for the real class.
        gen_position = np.full(len(classes), -1, dtype=np.int64)
        gen_position[self.generator_indices_] = np.arange(len(self.generator_indices_))
        saved = warm_start_head(self, X.shape[1], classes)
        standardiser: tuple[np.ndarray, np.ndarray] = (
            fit_standardiser(X) if saved is None else (saved.mean_, saved.scale_)
        )
        self.mean_, self.scale_ = standardiser

        def tensors(Xa: np.ndarray, ya: np.ndarray) -> tuple[Any, Any, Any]:
            return (
                StandardisedRows(Xa, self.mean_, self.scale_, device),
                torch.as_tensor(ya != self.real_index_, dtype=torch.float32).to(device),
                torch.as_tensor(gen_position[ya]).to(device),
            )

        bce = torch.nn.BCEWithLogitsLoss(reduction="sum")
        ce = torch.nn.CrossEntropyLoss(reduction="sum")
        use_detector = self.real_index_ >= 0

        with torch_seeded(seed_from(self.random_state)) as generator:
            net = _build_net(X.shape[1], self.hidden, len(self.generator_indices_)).to(device)
            if saved is not None:
                load_torch_weights(net, saved.weights_)

            def loss_sums(z: Any, gen: Any, pos: Any) -> tuple[Any, Any, Any]:
                """Summed detection and attribution losses, and the generated-row count."""
                detect, attribute = net(z)
                detection = bce(detect[:, 0], gen) if use_detector else detect.sum() * 0.0
                mask = pos >= 0
                return detection, ce(attribute[mask], pos[mask]), mask.sum()

            def loss(sums: tuple[Any, Any, Any], n_rows: int) -> Any:
                # Mean detection loss over the rows plus mean attribution loss over the
                # generated rows (zero when there are none).
                detection, attribution, n_gen = sums
                return detection / n_rows + attribution / n_gen.clamp(min=1)

            train = tensors(X, y_idx)
            val_loss = None
            if val is not None:
                val_t = tensors(*val)

                def val_loss() -> float:
                    parts = [loss_sums(z, val_t[1][b], val_t[2][b]) for b, z in val_t[0].blocks()]
                    total = tuple(sum(p[i] for p in parts) for i in range(3))
                    return float(loss(total, max(1, len(val_t[0]))))  # type: ignore[arg-type]

            def batch_loss(idx: Any) -> Any:
                on = idx.to(device)
                return loss(loss_sums(train[0].rows(idx), train[1][on], train[2][on]), len(idx))

            self.best_epoch_, self.val_loss_ = train_torch(
                net,
                batch_loss,
                n_rows=len(X),
                epochs=self.epochs,
                lr=self.lr,
                weight_decay=self.weight_decay,
                batch_size=self.batch_size,
                generator=generator,
                val_loss=val_loss,
            )
        self.weights_ = to_numpy_state(net)
        return self

    def _forward(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        X = self._validate_predict(X)
        w = {k: v.astype(np.float64) for k, v in self.weights_.items()}

        def block(Xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            z = standardise(Xb, self.mean_, self.scale_)
            h = np.maximum(z @ w["shared.weight"].T + w["shared.bias"], 0.0)
            detect = h @ w["detect.weight"].T + w["detect.bias"]
            attribute = h @ w["attribute.weight"].T + w["attribute.bias"]
            p_gen = expit(detect[:, 0]) if self.real_index_ >= 0 else np.ones(len(Xb))
            return p_gen, softmax_rows(attribute)

        return map_row_blocks(block, X)  # type: ignore[no-any-return]

    def p_generated(self, X: Any) -> np.ndarray:
        """Probability that each row is generated (not `real_label`), shape (n,)."""
        return self._forward(X)[0]

    def predict_proba(self, X: Any) -> np.ndarray:
        """P(real) = 1 − p_gen and P(g) = p_gen · P(g | generated), columns in `classes_` order."""
        p_gen, p_attr = self._forward(X)
        proba = np.zeros((len(p_gen), len(self.classes_)))
        proba[:, self.generator_indices_] = p_gen[:, None] * p_attr
        if self.real_index_ >= 0:
            proba[:, self.real_index_] = 1.0 - p_gen
        return proba

    def predict(self, X: Any) -> np.ndarray:
        """`real_label` where p_gen < 0.5, otherwise the most likely generator."""
        p_gen, p_attr = self._forward(X)
        labels = self.classes_[self.generator_indices_[np.argmax(p_attr, axis=1)]]
        if self.real_index_ >= 0:
            labels[p_gen < 0.5] = self.classes_[self.real_index_]
        return labels

    def _get_state(self) -> State:
        meta = {
            "best_epoch_": self.best_epoch_,
            "val_loss_": self.val_loss_,
            "real_index_": self.real_index_,
        }
        arrays = {
            "mean_": self.mean_,
            "scale_": self.scale_,
            "generator_indices_": self.generator_indices_,
        }
        arrays.update({f"weights_.{k}": v for k, v in self.weights_.items()})
        return meta, arrays

    def _set_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.best_epoch_ = meta["best_epoch_"]
        self.val_loss_ = meta["val_loss_"]
        self.real_index_ = meta["real_index_"]
        self.mean_, self.scale_ = arrays["mean_"], arrays["scale_"]
        self.generator_indices_ = arrays["generator_indices_"]
        prefix = "weights_."
        self.weights_ = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


def _build_net(n_in: int, hidden: int, n_generators: int) -> Any:
    """Shared Linear → ReLU projection with a 1-logit detection and an attribution head."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = torch.nn.Linear(n_in, hidden)
            self.detect = torch.nn.Linear(hidden, 1)
            self.attribute = torch.nn.Linear(hidden, n_generators)

        def forward(self, x: Any) -> tuple[Any, Any]:
            h = torch.relu(self.shared(x))
            return self.detect(h), self.attribute(h)

    return Net()
