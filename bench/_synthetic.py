"""Synthetic inputs for the benchmarks: distinct JPEGs, and the encode stage's inputs for them
(ingest shards, dataset captions, seeded object boxes) made without a captioner or grounder.

One home for what bench_reader, bench_feed and gpu_check each wrote before. Imported as
`bench._synthetic` by scripts run as `python bench/<script>.py` (they put the project root on
`sys.path` first).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import Params
from pipeline.data.ingest import run_ingest
from pipeline.extract.caption import run_caption
from pipeline.rows import store

PHRASES = ("car", "tree", "person", "dog", "red sofa", "street")


def synthetic_images(folder: Path, *, n: int, width: int, height: int, seed: int = 0) -> list[Path]:
    """`n` distinct JPEGs of `width` x `height` in `folder`: colour gradients plus noise, so
    that they decode and compress like photos rather than flat colour."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:height, 0:width]
    paths = []
    for i in range(n):
        base = np.stack(
            [(xx * (i % 7 + 1)) % 256, (yy * (i % 5 + 1)) % 256, (xx + yy + i) % 256], -1
        )
        arr = np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"img_{i:05d}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return paths


def write_manifest(images: list[Path], *, caption: str) -> Path:
    """A manifest.csv beside `images` (alternating labels, one generator) with a distinct
    caption per image (`caption` and its index), so the text tower runs once per image as on a
    real dataset; returns the images' folder."""
    data = images[0].parent
    with (data / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "generator", "caption"])
        writer.writerows([p.name, i % 2, "g", f"{caption} {i}"] for i, p in enumerate(images))
    return data


def encode_inputs(
    images: list[Path],
    cache: Path,
    params: Params,
    *,
    dataset: str,
    caption: str,
    per_image: int,
    seed: int = 0,
) -> list[tuple[str, np.ndarray]]:
    """What the encode stage reads for `images`, in `cache/{ingest,captions,objects}`: a
    manifest, the ingest shards, the dataset's captions (`params.caption.source` must be
    `dataset`: no captioner runs) and `per_image` seeded boxes inside each image with phrases
    from `PHRASES` (what the ground stage writes, without its model).

    Returns:
        (image path, its boxes) for every row, in shard order: the crops the encode stage cuts.
    """
    if params.caption.source != "dataset":
        raise ValueError(f"caption.source must be 'dataset', not {params.caption.source!r}")
    data = write_manifest(images, caption=caption)
    run_ingest(data, cache / "ingest", cfg=params.ingest, base=params.base, dataset=dataset)
    run_caption(
        cache / "ingest",
        cache / "captions",
        cfg=params.caption,
        models=params.models,
        base=params.base,
        dataset=dataset,
    )
    rng = np.random.default_rng(seed)
    phrases = np.array(PHRASES, dtype=object)
    items: list[tuple[str, np.ndarray]] = []
    for shard in store.list_shards(cache / "ingest"):
        rows = store.read_shard(shard, ["ids", "path", "width", "height"])
        boxes = []
        for name, w, h in zip(rows["path"], rows["width"], rows["height"]):
            x0 = rng.uniform(0, w * 0.6, per_image)
            y0 = rng.uniform(0, h * 0.6, per_image)
            x1 = x0 + rng.uniform(16, w * 0.4, per_image)
            y1 = y0 + rng.uniform(16, h * 0.4, per_image)
            boxes.append(np.stack([x0, y0, x1, y1], 1).astype(np.float32))
            items.append((str(data / str(name)), boxes[-1]))
        n = len(rows["ids"])
        store.write_shard(
            cache / "objects" / shard.name,
            {
                "ids": rows["ids"],
                "obj_offsets": np.arange(0, per_image * n + 1, per_image, dtype=np.int64),
                "obj_boxes": np.concatenate(boxes).reshape(-1, 4),
                "obj_phrase": rng.choice(phrases, per_image * n).astype(object),
            },
            {"stage": "objects", "params_hash": "synthetic"},
        )
    return items
