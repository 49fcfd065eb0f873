"""Tip-Adapter and Tip-Adapter-F: a key-value cache of training features plus CLIP zero-shot."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np

from pipeline.errors import ConfigError
from pipeline.heads.blocks import (
    cross_entropy,
    fit_standardiser,
    l2_normalise,
    map_row_blocks,
    softmax_rows,
    standardise,
)
from pipeline.heads.contract import BaseHead, State, check_positive
from pipeline.heads.registry import register
from pipeline.heads.torch_loop import check_device, minibatches, seed_from, torch_seeded
from pipeline.heads.warm import warm_start_head

logger = logging.getLogger(__name__)

# Cap on the (rows × cache entries) affinity block held in memory while predicting.
_AFFINITY_BLOCK = 4_000_000


@register("tip_adapter")
class TipAdapterHead(BaseHead):
    """Tip-Adapter (Zhang et al. 2022) on feature vectors, with optional key fine-tuning (-F).

    For a row x with L2-normalised cache feature f, cache keys F (one per cached training row)
    and one-hot cache values L:

        logits(x) = alpha · exp(−beta · (1 − f·Fᵀ)) · L  +  clip_logit_scale · x̂ · Wᵀ

    where x̂ is the L2-normalised raw feature and W the L2-normalised class text embeddings
    (`class_text_emb`, one row per class in `classes_` order). `predict_proba` is the softmax
    of the logits.

    The defaults are the paper's form: f = x̂ (`standardize=False`, for L2-normalised CLIP
    image features, the train stage's `image` kind), logits `100·zero-shot + alpha·cache`, and
    a cache of `n_shots=16` training rows per class drawn with `random_state` (Tip-Adapter's
    16-shot setting), so that fitting and predicting cost time linear in the rows. With
    `standardize=True` f is the L2-normalised *standardised* row instead: CLIP *difference*
    features share a large common offset, so their raw cosines are all close to 1 and the
    affinity carries no signal; standardising first restores it (not the paper's form). The
    zero-shot term always uses x̂, because W lives in CLIP's raw embedding space.

    Without `class_text_emb` the zero-shot term is omitted and the head is the cache model
    alone (the training-free kernel classifier). The train stage passes CLIP text embeddings
    of class prompts; they must be in the same space as the features.

    Parameters:
        alpha: weight of the cache (few-shot) term.
        beta: sharpness of the affinity exp(−beta(1 − cos)).
        finetune: Tip-Adapter-F; the cache keys become parameters trained with AdamW
            (eps 1e-4, cosine schedule) on the cross-entropy of the logits. A row's own cache
            entry is masked out of its affinity while training, because there is no data
            augmentation on cached features and the self-match would teach nothing.
        epochs, lr, batch_size: fine-tuning schedule (Tip-Adapter-F trains 20 epochs).
        n_shots: cache at most this many random rows per class (the cache size is
            n_shots × n_classes; Tip-Adapter's default is 16 shots); None caches every training
            row (quadratic fine-tuning cost). Fine-tuning uses all training rows as queries.
        class_text_emb: array (n_classes, n_features) or None.
        clip_logit_scale: CLIP's logit scale for the zero-shot term (100 for OpenAI CLIP).
        standardize: see above.
        alpha_grid, beta_grid: searched on validation data when `fit` gets it (None skips the
            search); the pair with the best validation accuracy, ties broken by the lower
            cross-entropy, is kept in `alpha_`, `beta_`.
        random_state: seeds cache sampling, fine-tuning shuffling and key updates.
        device: torch device for fine-tuning; prediction runs in numpy float64.
        warm_start_from: folder of a saved Tip-Adapter head to continue: its cache (keys,
            labels, standardisation) and its alpha, beta are the start, and -F fine-tunes its
            keys on these rows (`epochs` may then be 0: the saved keys unchanged). No row of
            this fit is in that cache, so none is masked. Without `class_text_emb` the saved
            text weights are kept. Its classes and width must match the rows.

    With validation data, -F also keeps the keys of the epoch with the best validation accuracy
    (ties: lower cross-entropy) at the initial alpha, beta; without it the last epoch is kept
    and `alpha_`, `beta_` equal `alpha`, `beta`.
    """

    needs_class_prompts: ClassVar[bool] = True

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 5.5,
        finetune: bool = False,
        epochs: int = 20,
        lr: float = 1e-3,
        batch_size: int = 256,
        n_shots: int | None = 16,
        class_text_emb: np.ndarray | None = None,
        clip_logit_scale: float = 100.0,
        standardize: bool = False,
        alpha_grid: tuple[float, ...] | None = (
            1e-4,
            3e-4,
            1e-3,
            3e-3,
            0.01,
            0.03,
            0.1,
            0.3,
            1.0,
            3.0,
            10.0,
            30.0,
            100.0,
        ),
        beta_grid: tuple[float, ...] | None = (0.5, 1.0, 2.0, 3.5, 5.5, 7.0, 10.0, 15.0, 20.0),
        random_state: Any = 0,
        device: str = "cpu",
        warm_start_from: str | None = None,
    ) -> None:
        self.alpha = alpha
        self.beta = beta
        self.finetune = finetune
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.n_shots = n_shots
        self.class_text_emb = class_text_emb
        self.clip_logit_scale = clip_logit_scale
        self.standardize = standardize
        self.alpha_grid = alpha_grid
        self.beta_grid = beta_grid
        self.random_state = random_state
        self.device = device
        self.warm_start_from = warm_start_from

    def fit(self, X: Any, y: Any, *, X_val: Any = None, y_val: Any = None) -> TipAdapterHead:
        """Build the cache from (X, y); optionally fine-tune and search alpha, beta on val.

        Returns:
            self.
        """
        check_positive("alpha", self.alpha, allow_zero=True)
        check_positive("beta", self.beta)
        check_positive("clip_logit_scale", self.clip_logit_scale, allow_zero=True)
        if self.n_shots is not None:
            check_positive("n_shots", self.n_shots, integer=True)
        if self.finetune:
            warm = self.warm_start_from not in (None, "")
            check_positive("epochs", self.epochs, integer=True, allow_zero=warm)
            check_positive("lr", self.lr)
            check_positive("batch_size", self.batch_size, integer=True)
        X, classes, y_idx = self._validate_train(X, y)
        val = self._validate_val(X_val, y_val, classes)
        self.classes_ = classes
        self.text_weights_ = self._text_weights(len(classes), X.shape[1])
        rng = np.random.RandomState(seed_from(self.random_state))
        saved = warm_start_head(self, X.shape[1], classes)
        if saved is not None:
            cache_rows = self._continue_from(saved)
        else:
            if self.standardize:
                self.mean_, self.scale_ = fit_standardiser(X)
            else:
                self.mean_, self.scale_ = np.zeros(X.shape[1]), np.ones(X.shape[1])
            cache_rows = self._cache_rows(y_idx, rng)
            self.cache_rows_ = cache_rows
            self.cache_keys_ = map_row_blocks(self._cache_features, X[cache_rows])
            self.cache_labels_ = y_idx[cache_rows]
            self.alpha_, self.beta_ = float(self.alpha), float(self.beta)
        if self.finetune:
            self.best_epoch_ = self._finetune(X, y_idx, cache_rows, val, rng)
        if val is not None and self.alpha_grid is not None and self.beta_grid is not None:
            self.alpha_, self.beta_ = self._search(val[0], val[1])
        return self

    # --- fitting helpers --------------------------------------------------------------------------

    def _continue_from(self, saved: TipAdapterHead) -> np.ndarray:
        """Take the saved head's cache, standardisation and alpha, beta; the rows of this fit
        that are in the cache: none."""
        self.mean_, self.scale_ = saved.mean_, saved.scale_
        self.cache_rows_ = saved.cache_rows_  # rows of the saved head's training set
        self.cache_keys_ = np.array(saved.cache_keys_, dtype=np.float64)
        self.cache_labels_ = saved.cache_labels_
        self.alpha_, self.beta_ = float(saved.alpha_), float(saved.beta_)
        if self.text_weights_ is None:
            self.text_weights_ = saved.text_weights_
        return np.zeros(0, dtype=np.int64)

    def _text_weights(self, n_classes: int, n_features: int) -> np.ndarray | None:
        if self.class_text_emb is None:
            return None
        W = np.asarray(self.class_text_emb, dtype=np.float64)
        if W.shape != (n_classes, n_features):
            raise ValueError(
                f"class_text_emb has shape {W.shape}, expected (n_classes, n_features) = "
                f"({n_classes}, {n_features}) with rows in sorted class order"
            )
        return l2_normalise(W)

    def _cache_rows(self, y_idx: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        if self.n_shots is None:
            return np.arange(len(y_idx))
        picked = [
            rng.choice(members, size=min(self.n_shots, len(members)), replace=False)
            for members in (np.flatnonzero(y_idx == k) for k in range(len(self.classes_)))
        ]
        return np.sort(np.concatenate(picked))

    def _cache_features(self, X: np.ndarray) -> np.ndarray:
        return l2_normalise(standardise(X, self.mean_, self.scale_))

    def _zero_shot(self, X: np.ndarray) -> np.ndarray:
        if self.text_weights_ is None:
            return np.zeros((len(X), len(self.classes_)))
        return float(self.clip_logit_scale) * l2_normalise(X) @ self.text_weights_.T

    def _finetune(
        self,
        X: np.ndarray,
        y_idx: np.ndarray,
        cache_rows: np.ndarray,
        val: tuple[np.ndarray, np.ndarray] | None,
        rng: np.random.RandomState,
    ) -> int:
        """Train the cache keys (Tip-Adapter-F); returns the kept epoch (1-based)."""
        import torch

        device = check_device(self.device)
        n_classes = len(self.classes_)

        def rows(idx: Any) -> tuple[Any, Any]:
            """Cache features and zero-shot logits of a minibatch, made on demand (no copy
            of the training matrix)."""
            Xb = np.asarray(X[idx.numpy()], dtype=np.float64)
            return (
                torch.as_tensor(self._cache_features(Xb), dtype=torch.float32, device=device),
                torch.as_tensor(self._zero_shot(Xb), dtype=torch.float32, device=device),
            )

        targets = torch.as_tensor(y_idx, device=device)
        values = torch.nn.functional.one_hot(
            torch.as_tensor(self.cache_labels_, device=device), n_classes
        ).float()
        # Position of each training row in the cache, -1 when it is not cached.
        cache_pos = np.full(len(X), -1, dtype=np.int64)
        cache_pos[cache_rows] = np.arange(len(cache_rows))
        cache_pos_t = torch.as_tensor(cache_pos, device=device)
        alpha, beta = self.alpha_, self.beta_
        ce = torch.nn.CrossEntropyLoss()

        with torch_seeded(int(rng.randint(0, 2**31 - 1))) as generator:
            keys = torch.nn.Parameter(
                torch.as_tensor(self.cache_keys_, dtype=torch.float32, device=device)
            )
            optimiser = torch.optim.AdamW([keys], lr=self.lr, eps=1e-4)
            n_batches = -(-len(X) // self.batch_size)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimiser, T_max=self.epochs * n_batches
            )
            best_epoch, best_score, best_keys = self.epochs, None, None
            for epoch in range(1, self.epochs + 1):
                for cpu_idx in minibatches(len(X), self.batch_size, generator):
                    feats, prior = rows(cpu_idx)
                    idx = cpu_idx.to(device)
                    affinity = torch.exp(-beta * (1.0 - feats @ keys.T))
                    own = cache_pos_t[idx]
                    hit = torch.nonzero(own >= 0).squeeze(1)
                    mask = torch.ones_like(affinity)
                    mask[hit, own[hit]] = 0.0
                    logits = alpha * (affinity * mask) @ values + prior
                    loss = ce(logits, targets[idx])
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    schedule.step()
                if val is not None:
                    self.cache_keys_ = keys.detach().cpu().numpy().astype(np.float64)
                    logits_val = self._logits(val[0], alpha, beta)
                    score = _score(logits_val, val[1])
                    logger.debug(
                        "epoch %d/%d: validation (accuracy, -CE) %s", epoch, self.epochs, score
                    )
                    if best_score is None or score > best_score:
                        best_epoch, best_score, best_keys = epoch, score, self.cache_keys_
        self.cache_keys_ = (
            best_keys if best_keys is not None else keys.detach().cpu().numpy().astype(np.float64)
        )
        return best_epoch

    def _search(self, X_val: np.ndarray, y_val: np.ndarray) -> tuple[float, float]:
        """Grid-search (alpha, beta) on validation rows."""
        alphas = [float(a) for a in self.alpha_grid or ()]
        betas = [float(b) for b in self.beta_grid or ()]
        for value in alphas:
            check_positive("alpha_grid entry", value, allow_zero=True)
        for value in betas:
            check_positive("beta_grid entry", value)
        prior = map_row_blocks(self._zero_shot, X_val)
        best: tuple[tuple[float, float], float, float] | None = None
        for beta in betas:
            cache = map_row_blocks(lambda Xb: self._cache_logits(Xb, beta), X_val)  # noqa: B023
            for alpha in alphas:
                score = _score(alpha * cache + prior, y_val)
                if best is None or score > best[0]:
                    best = (score, alpha, beta)
        if best is None:
            raise ConfigError("alpha_grid and beta_grid must be non-empty to search on val")
        logger.info(
            "TipAdapterHead: alpha=%g beta=%g, validation accuracy %.4f", *best[1:], best[0][0]
        )
        return best[1], best[2]

    # --- prediction -------------------------------------------------------------------------------

    def _cache_logits(self, X: np.ndarray, beta: float) -> np.ndarray:
        """exp(−beta(1 − f·Fᵀ)) · L in row blocks, so large caches fit in memory."""
        feats = self._cache_features(X)
        n_cache = len(self.cache_keys_)
        values = np.eye(len(self.classes_))[self.cache_labels_]
        block = max(1, _AFFINITY_BLOCK // max(1, n_cache))
        out = np.empty((len(X), len(self.classes_)))
        for start in range(0, len(X), block):
            affinity = np.exp(-beta * (1.0 - feats[start : start + block] @ self.cache_keys_.T))
            out[start : start + block] = affinity @ values
        return out

    def _logits(self, X: np.ndarray, alpha: float, beta: float) -> np.ndarray:
        def block(Xb: np.ndarray) -> np.ndarray:
            return alpha * self._cache_logits(Xb, beta) + self._zero_shot(Xb)

        return map_row_blocks(block, X)  # type: ignore[no-any-return]

    def logits(self, X: Any) -> np.ndarray:
        """Tip-Adapter logits, shape (n, n_classes), columns in `classes_` order."""
        return self._logits(self._validate_predict(X), self.alpha_, self.beta_)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Softmax of `logits`, columns in `classes_` order."""
        return softmax_rows(self.logits(X))

    # --- (de)serialisation ------------------------------------------------------------------------

    def _get_state(self) -> State:
        meta: dict[str, Any] = {
            "alpha_": self.alpha_,
            "beta_": self.beta_,
            "best_epoch_": getattr(self, "best_epoch_", None),
            "has_text_weights": self.text_weights_ is not None,
        }
        arrays = {
            "mean_": self.mean_,
            "scale_": self.scale_,
            "cache_keys_": self.cache_keys_,
            "cache_labels_": self.cache_labels_,
            "cache_rows_": self.cache_rows_,
        }
        if self.text_weights_ is not None:
            arrays["text_weights_"] = self.text_weights_
        return meta, arrays

    def _set_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.alpha_, self.beta_ = meta["alpha_"], meta["beta_"]
        if meta["best_epoch_"] is not None:
            self.best_epoch_ = meta["best_epoch_"]
        self.text_weights_ = arrays["text_weights_"] if meta["has_text_weights"] else None
        for key in ("mean_", "scale_", "cache_keys_", "cache_labels_"):
            setattr(self, key, arrays[key])
        # Heads saved before cache_rows_ existed cached every training row.
        self.cache_rows_ = arrays.get("cache_rows_", np.arange(len(self.cache_keys_)))


def _score(logits: np.ndarray, y_idx: np.ndarray) -> tuple[float, float]:
    """(accuracy, −cross-entropy): larger is better, accuracy first."""
    accuracy = float(np.mean(np.argmax(logits, axis=1) == y_idx))
    return accuracy, -cross_entropy(logits, y_idx)
