"""Parallel feeding: decode and preprocess images in worker processes, in order, with prefetch.

One reader serves every stage that touches pixels (ingest's check, caption, ground, encode,
and so `misalign predict`): a picklable `load(item)` does the CPU work (decode once, cut crops
from that decode, preprocess) in `base.decode_workers` worker processes while the main process
runs the model. The workers (a `Feeder`) live for the whole stage run: they take items in small
chunks whatever the forward batch, and decode the next shard (submitted ahead, `submit_ahead`)
while the current one is in the model. Batches come out in the order of the items whatever the
number of workers, so the rows a stage writes do not depend on it. The workers collate their
chunks themselves, and a `Pack`ed tensor (the encode stage's uint8 views) is written by them
straight into a reused shared-memory buffer per batch, so the main process neither copies nor
concatenates per image. On CUDA the batches are pinned, so that the copy to the device can be
`non_blocking`.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from pipeline.rows.buffers import Buffer, Buffers, Into, Pack, remove_mapped

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
# How often a decode worker checks that its parent process is still there.
ORPHAN_CHECK_SECONDS = 1.0


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, e.g. a SLURM allocation)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def main_threads(workers: int) -> int:
    """Torch threads for the main process beside `workers` busy decode processes: the CPUs
    they leave, at least one (more threads than cores only spin and wait for the workers)."""
    return max(1, available_cpus() - workers)


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
    # Ctrl-C reaches a terminal's whole process group: the parent turns it into its one-line
    # message and stops the workers. A worker interrupted itself would print a traceback, and
    # one interrupted while holding the task queue's lock would leave its siblings (and the
    # parent's exit, which joins them) waiting forever.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One thread per worker: the workers are the parallelism (as in torch's DataLoader).
    import torch

    torch.set_num_threads(1)
    threading.Thread(
        target=_exit_with_parent, args=(os.getppid(),), name="misalign-orphan-watch", daemon=True
    ).start()


def _exit_with_parent(parent: int) -> None:
    """End this decode worker once its parent is gone (e.g. a Dask worker process stopped
    without closing its feeder): a pool worker blocked on its task queue never sees EOF while
    its siblings hold the queue too, so it would wait forever. The batch buffers it mapped
    are removed first (their owner cannot any more)."""
    while os.getppid() == parent:
        time.sleep(ORPHAN_CHECK_SECONDS)
    remove_mapped()
    os._exit(0)


def _load_chunk(
    load: Callable[[Any], Any],
    chunk: Sequence[Any],
    collate: Callable[[list[Any]], Any],
    into: Into | None = None,
) -> Any:
    """`collate` of the chunk's samples, in the worker: one piece of a batch (and, with `into`,
    the samples' packed tensors written into the batch's shared buffer instead)."""
    samples = [load(item) for item in chunk]
    if into is not None:
        samples = into.write(samples)
    return collate(samples)


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


def merge_pieces(pieces: list[Any]) -> Any:
    """One batch from the pieces its chunks' collates made: lists joined, tensors concatenated
    (along the first axis), dicts merged key by key."""
    import torch

    first = pieces[0]
    if len(pieces) == 1:
        return first
    if isinstance(first, list):
        return [x for piece in pieces for x in piece]
    if isinstance(first, torch.Tensor):
        return torch.cat(pieces)
    if isinstance(first, dict):
        return {k: merge_pieces([piece[k] for piece in pieces]) for k in first}
    raise TypeError(f"cannot merge batch pieces of type {type(first).__name__}")


@dataclass
class _Batch:
    """One batch of a job: its tasks (chunks of items), rows and buffer (with a Pack)."""

    tasks: list[Sequence[Any]]
    offsets: list[int]  # each task's first row in the buffer
    rows: int
    buffer: Buffer | None = None


class Job:
    """The batches of one `Feeder.submit`, in item order, as they become ready."""

    def __init__(
        self,
        feeder: Feeder,
        batches: list[_Batch],
        load: Callable[[Any], Any],
        collate: Callable[[list[Any]], Any],
        pin_memory: bool,
        pack: Pack | None,
    ) -> None:
        self.feeder = feeder
        self.batches = batches
        self.load = load
        self.collate = collate
        self.pin_memory = pin_memory
        self.pack = pack
        # One future per task, filled by the feeder as slots free up.
        self.futures: list[list[Any]] = [[None] * len(b.tasks) for b in batches]

    @property
    def chunks(self) -> list[Sequence[Any]]:
        """Every task's items, batch after batch."""
        return [task for batch in self.batches for task in batch.tasks]

    def _into(self, b: int, t: int) -> Into | None:
        if self.pack is None:
            return None
        batch = self.batches[b]
        if batch.buffer is None:
            batch.buffer = self.feeder._buffers.take(batch.rows * self.pack.row_bytes())
        end = batch.offsets[t + 1] if t + 1 < len(batch.tasks) else batch.rows
        return Into(
            self.pack.key,
            self.pack.shape,
            self.pack.dtype,
            batch.buffer.path,
            batch.offsets[t] * self.pack.row_bytes(),
            end - batch.offsets[t],
        )

    def __iter__(self) -> Iterator[Any]:
        for b, batch in enumerate(self.batches):
            pieces = []
            for t in range(len(batch.tasks)):
                self.feeder._top_up(until=(self, b, t))
                pieces.append(self.futures[b][t].result())
                self.futures[b][t] = None  # the piece is the consumer's now
                self.feeder._taken()
            out = merge_pieces(pieces)
            if self.pack is not None and batch.buffer is not None:
                out[self.pack.key] = self.feeder._buffers.tensor(
                    batch.buffer, self.pack, batch.rows
                )
                batch.buffer = None
            yield _pin(out) if self.pin_memory else out


