"""GroundingDINO grounder (transformers `GroundingDinoForObjectDetection`) with a `tiny` preset."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

from pipeline.models.hf import (
    HFWrapper,
    to_model_inputs,
    write_json,
    write_tiny_wordpiece_tokenizer,
)

logger = logging.getLogger(__name__)

_TINY_TEXT_LEN = 256  # GroundingDINO's max_text_len; the text BERT needs as many positions


@dataclass(frozen=True)
class GroundedObject:
    """One grounded phrase: an xyxy box in original pixels (inside the image), phrase, score."""

    box: tuple[float, float, float, float]
    phrase: str
    score: float


def caption_to_query(caption: str) -> str:
    """Turn a caption into a GroundingDINO text query: lowercase, single spaces, ending in ".".

    An empty or blank caption gives "" (there is nothing to ground).
    """
    query = " ".join(caption.lower().split()).rstrip(" .")
    return f"{query}." if query else ""


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
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        max_objects: int = 10,
    ) -> list[list[GroundedObject]]:
        """Ground each caption in its image.

        Args:
            images: PIL images, any sizes and modes (converted to RGB).
            captions: One caption per image; see `caption_to_query`.
            box_threshold: Keep a box when its best token probability exceeds this.
            text_threshold: A token joins a box's phrase when its probability exceeds this.
            max_objects: Keep at most this many boxes per image, highest score first.

        Returns:
            Per image, objects sorted by descending score. Boxes are clipped to the image;
            boxes with no area after clipping, and boxes whose phrase is empty, are dropped.
        """
        if len(images) != len(captions):
            raise ValueError(f"got {len(images)} images but {len(captions)} captions")
        results: list[list[GroundedObject]] = [[] for _ in images]
        queries = [caption_to_query(caption) for caption in captions]
        todo = [i for i, query in enumerate(queries) if query]
        if not todo or max_objects <= 0:
            return results
        rgb = {i: images[i].convert("RGB") for i in todo}
        for group in self.partner_free_groups([rgb[i] for i in todo], [queries[i] for i in todo]):
            members = [todo[k] for k in group]
            found = self._ground_batch(
                [rgb[i] for i in members],
                [queries[i] for i in members],
                box_threshold,
                text_threshold,
                max_objects,
            )
            for index, objects in zip(members, found):
                results[index] = objects
        return results

    def partner_free_groups(self, images: list[Image.Image], queries: list[str]) -> list[list[int]]:
        """Split a batch into groups that need no padding: the same preprocessed image size and
        the same number of text tokens. Padding changes GroundingDINO's boxes (by up to
        hundreds of pixels: the backbone and deformable attention see the padded area), so an
        image's boxes would depend on its batch partners; within a group they do not."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for k, (image, query) in enumerate(zip(images, queries)):
            shape = tuple(
                self.processor.image_processor(images=image, return_tensors="pt")[
                    "pixel_values"
                ].shape[-2:]
            )
            n_tokens = len(
                self.processor.tokenizer(
                    query, truncation=True, max_length=self.model.config.max_text_len
                )["input_ids"]
            )
            groups.setdefault((shape, n_tokens), []).append(k)
        return list(groups.values())

    def _ground_batch(
        self,
        batch_images: list[Image.Image],
        batch_queries: list[str],
        box_threshold: float,
        text_threshold: float,
        max_objects: int,
    ) -> list[list[GroundedObject]]:
        batch = self.processor(
            images=batch_images,
            text=batch_queries,
            padding="longest",
            truncation=True,
            max_length=self.model.config.max_text_len,
            return_tensors="pt",
        )
        inputs = to_model_inputs(batch, self.device, self.dtype)
        with torch.inference_mode():
            outputs = self.model(**inputs)
        sizes = [(image.height, image.width) for image in batch_images]
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
            )
            for row in range(len(batch_images))
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
        special = set(self.processor.tokenizer.all_special_ids)
        dot = self.processor.tokenizer.convert_tokens_to_ids(".")
        usable = torch.tensor(
            [
                bool(m) and int(t) not in special and int(t) != dot
                for t, m in zip(input_ids, attention_mask, strict=True)
            ],
            dtype=torch.bool,
        )
        height, width = size
        objects: list[GroundedObject] = []
        for score, box, prob in zip(scores.tolist(), boxes, kept.cpu(), strict=True):
            token_mask = (prob[:n_tokens] > text_threshold) & usable
            phrase = self.processor.tokenizer.decode(input_ids[token_mask].tolist()).strip()
            if not phrase:
                continue
            x0, y0, x1, y1 = box.tolist()
            # float(): clipping to the int image size must not turn a coordinate into an int.
            x0, x1 = float(min(max(x0, 0.0), width)), float(min(max(x1, 0.0), width))
            y0, y1 = float(min(max(y0, 0.0), height)), float(min(max(y1, 0.0), height))
            if x1 <= x0 or y1 <= y0:
                continue
            objects.append(GroundedObject((x0, y0, x1, y1), phrase, min(max(score, 0.0), 1.0)))
        objects.sort(key=lambda obj: obj.score, reverse=True)
        return objects[:max_objects]

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
