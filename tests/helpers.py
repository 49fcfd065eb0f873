"""Builders shared by tests: small images (valid and broken), datasets and synthetic feature
shards in tmp folders."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import FeaturesConfig
from pipeline.features import CLASS_PROMPTS, compute_features
from pipeline.rows import store
from stages import caption, encode, features, ground, ingest

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


GENERATORS = ("ganA", "diffB", "diffC")


def write_features(directory, n=240, d=6, seed=0, poison_test=False, splits=None):
    """Two separable classes in raw-embedding space, three generators, fixed splits."""
    rng = np.random.default_rng(seed)
    label = np.tile([0, 1], n // 2)
    gen = np.where(label == 0, "real", np.array(GENERATORS)[rng.integers(0, 3, n)])
    shift = np.array([[0.0] * d] + [np.eye(d)[k] * 3 for k in range(3)])
    which = np.where(label == 0, 0, 1 + np.searchsorted(GENERATORS, gen, sorter=[1, 0, 2]))
    image = rng.normal(0, 1, (n, d)) + 5.0 + shift[which]
    image[:, 0] += 6.0 * (2 * label - 1)
    text = rng.normal(0, 1, (n, d)) - 2.0
    split = (
        splits if splits is not None else np.array(["train", "val", "test"])[np.arange(n) % 5 % 3]
    )
    if poison_test:
        test = split == "test"
        label = np.where(test, 1 - label, label)
        image = np.where(test[:, None], np.random.default_rng(99).normal(0, 100, (n, d)), image)
    clip = {
        "image_emb": image.astype(np.float32),
        "text_emb": text.astype(np.float32),
        "obj_offsets": np.zeros(n + 1, np.int64),
        "obj_image_emb": np.zeros((0, d), np.float32),
        "obj_text_emb": np.zeros((0, d), np.float32),
    }
    feats = compute_features(clip, FeaturesConfig())
    meta = {
        "ids": np.array([f"id{i}" for i in range(n)], dtype=object),
        "label": label.astype(np.int8),
        "generator": gen.astype(object),
        "split": np.asarray(split, dtype=object),
        "family": np.where(label == 0, "real", "fam").astype(object),
        "subset": np.full(n, "", dtype=object),
    }
    store.write_shard(directory / store.shard_name(0), {**meta, **feats}, {})
    store.write_shard(
        directory / CLASS_PROMPTS,
        {"ids": np.array(["c0", "c1"], dtype=object), "text_emb": rng.normal(size=(2, d))},
        {},
    )
    return directory


def with_value(params: dict, key: str, value: object) -> dict:
    """Set dotted `key` (e.g. "train.mlp.epochs") in a params mapping, creating sections."""
    node = params
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return params


def tiny_params(tmp: Path, **overrides: object) -> str:
    """A params.yaml in `tmp`: the project's, with the tiny preset, shards of 8 images and the
    dotted `overrides` (pass them as a dict: `**{"train.heads": ["svm"]}`)."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["models"]["preset"] = "tiny"
    params["ingest"]["shard_size"] = 8
    for dotted, value in overrides.items():
        with_value(params, dotted, value)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


def flip_byte(path: Path, key: str, at: int = 0) -> None:
    """Flip one byte inside dataset `key`'s stored data (contiguous layout), in place."""
    import h5py

    with h5py.File(path, "r") as fh:
        offset = fh[key].id.get_offset()
    assert offset is not None
    with open(path, "r+b") as fh:
        fh.seek(offset + at)
        byte = fh.read(1)
        fh.seek(offset + at)
        fh.write(bytes([byte[0] ^ 0x40]))


def saved_head(tmp_path: Path, name: str = "svm") -> Path:
    """A small head of registry name `name` fitted on separable data and saved with its
    train.json, as the train stage leaves it."""
    import json

    import numpy as np

    from pipeline.heads import make_head, save_head

    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 6))
    y = (X[:, 0] > 0).astype(int)
    params = {"epochs": 2, "hidden": 4} if name == "mlp" else {}
    head = make_head(name, params).fit(X, y, X_val=X[:10], y_val=y[:10])
    save_head(head, tmp_path / name)
    (tmp_path / name / "train.json").write_text(json.dumps({"head": name, "kind": "item"}))
    return tmp_path / name


def pipeline_params(tmp: Path, **overrides: object) -> str:
    """`tiny_params` for whole tiny pipelines on a few images: 20 MLP epochs and 2 meta folds
    (the smallest test datasets have 3-4 real images); `overrides` as "section.key" names."""
    return tiny_params(tmp, **{"train.mlp.epochs": 20, "train.meta.n_folds": 2, **overrides})


EXTRACTION = ("ingest", "caption", "ground", "encode", "features")


def extract_stages(
    cache: Path, data: Path, params: str, *, only: tuple[str, ...] = EXTRACTION
) -> int:
    """Run the extraction stage scripts `only` (in pipeline order) on `data` into
    `cache/<stage dir>` as dataset "t", as `dvc repro` would; returns the first nonzero exit
    status, else 0."""
    c = str(cache)
    args = {
        "ingest": (ingest, ["--data", str(data), "--out", f"{c}/ingest"]),
        "caption": (caption, ["--ingest", f"{c}/ingest", "--out", f"{c}/captions"]),
        "ground": (
            ground,
            ["--ingest", f"{c}/ingest", "--captions", f"{c}/captions", "--out", f"{c}/objects"],
        ),
        "encode": (
            encode,
            [
                *("--ingest", f"{c}/ingest", "--captions", f"{c}/captions"),
                *("--objects", f"{c}/objects", "--out", f"{c}/clip"),
            ],
        ),
        "features": (
            features,
            [
                *("--ingest", f"{c}/ingest", "--clip", f"{c}/clip"),
                *("--captions", f"{c}/captions", "--out", f"{c}/features"),
            ],
        ),
    }
    for name in EXTRACTION:
        if name in only:
            module, stage_args = args[name]
            status = module.main([*stage_args, "--params", params, "--name", "t"])
            if status:
                return status
    return 0
