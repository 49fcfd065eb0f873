"""The torch training loop of the torch-trained heads and its helpers: seeding, minibatches,
device and thread choice.

Torch is imported inside the functions: scikit-learn-only heads (SVM, meta on them) and
loading the heads package do not pay its import."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from sklearn.utils import check_random_state

from pipeline.errors import ConfigError, shown

logger = logging.getLogger(__name__)


def threads_for(rows: int, width: int, hidden: int) -> int:
    """Torch threads for minibatch steps of `rows` × `width` → `hidden` matmuls: one thread
    below ~64 M multiply-adds a step (the default thread pool costs more than it gives there:
    4.7x slower wall time measured on 2 cores), else torch's default."""
    import torch

    return 1 if rows * width * hidden < 1 << 26 else torch.get_num_threads()


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` torch intra-op threads, restoring the caller's count after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seed_from(random_state: Any) -> int:
    """An int seed for torch from an sklearn-style random_state (int, None or RandomState)."""
    return int(check_random_state(random_state).randint(0, 2**31 - 1))


@contextmanager
def torch_seeded(seed: int) -> Iterator[Any]:
    """Seed torch's global CPU RNG inside the block and restore the caller's state after.

    Layer initialisation draws from the global generator; forking keeps fitting a head from
    changing the random stream of the code around it.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)


def minibatches(n: int, batch_size: int, generator: Any) -> list[Any]:
    """Shuffled index batches covering range(n) once; the last batch may be short."""
    import torch

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(n, generator=generator)
    return list(torch.split(order, batch_size))


def check_device(device: str) -> Any:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(
            f"device={shown(device)} is not a torch device; use 'cpu' or 'cuda'"
        ) from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={shown(device)} requested but CUDA is not available; use 'cpu'")
    return dev


def to_numpy_state(module: Any) -> dict[str, np.ndarray]:
    """Copy a torch module's parameters to float32 numpy arrays keyed by parameter name."""
    return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in module.state_dict().items()}


def train_torch(
    module: Any,
    batch_loss: Callable[[Any], Any],
    *,
    n_rows: int,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    generator: Any,
    val_loss: Callable[[], float] | None = None,
) -> tuple[int, float | None]:
    """Train `module` with AdamW on shuffled minibatches; keep the best epoch on validation.

    Args:
        module: the torch module whose parameters are optimised; on return it holds the
            weights of the selected epoch.
        batch_loss: maps a tensor of row indices to a scalar loss.
        val_loss: evaluated after each epoch; the epoch with the lowest value is kept. Without
            it the weights after the last epoch are kept.

    Returns:
        The selected epoch (1-based) and its validation loss (None without validation).
    """

    largest = max((p.numel() for p in module.parameters()), default=1)
    with torch_threads(threads_for(min(batch_size, n_rows), 1, largest)):
        return _train_torch(
            module,
            batch_loss,
            n_rows=n_rows,
            epochs=epochs,
            lr=lr,
            weight_decay=weight_decay,
            batch_size=batch_size,
            generator=generator,
            val_loss=val_loss,
        )


def _train_torch(
    module: Any,
    batch_loss: Callable[[Any], Any],
    *,
    n_rows: int,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    generator: Any,
    val_loss: Callable[[], float] | None,
) -> tuple[int, float | None]:
    import torch

    optimiser = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    best_epoch, best_loss, best_state = epochs, None, None
    for epoch in range(1, epochs + 1):
        module.train()
        for idx in minibatches(n_rows, batch_size, generator):
            optimiser.zero_grad(set_to_none=True)
            loss = batch_loss(idx)
            loss.backward()
            optimiser.step()
        if val_loss is not None:
            module.eval()
            with torch.no_grad():
                current = float(val_loss())
            logger.debug("epoch %d/%d: validation loss %.5f", epoch, epochs, current)
            if not np.isfinite(current):
                continue
            if best_loss is None or current < best_loss:
                best_epoch, best_loss = epoch, current
                best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if best_state is not None:
        module.load_state_dict(best_state)
        logger.info("kept epoch %d/%d (validation loss %.5f)", best_epoch, epochs, best_loss)
    module.eval()
    return best_epoch, best_loss
