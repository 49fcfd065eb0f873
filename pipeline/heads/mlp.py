"""Two-layer MLP head trained with AdamW, as in the ITEM detector."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.heads.blocks import (
    StandardisedRows,
    binary_proba,
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


@register("mlp")
class MLPHead(BaseHead):
    """Linear → ReLU → linear classifier on standardised features.

    Binary problems use one output logit and binary cross-entropy, more classes use softmax
    cross-entropy over `classes_`. Inputs are standardised with the training mean and standard
    deviation, because CLIP difference features share a large common offset and have very
    different spreads per dimension.

    Parameters:
        hidden: width of the hidden layer.
        epochs: passes over the training rows (ITEM trains its head for 50).
        lr: AdamW learning rate (ITEM: 1e-3).
        weight_decay: AdamW decoupled weight decay (ITEM: 1e-3).
        batch_size: rows per step; a training set smaller than this is one full batch.
        random_state: seeds weight initialisation and shuffling; an int makes fit repeatable.
        device: torch device for training; prediction always runs in numpy float64.
        warm_start_from: folder of a saved MLP head (`save_head`) to fine-tune: training
            starts from its weights and keeps its input standardisation, instead of a random
            start (`epochs` may then be 0: the saved head unchanged). Its classes and width
            must match the rows.

    With `fit(..., X_val=, y_val=)` the weights of the epoch with the lowest validation
    cross-entropy are kept (`best_epoch_`); without validation the last epoch is kept.
    """

    def __init__(
        self,
        hidden: int = 512,
        epochs: int = 50,
        lr: float = 1e-3,
        weight_decay: float = 1e-3,
        batch_size: int = 64,
        random_state: Any = 0,
        device: str = "cpu",
        warm_start_from: str | None = None,
    ) -> None:
        self.hidden = hidden
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.random_state = random_state
        self.device = device
        self.warm_start_from = warm_start_from

    def fit(self, X: Any, y: Any, *, X_val: Any = None, y_val: Any = None) -> MLPHead:
        """Fit on (X, y); optional (X_val, y_val) select the best epoch.

        Returns:
            self.
        """
        import torch

        check_sgd_params(self)
        device = check_device(self.device)
        X, classes, y_idx = self._validate_train(X, y)
        val = self._validate_val(X_val, y_val, classes)
        self.classes_ = classes
        saved = warm_start_head(self, X.shape[1], classes)
        standardiser: tuple[np.ndarray, np.ndarray] = (
            fit_standardiser(X) if saved is None else (saved.mean_, saved.scale_)
        )
        self.mean_, self.scale_ = standardiser
        n_out = 1 if len(classes) == 2 else len(classes)
        Xt = StandardisedRows(X, self.mean_, self.scale_, device)
        yt = torch.as_tensor(y_idx).to(device)
        if n_out == 1:
            # Summed, so the validation loss adds up over blocks (divided by the row count).
            loss_fn: Any = torch.nn.BCEWithLogitsLoss(reduction="sum")
            target = yt.float().unsqueeze(1)
        else:
            loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
            target = yt

        with torch_seeded(seed_from(self.random_state)) as generator:
            net = torch.nn.Sequential(
                torch.nn.Linear(X.shape[1], self.hidden),
                torch.nn.ReLU(),
                torch.nn.Linear(self.hidden, n_out),
            ).to(device)
            if saved is not None:
                load_torch_weights(net, saved.weights_)
            val_loss = None
            if val is not None:
                Xv = StandardisedRows(val[0], self.mean_, self.scale_, device)
                yv = torch.as_tensor(val[1]).to(device)
                tv = yv.float().unsqueeze(1) if n_out == 1 else yv

                def val_loss() -> float:
                    total = sum(float(loss_fn(net(z), tv[b])) for b, z in Xv.blocks())
                    return total / max(1, len(Xv))

            def batch_loss(idx: Any) -> Any:
                return loss_fn(net(Xt.rows(idx)), target[idx.to(device)]) / len(idx)

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

    def _logits(self, X: np.ndarray) -> np.ndarray:
        w = {k: v.astype(np.float64) for k, v in self.weights_.items()}

        def block(Xb: np.ndarray) -> np.ndarray:
            z = standardise(Xb, self.mean_, self.scale_)
            h = np.maximum(z @ w["0.weight"].T + w["0.bias"], 0)
            return h @ w["2.weight"].T + w["2.bias"]

        return map_row_blocks(block, X)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, columns in `classes_` order."""
        logits = self._logits(self._validate_predict(X))
        if len(self.classes_) == 2:
            return binary_proba(logits[:, 0])
        return softmax_rows(logits)

    def _get_state(self) -> State:
        meta = {"best_epoch_": self.best_epoch_, "val_loss_": self.val_loss_}
        arrays = {"mean_": self.mean_, "scale_": self.scale_}
        arrays.update({f"weights_.{k}": v for k, v in self.weights_.items()})
        return meta, arrays

    def _set_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.best_epoch_ = meta["best_epoch_"]
        self.val_loss_ = meta["val_loss_"]
        self.mean_, self.scale_ = arrays["mean_"], arrays["scale_"]
        prefix = "weights_."
        self.weights_ = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
