"""BLIP captioner (transformers `BlipForConditionalGeneration`) with a seeded `tiny` preset."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipProcessor,
)

from pipeline.models.captioning import Captioner, save_tiny_captioner
from pipeline.models.hf import write_json, write_tiny_wordpiece_tokenizer

_TINY_IMAGE = 32  # pixels; patch 8 gives 16 patches
_DECODER_BOS = "[DEC]"  # BLIP's decoder start token, added after bert-base-uncased's vocabulary


class BlipCaptioner(Captioner):
    """Caption images with BLIP (ViT encoder, BERT-style decoder attending to the image)."""

    # ITEM (Fig. 7) names BLIP without a variant; the large captioning checkpoint is BLIP's own
    # COCO-finetuned captioner.
    default_model_id = "Salesforce/blip-image-captioning-large"
    tiny_name = "tiny-blip"
    default_role = "blip"  # the models.<key> in params.yaml

    @classmethod
    def _model_loader(cls) -> Callable[..., Any]:
        return BlipForConditionalGeneration.from_pretrained

    @classmethod
    def _processor_loader(cls) -> Callable[..., Any]:
        return AutoProcessor.from_pretrained

    def prompt_length(self, inputs: Mapping[str, torch.Tensor]) -> int:
        # BLIP's generate() drops the trailing [SEP] of the prompt and swaps [CLS] for its
        # decoder start token: the output repeats all input tokens but the last.
        return int(inputs["input_ids"].shape[1]) - 1

    def generate(self, inputs: Mapping[str, Any], generation_config: Any) -> torch.Tensor:
        # BLIP's generate() hands its text decoder the EOS and pad ids as keyword arguments;
        # transformers deprecates mixing those with a config, so every setting goes that way.
        internal = ("eos_token_id", "pad_token_id", "_from_model_config", "transformers_version")
        settings = {k: v for k, v in generation_config.to_diff_dict().items() if k not in internal}
        return self.model.generate(**inputs, **settings)

    @staticmethod
    def _build_tiny(directory: Path) -> None:
        """Save a tiny BLIP (ViT + text decoder) and its processor into `directory`."""
        source = directory / "_source"
        write_tiny_wordpiece_tokenizer(source, model_max_length=64)
        write_json(
            source / "preprocessor_config.json",
            {
                "image_processor_type": "BlipImageProcessor",
                "do_convert_rgb": True,
                "do_resize": True,
                "size": {"height": _TINY_IMAGE, "width": _TINY_IMAGE},
                "resample": 3,
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
            },
        )
        tokenizer = AutoTokenizer.from_pretrained(source)
        # As in Salesforce/blip-*: the decoder starts from an added "[DEC]" token.
        tokenizer.add_special_tokens({"bos_token": _DECODER_BOS})
        image_processor = AutoImageProcessor.from_pretrained(source)
        processor = BlipProcessor(image_processor, tokenizer)
        vocab_size = len(tokenizer)
        config = BlipConfig(
            vision_config={
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "image_size": _TINY_IMAGE,
                "patch_size": 8,
            },
            text_config={
                "vocab_size": vocab_size,
                "hidden_size": 32,
                "encoder_hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "max_position_embeddings": 64,
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.sep_token_id,
                "sep_token_id": tokenizer.sep_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            },
            projection_dim=32,
        )
        model = BlipForConditionalGeneration(config)
        # Random weights: keep tiny captions non-empty lowercase words (see captioning.WORDLIKE).
        save_tiny_captioner(
            model,
            processor,
            tokenizer,
            vocab_size,
            end_token=tokenizer.sep_token_id,
            directory=directory,
            source=source,
        )
