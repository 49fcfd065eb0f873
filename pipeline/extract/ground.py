"""The ground step: GroundingDINO boxes and phrases of each caption's objects in its image."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import BaseConfig, GroundConfig, ModelsConfig
from pipeline.extract.base import (
    DecodeThen,
    Feed,
    ModelStep,
    aligned,
    batch_slices,
    ingest_rows,
    model_attrs,
    preflight,
    scaled_batch_size,
    scheduler_args,
    upstream_provenance,
)
from pipeline.extract.boxes import phrase_nms
from pipeline.extract.loaded import loaded_model, model_loads
from pipeline.rows.key import decoding_hash, params_hash, row_hash
from pipeline.rows.runner import Timer, run_step
from pipeline.rows.store import Arrays

logger = logging.getLogger(__name__)

# Boxes asked of the grounder before the per-phrase NMS and the cut to ground.max_objects, so
# that a suppressed duplicate leaves room for the next object (GLIP suppresses, then keeps its
# top detections): GroundingDINO's number of queries, i.e. every box above box_threshold.
_CANDIDATES = 900


@dataclass
class GroundStep(ModelStep):
    """The ground step as the runner sees it: reads ingest rows and captions, writes the objects."""

    ingest_dir: Path
    captions_dir: Path
    cfg: GroundConfig
    models: ModelsConfig
    base: BaseConfig
    dataset: str
    stage: str = "objects"
    upstream: str = ""  # provenance of the captions (JSON), recorded in the shards

    def roles(self) -> list[str]:
        return ["grounder"] if self.cfg.enabled else []

    def params_hash(self) -> str:
        # crop_padding only shapes the encode stage's crops.
        settings = {
            k: v for k, v in asdict(self.cfg).items() if k not in ("batch_size", "crop_padding")
        }
        return params_hash(
            settings,
            self.models.preset,
            asdict(self.models.grounding),
            self.base.seed if self.models.preset == "tiny" else "",
            self.key(),
        )

    def attrs(self) -> dict[str, Any]:
        return model_attrs(
            self.stage,
            self.dataset,
            self.models.preset,
            self.key(),
            "none (ground.enabled=false)",
            self.upstream,
        )

    def read(self, index: int) -> Arrays:
        rows = ingest_rows(self.ingest_dir, index, ["path", "width", "height"])
        rows["caption"] = aligned(self.captions_dir, index, rows["ids"], ["caption"])["caption"]
        rows["input_hash"] = np.array([row_hash(c) for c in rows["caption"]], dtype=object)
        rows["input_hash"] = decoding_hash(rows)
        return rows

    def feed(self, rows: Arrays) -> Feed | None:
        if not self.cfg.enabled:
            return None
        model = loaded_model("grounder", self.models, self.base)
        # The workers decode and run the processor on each (image, query); this process runs
        # the model and the post-processing. A batch stays a list of per-item inputs, which
        # `ground_encoded` groups into partner-free batches.
        items = zip(rows["path"], rows["exif_transpose"], rows["caption"])
        return Feed(
            [(str(p), bool(e), str(c)) for p, e, c in items],
            DecodeThen(model.item_encoder()),
            scaled_batch_size(self.cfg.batch_size, self.base),
            pin_memory=str(model.device).startswith("cuda"),
        )

    def compute(self, rows: Arrays, timer: Timer) -> Arrays:
        n = len(rows["ids"])
        found: list[list[Any]] = [[] for _ in range(n)]
        feed = self.feed(rows)
        if feed is not None and n:
            model = loaded_model("grounder", self.models, self.base)
            size = feed.batch_size
            batches = self.batches(rows, feed)
            for sl in batch_slices(n, size):
                with timer("read"):
                    encoded = next(batches)
                with timer("model"):
                    out = model.ground_encoded(
                        encoded,
                        box_threshold=self.cfg.box_threshold,
                        text_threshold=self.cfg.text_threshold,
                        max_objects=_CANDIDATES if self.cfg.max_objects else 0,
                        iou_threshold=self.cfg.iou_threshold,
                        min_box_side=self.cfg.min_box_side,
                    )
                # Duplicates of a phrase go after the grounder's own post-processing.
                found[sl] = [
                    phrase_nms(objects, self.cfg.nms_iou)[: self.cfg.max_objects] for objects in out
                ]
                timer.advance(len(out))
        counts = np.array([len(f) for f in found], dtype=np.int64)
        flat = [o for f in found for o in f]
        return {
            "ids": rows["ids"],
            "input_hash": rows["input_hash"],
            "obj_offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            "obj_boxes": np.array([o.box for o in flat], dtype=np.float32).reshape(-1, 4),
            "obj_phrase": np.array([o.phrase for o in flat], dtype=object),
            "obj_score": np.array([o.score for o in flat], dtype=np.float32),
        }


def run_ground(
    ingest_dir: Path,
    captions_dir: Path,
    out_dir: Path,
    *,
    cfg: GroundConfig,
    models: ModelsConfig,
    base: BaseConfig,
    dataset: str,
    reuse_from: Sequence[Path] = (),
) -> dict[str, Any]:
    """Ground every caption's objects in its image into `out_dir`'s shards (reusing cached
    rows); returns the timings (see `run_step`)."""
    upstream = upstream_provenance(Path(captions_dir))
    step = GroundStep(
        Path(ingest_dir), Path(captions_dir), cfg, models, base, dataset, upstream=upstream
    )
    if cfg.enabled:
        preflight(models, ["grounder"])
    return run_step(
        step, out_dir, load_counts=model_loads, reuse_from=reuse_from, **scheduler_args(base)
    )
