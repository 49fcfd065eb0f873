"""Parallel feeding: decode and preprocess images in worker processes, in order, with prefetch.

One reader serves every stage that touches pixels (ingest's check, caption, ground, encode,
and so `misalign predict`): a picklable `load(item)` does the CPU work (decode once, cut crops
from that decode, preprocess) in `base.decode_workers` worker processes while the main process
runs the model. The workers (a `Feeder`) live for the whole stage run: they take items in small
chunks whatever the forward batch, and decode the next shard (submitted ahead, `submit_ahead`)
while the current one is in the model. Batches come out in the order of the items whatever the
number of workers, so the rows a stage writes do not depend on it. On CUDA the batches are
pinned, so that the copy to the device can be `non_blocking`.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Sample = TypeVar("Sample")

# Chunks of items each worker may hold ready (decoded, not yet taken by the model), beyond
# which the feeder stops handing out work: it bounds the memory of the samples in flight.
PREFETCH = 4
# Items per task sent to a worker: small enough that the workers share one forward batch (the
# worker count does not depend on the batch), large enough that a task's overhead (one round
# trip, one shared-memory handle per tensor) stays small beside decoding an image.
MAX_CHUNK = 8
# Auto never starts more decode processes than this. An H100 takes ViT-L/14 at ~700 images/s
# with 3 object crops each; one core decodes and preprocesses ~25 such 1024-px images/s, so
# about 28 processes feed it. More than 32 only cost memory (each holds its samples in flight).
MAX_AUTO_WORKERS = 32


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, e.g. a SLURM allocation)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_workers(setting: int, n_processes: int = 1) -> int:
    """Decode worker processes for `base.decode_workers` (-1: auto, 0: the main process).

    Auto gives each of the `n_processes` extraction processes on this machine (Dask workers)
    an equal share of the CPUs less the one its main process (the model's feeder) uses, at
    most MAX_AUTO_WORKERS.
    """
    if setting >= 0:
        return setting
    share = available_cpus() // max(1, n_processes)
    return max(0, min(MAX_AUTO_WORKERS, share - 1))


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


def _init_worker() -> None:
    # One thread per worker: the workers are the parallelism (as in torch's DataLoader).
    import torch

    torch.set_num_threads(1)


def _load_chunk(load: Callable[[Any], Any], chunk: Sequence[Any]) -> list[Any]:
    return [load(item) for item in chunk]


def _pin(batch: Any) -> Any:
    """`batch` with its CPU tensors in page-locked memory (dicts and lists walked)."""
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {k: _pin(v) for k, v in batch.items()}
    if isinstance(batch, list):
        return [_pin(v) for v in batch]
    return batch


class Job:
    """The batches of one `Feeder.submit`, in item order, as they become ready."""

    def __init__(
        self,
        feeder: Feeder,
        chunks: list[Sequence[Any]],
        load: Callable[[Any], Any],
        batch_size: int,
        collate: Callable[[list[Any]], Any],
        pin_memory: bool,
    ) -> None:
        self.feeder = feeder
        self.chunks = chunks
        self.load = load
        self.batch_size = batch_size
        self.collate = collate
        self.pin_memory = pin_memory
        self.futures: list[Any] = []  # one per chunk, filled by the feeder as slots free up

    def __iter__(self) -> Iterator[Any]:
        pending: list[Any] = []
        for k in range(len(self.chunks)):
            self.feeder._top_up(until=(self, k))
            samples = self.futures[k].result()
            self.futures[k] = None  # the samples are the consumer's now
            self.feeder._taken()
            pending.extend(samples)
            while len(pending) >= self.batch_size:
                yield self._batch(pending[: self.batch_size])
                pending = pending[self.batch_size :]
        if pending:
            yield self._batch(pending)

    def _batch(self, samples: list[Any]) -> Any:
        batch = self.collate(samples)
        return _pin(batch) if self.pin_memory else batch


class Feeder:
    """Decode worker processes that live for a whole stage run.

    `submit` queues the items of one shard and returns its batches (a `Job`); the workers go
    on to the next submitted shard as soon as they have finished this one, so a shard can be
    decoded while the previous one is in the model. Items go to the workers in chunks of at
    most MAX_CHUNK, whatever the forward batch, so every worker takes part in each batch; at
    most `workers` x PREFETCH chunks are decoded ahead of the consumer. Samples come back
    through shared memory (torch's reductions), in order.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor: Any = None
        self._queue: list[tuple[Job, int]] = []  # chunks not yet handed to a worker
        self._in_flight = 0  # handed out and not yet taken by a consumer

    def submit(
        self,
        items: Sequence[Item],
        load: Callable[[Item], Sample],
        batch_size: int,
        collate: Callable[[list[Sample]], Any] = _as_list,
        pin_memory: bool = False,
    ) -> Job:
        chunk = max(1, min(MAX_CHUNK, -(-batch_size // max(1, self.workers))))
        chunks = [items[s : s + chunk] for s in range(0, len(items), chunk)]
        job = Job(self, chunks, load, batch_size, collate, pin_memory)
        job.futures = [None] * len(chunks)
        self._queue.extend((job, k) for k in range(len(chunks)))
        self._top_up()
        return job

    def _top_up(self, until: tuple[Job, int] | None = None) -> None:
        """Hand queued chunks to the workers while fewer than the limit are out (and at least
        up to chunk `until`, which a consumer is waiting for)."""
        limit = self.workers * PREFETCH
        while self._queue and (
            self._in_flight < limit or (until is not None and until[0].futures[until[1]] is None)
        ):
            job, k = self._queue.pop(0)
            job.futures[k] = self._pool().submit(_load_chunk, job.load, job.chunks[k])
            self._in_flight += 1

    def _taken(self) -> None:
        self._in_flight -= 1
        self._top_up()

    def _pool(self) -> Any:
        if self._executor is None:
            from concurrent.futures import ProcessPoolExecutor

            import torch.multiprocessing  # registers the shared-memory reductions of tensors

            # fork starts a worker in milliseconds (spawn/forkserver re-import torch, ~seconds
            # each); workers never touch CUDA, so forking a CUDA-using parent is safe.
            context = torch.multiprocessing.get_context(
                "fork" if sys.platform.startswith("linux") else None
            )
            self._executor = ProcessPoolExecutor(
                self.workers, mp_context=context, initializer=_init_worker
            )
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._queue.clear()
        self._in_flight = 0


# This process's feeders by worker count, kept across the shards of a run (`close_feeders`
# ends them), and the jobs submitted ahead of the shard that will consume them.
_FEEDERS: dict[int, Feeder] = {}
_AHEAD: dict[Any, Job] = {}


def feeder(workers: int) -> Feeder:
    """This process's feeder with `workers` decode processes (started at first use)."""
    if workers not in _FEEDERS:
        if not _FEEDERS:
            atexit.register(close_feeders)  # before the interpreter tears the executor down
        _FEEDERS[workers] = Feeder(workers)
    return _FEEDERS[workers]


def close_feeders() -> None:
    """Stop this process's decode workers and forget the jobs submitted ahead."""
    _AHEAD.clear()
    for f in _FEEDERS.values():
        f.close()
    _FEEDERS.clear()


def submit_ahead(key: Any, job: Job) -> None:
    """Keep `job` (a shard's batches, submitted early) for the `take_ahead(key)` that uses it."""
    _AHEAD[key] = job


def take_ahead(key: Any) -> Job | None:
    return _AHEAD.pop(key, None)


def usable_workers(workers: int) -> int:
    """`workers`, or 0 where this process may not start processes (a daemonic Dask worker)."""
    if workers and not _can_fork_children():
        logger.info(
            "decoding in the main process: this process is daemonic and cannot start decode "
            "workers (start Dask workers with --no-nanny or distributed.worker.daemon=False)"
        )
        return 0
    return workers


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
        workers: Worker processes (this process's `feeder`, kept for the run); 0 loads in this
            process. Resolved already (see `resolve_workers`).
        collate: Turns a list of samples into a batch, in this process.
        pin_memory: Collate into page-locked memory (only useful when batches go to CUDA).
    """
    if not items:
        return
    workers = usable_workers(workers)
    if workers:
        yield from feeder(workers).submit(items, load, batch_size, collate, pin_memory)
        return
    for s in range(0, len(items), batch_size):
        batch = collate([load(item) for item in items[s : s + batch_size]])
        yield _pin(batch) if pin_memory else batch
