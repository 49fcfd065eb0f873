"""Read → map → write over shards: reuse what is cached, resume after interruption, time phases.

An extraction step (caption, ground, encode) implements `Step`: `read(i)` gives the inputs of
shard i (row-aligned with the ingest shard), `compute(rows, timer)` maps rows through a model.
`run_step` decides per row whether it can be reused from the previous outputs (same
`params_hash` and same `input_hash`: the row key, see `key`) and writes
the new shards to `<out>/.partial/` first; they replace the old shards only once every shard is
complete. An interrupted run therefore leaves the old outputs intact and its finished shards in
`.partial/`, which the next run picks up. A step with `retain_params = k` keeps the shards its
new ones replace, when other params made them, in `<dataset cache>/retained/<stage dir>/<their
params hash>/` (the newest k sets), so that switching a param back (e.g. `caption.model`)
reuses those rows instead of recomputing them.

The rows finished inside the shard being built when the run is interrupted (Ctrl-C, kill) are
not kept: a step's `compute` returns a shard's rows at once (encode synchronises the device
once per shard), so keeping them would mean cutting every shard into several model calls at
every run to save at most one shard (`ingest.shard_size` images) of work on an interruption.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline.logs import progress
from pipeline.rows import reader, store
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
    return _finish(step, _plan(step, index, out_dir, reuse, Timer(on_advance=progress)))


@dataclass
class _Plan:
    """A shard read and sorted into rows to compute (`todo`) and rows reused from cached
    shards, held as the verified rows themselves (`reused`): each cached shard is read once,
    checked against its checksums in that same read, and only the rows this shard takes from it
    are kept, so `_finish` reads no file again and a later change on disk cannot reach them.
    """

    index: int
    out_dir: str
    timer: Timer
    ids: list[str]
    inputs: Arrays | None = None  # None: the shard is already complete
    todo: list[int] = field(default_factory=list)
    reused: list[Arrays] = field(default_factory=list)
    phash: str = ""
    attrs: dict[str, Any] = field(default_factory=dict)

    def todo_rows(self) -> Arrays | None:
        if self.inputs is None or not self.todo:
            return None
        return store.take_rows(self.inputs, self.todo)


def _plan(
    step: Step, index: int, out_dir: str, reuse: dict[str, tuple[str, int, str]], timer: Timer
) -> _Plan:
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
        return _Plan(index, out_dir, timer, ids)
    if matches(target, phash, ids, hashes, attrs):
        return _Plan(index, out_dir, timer, ids)

    by_file: dict[str, list[tuple[int, int]]] = defaultdict(list)
    todo: list[int] = []
    for i, (cid, ihash) in enumerate(zip(ids, hashes)):
        hit = reuse.get(cid)
        if hit is not None and hit[2] == ihash:
            by_file[hit[0]].append((i, hit[1]))
        else:
            todo.append(i)
    reused: list[Arrays] = []
    with timer("read"):
        for path, pairs in by_file.items():
            try:
                # Every dataset, each checked against its checksum (None: all of them).
                cached = store.read_shard(path)
            except store.ShardError as err:
                # A damaged cached shard: its rows are recomputed, never reused.
                logger.warning("%s; recomputing its rows", err)
                todo.extend(i for i, _ in pairs)
                continue
            reused.append(store.take_rows(cached, [row for _, row in pairs]))
    todo.sort()
    return _Plan(index, out_dir, timer, ids, inputs, todo, reused, phash, attrs)


def _prefetch(step: Step, plan: _Plan) -> None:
    """Let the step's decode workers start on the plan's images (steps that read images)."""
    rows = plan.todo_rows()
    prefetch = getattr(step, "prefetch", None)
    if rows is not None and prefetch is not None:
        prefetch(rows)


def _finish(step: Step, plan: _Plan) -> ShardReport:
    timer = plan.timer
    if plan.inputs is None:
        report = ShardReport(plan.index, 0, len(plan.ids), timer.seconds)
    else:
        parts = list(plan.reused)
        plan.reused = []  # merged below: the plan keeps no second copy of them
        rows = plan.todo_rows()
        if rows is not None:
            parts.append(step.compute(rows, timer))
        merged = store.concat_rows(parts)
        position = {str(cid): k for k, cid in enumerate(merged["ids"])}
        ordered = store.take_rows(merged, [position[cid] for cid in plan.ids])
        target = Path(plan.out_dir) / PARTIAL / store.shard_name(plan.index)
        with timer("write"):
            store.write_shard(target, ordered, {**plan.attrs, "params_hash": plan.phash})
        n_todo = len(plan.todo)
        report = ShardReport(plan.index, n_todo, len(plan.ids) - n_todo, timer.seconds)
    rest = report.n_processed + report.n_reused - timer.n_advanced
    if rest > 0:  # reused rows, and a step's batches that it did not report
        timer.advance(rest)
    return report


def _local_shards(
    step: Step,
    n: int,
    out_dir: str,
    reuse: dict[str, tuple[str, int, str]],
    progress: Callable[[int], Any],
) -> Iterator[ShardReport]:
    """The shards in order, in this process, one ahead: shard i+1 is read and its images
    handed to the decode workers before shard i goes to the model."""
    if not n:
        return
    plan = _plan(step, 0, out_dir, reuse, Timer(on_advance=progress))
    _prefetch(step, plan)
    for i in range(n):
        following = None
        if i + 1 < n:
            following = _plan(step, i + 1, out_dir, reuse, Timer(on_advance=progress))
            _prefetch(step, following)
        yield _finish(step, plan)
        if following is not None:
            plan = following


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
    reuse_from: Sequence[Path] = (),
) -> dict[str, Any]:
    """Run `step` over all shards into `out_dir` and write its timings (`timings_path`).

    `reuse_from`: other folders of the same step (e.g. the main pipeline's, for a study's own
    folder) whose rows, and those retained beside them, are reused under the same row key;
    they are only read.

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
    retain = int(getattr(step, "retain_params", 0))
    kept = [retained_dir(out_dir) / phash] if retain else []
    elsewhere = [d for src in map(Path, reuse_from) for d in (src, retained_dir(src) / phash)]
    # Listed last, this folder's own rows win over equal rows elsewhere.
    reuse = reuse_index([*elsewhere, out_dir, out_dir / PARTIAL, *kept], phash)
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
            try:
                reports.extend(_local_shards(step, n, str(out_dir), reuse, bar.update))
            finally:
                reader.close_feeders(wait=False)  # joined at exit at the latest
            if finish is not None:
                finish()

    # Every shard is complete: swap them in, then drop shards the dataset no longer has.
    for i in range(n):
        built = out_dir / PARTIAL / store.shard_name(i)
        if built.exists():  # absent when the existing shard was already right
            if retain:
                _retain(out_dir / store.shard_name(i), phash)
            os.replace(built, out_dir / store.shard_name(i))
    for path in store.list_shards(out_dir)[n:]:
        path.unlink()
    shutil.rmtree(out_dir / PARTIAL, ignore_errors=True)
    if retain:  # this run's params now live in out_dir: keep no second copy of them
        shutil.rmtree(retained_dir(out_dir) / phash, ignore_errors=True)
        _prune_retained(out_dir, retain)

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
        # The wall-clock time lives here, beside the outputs, never in a shard (see store).
        "finished_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
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