class Feeder:
    """Decode worker processes that live for a whole stage run.

    `submit` queues the items of one shard and returns its batches (a `Job`); the workers go
    on to the next submitted shard as soon as they have finished this one, so a shard can be
    decoded while the previous one is in the model. Each batch is cut into tasks of at most
    MAX_CHUNK items, whatever the forward batch, so every worker takes part in each batch; at
    most `workers` x PREFETCH tasks are decoded ahead of the consumer. A worker collates its
    task's samples itself (one piece per task, not one per item, crosses between processes);
    with a `Pack`, it writes the packed tensor straight into the batch's shared buffer.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor: Any = None
        self._queue: list[tuple[Job, int, int]] = []  # tasks not yet handed to a worker
        self._in_flight = 0  # handed out and not yet taken by a consumer
        self._buffers = Buffers()
        self._threads: int | None = None  # the main process's torch threads before a CUDA job

    def submit(
        self,
        items: Sequence[Item],
        load: Callable[[Item], Sample],
        batch_size: int,
        collate: Callable[[list[Sample]], Any] = _as_list,
        pin_memory: bool = False,
        pack: Pack | None = None,
    ) -> Job:
        chunk = max(1, min(MAX_CHUNK, -(-batch_size // max(1, self.workers))))
        batches = []
        for s in range(0, len(items), batch_size):
            part = items[s : s + batch_size]
            tasks = [part[c : c + chunk] for c in range(0, len(part), chunk)]
            rows = [sum(pack.rows(i) for i in task) for task in tasks] if pack else [0] * len(tasks)
            offsets = [int(x) for x in np.cumsum([0, *rows[:-1]])]
            batches.append(_Batch(tasks, offsets, int(sum(rows))))
        job = Job(self, batches, load, collate, pin_memory, pack)
        if pin_memory and self._threads is None:
            # Batches for CUDA: this process only feeds the device, and its CPU ops (copies,
            # post-processing) are small; its threads take the CPUs the workers leave.
            import torch

            self._threads = torch.get_num_threads()
            torch.set_num_threads(min(self._threads, main_threads(self.workers)))
        self._queue.extend((job, b, t) for b, x in enumerate(batches) for t in range(len(x.tasks)))
        self._top_up()
        return job

    def _top_up(self, until: tuple[Job, int, int] | None = None) -> None:
        """Hand queued tasks to the workers while fewer than the limit are out (and at least
        up to task `until`, which a consumer is waiting for)."""
        limit = self.workers * PREFETCH
        while self._queue and (
            self._in_flight < limit
            or (until is not None and until[0].futures[until[1]][until[2]] is None)
        ):
            job, b, t = self._queue.pop(0)
            job.futures[b][t] = self._pool().submit(
                _load_chunk, job.load, job.batches[b].tasks[t], job.collate, job._into(b, t)
            )
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

    def close(self, wait: bool = True) -> None:
        """Stop the workers; without `wait` they exit in the background, and are waited for
        at the latest when this process exits (`_join_closed`)."""
        if self._executor is not None:
            self._executor.shutdown(wait=wait, cancel_futures=True)
            if not wait:
                _CLOSED.append(self._executor)
            self._executor = None
        self._queue.clear()
        self._in_flight = 0
        self._buffers.close()
        if self._threads is not None:
            import torch

            torch.set_num_threads(self._threads)
            self._threads = None


# This process's feeders by worker count, kept across the shards of a run (`close_feeders`
# ends them), and the jobs submitted ahead of the shard that will consume them.
_FEEDERS: dict[int, Feeder] = {}
_AHEAD: dict[Any, Job] = {}


# Executors closed without waiting, joined at exit: a worker left behind would hold this
# process's output pipes open until its orphan watch (`_exit_with_parent`) ends it.
_CLOSED: list[Any] = []


def _join_closed() -> None:
    while _CLOSED:
        _CLOSED.pop().shutdown(wait=True)


def feeder(workers: int) -> Feeder:
    """This process's feeder with `workers` decode processes (started at first use)."""
    if workers not in _FEEDERS:
        if not _FEEDERS:
            atexit.register(close_feeders)  # before the interpreter tears the executor down
            atexit.register(_join_closed)
        _FEEDERS[workers] = Feeder(workers)
    return _FEEDERS[workers]


def close_feeders(wait: bool = True) -> None:
    """Stop this process's decode workers and forget the jobs submitted ahead; without `wait`
    the workers exit in the background (a stage's last batch is in: its wall time need not
    include their exit), and are waited for when this process exits."""
    _AHEAD.clear()
    for f in _FEEDERS.values():
        f.close(wait)
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
    pack: Pack | None = None,
) -> Iterator[Any]:
    """Yield `collate([load(item) for item in chunk])` for consecutive chunks of `items`.

    Args:
        load: Picklable callable run in the workers (a module-level function or an object of a
            module-level class); it must not touch CUDA.
        batch_size: Items per batch (the last batch may be shorter).
        workers: Worker processes (this process's `feeder`, kept for the run); 0 loads in this
            process. Resolved already (see `resolve_workers`).
        collate: Turns a list of samples into a batch. Picklable: with workers it runs in them,
            on parts of a batch, whose results `merge_pieces` joins, so it must give the same
            batch either way (a list, or tensors concatenated along their first axis).
        pin_memory: Batches in page-locked memory (only useful when they go to CUDA).
        pack: A tensor the workers write straight into a shared buffer per batch (see `Pack`);
            in this process it is collated like the rest.
    """
    if not items:
        return
    workers = usable_workers(workers)
    if workers:
        yield from feeder(workers).submit(items, load, batch_size, collate, pin_memory, pack)
        return
    for s in range(0, len(items), batch_size):
        batch = collate([load(item) for item in items[s : s + batch_size]])
        yield _pin(batch) if pin_memory else batch
