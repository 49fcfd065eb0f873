"""BLIP-2 captioner (transformers `Blip2ForConditionalGeneration`) with a seeded `tiny` preset."""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
)

from pipeline.errors import ModelFileError
from pipeline.models.hf import HFWrapper, to_model_inputs, write_json

logger = logging.getLogger(__name__)

# Sentences the tiny byte-level BPE is trained on; only their merges matter.
_TINY_CORPUS = (
    "a photo of a cat sitting on a red sofa",
    "a dog running on the beach next to the sea",
    "two people riding bikes in the city street",
    "a bowl of fruit on a wooden table",
    "a man standing in front of a white building",
    "question: what is in the image? answer:",
)
_TINY_IMAGE = 32  # pixels; patch 8 gives 16 patches
_TINY_QUERIES = 4  # Q-Former query tokens (32 in the real model)
_WORDLIKE = re.compile(r"[a-z ]*[a-z][a-z ]*")


@dataclass(frozen=True)
class CaptionItemEncoder:
    """The CPU half of captioning one image with a fixed prompt, picklable so that a decode
    worker can run it: the processor's inputs for that image alone (pixel_values (1, 3, H, W),
    the prompt's tokens (1, L))."""

    processor: Any
    prompt: str  # "" tokenizes to [BOS]: the same start the model uses with no text at all

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        return dict(self.processor(images=[rgb], text=[self.prompt], return_tensors="pt"))


def concat_encoded(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One batch of `CaptionItemEncoder` outputs: each tensor concatenated along the batch
    axis. Every item has the same prompt, hence the same token count, so no padding is needed
    and the batch equals the processor's output for all the images at once."""
    return {key: torch.cat([s[key] for s in samples]) for key in samples[0]}


class Blip2Captioner(HFWrapper):
    """Caption images with BLIP-2 (OPT language model)."""

    default_model_id = "Salesforce/blip2-opt-2.7b"
    tiny_name = "tiny-blip2"
    default_role = "blip2"  # the models.<key> in params.yaml

    @classmethod
    def _model_loader(cls) -> Callable[..., Any]:
        return Blip2ForConditionalGeneration.from_pretrained

    @classmethod
    def _processor_loader(cls) -> Callable[..., Any]:
        return AutoProcessor.from_pretrained

    def _after_load(self) -> None:
        config = self.model.config
        if getattr(config, "image_token_index", None) is None:
            raise ModelFileError(
                f"BLIP-2 checkpoint {self.weights_id} has no image_token_index in its config.json "
                "(a snapshot older than transformers' image-token format); download the current "
                f"revision with `hf download {self.model_id}`"
            )
        if getattr(self.processor, "num_query_tokens", None) is None:
            # Older processor_config.json files lack it; without it no image tokens are inserted.
            logger.warning(
                "processor of %s has no num_query_tokens; using the model's %d",
                self.weights_id,
                config.num_query_tokens,
            )
            self.processor.num_query_tokens = config.num_query_tokens

    def caption(
        self,
        images: list[Image.Image],
        prompt: str | None = None,
        num_beams: int = 3,
        max_new_tokens: int = 30,
    ) -> list[str]:
        """Caption a batch of images.

        Args:
            images: PIL images of any size and mode (converted to RGB).
            prompt: Optional text the caption continues (e.g. "a photo of"); it is not returned.
            num_beams: Beam width.
            max_new_tokens: Upper bound on the caption length in tokens.

        Returns:
            One caption per image, without the prompt and surrounding whitespace.
        """
        if not images:
            return []
        encode = self.item_encoder(prompt)
        return self.caption_encoded(
            concat_encoded([encode(image) for image in images]), num_beams, max_new_tokens
        )

    def item_encoder(self, prompt: str | None = None) -> CaptionItemEncoder:
        """The per-image CPU work of `caption` with `prompt`, to run where images are decoded."""
        return CaptionItemEncoder(self.processor, prompt or "")

    def caption_encoded(
        self, batch: Mapping[str, torch.Tensor], num_beams: int = 3, max_new_tokens: int = 30
    ) -> list[str]:
        """`caption` on a batch made by `concat_encoded` of `item_encoder(prompt)` outputs (e.g.
        in decode workers); the arguments and the result are those of `caption`."""
        inputs = to_model_inputs(batch, self.device, self.dtype)
        # Pass the saved generation config explicitly: transformers 5 does not hand the top-level
        # generation_config.json to the inner language model's generate(). It also deprecates
        # mixing a config with keyword arguments, hence the copy.
        generation_config = copy.deepcopy(self.model.generation_config)
        generation_config.num_beams = num_beams
        generation_config.max_new_tokens = max_new_tokens
        with torch.inference_mode():
            output = self.model.generate(**inputs, generation_config=generation_config)
        # For decoder-only LMs the output repeats the input ids (image tokens, BOS, prompt).
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        captions = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [caption.strip() for caption in captions]

    @staticmethod
    def _build_tiny(directory: Path) -> None:
        """Save a tiny BLIP-2 (ViT + Q-Former + OPT) and its processor into `directory`."""
        source = directory / "_source"
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(
            _TINY_CORPUS,
            vocab_size=320,
            min_frequency=1,
            special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
            show_progress=False,
        )
        source.mkdir(parents=True)
        bpe.save_model(str(source))  # vocab.json + merges.txt, the files OPT checkpoints ship
        # Same special-token layout as facebook/opt-*: BOS and EOS are both "</s>".
        write_json(
            source / "tokenizer_config.json",
            {
                "tokenizer_class": "GPT2Tokenizer",
                "add_bos_token": True,
                "bos_token": "</s>",
                "eos_token": "</s>",
                "unk_token": "</s>",
                "pad_token": "<pad>",
                "model_max_length": 128,
            },
        )
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
        image_processor = AutoImageProcessor.from_pretrained(source)
        # The processor adds the "<image>" token; num_query_tokens makes it expand one per query.
        processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=_TINY_QUERIES)
        vocab_size = len(processor.tokenizer)
        config = Blip2Config(
            vision_config={
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "image_size": _TINY_IMAGE,
                "patch_size": 8,
            },
            qformer_config={
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "encoder_hidden_size": 32,
                "vocab_size": vocab_size,
                "max_position_embeddings": 64,
            },
            text_config={
                "model_type": "opt",
                "vocab_size": vocab_size,
                "hidden_size": 32,
                "word_embed_proj_dim": 32,
                "ffn_dim": 37,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "max_position_embeddings": 128,
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            },
            num_query_tokens=_TINY_QUERIES,
            # transformers 5 locates the query embeddings by this id; it must be set.
            image_token_index=tokenizer.get_vocab()["<image>"],
        )
        model = Blip2ForConditionalGeneration(config)
        # Random weights often emit EOS or byte-garbage first. Keep tiny captions non-empty
        # and word-like (lowercase letters and spaces) so they can flow through grounding and
        # CLIP: at least one new token, and every token that is not word-like (other than EOS)
        # is suppressed. This lives in the tiny model's generation_config.json only.
        suppress = [
            token_id
            for token_id in range(vocab_size)
            if token_id != tokenizer.eos_token_id
            and not _WORDLIKE.fullmatch(str(tokenizer.decode([token_id])))
        ]
        model.generation_config.min_new_tokens = 1
        model.generation_config.suppress_tokens = suppress
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
        for path in source.iterdir():
            path.unlink()
        source.rmdir()
