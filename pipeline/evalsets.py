"""Further evaluation sets: perturbed copies of a dataset, other datasets, JPEG qualities.

Each set is an ordinary dataset under `cache/<name>/` that goes through the same extraction
(ingest → caption → ground → encode → features, with the same row cache) and is scored by the
trained heads into `metrics/eval_<name>.json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.data.images import load_rgb
from pipeline.data.ingest import run_ingest
from pipeline.data.manifest import write_csv
from pipeline.errors import DataUnusable
from pipeline.extract.caption import CaptionStep, run_caption
from pipeline.extract.encode import EncodeStep, run_encode
from pipeline.extract.ground import GroundStep, run_ground
from pipeline.features import (
    planned_feature_provenance,
    run_features,
)
from pipeline.logs import progress
from pipeline.perturb import parse_perturbation, perturb
from pipeline.rows import store
from pipeline.rows.atomic import atomic_path

logger = logging.getLogger(__name__)

STAGE_DIRS = ("ingest", "captions", "objects", "clip", "features")


def extract_dataset(
    data_path: str | Path,
    cache: str | Path,
    name: str,
    params: Params,
    layout: str = "auto",
    with_features: bool = True,
    *,
    max_per_class: int | None = None,
) -> Path:
    """Run every extraction stage for one dataset into `cache/<stage>/`; returns the features
    directory (the encode directory when `with_features` is false). Rows already in `cache`
    (same image, inputs and settings) are reused. `max_per_class`, when given, replaces
    `ingest.max_per_class` (an evaluation dataset is drawn by `evaluate.max_per_class`)."""
    ingest_cfg = params.ingest
    if max_per_class is not None:
        ingest_cfg = dataclasses.replace(ingest_cfg, max_per_class=max_per_class)
    run_ingest(
        data_path,
        Path(cache) / "ingest",
        cfg=ingest_cfg,
        base=params.base,
        dataset=name,
        layout=layout,
    )
    return extract_ingested(cache, name, params, with_features)


def extract_ingested(
    cache: str | Path, name: str, params: Params, with_features: bool = True
) -> Path:
    """The stages after ingest (caption, ground, encode and, unless told not to, features)
    for `cache/ingest`."""
    c = Path(cache)
    models, base = params.models, params.base
    run_caption(
        c / "ingest", c / "captions", cfg=params.caption, models=models, base=base, dataset=name
    )
    run_ground(
        c / "ingest",
        c / "captions",
        c / "objects",
        cfg=params.ground,
        models=models,
        base=base,
        dataset=name,
    )
    run_encode(
        c / "ingest",
        c / "captions",
        c / "objects",
        c / "clip",
        cfg=params.encode,
        crop_padding=params.ground.crop_padding,
        models=models,
        base=base,
        dataset=name,
    )
    if not with_features:
        return c / "clip"
    run_features(
        c / "ingest", c / "clip", c / "features", params.features, name, captions_dir=c / "captions"
    )
    return c / "features"


def planned_settings(params: Params) -> dict[str, Any]:
    """The `features.feature_settings` that `extract_ingested` will record with these params,
    computed before any work from the same steps' shard attributes (weights, dtype, step
    versions, feature params), so that a mismatch can be refused before extraction."""
    here = Path(".")
    p = params
    steps: list[CaptionStep | GroundStep | EncodeStep] = [
        CaptionStep(here, p.caption, p.models, p.base, ""),
        GroundStep(here, here, p.ground, p.models, p.base, ""),
        EncodeStep(here, here, here, p.encode, p.ground.crop_padding, p.models, p.base, ""),
    ]
    chain: dict[str, Any] = {}
    for step in steps:
        chain.update(json.loads(step.attrs()["provenance"]))
    chain.update(planned_feature_provenance(p.features))
    return {"preset": p.models.preset, "provenance": chain}


def perturbed_copy(
    source_ingest: str | Path,
    perturbation: str,
    dest: str | Path,
    seed: int,
    splits: Sequence[str] | None = None,
) -> Path:
    """Write perturbed copies of a dataset's images (deterministic) plus a manifest.

    The copies keep each image's label, generator, dataset caption, split and group, so the
    perturbed set is scored exactly like the clean one. Images are saved as PNG (lossless), so
    what the pipeline reads is exactly what `perturb` produced.

    Args:
        splits: which splits to copy; None copies all.
    Returns:
        The folder holding `manifest.csv` and `images/`.
    """

    kind, severity = parse_perturbation(perturbation)
    dest = Path(dest)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for shard in store.list_shards(source_ingest):
        root = Path(str(store.read_attrs(shard)["data_root"]))
        data = store.read_shard(shard)
        for i in range(len(data["ids"])):
            if splits is not None and data["split"][i] not in splits:
                continue
            rows.append({k: data[k][i] for k in data} | {"_root": root})
    if not rows:
        raise DataUnusable(f"no images of splits {splits} in {source_ingest} to perturb")
    written = set()
    for row in progress(rows, desc=f"perturb {perturbation}", unit="img"):
        rel = f"images/{row['ids'][:16]}_s{seed}.png"
        target = dest / rel
        # Always regenerated (deterministic, so the same bytes and ids when nothing changed):
        # a file kept from an earlier run could come from other perturbation code.
        image = load_rgb(row["_root"] / row["path"])
        out = perturb(image, kind, severity, seed=seed, key=str(row["ids"]))
        with atomic_path(target) as tmp:
            out.save(tmp, format="PNG", compress_level=1)
        written.add(target.name)
        row["_rel"] = rel
    for stale in (dest / "images").glob("*.png"):
        if stale.name not in written:
            stale.unlink()
    columns = ["path", "label", "generator", "caption", "split", "group", "family", "subset"]
    write_csv(
        dest / "manifest.csv",
        columns,
        (
            [
                r["_rel"],
                int(r["label"]),
                r["generator"],
                r["caption"],
                r["split"],
                r["group"],
                r["family"],
                r.get("subset", ""),
            ]
            for r in rows
        ),
    )
    logger.info("%s: %d perturbed images in %s", perturbation, len(rows), dest)
    return dest


@dataclass(frozen=True)
class Copy:
    """One perturbed copy of a dataset: its perturbation, cache folder, the splits it copies
    (None: all) and the dataset name its shards record."""

    perturbation: str
    cache: Path
    splits: Sequence[str] | None
    dataset: str


def extract_copies(source_ingest: str | Path, copies: Sequence[Copy], params: Params) -> None:
    """Make and extract every perturbed copy of a dataset in this one process, so that each
    model is loaded once for all of them (`loaded_model` keeps it) rather than once per copy.

    Each copy is written to `<cache>/data/` (`perturbed_copy`) and extracted into
    `<cache>/{ingest,captions,objects,clip}/` with its own row cache, resume and timings,
    exactly as a separate run would.
    """
    for copy in copies:
        data = perturbed_copy(
            source_ingest,
            copy.perturbation,
            copy.cache / "data",
            params.base.seed,
            splits=copy.splits,
        )
        extract_dataset(data, copy.cache, copy.dataset, params, "manifest", with_features=False)


def drop_stale_copies(root: str | Path, keep: Sequence[str]) -> None:
    """Remove the copies under `root` whose names are not in `keep` (a perturbation or quality
    taken out of the params), so that the stage's output holds the current copies only."""
    root = Path(root)
    if not root.is_dir():
        return
    for folder in root.iterdir():
        if folder.is_dir() and folder.name not in keep:
            logger.info("removing %s (no longer in the params)", folder)
            shutil.rmtree(folder)
