"""LLaVA captioner (transformers `LlavaForConditionalGeneration`) with a seeded `tiny` preset."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenizers import ByteLevelBPETokenizer
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from pipeline.models.captioning import Captioner, save_tiny_captioner
from pipeline.models.hf import write_json

# The instruction ITEM gives LLaVA (Fig. 7).
ITEM_PROMPT = "Please generate a one-sentence caption for the input image."
_IMAGE_TOKEN = "<image>"
_TINY_CORPUS = (
    "a photo of a cat sitting on a red sofa",
    "a dog running on the beach next to the sea",
    "two people riding bikes in the city street",
    "a man standing in front of a white building",
    f"USER: {_IMAGE_TOKEN}\n{ITEM_PROMPT} ASSISTANT:",
)
_TINY_IMAGE = 32  # pixels; patch 8 gives 16 image tokens
_TINY_PATCH = 8


class LlavaCaptioner(Captioner):
    """Caption images with LLaVA-1.5 (CLIP ViT, projector, Llama) answering an instruction."""

    default_model_id = "llava-hf/llava-1.5-7b-hf"
    tiny_name = "tiny-llava"
    default_role = "llava"  # the models.<key> in params.yaml
    default_prompt = ITEM_PROMPT

    @classmethod
    def _model_loader(cls) -> Callable[..., Any]:
        return LlavaForConditionalGeneration.from_pretrained

    @classmethod
    def _processor_loader(cls) -> Callable[..., Any]:
        return AutoProcessor.from_pretrained

    def processor_text(self, prompt: str) -> str:
        # LLaVA-1.5's conversation format (the llava-hf model cards'): one user turn holding
        # the image and the instruction; the caption is the assistant's answer.
        return f"USER: {self.processor.image_token}\n{prompt} ASSISTANT:"

    @staticmethod
    def _build_tiny(directory: Path) -> None:
        """Save a tiny LLaVA (CLIP vision tower + projector + Llama) and its processor."""
        source = directory / "_source"
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(
            _TINY_CORPUS,
            vocab_size=320,
            min_frequency=1,
            special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
            show_progress=False,
        )
        source.mkdir(parents=True)
        bpe.save_model(str(source))
        write_json(
            source / "tokenizer_config.json",
            {
                "tokenizer_class": "GPT2Tokenizer",
                "add_bos_token": True,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "model_max_length": 256,
            },
        )
        write_json(
            source / "preprocessor_config.json",
            {
                "image_processor_type": "CLIPImageProcessor",
                "do_convert_rgb": True,
                "do_resize": True,
                "size": {"shortest_edge": _TINY_IMAGE},
                "do_center_crop": True,
                "crop_size": {"height": _TINY_IMAGE, "width": _TINY_IMAGE},
                "resample": 3,
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
            },
        )
        tokenizer = AutoTokenizer.from_pretrained(source)
        tokenizer.add_tokens([_IMAGE_TOKEN], special_tokens=True)
        image_processor = AutoImageProcessor.from_pretrained(source)
        # llava-1.5's processor settings: the CLS token is dropped ("default" strategy).
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=_TINY_PATCH,
            vision_feature_select_strategy="default",
            image_token=_IMAGE_TOKEN,
            num_additional_image_tokens=1,
        )
        vocab_size = len(tokenizer)
        config = LlavaConfig(
            vision_config={
                "model_type": "clip_vision_model",
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "image_size": _TINY_IMAGE,
                "patch_size": _TINY_PATCH,
                "projection_dim": 32,
            },
            text_config={
                "model_type": "llama",
                "vocab_size": vocab_size,
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "max_position_embeddings": 256,
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            },
            image_token_index=tokenizer.get_vocab()[_IMAGE_TOKEN],
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        model = LlavaForConditionalGeneration(config)
        # Random weights: keep tiny captions non-empty lowercase words (see captioning.WORDLIKE).
        save_tiny_captioner(
            model,
            processor,
            tokenizer,
            vocab_size,
            end_token=tokenizer.eos_token_id,
            directory=directory,
            source=source,
        )
