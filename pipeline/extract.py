"""The extraction stages as library calls: ingest, caption, ground, encode (see `runner`)."""

from __future__ import annotations

import functools
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import data as datamod
from pipeline import reader, store
from pipeline.atomic import writable_dir
from pipeline.config import (
    BaseConfig,
    CaptionConfig,
    EncodeConfig,
    GroundConfig,
    IngestConfig,
    ModelsConfig,
    params_hash,
)
from pipeline.errors import CaptionsMissing, ModelFileError
from pipeline.features import CLASS_PROMPTS
from pipeline.runner import Timer, row_hash, run_step
from pipeline.store import Arrays

logger = logging.getLogger(__name__)

# Version of the code that shapes each step's rows: the step's `compute` here and the model
# wrapper it calls (models/blip2.py, models/grounding.py, models/clip.py, bert.py, dinov2.py).
# It is part of every row's key, so bumping it recomputes that step's rows (and downstream rows
# only where their inputs then change). tests/test_cache_key.py pins each step's output on
# a fixed fixture (tests/golden/step_outputs.json): a change of output without a bump here
# fails it; a refactor that keeps the output passes and invalidates nothing.
STEP_VERSIONS: dict[str, int] = {"captions": 1, "objects": 1, "clip": 1}


# --------------------------------------------------------------------------------------- ingest


def run_ingest(
    data_path: str | Path,
    out_dir: str | Path,
    cfg: IngestConfig,
    base: BaseConfig,
    dataset: str,
    layout: str = "auto",
) -> datamod.IngestResult:
    """Read the dataset, quarantine what does not decode, write ingest shards and CSVs.

    Writes `manifest.csv` (resolved, one row per kept image), `quarantine.csv`,
    `duplicates.csv` and `shard_*.h5` (ids, path, label, generator, split, caption, ...).
    """
    root, records = datamod.resolve_dataset(data_path, layout)
    return ingest_records(root, records, out_dir, cfg, base, dataset)


def ingest_records(
    root: Path,
    records: Sequence[datamod.Record],
    out_dir: str | Path,
    cfg: IngestConfig,
    base: BaseConfig,
    dataset: str,
) -> datamod.IngestResult:
    """`run_ingest` for records already in hand (e.g. the files given to `misalign predict`)."""
    out_dir = writable_dir(out_dir)
    result = datamod.ingest(
        root,
        records,
        fractions=cfg.split_fractions,
        seed=base.seed,
        min_side=cfg.min_side,
        workers=reader.resolve_workers(base.decode_workers),
        caption_similarity=cfg.caption_similarity,
        max_aspect_ratio=cfg.max_aspect_ratio,
        exif_transpose=cfg.exif_transpose,
    )
    if not records:
        raise datamod.DatasetError(f"the dataset at {root} lists no images; nothing to ingest")
    if not result.items:
        shown = "; ".join(f"{p}: {r}" for p, r in result.quarantined[:3])
        raise datamod.DatasetError(
            f"no usable image in {root}: all {len(records)} were quarantined or duplicates "
            f"(e.g. {shown or 'none'}); nothing was written to {out_dir}"
        )
    attrs = {
        "stage": "ingest",
        "dataset": dataset,
        "data_root": str(Path(root).resolve()),
        "model": "",
        "preset": "",
        "params_hash": params_hash(cfg, base.seed),
        # How every later stage decodes these files (pipeline.data.decode_image).
        "exif_transpose": cfg.exif_transpose,
    }
    # Every shard is built (and every value checked) before the first file is written, so a
    # bad row fails the stage with the old outputs untouched.
    shards: list[Arrays] = []
    for start in range(0, len(result.items), cfg.shard_size):
        chunk = result.items[start : start + cfg.shard_size]
        shard: Arrays = {
            "ids": np.array([it.id for it in chunk], dtype=object),
            "label": np.array([it.label for it in chunk], dtype=np.int8),
            "width": np.array([it.width for it in chunk], dtype=np.int32),
            "height": np.array([it.height for it in chunk], dtype=np.int32),
        }
        for key in ("path", "generator", "split", "caption", "group", "family", "subset"):
            shard[key] = np.array([getattr(it, key) for it in chunk], dtype=object)
        shards.append(shard)
    n_shards = len(shards)
    for k, shard in enumerate(shards):
        if not _same_shard(out_dir / store.shard_name(k), shard, attrs):
            store.write_shard(out_dir / store.shard_name(k), shard, attrs)
    for stale in store.list_shards(out_dir)[n_shards:]:
        stale.unlink()
    columns = datamod.item_columns()
    datamod.write_csv(out_dir / "quarantine.csv", ["path", "reason"], result.quarantined)
    datamod.write_csv(out_dir / "duplicates.csv", ["path", "duplicate_of"], result.duplicates)
    datamod.write_csv(
        out_dir / "manifest.csv", columns, ([asdict(it)[c] for c in columns] for it in result.items)
    )
    for path, reason in result.quarantined:
        logger.warning("quarantined %s: %s", path, reason)
    if result.duplicates:
        logger.warning(
            "%d exact duplicates kept once (see %s)",
            len(result.duplicates),
            out_dir / "duplicates.csv",
        )
    logger.info(
        "ingest: %d images kept in %d shards, %d quarantined (see %s), %d duplicates dropped",
        len(result.items),
        n_shards,
        len(result.quarantined),
        out_dir / "quarantine.csv",
        len(result.duplicates),
    )
    return result


