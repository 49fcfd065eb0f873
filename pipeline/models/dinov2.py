"""DINOv2 image encoder (transformers `Dinov2Model`) with a `tiny` preset."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, Dinov2Config, Dinov2Model

from pipeline.models.hf import HFWrapper, to_model_inputs, write_json

_TINY_CROP = 28  # two 14-pixel patches a side


class Dinov2ImageEncoder(HFWrapper):
    """Encode images with DINOv2's CLS token."""

    default_model_id = "facebook/dinov2-base"
    tiny_name = "tiny-dinov2"
    default_role = "dinov2"

    @classmethod
    def _model_loader(cls) -> Callable[..., Any]:
        return Dinov2Model.from_pretrained

    @classmethod
    def _processor_loader(cls) -> Callable[..., Any]:
        return AutoImageProcessor.from_pretrained

    @property
    def dim(self) -> int:
        """Width of the embeddings `encode` returns."""
        return int(self.model.config.hidden_size)

    def encode(self, images: list[Image.Image], batch_size: int = 32) -> np.ndarray:
        """Embed images.

        Pooling is DINOv2's `pooler_output`: the CLS token after the final layer norm.

        Args:
            images: PIL images, any sizes and modes (converted to RGB).
            batch_size: Images per forward pass.

        Returns:
            float32 array of shape (len(images), hidden_size).
        """
        chunks = [np.zeros((0, self.dim), dtype=np.float32)]
        for start in range(0, len(images), batch_size):
            rgb = [image.convert("RGB") for image in images[start : start + batch_size]]
            batch = self.processor(images=rgb, return_tensors="pt")
            inputs = to_model_inputs(batch, self.device, self.dtype)
            with torch.inference_mode():
                pooled = self.model(**inputs).pooler_output
            chunks.append(pooled.float().cpu().numpy())
        return np.concatenate(chunks, axis=0)

    @staticmethod
    def pixel_values(processor: Any, image: Image.Image) -> torch.Tensor:
        """Pixel values (3, H, W) of one image as `encode` prepares them; takes the processor,
        not the model, so that a decode worker can run it."""
        return processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"][0]

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLS embeddings of `preprocess`ed images (N, 3, H, W), left on the model's device."""
        batch = pixels.to(self.device, self.dtype, non_blocking=True)
        return self.model(pixel_values=batch).pooler_output

    @staticmethod
    def _build_tiny(directory: Path) -> None:
        """Save a tiny Dinov2Model and its BitImageProcessor config into `directory`."""
        # Same keys as facebook/dinov2-base's preprocessor_config.json (256 resize, 224 crop).
        write_json(
            directory / "preprocessor_config.json",
            {
                "image_processor_type": "BitImageProcessor",
                "do_convert_rgb": True,
                "do_resize": True,
                "size": {"shortest_edge": 32},
                "resample": 3,
                "do_center_crop": True,
                "crop_size": {"height": _TINY_CROP, "width": _TINY_CROP},
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": [0.485, 0.456, 0.406],
                "image_std": [0.229, 0.224, 0.225],
            },
        )
        config = Dinov2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            mlp_ratio=2,
            image_size=_TINY_CROP,
            patch_size=14,
        )
        model = Dinov2Model(config)
        model.save_pretrained(directory)
        # Round-trip through the real loader so the saved file is what transformers writes.
        AutoImageProcessor.from_pretrained(directory).save_pretrained(directory)
