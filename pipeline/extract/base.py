"""The shared step base: what every extraction step (caption, ground, encode) does alike.

A step reads its inputs row-aligned with the ingest shard (`ingest_rows`, `aligned`), keys
its rows (`ModelStep.key`, see `pipeline.rows.key`), records what made them (`model_attrs`)
and feeds images to its model through decode workers (`DecodeThen`, `decode_workers`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import BaseConfig, ModelsConfig
from pipeline.data.images import load_rgb
from pipeline.models import check_weights, resolve_device
from pipeline.models.identity import runtime_class, weights_identity
from pipeline.rows import reader, store
from pipeline.rows.key import check_unchanged, runtime_key
from pipeline.rows.store import Arrays


class ModelStep:
    """The parts of `pipeline.rows.runner.Step` that every extraction step shares. Subclasses
    are dataclasses with these fields and add `roles`, `params_hash`, `attrs`, `read` and
    `compute`."""

    ingest_dir: Path
    models: ModelsConfig
    base: BaseConfig
    dataset: str
    stage: str

    def roles(self) -> list[str]:
        """The model roles the step runs with its settings (none: no model)."""
        raise NotImplementedError

    def n_shards(self) -> int:
        return len(store.list_shards(self.ingest_dir))

    def key(self) -> dict[str, Any]:
        roles = self.roles()
        weights = {r: weights_identity(r, self.models, self.base.seed) for r in roles}
        runtime = runtime_class(self.base) if roles else {}
        return runtime_key(self.stage, weights=weights, runtime=runtime)

    def feed(self, rows: Arrays) -> Feed | None:
        """What the decode workers do for `rows` (None: no image to decode)."""
        return None

    def prefetch(self, rows: Arrays) -> None:
        """Hand `rows`' images to the decode workers now, ahead of `compute(rows)` (the runner
        calls it for the next shard while the current one is in the model)."""
        feed = self.feed(rows)
        workers = reader.usable_workers(decode_workers(self.base))
        if feed is not None and feed.items and workers:
            job = reader.feeder(workers).submit(
                feed.items, feed.load, feed.batch_size, feed.collate, feed.pin_memory, feed.pack
            )
            reader.submit_ahead(_feed_key(self.stage, rows), job)

    def batches(self, rows: Arrays, feed: Feed) -> Iterator[Any]:
        """`feed`'s batches for `rows`: those submitted by `prefetch(rows)`, else read now."""
        ahead = reader.take_ahead(_feed_key(self.stage, rows))
        if ahead is not None:
            return iter(ahead)
        return reader.read_batches(
            feed.items,
            feed.load,
            feed.batch_size,
            decode_workers(self.base),
            feed.collate,
            pin_memory=feed.pin_memory,
            pack=feed.pack,
        )


@dataclass
class Feed:
    """A step's per-image CPU work on some rows: items for `load` (run in a decode worker),
    the forward batch, how samples become a batch (`collate`, run in the workers on parts of
    it, see `reader.read_batches`), whether it goes to CUDA, and the tensor the workers write
    straight into the batch (`reader.Pack`)."""

    items: list[Any]
    load: Callable[[Any], Any]
    batch_size: int
    collate: Callable[[list[Any]], Any] = list
    pin_memory: bool = False
    pack: reader.Pack | None = None


def _feed_key(stage: str, rows: Arrays) -> tuple[str, ...]:
    return (stage, *(str(x) for x in rows["ids"]))


def ingest_rows(ingest_dir: Path, index: int, keys: Sequence[str]) -> Arrays:
    """Columns `keys` of ingest shard `index`; a `path` column comes back absolute, with the
    decoding flag ingest recorded (`exif_transpose`) beside it."""
    path = ingest_dir / store.shard_name(index)
    rows = store.read_shard(path, ["ids", *keys])
    if "path" in rows:
        attrs = store.read_attrs(path)
        root = Path(str(attrs["data_root"]))
        rows["path"] = np.array([str(root / p) for p in rows["path"]], dtype=object)
        # Every image must still be the file ingest hashed: never used under an old id.
        with store.open_shard(path) as fh:
            stamped = "file_size" in fh and "file_mtime_ns" in fh
        if not stamped:
            raise store.ShardError(
                f"{path} was written by an older ingest that did not record file sizes and "
                "times; rerun ingest (`dvc repro` reruns it)"
            )
        stamps = store.read_shard(path, ["file_size", "file_mtime_ns"])
        check_unchanged(
            [str(p) for p in rows["path"]],
            [str(i) for i in rows["ids"]],
            [int(v) for v in stamps["file_size"]],
            [int(v) for v in stamps["file_mtime_ns"]],
        )
        rows["exif_transpose"] = np.full(
            len(rows["ids"]), bool(attrs.get("exif_transpose", True)), dtype=bool
        )
    return rows