def _same_shard(path: Path, data: Arrays, attrs: dict[str, Any]) -> bool:
    """Whether `path` already holds exactly `data` (then it is left as is, so that DVC sees no
    change and reruns nothing downstream)."""
    if not path.exists():
        return False
    try:
        old_attrs = store.read_attrs(path)
        if any(old_attrs.get(k) != v for k, v in attrs.items()):
            return False
        old = store.read_shard(path)
    except store.ShardError:
        return False
    return set(old) == set(data) and all(
        np.array_equal(np.asarray(old[k]), np.asarray(data[k])) for k in data
    )


def _ingest_rows(ingest_dir: Path, index: int, keys: Sequence[str]) -> Arrays:
    path = ingest_dir / store.shard_name(index)
    rows = store.read_shard(path, ["ids", *keys])
    if "path" in rows:
        attrs = store.read_attrs(path)
        root = Path(str(attrs["data_root"]))
        rows["path"] = np.array([str(root / p) for p in rows["path"]], dtype=object)
        rows["exif_transpose"] = np.full(
            len(rows["ids"]), bool(attrs.get("exif_transpose", True)), dtype=bool
        )
    return rows


def _decoding_hash(rows: Arrays) -> np.ndarray:
    """Row input hashes that also change when the pixels are decoded differently (EXIF
    orientation off); with the default decoding they are the hashes as computed."""
    flags = rows.get("exif_transpose")
    if flags is None:
        return rows["input_hash"]
    return np.array(
        [
            h if f else row_hash(h, "exif_transpose=false")
            for h, f in zip(rows["input_hash"], flags)
        ],
        dtype=object,
    )


def _aligned(upstream: Path, index: int, ids: np.ndarray, keys: Sequence[str]) -> Arrays:
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


def runtime_key(stage: str, roles: Sequence[str], models: ModelsConfig, base: BaseConfig) -> dict:
    """What, besides params and upstream content, shapes a step's rows: its code version, the
    identity of the weights of each model it runs, and the dtype and device class they run in."""
    from pipeline.models import runtime_class, weights_identity

    key: dict[str, Any] = {"step_version": STEP_VERSIONS[stage]}
    if roles:
        key["weights"] = {r: weights_identity(r, models, base.seed) for r in roles}
        key.update(runtime_class(base))
    return key


