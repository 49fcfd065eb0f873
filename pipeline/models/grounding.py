"""GroundingDINO grounder (transformers `GroundingDinoForObjectDetection`) with a `tiny` preset."""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoProcessor,
)

from pipeline.config import GroundConfig
from pipeline.models.hf import (
    HFWrapper,
    to_model_inputs,
    write_json,
    write_tiny_wordpiece_tokenizer,
)

logger = logging.getLogger(__name__)
# The grounding settings' one home is the ground params (GroundConfig): a library call gets the
# same boxes as the pipeline unless it asks otherwise.
_DEFAULTS = GroundConfig()

_TINY_TEXT_LEN = 256  # GroundingDINO's max_text_len; the text BERT needs as many positions


@dataclass(frozen=True)
class GroundedObject:
    """One grounded phrase: an xyxy box in original pixels (inside the image), phrase, score."""

    box: tuple[float, float, float, float]
    phrase: str
    score: float


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two xyxy boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def merge_duplicates(objects: list[GroundedObject], iou_threshold: float) -> list[GroundedObject]:
    """Keep each phrase's boxes that no higher-scoring box of the same phrase overlaps by more
    than `iou_threshold` (per-phrase non-maximum suppression); `objects` sorted by score."""
    kept: list[GroundedObject] = []
    for obj in objects:
        if all(o.phrase != obj.phrase or box_iou(o.box, obj.box) <= iou_threshold for o in kept):
            kept.append(obj)
    return kept


