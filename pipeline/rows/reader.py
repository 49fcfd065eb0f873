"""Parallel feeding: decode and preprocess images in worker processes, in order, with prefetch.

One reader serves every stage that touches pixels (ingest's check, caption, ground, encode,
and so `misalign predict`): a torch `DataLoader` over a list of items, where a picklable
`load(item)` does the CPU work (decode once, cut crops from that decode, preprocess) in
`base.decode_workers` worker processes while the main process runs the model. Batches come out
in the order of the items whatever the number of workers, so the rows a stage writes do not
depend on it. On CUDA the batches are collated into pinned memory, so that the copy to the
device can be `non_blocking`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Sample = TypeVar("Sample")

# Batches each worker keeps ready ahead of the model (the DataLoader's prefetch_factor).
PREFETCH = 4
# More decode processes than this rarely help one GPU and cost memory per process.
MAX_AUTO_WORKERS = 8


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, e.g. a SLURM allocation)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_workers(setting: int, n_processes: int = 1) -> int:
    """Decode worker processes for `base.decode_workers` (-1: auto, 0: the main process).

    Auto gives each of the `n_processes` extraction processes on this machine (Dask workers)
    an equal share of the CPUs, at most MAX_AUTO_WORKERS.
    """
    if setting >= 0:
        return setting
    return max(0, min(MAX_AUTO_WORKERS, available_cpus() // max(1, n_processes)))


class _Items(Generic[Item, Sample]):
    """A map-style dataset: item i through `load`."""

    def __init__(self, items: Sequence[Item], load: Callable[[Item], Sample]) -> None:
        self.items = items
        self.load = load

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        return self.load(self.items[index])


def _as_list(samples: list[Any]) -> list[Any]:
    return samples


def _can_fork_children() -> bool:
    # Daemonic processes (e.g. Dask workers with distributed.worker.daemon=True) may not start
    # processes of their own.
    return not multiprocessing.current_process().daemon


def read_batches(
    items: Sequence[Item],
    load: Callable[[Item], Sample],
    batch_size: int,
    workers: int = 0,
    collate: Callable[[list[Sample]], Any] = _as_list,
    pin_memory: bool = False,
) -> Iterator[Any]:
    """Yield `collate([load(item) for item in chunk])` for consecutive chunks of `items`.

    Args:
        load: Picklable callable run in the workers (a module-level function or an object of a
            module-level class); it must not touch CUDA.
        batch_size: Items per batch (the last batch may be shorter).
        workers: Worker processes; 0 loads in this process. Resolved already (see
            `resolve_workers`).
        collate: Turns a list of samples into a batch, in the worker.
        pin_memory: Collate into page-locked memory (only useful when batches go to CUDA).
    """
    if not items:
        return
    if workers and not _can_fork_children():
        logger.info(
            "decoding in the main process: this process is daemonic and cannot start decode "
            "workers (start Dask workers with --no-nanny or distributed.worker.daemon=False)"
        )
        workers = 0
    workers = min(workers, (len(items) + batch_size - 1) // batch_size)
    from torch.utils.data import DataLoader  # torch: only the model steps need it, not ingest

    # fork starts a worker in milliseconds (spawn/forkserver re-import torch, ~seconds each);
    # workers never touch CUDA, so forking a CUDA-using parent is safe.
    context = "fork" if workers and sys.platform.startswith("linux") else None
    loader: Any = DataLoader(
        _Items(items, load),  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=PREFETCH if workers else None,
        multiprocessing_context=context,
    )
    yield from loader