def _model_attrs(
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


def _batches(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


# -------------------------------------------------------------------------------------- caption


@dataclass
class DecodeThen:
    """A model's per-image CPU work, run in a decode worker: decode the item's image as ingest
    checked it (`data.load_rgb`), then `encode(image, *rest)` with the item's other fields
    (e.g. its caption). Items are (path, exif_transpose, *rest)."""

    encode: Callable[..., Any]

    def __call__(self, item: tuple[Any, ...]) -> Any:
        path, exif_transpose, *rest = item
        return self.encode(datamod.load_rgb(path, exif_transpose), *rest)


@dataclass
class CaptionStep:
    ingest_dir: Path
    cfg: CaptionConfig
    models: ModelsConfig
    base: BaseConfig
    dataset: str
    stage: str = "captions"

    def n_shards(self) -> int:
        return len(store.list_shards(self.ingest_dir))

    def roles(self) -> list[str]:
        return [] if self.cfg.source == "dataset" else ["captioner"]

    def key(self) -> dict[str, Any]:
        return runtime_key(self.stage, self.roles(), self.models, self.base)

    def params_hash(self) -> str:
        decoding = {k: v for k, v in asdict(self.cfg).items() if k != "batch_size"}
        uses_model = self.cfg.source != "dataset"
        return params_hash(
            decoding,
            self.models.preset if uses_model else "",
            asdict(self.models.blip2) if uses_model else "",
            self.base.seed if uses_model and self.models.preset == "tiny" else "",
            self.key(),
        )

    def attrs(self) -> dict[str, Any]:
        return _model_attrs(self.stage, self.dataset, self.models.preset, self.key(), "dataset", "")

    def read(self, index: int) -> Arrays:
        rows = _ingest_rows(self.ingest_dir, index, ["path", "caption"])
        rows["input_hash"] = np.array(
            [row_hash(c if self.cfg.source != "blip2" else "") for c in rows["caption"]],
            dtype=object,
        )
        rows["input_hash"] = _decoding_hash(rows)
        return rows

    def compute(self, rows: Arrays, timer: Timer) -> Arrays:
        n = len(rows["ids"])
        captions = np.array([str(c).strip() for c in rows["caption"]], dtype=object)
        sources = np.full(n, "dataset", dtype=object)
        need = [i for i in range(n) if self.cfg.source == "blip2" or not captions[i]]
        if need and self.cfg.source == "dataset":
            listing = ", ".join(str(rows["path"][i]) for i in need[:5])
            raise CaptionsMissing(
                f"{len(need)} images have no caption in the dataset (e.g. {listing}); set "
                "caption.source=dataset_else_blip2 to caption them with BLIP-2, or add captions "
                "to the manifest"
            )
        if need:
            from pipeline.models.blip2 import concat_encoded

            model = _load("captioner", self.models, self.base)
            size = _batch_size(self.cfg.batch_size, self.base)
            # The workers decode and run the processor; this process only generates.
            batches = reader.read_batches(
                [(str(rows["path"][i]), bool(rows["exif_transpose"][i])) for i in need],
                DecodeThen(model.item_encoder(self.cfg.prompt or None)),
                size,
                _decode_workers(self.base),
                concat_encoded,
                pin_memory=str(model.device).startswith("cuda"),
            )
            for sl in _batches(len(need), size):
                chunk = need[sl]
                with timer("read"):
                    batch = next(batches)
                with timer("model"):
                    out = model.caption_encoded(
                        batch,
                        num_beams=self.cfg.num_beams,
                        max_new_tokens=self.cfg.max_new_tokens,
                    )
                for i, text in zip(chunk, out):
                    captions[i] = text
                    sources[i] = model.model_id
                timer.advance(len(chunk))
        return {
            "ids": rows["ids"],
            "input_hash": rows["input_hash"],
            "caption": captions,
            "caption_source": sources,
        }


def run_caption(
    ingest_dir: Path,
    out_dir: Path,
    cfg: CaptionConfig,
    models: ModelsConfig,
    base: BaseConfig,
    dataset: str,
) -> dict[str, Any]:
    step = CaptionStep(Path(ingest_dir), cfg, models, base, dataset)
    if cfg.source != "dataset":
        preflight(models, ["captioner"])
    timings = run_step(step, out_dir, **_sched(base))
    write_caption_provenance(Path(ingest_dir), Path(out_dir), cfg.source)
    return timings


PROVENANCE_FILE = "provenance.json"


def write_caption_provenance(ingest_dir: Path, captions_dir: Path, source: str) -> dict[str, Any]:
    """Count caption sources per class into `<captions_dir>/provenance.json`; warn loudly
    when they are class-correlated (see `metrics.caption_provenance`)."""
    from pipeline.atomic import write_text
    from pipeline.metrics import caption_provenance, describe_provenance, warn_if_correlated

    labels, sources = [], []
    for i, path in enumerate(store.list_shards(ingest_dir)):
        rows = store.read_shard(path, ["ids", "label"])
        labels.append(rows["label"])
        sources.append(_aligned(captions_dir, i, rows["ids"], ["caption_source"])["caption_source"])
    provenance = caption_provenance(np.concatenate(labels), np.concatenate(sources))
    provenance["caption.source"] = source
    write_text(captions_dir / PROVENANCE_FILE, json.dumps(provenance, indent=2) + "\n")
    logger.info("caption sources (caption.source=%s): %s", source, describe_provenance(provenance))
    warn_if_correlated(provenance, str(captions_dir))
    return provenance


# --------------------------------------------------------------------------------------- ground


@dataclass
class GroundStep:
    ingest_dir: Path
    captions_dir: Path
    cfg: GroundConfig
    models: ModelsConfig
    base: BaseConfig
    dataset: str
    stage: str = "objects"
    upstream: str = ""  # provenance of the captions (JSON), recorded in the shards

    def n_shards(self) -> int:
        return len(store.list_shards(self.ingest_dir))

    def roles(self) -> list[str]:
        return ["grounder"] if self.cfg.enabled else []

    def key(self) -> dict[str, Any]:
        return runtime_key(self.stage, self.roles(), self.models, self.base)

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
        return _model_attrs(
            self.stage,
            self.dataset,
            self.models.preset,
            self.key(),
            "none (ground.enabled=false)",
            self.upstream,
        )

    def read(self, index: int) -> Arrays:
        rows = _ingest_rows(self.ingest_dir, index, ["path", "width", "height"])
        rows["caption"] = _aligned(self.captions_dir, index, rows["ids"], ["caption"])["caption"]
        rows["input_hash"] = np.array([row_hash(c) for c in rows["caption"]], dtype=object)
        rows["input_hash"] = _decoding_hash(rows)
        return rows

    def compute(self, rows: Arrays, timer: Timer) -> Arrays:
        n = len(rows["ids"])
        found: list[list[Any]] = [[] for _ in range(n)]
        if self.cfg.enabled and n:
            model = _load("grounder", self.models, self.base)
            size = _batch_size(self.cfg.batch_size, self.base)
            # The workers decode and run the processor on each (image, query); this process runs
            # the model and the post-processing. A batch stays a list of per-item inputs, which
            # `ground_encoded` groups into partner-free batches.
            items = zip(rows["path"], rows["exif_transpose"], rows["caption"])
            batches = reader.read_batches(
                [(str(p), bool(e), str(c)) for p, e, c in items],
                DecodeThen(model.item_encoder()),
                size,
                _decode_workers(self.base),
            )
            for sl in _batches(n, size):
                with timer("read"):
                    encoded = next(batches)
                with timer("model"):
                    out = model.ground_encoded(
                        encoded,
                        box_threshold=self.cfg.box_threshold,
                        text_threshold=self.cfg.text_threshold,
                        max_objects=self.cfg.max_objects,
                        iou_threshold=self.cfg.iou_threshold,
                        min_box_side=self.cfg.min_box_side,
                    )
                found[sl] = out
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
    cfg: GroundConfig,
    models: ModelsConfig,
    base: BaseConfig,
    dataset: str,
) -> dict[str, Any]:
    upstream = upstream_provenance(Path(captions_dir))
    step = GroundStep(
        Path(ingest_dir), Path(captions_dir), cfg, models, base, dataset, upstream=upstream
    )
    if cfg.enabled:
        preflight(models, ["grounder"])
    return run_step(step, out_dir, **_sched(base))


# --------------------------------------------------------------------------------------- encode


def crop_box(image: Any, box: Sequence[float], padding: float) -> Any:
    """Crop `box` (xyxy, original pixels) padded by `padding` × its size, clipped to the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    pw, ph = (x1 - x0) * padding, (y1 - y0) * padding
    w, h = image.size
    left, top = max(0, int(np.floor(x0 - pw))), max(0, int(np.floor(y0 - ph)))
    right, bottom = min(w, int(np.ceil(x1 + pw))), min(h, int(np.ceil(y1 + ph)))
    right, bottom = max(right, left + 1), max(bottom, top + 1)
    return image.crop((left, top, right, bottom))


@dataclass
class EncodeLoad:
    """The encode stage's CPU work for one image, run in a decode worker: decode once, cut the
    object crops from that decode, preprocess every view; optional colour histograms and
    DINOv2 pixels from the same decode."""

    preprocess: Any
    crop_padding: float
    color_bins: int = 0
    dinov2_processor: Any = None

    def __call__(self, item: tuple[str, bool, np.ndarray]) -> dict[str, Any]:
        import torch

        path, exif_transpose, boxes = item
        image = datamod.load_rgb(path, exif_transpose)
        views = [image, *(crop_box(image, box, self.crop_padding) for box in boxes)]
        out: dict[str, Any] = {"pixels": torch.stack([self.preprocess(v) for v in views])}
        if self.color_bins:
            from pipeline.features import color_histograms

            out["color"] = torch.from_numpy(color_histograms(image, self.color_bins))
        if self.dinov2_processor is not None:
            from pipeline.models.dinov2 import Dinov2ImageEncoder

            out["dinov2"] = Dinov2ImageEncoder.pixel_values(self.dinov2_processor, image)
        return out


def collate_views(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch of `EncodeLoad` samples: every view stacked in order, and views per image."""
    import torch

    batch: dict[str, Any] = {
        "pixels": torch.cat([s["pixels"] for s in samples]),
        "n_views": torch.tensor([len(s["pixels"]) for s in samples]),
    }
    for key in ("color", "dinov2"):
        if key in samples[0]:
            batch[key] = torch.stack([s[key] for s in samples])
    return batch


@dataclass
class EncodeStep:
    ingest_dir: Path
    captions_dir: Path
    objects_dir: Path
    cfg: EncodeConfig
    crop_padding: float
    models: ModelsConfig
    base: BaseConfig
    dataset: str
    stage: str = "clip"
    upstream: str = ""  # provenance of the captions and objects (JSON), recorded in the shards

    def n_shards(self) -> int:
        return len(store.list_shards(self.ingest_dir))

    def roles(self) -> list[str]:
        return (
            ["clip"] + (["bert"] if self.cfg.bert else []) + (["dinov2"] if self.cfg.dinov2 else [])
        )

    def key(self) -> dict[str, Any]:
        return runtime_key(self.stage, self.roles(), self.models, self.base)

    def params_hash(self) -> str:
        # Only what shapes the stored rows: not the batch size, not the class prompts (written
        # to their own file), and the optional encoders' weights only when they are on.
        settings = {
            k: v for k, v in asdict(self.cfg).items() if k not in ("batch_size", "class_prompts")
        }
        return params_hash(
            settings,
            self.crop_padding,
            self.models.preset,
            asdict(self.models.clip),
            asdict(self.models.bert) if self.cfg.bert else "",
            asdict(self.models.dinov2) if self.cfg.dinov2 else "",
            self.base.seed if self.models.preset == "tiny" else "",
            self.key(),
        )

    def attrs(self) -> dict[str, Any]:
        return _model_attrs(
            self.stage, self.dataset, self.models.preset, self.key(), "", self.upstream
        )

    def read(self, index: int) -> Arrays:
        rows = _ingest_rows(self.ingest_dir, index, ["path"])
        rows["caption"] = _aligned(self.captions_dir, index, rows["ids"], ["caption"])["caption"]
        objs = _aligned(
            self.objects_dir, index, rows["ids"], ["obj_offsets", "obj_boxes", "obj_phrase"]
        )
        rows.update({k: objs[k] for k in ("obj_offsets", "obj_boxes", "obj_phrase")})
        off = rows["obj_offsets"]
        rows["input_hash"] = np.array(
            [
                row_hash(
                    rows["caption"][i],
                    rows["obj_boxes"][off[i] : off[i + 1]],
                    list(rows["obj_phrase"][off[i] : off[i + 1]]),
                )
                for i in range(len(rows["ids"]))
            ],
            dtype=object,
        )
        rows["input_hash"] = _decoding_hash(rows)
        return rows

    def compute(self, rows: Arrays, timer: Timer) -> Arrays:
        import torch

        clip = _load("clip", self.models, self.base)
        dino = _load("dinov2", self.models, self.base) if self.cfg.dinov2 else None
        n, off = len(rows["ids"]), np.asarray(rows["obj_offsets"], dtype=np.int64)
        counts = np.diff(off)
        # Each image is decoded once, in a decode worker, and its crops are cut from that decode;
        # the worker preprocesses them (views: the image, then its crops in object order).
        load = EncodeLoad(
            clip.preprocess,
            self.crop_padding,
            self.cfg.color_bins,
            dino.processor if dino is not None else None,
        )
        items = [
            (
                str(rows["path"][k]),
                bool(rows["exif_transpose"][k]),
                rows["obj_boxes"][off[k] : off[k + 1]],
            )
            for k in range(n)
        ]
        on_cuda = str(clip.device).startswith("cuda")
        size = _batch_size(self.cfg.batch_size, self.base)
        batches = reader.read_batches(
            items, load, size, _decode_workers(self.base), collate_views, pin_memory=on_cuda
        )
        # Outputs stay on the device until the shard is done: one synchronisation per shard.
        view_emb: list[Any] = []
        pooled_emb: list[Any] = []
        dino_emb: list[Any] = []
        colors: list[np.ndarray] = []
        while True:
            with timer("read"):
                batch = next(batches, None)
            if batch is None:
                break
            with timer("model"):
                pixels = batch["pixels"]
                for s in _batches(len(pixels), size):
                    view_emb.append(clip.encode_pixels(pixels[s]))
                if self.cfg.clip_pooled:
                    # CT2's image feature: the whole image's view only, before projection.
                    first = torch.cumsum(batch["n_views"], 0) - batch["n_views"]
                    pooled_emb.append(clip.encode_pixels_pooled(pixels[first]))
                if dino is not None:
                    dino_emb.append(dino.encode_pixels(batch["dinov2"]))
            if "color" in batch:
                colors.append(batch["color"].numpy())
            timer.advance(len(batch["n_views"]))
        with timer("model"):
            views = (
                torch.cat(view_emb).float().cpu().numpy()
                if view_emb
                else np.zeros((0, clip.dim), np.float32)
            )
            owner = np.repeat(np.arange(n), counts)
            image_emb = views[off[:-1] + np.arange(n)] if n else np.zeros((0, clip.dim), np.float32)
            obj_image_emb = views[np.arange(int(off[-1])) + owner + 1]
        extra: dict[str, list[np.ndarray]] = {
            "bert": [],
            "dinov2": [],
            "color": colors,
            "pooled": [],
        }
        if pooled_emb:
            extra["pooled"].append(torch.cat(pooled_emb).float().cpu().numpy())
        if dino_emb:
            extra["dinov2"].append(torch.cat(dino_emb).float().cpu().numpy())
        phrases = [self.cfg.phrase_template.format(p) for p in rows["obj_phrase"]]
        memo = _TEXT_MEMO.setdefault(self.params_hash(), TextMemo())
        with timer("model"):
            captions = [str(c) for c in rows["caption"]]
            text_emb = encode_texts_once(clip, captions, size, memo)
            obj_text_emb = encode_texts_once(clip, phrases, size, memo)
            if self.cfg.bert:
                bert = _load("bert", self.models, self.base)
                extra["bert"].append(bert.encode([str(c) for c in rows["caption"]]))
        out = {
            "ids": rows["ids"],
            "input_hash": rows["input_hash"],
            "image_emb": image_emb,
            "text_emb": text_emb,
            "obj_offsets": off,
            "obj_image_emb": obj_image_emb,
            "obj_text_emb": obj_text_emb,
        }
        names = {
            "bert": "bert_text_emb",
            "dinov2": "dinov2_emb",
            "color": "color_hist",
            "pooled": "image_pooled_emb",
        }
        for key, blocks in extra.items():
            if blocks:
                out[names[key]] = np.concatenate(blocks).astype(np.float32)
        return out


class TextMemo:
    """Text embeddings already computed this run, least recently used dropped beyond
    `max_items` (a ViT-L/14 row is 3 KB, so the default holds about 300 MB)."""

    def __init__(self, max_items: int = 100_000) -> None:
        self.max_items = max_items
        self._rows: OrderedDict[str, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, text: object) -> bool:
        return text in self._rows

    def get(self, text: str) -> np.ndarray | None:
        row = self._rows.get(text)
        if row is not None:
            self._rows.move_to_end(text)
        return row

    def put(self, text: str, row: np.ndarray) -> None:
        self._rows[text] = row
        self._rows.move_to_end(text)
        while len(self._rows) > self.max_items:
            self._rows.popitem(last=False)


def encode_texts_once(
    encoder: Any, texts: Sequence[str], batch_size: int, memo: TextMemo | None = None
) -> np.ndarray:
    """Encode each distinct string once and scatter the rows back to `texts`' order.

    With `memo` (kept for a whole run), strings already encoded for an earlier shard are not
    sent to the encoder again.
    """
    if not texts:
        return np.zeros((0, encoder.dim), np.float32)
    distinct = list(dict.fromkeys(texts))
    found = {t: memo.get(t) for t in distinct} if memo is not None else {}
    todo = [t for t in distinct if found.get(t) is None]
    rows: dict[str, np.ndarray] = {t: r for t, r in found.items() if r is not None}
    for s in _batches(len(todo), batch_size):
        for text, row in zip(todo[s], np.asarray(encoder.encode_texts(todo[s]), np.float32)):
            rows[text] = row
            if memo is not None:
                memo.put(text, row)
    out = np.empty((len(texts), encoder.dim), np.float32)
    for i, text in enumerate(texts):
        out[i] = rows[text]
    return out


# Text embeddings of the current run, per encoder; cleared when a run starts. Under Dask each
# worker process keeps its own.
_TEXT_MEMO: dict[str, TextMemo] = {}


def run_encode(
    ingest_dir: Path,
    captions_dir: Path,
    objects_dir: Path,
    out_dir: Path,
    cfg: EncodeConfig,
    crop_padding: float,
    models: ModelsConfig,
    base: BaseConfig,
    dataset: str,
) -> dict[str, Any]:
    step = EncodeStep(
        Path(ingest_dir),
        Path(captions_dir),
        Path(objects_dir),
        cfg,
        crop_padding,
        models,
        base,
        dataset,
        upstream=upstream_provenance(Path(captions_dir), Path(objects_dir)),
    )
    preflight(models, step.roles())
    _TEXT_MEMO.clear()
    # The class prompts are encoded where the shards were (a Dask worker's loaded CLIP), not
    # by a second CLIP in this process.
    finish = functools.partial(
        _write_class_prompts_task, Path(out_dir), list(cfg.class_prompts), models, base, dataset
    )
    try:
        timings = run_step(step, out_dir, finish=finish, **_sched(base))
    finally:
        _TEXT_MEMO.clear()
    return timings


def _write_class_prompts_task(
    out_dir: Path, prompts: list[str], models: ModelsConfig, base: BaseConfig, dataset: str
) -> None:
    write_class_prompts(out_dir, prompts, _load("clip", models, base), models.preset, dataset)


def write_class_prompts(
    out_dir: Path, prompts: Sequence[str], clip: Any, preset: str, dataset: str
) -> None:
    """CLIP text embeddings (raw) of the class prompts, row k for class k."""
    store.write_shard(
        out_dir / CLASS_PROMPTS,
        {
            "ids": np.array([f"class_{k}" for k in range(len(prompts))], dtype=object),
            "prompt": np.array(list(prompts), dtype=object),
            "text_emb": clip.encode_texts(list(prompts)) if prompts else np.zeros((0, clip.dim)),
        },
        {
            "stage": "clip",
            "dataset": dataset,
            "model": getattr(clip, "weights_id", ""),
            "preset": preset,
            "params_hash": params_hash(list(prompts), getattr(clip, "weights_id", "")),
        },
    )


# -------------------------------------------------------------------------------------- helpers


def _decode_workers(base: BaseConfig) -> int:
    """Decode processes for one extraction process (Dask workers share the machine's CPUs)."""
    sharing = base.n_workers if base.scheduler == "dask" and not base.dask_address else 1
    return reader.resolve_workers(base.decode_workers, sharing)


def _batch_size(configured: int, base: BaseConfig) -> int:
    """The params' batch size on a CPU, times base.cuda_batch_scale on CUDA."""
    from pipeline.models import resolve_device

    scale = base.cuda_batch_scale if resolve_device(base.device).startswith("cuda") else 1
    return max(1, configured * max(1, scale))


def _sched(base: BaseConfig) -> dict[str, Any]:
    return {
        "scheduler": base.scheduler,
        "dask_address": base.dask_address,
        "n_workers": base.n_workers,
    }


_LOADED: dict[tuple[str, str], Any] = {}


def _load(role: str, models: ModelsConfig, base: BaseConfig) -> Any:
    """Load a model once per process (Dask workers keep theirs between shards)."""
    from pipeline.models import load_model, weights_identity

    key = (role, repr((models, base.seed, base.device, base.dtype)))
    if key not in _LOADED:
        _LOADED[key] = load_model(role, models, base)
    loaded = getattr(_LOADED[key], "weights_id", None)
    expected = weights_identity(role, models, base.seed)
    if loaded != expected:
        # The rows of this run are keyed by `expected`; never write rows of other weights.
        del _LOADED[key]
        raise ModelFileError(
            f"the {role} weights changed during the run (loaded {loaded}, now {expected}); "
            "rerun the stage"
        )
    return _LOADED[key]


def preflight(models: ModelsConfig, roles: Sequence[str]) -> None:
    """Fail in seconds, before any work, if a needed model's weights are absent."""
    from pipeline.models import check_weights

    check_weights(models, list(roles))