def aligned(upstream: Path, index: int, ids: np.ndarray, keys: Sequence[str]) -> Arrays:
    """Columns `keys` of an upstream step's shard `index`, refused unless its rows are `ids`."""
    path = upstream / store.shard_name(index)
    if not path.exists():
        raise store.ShardError(f"{path} is missing; run the stage that writes {upstream} first")
    rows = store.read_shard(path, ["ids", *keys])
    if not np.array_equal(rows["ids"], ids):
        raise store.ShardError(
            f"{path} is not row-aligned with the ingest shard (the dataset changed since it was "
            "written); rerun the stages in order (dvc repro does)"
        )
    return rows


def model_attrs(
    stage: str, dataset: str, preset: str, key: dict[str, Any], no_model: str, upstream: str
) -> dict[str, Any]:
    """Shard attributes: `model` names the weights actually used (name@revision or
    name@sha256:...), plus dtype, device class, step version and the provenance chain."""
    weights = key.get("weights", {})
    own = {
        "model": "; ".join(weights.values()) or no_model,
        "dtype": key.get("dtype", ""),
        "device_class": key.get("device_class", ""),
        "step_version": key["step_version"],
    }
    chain = json.loads(upstream) if upstream else {}
    chain[stage] = own
    return {
        "stage": stage,
        "dataset": dataset,
        "preset": preset,
        **own,
        "weights": json.dumps(weights, sort_keys=True),
        "provenance": json.dumps(chain, sort_keys=True),
    }


def upstream_provenance(*directories: Path) -> str:
    """The provenance chain of the stages a step reads (each folder's shards must agree)."""
    chain: dict[str, Any] = {}
    for directory in directories:
        attrs = store.dataset_attrs(directory)
        chain.update(json.loads(str(attrs.get("provenance") or "{}")))
    return json.dumps(chain, sort_keys=True)


def batch_slices(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most `size` over `n` items."""
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


@dataclass
class DecodeThen:
    """A model's per-image CPU work, run in a decode worker: decode the item's image as ingest
    checked it (`data.images.load_rgb`), then `encode(image, *rest)` with the item's other fields
    (e.g. its caption). Items are (path, exif_transpose, *rest)."""

    encode: Callable[..., Any]

    def __call__(self, item: tuple[Any, ...]) -> Any:
        path, exif_transpose, *rest = item
        return self.encode(load_rgb(path, exif_transpose), *rest)


def decode_workers(base: BaseConfig) -> int:
    """Decode processes for one extraction process (Dask workers share the machine's CPUs)."""
    sharing = base.n_workers if base.scheduler == "dask" and not base.dask_address else 1
    return reader.resolve_workers(base.decode_workers, sharing)


def scaled_batch_size(configured: int, base: BaseConfig) -> int:
    """The params' batch size on a CPU, times base.cuda_batch_scale on CUDA."""
    scale = base.cuda_batch_scale if resolve_device(base.device).startswith("cuda") else 1
    return max(1, configured * max(1, scale))


def scheduler_args(base: BaseConfig) -> dict[str, Any]:
    """`run_step`'s scheduler arguments from the base params."""
    return {
        "scheduler": base.scheduler,
        "dask_address": base.dask_address,
        "n_workers": base.n_workers,
    }


def preflight(models: ModelsConfig, roles: Sequence[str]) -> None:
    """Fail in seconds, before any work, if a needed model's weights are absent."""
    check_weights(models, list(roles))
