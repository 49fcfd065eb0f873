"""Read → map → write over shards: reuse what is cached, resume after interruption, time phases.

An extraction step (caption, ground, encode) implements `Step`: `read(i)` gives the inputs of
shard i (row-aligned with the ingest shard), `compute(rows, timer)` maps rows through a model.
`run_step` decides per row whether it can be reused from the previous outputs (same
`params_hash` and same `input_hash`: the row key, see `key`) and writes
the new shards to `<out>/.partial/` first; they replace the old shards only once every shard is
complete. An interrupted run therefore leaves the old outputs intact and its finished shards in
`.partial/`, which the next run picks up.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline.logs import progress
from pipeline.rows import store
from pipeline.rows.atomic import writable_dir, write_text
from pipeline.rows.key import matches, reuse_index
from pipeline.rows.store import Arrays

logger = logging.getLogger(__name__)

PARTIAL = ".partial"
PHASES = ("read", "model", "write")


@dataclass
class Timer:
    """Accumulates seconds per phase, and passes the images a step has finished inside a shard
    (`advance`) to the stage's progress bar, which then moves per batch rather than per shard.
    """

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    on_advance: Callable[[int], Any] | None = None
    n_advanced: int = 0

    def advance(self, n_images: int) -> None:
        self.n_advanced += n_images
        if self.on_advance is not None:
            self.on_advance(n_images)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


class Step(Protocol):
    """One extraction stage, as the runner sees it. Must be picklable (Dask ships it)."""

    stage: str

    def params_hash(self) -> str: ...

    def attrs(self) -> dict[str, Any]: ...

    def n_shards(self) -> int: ...

    def read(self, index: int) -> Arrays:
        """Inputs of shard `index`: `ids`, `input_hash` and whatever `compute` needs."""
        ...

    def compute(self, rows: Arrays, timer: Timer) -> Arrays:
        """Outputs for `rows` (a subset of `read`), including `ids` and `input_hash`; calls
        `timer.advance(n)` after each batch of n images (optional: the runner counts the rest
        when the shard is done)."""
        ...


@dataclass
class ShardReport:
    index: int
    n_processed: int
    n_reused: int
    seconds: dict[str, float]


def process_shard(
    step: Step,
    index: int,
    out_dir: str,
    reuse: dict[str, tuple[str, int, str]],
    progress: Callable[[int], Any] | None = None,
) -> ShardReport:
    """Build shard `index` into `<out_dir>/.partial/`, reusing rows where allowed.

    Args:
        progress: called with numbers of images done, adding up to the shard's rows.
    """
    timer = Timer(on_advance=progress)
    report = _build_shard(step, index, out_dir, reuse, timer)
    rest = report.n_processed + report.n_reused - timer.n_advanced
    if rest > 0:  # reused rows, and a step's batches that it did not report
        timer.advance(rest)
    return report


def _build_shard(
    step: Step, index: int, out_dir: str, reuse: dict[str, tuple[str, int, str]], timer: Timer
) -> ShardReport:
    target = Path(out_dir) / PARTIAL / store.shard_name(index)
    with timer("read"):
        inputs = step.read(index)
    ids = [str(x) for x in inputs["ids"]]
    hashes = [str(x) for x in inputs["input_hash"]]
    phash = step.params_hash()
    attrs = step.attrs()

    final = Path(out_dir) / store.shard_name(index)
    if matches(final, phash, ids, hashes, attrs):
        # Already what this run would write: leave the file (and its DVC hash) untouched.
        target.unlink(missing_ok=True)
        return ShardReport(index, 0, len(ids), timer.seconds)
    if matches(target, phash, ids, hashes, attrs):
        return ShardReport(index, 0, len(ids), timer.seconds)

    parts: list[Arrays] = []
    by_file: dict[str, list[tuple[int, int]]] = defaultdict(list)
    todo: list[int] = []
    for i, (cid, ihash) in enumerate(zip(ids, hashes)):
        hit = reuse.get(cid)
        if hit is not None and hit[2] == ihash:
            by_file[hit[0]].append((i, hit[1]))
        else:
            todo.append(i)
    with timer("read"):
        for path, pairs in by_file.items():
            parts.append(store.take_rows(store.read_shard(path), [r for _, r in pairs]))
    if todo:
        parts.append(step.compute(store.take_rows(inputs, todo), timer))
    merged = store.concat_rows(parts)
    position = {str(cid): k for k, cid in enumerate(merged["ids"])}
    ordered = store.take_rows(merged, [position[cid] for cid in ids])
    with timer("write"):
        store.write_shard(target, ordered, {**attrs, "params_hash": phash})
    return ShardReport(index, len(todo), len(ids) - len(todo), timer.seconds)


def _n_gpus() -> int:
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - no usable torch/CUDA means no GPU to share out
        return 0


def local_cluster(n_workers: int) -> Any:
    """A cluster on this machine: one worker process per GPU when there are GPUs (dask-cuda's
    LocalCUDACluster when installed, else one Nanny per GPU with its own
    CUDA_VISIBLE_DEVICES), else `n_workers` CPU worker processes.

    Workers are not daemonic, so that each can start its own decode processes.
    """
    # dask (and dask-cuda) load in seconds and serve only scheduler=dask runs.
    import dask
    from dask.distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    n_gpus = _n_gpus()
    with dask.config.set({"distributed.worker.daemon": False}):
        if not n_gpus:
            return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True)
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            workers = {
                f"gpu{i}": {
                    "cls": Nanny,
                    "options": {"nthreads": 1, "env": {"CUDA_VISIBLE_DEVICES": str(i)}},
                }
                for i in range(n_gpus)
            }
            scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
            return SpecCluster(workers=workers, scheduler=scheduler)
        return LocalCUDACluster(threads_per_worker=1)


def _client(scheduler: str, address: str, n_workers: int) -> Any:
    from dask.distributed import Client  # only scheduler=dask runs pay for dask

    if address:
        return Client(address)
    return Client(local_cluster(n_workers))


def run_step(
    step: Step,
    out_dir: str | Path,
    *,
    scheduler: str = "local",
    dask_address: str = "",
    n_workers: int = 2,
    finish: Callable[[], Any] | None = None,
    load_counts: Callable[[], dict[str, int]] | None = None,
) -> dict[str, Any]:
    """Run `step` over all shards into `out_dir` and write its timings (`timings_path`).

    `finish` (picklable) runs once after the shards, on a worker under Dask (where the models
    are already loaded), e.g. to encode the class prompts. `load_counts` gives this process's
    model loads by role; their increase during the step is recorded as `model_loads` (under
    Dask the workers load the models, and this process counts none).

    Returns:
        The timings: seconds per phase, images per second, n_processed, n_reused.
    """
    out_dir = Path(out_dir)
    writable_dir(out_dir / PARTIAL)
    start = time.perf_counter()
    loads_before = load_counts() if load_counts is not None else {}
    phash = step.params_hash()
    reuse = reuse_index([out_dir, out_dir / PARTIAL], phash)
    n = step.n_shards()
    reports: list[ShardReport] = []
    # Counted in images over the whole stage (a shard is 64 of them), so that the rate and the
    # ETA mean something; rows reused from the cache count as done. Log lines (a model loading
    # inside the first shard) are written above the bar, not into it.
    bar = progress(total=_n_images(step), desc=step.stage, unit="img")
    with bar, logging_redirect_tqdm():
        if scheduler == "dask":
            client = _client(scheduler, dask_address, n_workers)
            try:
                futures = [
                    client.submit(process_shard, step, i, str(out_dir), reuse, pure=False)
                    for i in range(n)
                ]
                from dask.distributed import as_completed  # see _client

                for fut in as_completed(futures):  # a worker's batches cannot reach this bar
                    reports.append(fut.result())
                    bar.update(reports[-1].n_processed + reports[-1].n_reused)
                if finish is not None:
                    client.submit(finish, pure=False).result()
            finally:
                client.close()
        else:
            for i in range(n):
                reports.append(process_shard(step, i, str(out_dir), reuse, bar.update))
            if finish is not None:
                finish()

    # Every shard is complete: swap them in, then drop shards the dataset no longer has.
    for i in range(n):
        built = out_dir / PARTIAL / store.shard_name(i)
        if built.exists():  # absent when the existing shard was already right
            os.replace(built, out_dir / store.shard_name(i))
    for path in store.list_shards(out_dir)[n:]:
        path.unlink()
    shutil.rmtree(out_dir / PARTIAL, ignore_errors=True)

    seconds = {p: round(sum(r.seconds.get(p, 0.0) for r in reports), 4) for p in PHASES}
    n_processed = sum(r.n_processed for r in reports)
    n_reused = sum(r.n_reused for r in reports)
    busy = seconds["read"] + seconds["model"]
    timings = {
        "stage": step.stage,
        "seconds": seconds,
        "wall_seconds": round(time.perf_counter() - start, 4),
        "images_per_second": round(n_processed / busy, 4) if n_processed and busy else None,
        "n_processed": n_processed,
        "n_reused": n_reused,
        "n_images": n_processed + n_reused,
        "n_shards": n,
        "scheduler": scheduler,
    }
    if load_counts is not None:
        loads = load_counts()
        timings["model_loads"] = {
            role: n - loads_before.get(role, 0)
            for role, n in sorted(loads.items())
            if n > loads_before.get(role, 0)
        }
    write_text(timings_path(out_dir), json.dumps(timings, indent=2) + "\n")
    logger.info(
        "%s: %d images processed, %d reused from cache, %d shards in %.1fs",
        step.stage,
        n_processed,
        n_reused,
        n,
        timings["wall_seconds"],
    )
    return timings


def timings_path(out_dir: str | Path) -> Path:
    """`<dataset cache>/timings/<stage dir>.json`: beside the stage's folder, not in it, so that
    a rerun that changes no row changes no DVC-tracked output (timings differ at every run)."""
    out_dir = Path(out_dir)
    return out_dir.parent / "timings" / f"{out_dir.name}.json"


def _n_images(step: Step) -> int | None:
    """Rows the step will go through: those of its ingest shards (None when unknown)."""
    ingest = getattr(step, "ingest_dir", None)
    if ingest is None:
        return None
    total = 0
    for path in store.list_shards(ingest):
        total += len(store.read_ids(path))
    return total
