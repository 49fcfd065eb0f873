"""BLIP-2 captioner (transformers `Blip2ForConditionalGeneration`) with a seeded `tiny` preset."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from pipeline.models.captioning import (  # noqa: F401  (re-exported for callers)
    Captioner,
    CaptionItemEncoder,
    concat_encoded,
    save_tiny_captioner,
    suppressed_tokens,
)
from pipeline.models.hf import write_json

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


class Blip2Captioner(Captioner):
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
        save_tiny_captioner(
            model,
            processor,
            tokenizer,
            vocab_size,
            end_token=tokenizer.eos_token_id,
            directory=directory,
            source=source,
        )