def retained_dir(out_dir: str | Path) -> Path:
    """`<dataset cache>/retained/<stage dir>/`: the shards of other params a step keeps (see the
    module docstring); beside the stage's folder, so DVC does not track them as its output."""
    out_dir = Path(out_dir)
    return out_dir.parent / "retained" / out_dir.name


def _retain(shard: Path, phash: str) -> None:
    """Move `shard` aside under its own params hash when other params than `phash` made it."""
    if not shard.exists():
        return
    try:
        made_by = str(store.read_attrs(shard).get("params_hash", ""))
    except store.ShardError:
        return  # unreadable: nothing worth keeping; the new shard replaces it
    if not made_by or made_by == phash:
        return
    target = retained_dir(shard.parent) / made_by
    target.mkdir(parents=True, exist_ok=True)
    os.replace(shard, target / shard.name)
    os.utime(target)  # the newest sets are the ones kept


def _prune_retained(out_dir: Path, keep: int) -> None:
    """Keep the `keep` most recently retained params sets of `out_dir`'s step."""
    root = retained_dir(out_dir)
    if not root.is_dir():
        return
    sets = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for old in sets[: max(0, len(sets) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def _n_images(step: Step) -> int | None:
    """Rows the step will go through: those of its ingest shards (None when unknown)."""
    ingest = getattr(step, "ingest_dir", None)
    if ingest is None:
        return None
    total = 0
    for path in store.list_shards(ingest):
        total += len(store.read_ids(path))
    return total
