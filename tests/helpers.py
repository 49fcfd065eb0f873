"""Builders shared by tests: small images (valid and broken) and datasets in tmp folders."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"


def make_image(path: Path, seed: int, size: tuple[int, int] = (64, 48)) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def write_manifest(path: Path, rows: list[dict[str, object]]) -> Path:
    keys = list(rows[0])
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def tiny_sample(dest: Path, per_generator: int = 2, n_real: int = 12) -> Path:
    """A copy of a few shipped sample images (all real ones up to n_real, a few per generator)
    with its manifest, so end-to-end tests run on real photos in seconds."""
    with (SAMPLE / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    keep, seen = [], {}
    for row in rows:
        g = row["generator"]
        cap = n_real if g == "real" else per_generator
        if seen.get(g, 0) < cap:
            seen[g] = seen.get(g, 0) + 1
            keep.append(row)
    for row in keep:
        target = dest / row["file"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SAMPLE / row["file"], target)
    write_manifest(dest / "manifest.csv", keep)
    return dest