def _merge_sorted(
    corners: np.ndarray, phrase_ids: np.ndarray, order: np.ndarray, iou_threshold: float, limit: int
) -> list[int]:
    """`merge_duplicates` on arrays, up to `limit` kept: the boxes (xyxy, float64) in `order`
    that no kept box of the same phrase overlaps by more than `iou_threshold`, with one IoU
    matrix computed as `box_iou` computes each pair."""
    x0, y0, x1, y1 = (corners[:, k] for k in range(4))
    w = np.maximum(0.0, np.minimum(x1[:, None], x1[None, :]) - np.maximum(x0[:, None], x0[None, :]))
    h = np.maximum(0.0, np.minimum(y1[:, None], y1[None, :]) - np.maximum(y0[:, None], y0[None, :]))
    inter = w * h
    area = (x1 - x0) * (y1 - y0)
    union = area[:, None] + area[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    clash = (iou > iou_threshold) & (phrase_ids[:, None] == phrase_ids[None, :])
    suppressed = np.zeros(len(corners), dtype=bool)
    kept: list[int] = []
    for k in order.tolist():
        if len(kept) >= limit:
            break
        if not suppressed[k]:
            kept.append(k)
            suppressed |= clash[k]
    return kept


def _partner_free(encoded: list[dict[str, Any]]) -> list[list[int]]:
    """Indices of `encoded` grouped by (image size, token count): items that batch unpadded.
    Items without a query (nothing to ground) are in no group."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for k, item in enumerate(encoded):
        if not item["query"]:
            continue
        key = (tuple(item["pixel_values"].shape[-2:]), int(item["input_ids"].shape[-1]))
        groups.setdefault(key, []).append(k)
    return list(groups.values())


def caption_to_query(caption: str) -> str:
    """Turn a caption into a GroundingDINO text query: lowercase, single spaces, ending in ".".

    An empty or blank caption gives "" (there is nothing to ground).
    """
    query = " ".join(caption.lower().split()).rstrip(" .")
    return f"{query}." if query else ""


@dataclass(frozen=True)
class GroundingItemEncoder:
    """The CPU half of grounding one (image, caption), picklable so that a decode worker can
    run it: the query (`caption_to_query`), the image's (height, width), and the processor
    inputs of the image and the query on their own, unpadded (pixel_values/pixel_mask
    (1, 3, H, W), the query's tokens (1, L)). Stacking items of equal shapes gives what the
    processor gives for them as one batch. An item with no query gets no tensors."""

    image_processor: Any
    tokenizer: Any
    max_text_len: int

    def __call__(self, image: Image.Image, caption: str) -> dict[str, Any]:
        query = caption_to_query(caption)
        item: dict[str, Any] = {"query": query, "size": (image.height, image.width)}
        if query:
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            item.update(self.image_processor(images=rgb, return_tensors="pt"))
            item.update(
                self.tokenizer(
                    query, truncation=True, max_length=self.max_text_len, return_tensors="pt"
                )
            )
        return item


class GroundingDinoGrounder(HFWrapper):
    """Find the objects a caption mentions (GLIP's role in ITEM)."""

    default_model_id = "IDEA-Research/grounding-dino-base"
    tiny_name = "tiny-grounding-dino"
    default_role = "grounding"  # the models.<key> in params.yaml

    @classmethod
    def _model_loader(cls) -> Callable[..., Any]:
        return GroundingDinoForObjectDetection.from_pretrained

    @classmethod
    def _processor_loader(cls) -> Callable[..., Any]:
        return AutoProcessor.from_pretrained

    def ground(
        self,
        images: list[Image.Image],
        captions: list[str],
        box_threshold: float = _DEFAULTS.box_threshold,
        text_threshold: float = _DEFAULTS.text_threshold,
        max_objects: int = _DEFAULTS.max_objects,
        iou_threshold: float = _DEFAULTS.iou_threshold,
        min_box_side: float = _DEFAULTS.min_box_side,
    ) -> list[list[GroundedObject]]:
        """Ground each caption in its image.

        Args:
            images: PIL images, any sizes and modes (converted to RGB).
            captions: One caption per image; see `caption_to_query`.
            box_threshold: Keep a box when its best token probability exceeds this.
            text_threshold: A caption word joins a box's phrase when one of its tokens has a
                probability above this.
            max_objects: Keep at most this many boxes per image, highest score first.
            iou_threshold: Boxes of the same phrase overlapping a higher-scoring one by more
                than this IoU are near-duplicates and dropped (1 keeps them all).
            min_box_side: Boxes with a side shorter than this (pixels, after clipping) are
                dropped.

        Returns:
            Per image, objects sorted by descending score. A phrase is whole words of the
            caption, in caption order (a selected WordPiece `##` piece brings its whole word).
            Boxes are clipped to the image; boxes with no area after clipping, boxes whose
            phrase is empty, small boxes and near-duplicates are dropped.
        """
        if len(images) != len(captions):
            raise ValueError(f"got {len(images)} images but {len(captions)} captions")
        encode = self.item_encoder()
        return self.ground_encoded(
            [encode(image, caption) for image, caption in zip(images, captions)],
            box_threshold,
            text_threshold,
            max_objects,
            iou_threshold,
            min_box_side,
        )

    def item_encoder(self) -> GroundingItemEncoder:
        """The per-item CPU work of `ground`, to run where the images are decoded."""
        return GroundingItemEncoder(
            self.processor.image_processor,
            self.processor.tokenizer,
            self.model.config.max_text_len,
        )

    def ground_encoded(
        self,
        encoded: list[dict[str, Any]],
        box_threshold: float = _DEFAULTS.box_threshold,
        text_threshold: float = _DEFAULTS.text_threshold,
        max_objects: int = _DEFAULTS.max_objects,
        iou_threshold: float = _DEFAULTS.iou_threshold,
        min_box_side: float = _DEFAULTS.min_box_side,
    ) -> list[list[GroundedObject]]:
        """`ground` on items made by `item_encoder()` (e.g. in decode workers); the arguments
        and the result are those of `ground`."""
        results: list[list[GroundedObject]] = [[] for _ in encoded]
        if max_objects <= 0:
            return results
        for group in _partner_free(encoded):
            first = encoded[group[0]]
            found = self._ground_batch(
                [encoded[k]["size"] for k in group],
                [encoded[k]["query"] for k in group],
                {
                    key: torch.cat([encoded[k][key] for k in group])
                    for key, value in first.items()
                    if isinstance(value, torch.Tensor)
                },
                box_threshold,
                text_threshold,
                max_objects,
                iou_threshold,
                min_box_side,
            )
            for k, objects in zip(group, found):
                results[k] = objects
        return results

    def partner_free_groups(self, images: list[Image.Image], queries: list[str]) -> list[list[int]]:
        """Split a batch into groups that need no padding: the same preprocessed image size and
        the same number of text tokens. Padding changes GroundingDINO's boxes (by up to
        hundreds of pixels: the backbone and deformable attention see the padded area), so an
        image's boxes would depend on its batch partners; within a group they do not."""
        encode = self.item_encoder()
        return _partner_free([encode(image, query) for image, query in zip(images, queries)])

    def _ground_batch(
        self,
        sizes: list[tuple[int, int]],
        batch_queries: list[str],
        batch: dict[str, Any],
        box_threshold: float,
        text_threshold: float,
        max_objects: int,
        iou_threshold: float,
        min_box_side: float,
    ) -> list[list[GroundedObject]]:
        inputs = to_model_inputs(batch, self.device, self.dtype)
        with torch.inference_mode():
            outputs = self.model(**inputs)
        # Boxes and scores come from the upstream post-processing; phrases are decoded below.
        detections = self.processor.post_process_grounded_object_detection(
            outputs,
            inputs["input_ids"],
            threshold=box_threshold,
            text_threshold=text_threshold,
            target_sizes=sizes,
        )
        probs = torch.sigmoid(outputs.logits.float())  # (batch, queries, max_text_len)
        return [
            self._objects(
                detections[row],
                probs[row],
                inputs["input_ids"][row],
                inputs["attention_mask"][row],
                sizes[row],
                box_threshold,
                text_threshold,
                max_objects,
                query=batch_queries[row],
                iou_threshold=iou_threshold,
                min_box_side=min_box_side,
            )
            for row in range(len(sizes))
        ]

    def _objects(
        self,
        detection: dict[str, Any],
        probs: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        size: tuple[int, int],
        box_threshold: float,
        text_threshold: float,
        max_objects: int,
        query: str | None = None,
        iou_threshold: float = 1.0,
        min_box_side: float = 0.0,
    ) -> list[GroundedObject]:
        # Same selection as the upstream post-processing, so rows line up with its boxes.
        kept = probs[probs.max(dim=-1).values > box_threshold]
        scores = detection["scores"].float().cpu()
        boxes = detection["boxes"].float().cpu()
        if len(kept) != len(scores):
            raise RuntimeError("GroundingDINO post-processing kept a different set of boxes")
        # Phrase tokens: real text tokens only. Upstream decodes batched phrases over all
        # max_text_len slots and so includes "[SEP]"; the "." separators carry no object.
        n_tokens = input_ids.shape[0]
        ids = input_ids.cpu()
        usable = attention_mask.cpu().bool() & ~torch.isin(ids, self._not_words())
        owner, words = self._query_words(ids, attention_mask.cpu(), query)
        if not len(scores) or not words:
            return []
        # Per box, the caption words with a token above the threshold: (boxes, tokens) masks
        # times a (tokens, words) membership, then one phrase per distinct set of words.
        token_mask = (kept[:, :n_tokens].cpu() > text_threshold) & usable
        member = (owner[:, None] == torch.arange(len(words))[None, :]).to(torch.float32)
        picked = (token_mask.to(torch.float32) @ member) > 0
        patterns, which = torch.unique(picked, dim=0, return_inverse=True)
        rows = patterns.tolist()
        # A word joined with spaces is empty only when the words are (punctuation-only words).
        has_words = [any(words[k] for k, on in enumerate(row) if on) for row in rows]
        height, width = size
        # Clipped in float64 (exact for float32 corners and integer sizes), as Python floats.
        c = boxes.double().numpy()
        x0, x1 = np.clip(c[:, 0], 0.0, width), np.clip(c[:, 2], 0.0, width)
        y0, y1 = np.clip(c[:, 1], 0.0, height), np.clip(c[:, 3], 0.0, height)
        ok = (x1 > x0) & (y1 > y0) & (np.minimum(x1 - x0, y1 - y0) >= min_box_side)
        ok &= np.array(has_words, dtype=bool)[which.numpy()]
        corners = np.stack([x0, y0, x1, y1], 1)[ok]
        clipped = np.clip(scores.double().numpy(), 0.0, 1.0)[ok]
        phrase_ids = which.numpy()[ok]
        order = np.argsort(-clipped, kind="stable")  # by score, ties in box order
        chosen = _merge_sorted(corners, phrase_ids, order, iou_threshold, max_objects)
        return [
            GroundedObject(
                tuple(corners[k].tolist()),  # type: ignore[arg-type]
                " ".join(w for w, on in zip(words, rows[phrase_ids[k]], strict=True) if on).strip(),
                float(clipped[k]),
            )
            for k in chosen
        ]

    def _not_words(self) -> torch.Tensor:
        """Token ids that never join a phrase: the special tokens and "."."""
        cached = self.__dict__.get("_not_words_ids")
        if cached is None:
            tokenizer = self.processor.tokenizer
            ids = {*tokenizer.all_special_ids, tokenizer.convert_tokens_to_ids(".")}
            cached = torch.tensor(sorted(int(i) for i in ids), dtype=torch.long)
            self.__dict__["_not_words_ids"] = cached
        return cached

    def _query_words(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query: str | None
    ) -> tuple[torch.Tensor, list[str]]:
        """`_token_words` as a tensor of owners, computed once per distinct (query, tokens)
        and kept (a bounded memo: a dataset's captions repeat across shards and rows)."""
        memo: dict[Any, tuple[torch.Tensor, list[str]]] = self.__dict__.setdefault(
            "_words_memo", {}
        )
        key = (query, tuple(input_ids[attention_mask.bool()].tolist()), int(input_ids.shape[0]))
        found = memo.get(key)
        if found is None:
            owner, words = self._token_words(input_ids, attention_mask, query)
            found = (torch.tensor(owner, dtype=torch.long), words)
            if len(memo) >= 10_000:
                memo.pop(next(iter(memo)))
            memo[key] = found
        return found

    def _token_words(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query: str | None
    ) -> tuple[list[int], list[str]]:
        """The caption word each token position belongs to (-1: none), and those words.

        Words are the query's whitespace-separated words without surrounding punctuation, found
        through the fast tokenizer's character offsets, so a phrase is made of caption words
        even when the tokenizer splits a word into `##` pieces. Without offsets (a slow
        tokenizer, or a query that does not reproduce the ids) a word is a token and the `##`
        pieces that follow it.
        """
        tokenizer = self.processor.tokenizer
        ids = [int(t) for t, m in zip(input_ids, attention_mask, strict=True) if bool(m)]
        n = int(input_ids.shape[0])
        if query is not None:
            try:
                enc = tokenizer(
                    query,
                    return_offsets_mapping=True,
                    truncation=True,
                    max_length=len(ids),
                )
            except (NotImplementedError, ValueError, TypeError):
                enc = None
            if enc is not None and list(enc["input_ids"]) == ids:
                spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", query)]
                words = [query[s:e].strip(string.punctuation) for s, e in spans]
                owner = [-1] * n
                for t, (start, end) in enumerate(enc["offset_mapping"]):
                    if end <= start:
                        continue
                    for k, (s, e) in enumerate(spans):
                        if s <= start < e and words[k]:
                            owner[t] = k
                            break
                return owner, words
        tokens = tokenizer.convert_ids_to_tokens(input_ids.tolist())
        special = set(tokenizer.all_special_ids)
        token_word: list[int] = [-1] * n
        pieces: list[list[int]] = []
        for t, (token, tid) in enumerate(zip(tokens, input_ids.tolist(), strict=True)):
            if not bool(attention_mask[t]) or tid in special:
                continue
            if token.startswith("##") and pieces:
                pieces[-1].append(tid)
            else:
                pieces.append([tid])
            token_word[t] = len(pieces) - 1
        return token_word, [tokenizer.decode(p).strip() for p in pieces]

    @staticmethod
    def _build_tiny(directory: Path) -> None:
        """Save a tiny GroundingDINO (Swin backbone, BERT text encoder) and its processor."""
        source = directory / "_source"
        vocab_size = write_tiny_wordpiece_tokenizer(source, model_max_length=_TINY_TEXT_LEN)
        write_json(
            source / "preprocessor_config.json",
            {
                "image_processor_type": "GroundingDinoImageProcessor",
                "do_convert_rgb": True,
                "do_resize": True,
                # 800/1333 in the real one; 128 keeps the deepest feature level above 1x1 px,
                # where GroupNorm cannot normalise a lone square image.
                "size": {"shortest_edge": 128, "longest_edge": 192},
                "resample": 2,
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": [0.485, 0.456, 0.406],
                "image_std": [0.229, 0.224, 0.225],
                "do_pad": True,
                "format": "coco_detection",
            },
        )
        processor = GroundingDinoProcessor(
            AutoImageProcessor.from_pretrained(source), AutoTokenizer.from_pretrained(source)
        )
        # transformers 5 dropped use_timm_backbone/use_pretrained_backbone: backbone_config
        # is always built with AutoBackbone from the config, randomly initialised, offline.
        config = GroundingDinoConfig(
            backbone_config={
                "model_type": "swin",
                "embed_dim": 8,
                "depths": [1, 1, 1, 1],
                "num_heads": [1, 1, 1, 1],
                "window_size": 7,
                "image_size": 64,
                "out_features": ["stage2", "stage3", "stage4"],
            },
            text_config={
                "model_type": "bert",
                "vocab_size": vocab_size,
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "intermediate_size": 37,
                "max_position_embeddings": _TINY_TEXT_LEN,
            },
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,  # 1 fails to construct in transformers 5
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_n_points=2,
            decoder_n_points=2,
            num_queries=16,  # more than the default max_objects, so truncation is exercised
            max_text_len=_TINY_TEXT_LEN,
        )
        model = GroundingDinoForObjectDetection(config)
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
        for path in source.iterdir():
            path.unlink()
        source.rmdir()
