"""The encode step: CLIP embeddings of each image, caption, object crop and phrase (+ optional encoders)."""

from __future__ import annotations

import functools
import logging
import shutil
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import BaseConfig, EncodeConfig, ModelsConfig
from pipeline.data.images import load_rgb
from pipeline.extract.base import (
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
from pipeline.extract.device_decode import (
    GPU_DECODER,
    DeviceViews,
    ReadForDevice,
    choose_decoder,
    collate_files,
    tensor_steps,
)
from pipeline.extract.loaded import loaded_model, model_loads
from pipeline.features import CLASS_PROMPTS, color_histograms
from pipeline.models import resolve_device
from pipeline.models.identity import weights_identity
from pipeline.rows import reader, store
from pipeline.rows.atomic import atomic_path
from pipeline.rows.key import decoding_hash, params_hash, row_hash
from pipeline.rows.runner import Timer, run_step
from pipeline.rows.store import Arrays

logger = logging.getLogger(__name__)


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
    object crops from that decode, bring every view to CLIP's input size as uint8 (the
    normalisation is done on the model's device); optional colour histograms and DINOv2 pixels
    from the same decode. `image_pixels` makes the whole image's view, `crop_pixels` each
    crop's (they differ under `encode.image_transform: center_crop`)."""

    crop_pixels: Any
    crop_padding: float
    color_bins: int = 0
    dinov2_processor: Any = None
    image_pixels: Any = None  # None: as the crops

    def __call__(self, item: tuple[str, bool, np.ndarray]) -> dict[str, Any]:
        path, exif_transpose, boxes = item
        image = load_rgb(path, exif_transpose)
        whole = self.image_pixels or self.crop_pixels
        views = [
            whole(image),
            *(self.crop_pixels(crop_box(image, b, self.crop_padding)) for b in boxes),
        ]
        out: dict[str, Any] = {"pixels": torch.stack(views)}
        if self.color_bins:
            out["color"] = torch.from_numpy(color_histograms(image, self.color_bins))
        if self.dinov2_processor is not None:
            # Imports transformers' DINOv2 classes: only runs with encode.dinov2 on.
            from pipeline.models.dinov2 import Dinov2ImageEncoder

            out["dinov2"] = Dinov2ImageEncoder.pixel_values(self.dinov2_processor, image)
        return out


def views_of(item: tuple[str, bool, np.ndarray]) -> int:
    """Views `EncodeLoad` makes of an item: the whole image, then one per object box."""
    return 1 + len(item[2])


def collate_views(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch of `EncodeLoad` samples: every view stacked in order, and views per image."""
    batch: dict[str, Any] = {
        "pixels": torch.cat([s["pixels"] for s in samples]),
        "n_views": torch.tensor([len(s["pixels"]) for s in samples]),
    }
    for key in ("color", "dinov2"):
        if key in samples[0]:
            batch[key] = torch.stack([s[key] for s in samples])
    return batch


@dataclass
class EncodeStep(ModelStep):
    """The encode step as the runner sees it: reads ingest rows, captions and objects, writes embeddings."""

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

    def roles(self) -> list[str]:
        return (
            ["clip"] + (["bert"] if self.cfg.bert else []) + (["dinov2"] if self.cfg.dinov2 else [])
        )

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

    @functools.cached_property
    def decoder(self) -> str:
        """The JPEG decoder of this run's views (`base.decode`, where it can run)."""
        return choose_decoder(
            self.base.decode,
            resolve_device(self.base.device),
            host_image_needed=bool(self.cfg.color_bins or self.cfg.dinov2),
        )

    def attrs(self) -> dict[str, Any]:
        attrs = model_attrs(
            self.stage, self.dataset, self.models.preset, self.key(), "", self.upstream
        )
        if self.decoder == GPU_DECODER:
            attrs["decoder"] = self.decoder
        return attrs

    def read(self, index: int) -> Arrays:
        rows = ingest_rows(self.ingest_dir, index, ["path"])
        rows["caption"] = aligned(self.captions_dir, index, rows["ids"], ["caption"])["caption"]
        objs = aligned(
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
        rows["input_hash"] = decoding_hash(rows, self.decoder)
        return rows

    def feed(self, rows: Arrays) -> Feed:
        clip = loaded_model("clip", self.models, self.base)
        dino = loaded_model("dinov2", self.models, self.base) if self.cfg.dinov2 else None
        off = np.asarray(rows["obj_offsets"], dtype=np.int64)
        # Each image is decoded once, in a decode worker, and its crops are cut from that decode;
        # the worker sizes them (views: the image, then its crops in object order).
        load = EncodeLoad(
            clip.pixels,
            self.crop_padding,
            self.cfg.color_bins,
            dino.processor if dino is not None else None,
            clip.center_crop_pixels() if self.cfg.image_transform == "center_crop" else None,
        )
        items = [
            (
                str(rows["path"][k]),
                bool(rows["exif_transpose"][k]),
                rows["obj_boxes"][off[k] : off[k + 1]],
            )
            for k in range(len(rows["ids"]))
        ]
        on_cuda = str(clip.device).startswith("cuda")
        size = scaled_batch_size(self.cfg.batch_size, self.base)
        if self.decoder == GPU_DECODER:
            # The workers read the files; `device_views` decodes and sizes them on the device.
            return Feed(items, ReadForDevice(load), size, collate_files)
        # The workers write the views straight into one shared buffer per batch.
        shape = clip.view_shape()
        pack = reader.Pack("pixels", shape, views_of) if shape is not None else None
        return Feed(items, load, size, collate_views, pin_memory=on_cuda, pack=pack)

    def device_views(self, clip: Any) -> DeviceViews:
        """Views decoded and sized on CLIP's device (`base.decode: gpu`)."""
        crop_steps = tensor_steps(clip.pixels.pil_steps)
        image_steps = (
            tensor_steps(clip.center_crop_pixels().pil_steps)
            if self.cfg.image_transform == "center_crop"
            else None
        )
        if crop_steps is None or (self.cfg.image_transform == "center_crop" and not image_steps):
            raise ValueError("CLIP's image transform has a step without a tensor version")
        return DeviceViews(crop_steps, self.crop_padding, str(clip.device), image_steps)

    def compute(self, rows: Arrays, timer: Timer) -> Arrays:
        clip = loaded_model("clip", self.models, self.base)
        dino = loaded_model("dinov2", self.models, self.base) if self.cfg.dinov2 else None
        n, off = len(rows["ids"]), np.asarray(rows["obj_offsets"], dtype=np.int64)
        counts = np.diff(off)
        feed = self.feed(rows)
        size = feed.batch_size
        batches = self.batches(rows, feed)
        # The texts to encode are tokenized on a thread while the images go through the model.
        captions = [str(c) for c in rows["caption"]]
        phrases = [self.cfg.phrase_template.format(p) for p in rows["obj_phrase"]]
        memo = _TEXT_MEMO.setdefault(self.params_hash(), TextMemo())
        new_captions = texts_to_encode(captions, memo, set())
        new_phrases = texts_to_encode(phrases, memo, set(new_captions))
        tokenized = _TOKENIZER.submit(
            lambda: (
                tokenize_slices(clip, new_captions, size),
                tokenize_slices(clip, new_phrases, size),
            )
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
                if self.decoder == GPU_DECODER:
                    batch = {
                        "pixels": self.device_views(clip)(batch),
                        "n_views": torch.tensor([s["n"] for s in batch]),
                    }
                pixels = batch["pixels"]
                for s in batch_slices(len(pixels), size):
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
        with timer("model"):
            captions_tokens, phrases_tokens = tokenized.result()
            text_emb = encode_texts_once(clip, captions, size, memo, captions_tokens)
            obj_text_emb = encode_texts_once(clip, phrases, size, memo, phrases_tokens)
            if self.cfg.bert:
                bert = loaded_model("bert", self.models, self.base)
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


def texts_to_encode(texts: Sequence[str], memo: TextMemo | None, also: set[str]) -> list[str]:
    """The distinct strings of `texts` that neither `memo` holds nor `also` brings."""
    return [
        t for t in dict.fromkeys(texts) if t not in also and (memo is None or memo.get(t) is None)
    ]


def tokenize_slices(encoder: Any, texts: list[str], batch_size: int) -> list[Any]:
    """`encoder.tokenize` of `texts` in `encode_texts_once`'s slices (CPU; runs on a thread)."""
    return [encoder.tokenize(texts[s]) for s in batch_slices(len(texts), batch_size)]


def encode_texts_once(
    encoder: Any,
    texts: Sequence[str],
    batch_size: int,
    memo: TextMemo | None = None,
    tokens: list[Any] | None = None,
) -> np.ndarray:
    """Encode each distinct string once and scatter the rows back to `texts`' order.

    With `memo` (kept for a whole run), strings already encoded for an earlier shard are not
    sent to the encoder again. `tokens`: `tokenize_slices` of the strings to encode, made
    ahead (e.g. on another thread). The embeddings stay on the device until all are done.
    """
    if not texts:
        return np.zeros((0, encoder.dim), np.float32)
    distinct = list(dict.fromkeys(texts))
    found = {t: memo.get(t) for t in distinct} if memo is not None else {}
    todo = [t for t in distinct if found.get(t) is None]
    rows: dict[str, np.ndarray] = {t: r for t, r in found.items() if r is not None}
    slices = batch_slices(len(todo), batch_size)
    if tokens is None or len(tokens) != len(slices):
        tokens = None
    if hasattr(encoder, "encode_tokens"):
        parts = [
            encoder.encode_tokens(tokens[k] if tokens is not None else encoder.tokenize(todo[s]))
            for k, s in enumerate(slices)
        ]
        new = torch.cat(parts).float().cpu().numpy() if parts else np.zeros((0, encoder.dim))
    else:
        parts = [np.asarray(encoder.encode_texts(todo[s]), np.float32) for s in slices]
        new = np.concatenate(parts) if parts else np.zeros((0, encoder.dim))
    for text, row in zip(todo, np.asarray(new, np.float32)):
        rows[text] = row
        if memo is not None:
            memo.put(text, row)
    out = np.empty((len(texts), encoder.dim), np.float32)
    for i, text in enumerate(texts):
        out[i] = rows[text]
    return out


# Tokenizes a shard's captions and phrases while its images are read and encoded.
_TOKENIZER = ThreadPoolExecutor(1, thread_name_prefix="misalign-tokenize")


# Text embeddings of the current run, per encoder; cleared when a run starts. Under Dask each
# worker process keeps its own.
_TEXT_MEMO: dict[str, TextMemo] = {}


def clear_text_memo() -> None:
    """Forget the text embeddings of this process's run (the next shard encodes them anew)."""
    _TEXT_MEMO.clear()


def run_encode(
    ingest_dir: Path,
    captions_dir: Path,
    objects_dir: Path,
    out_dir: Path,
    *,
    cfg: EncodeConfig,
    crop_padding: float,
    models: ModelsConfig,
    base: BaseConfig,
    dataset: str,
    reuse_from: Sequence[Path] = (),
) -> dict[str, Any]:
    """Embed every image, caption, object crop and phrase into `out_dir`'s shards, and the
    class prompts into its class_prompts.h5; returns the timings (see `run_step`)."""
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
    clear_text_memo()
    # The class prompts are encoded where the shards were (a Dask worker's loaded CLIP), not
    # by a second CLIP in this process.
    finish = functools.partial(
        _write_class_prompts_task,
        Path(out_dir),
        list(cfg.class_prompts),
        models,
        base,
        dataset,
        [Path(d) for d in reuse_from],
    )
    try:
        timings = run_step(
            step,
            out_dir,
            finish=finish,
            load_counts=model_loads,
            reuse_from=reuse_from,
            **scheduler_args(base),
        )
    finally:
        clear_text_memo()
    return timings


def _write_class_prompts_task(
    out_dir: Path,
    prompts: list[str],
    models: ModelsConfig,
    base: BaseConfig,
    dataset: str,
    reuse_from: list[Path],
) -> None:
    # Made already, here or in a folder rows are reused from, with these prompts and weights:
    # kept or copied, and CLIP is not loaded for two sentences.
    phash = params_hash(list(prompts), weights_identity("clip", models, base.seed))
    target = out_dir / CLASS_PROMPTS
    for found in [target, *(d / CLASS_PROMPTS for d in reuse_from)]:
        if _made_with(found, phash):
            if found != target:
                with atomic_path(target) as tmp:
                    shutil.copyfile(found, tmp)
            return
    write_class_prompts(
        out_dir, prompts, loaded_model("clip", models, base), models.preset, dataset
    )


def _made_with(path: Path, phash: str) -> bool:
    """Whether `path` is an intact class-prompts file made with params hash `phash`."""
    if not path.is_file():
        return False
    try:
        if store.read_attrs(path).get("params_hash") != phash:
            return False
        store.verify_shard(path)
    except store.ShardError:
        return False
    return True


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
