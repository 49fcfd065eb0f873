"""BERT text encoder (transformers `BertModel`) for the CT2 variant, with a `tiny` preset."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from pipeline.models.hf import HFWrapper, write_tiny_wordpiece_tokenizer

_TINY_MAX_LENGTH = 64


class BertTextEncoder(HFWrapper):
    """Encode texts with BERT's final [CLS] hidden state (CT2's text feature)."""

    default_model_id = "bert-base-uncased"
    tiny_name = "tiny-bert"
    default_role = "bert"

    @classmethod
    def _model_loader(cls) -> Callable[..., Any]:
        return BertModel.from_pretrained

    @classmethod
    def _processor_loader(cls) -> Callable[..., Any]:
        return AutoTokenizer.from_pretrained

    @property
    def dim(self) -> int:
        """Width of the embeddings `encode` returns."""
        return int(self.model.config.hidden_size)

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Embed texts.

        The embedding is `last_hidden_state[:, 0]`, the final hidden state of [CLS], as CT2's
        `model.py` takes it; not `pooler_output` (that state through the NSP head's dense +
        tanh layer) and not a mean over tokens. Texts longer than the model's maximum length
        are truncated.

        Args:
            texts: Strings to embed.
            batch_size: Texts per forward pass.

        Returns:
            float32 array of shape (len(texts), hidden_size).
        """
        max_length = min(
            int(self.processor.model_max_length), int(self.model.config.max_position_embeddings)
        )
        chunks = [np.zeros((0, self.dim), dtype=np.float32)]
        for start in range(0, len(texts), batch_size):
            batch = self.processor(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                cls = self.model(**batch).last_hidden_state[:, 0]
            chunks.append(cls.float().cpu().numpy())
        return np.concatenate(chunks, axis=0)

    @staticmethod
    def _build_tiny(directory: Path) -> None:
        """Save a tiny BertModel (with pooler) and its WordPiece tokenizer into `directory`."""
        source = directory / "_source"
        vocab_size = write_tiny_wordpiece_tokenizer(source, model_max_length=_TINY_MAX_LENGTH)
        tokenizer = AutoTokenizer.from_pretrained(source)
        config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=_TINY_MAX_LENGTH,
            # 10x the usual init std, so random pooled outputs visibly depend on the text.
            initializer_range=0.2,
        )
        model = BertModel(config)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        for path in source.iterdir():
            path.unlink()
        source.rmdir()
