"""What every captioner shares: per-image encoding for decode workers, batching, and generation."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from pipeline.models.hf import HFWrapper, to_model_inputs

# Tiny captioners keep their (random) output to lowercase words so that it can flow through
# grounding and CLIP like a real caption.
WORDLIKE = re.compile(r"[a-z ]*[a-z][a-z ]*")


@dataclass(frozen=True)
class CaptionItemEncoder:
    """The CPU half of captioning one image with a fixed text, picklable so that a decode
    worker can run it: the processor's inputs for that image alone (pixel_values (1, 3, H, W),
    the text's tokens (1, L))."""

    processor: Any
    text: str  # what the processor tokenizes beside the image (a prompt, or a chat turn)

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        return dict(self.processor(images=[rgb], text=[self.text], return_tensors="pt"))


def concat_encoded(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One batch of `CaptionItemEncoder` outputs: each tensor concatenated along the batch
    axis. Every item has the same text, hence the same token count, so no padding is needed
    and the batch equals the processor's output for all the images at once."""
    return {key: torch.cat([s[key] for s in samples]) for key in samples[0]}


def suppressed_tokens(tokenizer: Any, vocab_size: int, keep: Sequence[int]) -> list[int]:
    """Token ids a tiny captioner must never emit: every one that does not decode to lowercase
    words (ids in `keep`, such as EOS, stay allowed)."""
    return [
        token_id
        for token_id in range(vocab_size)
        if token_id not in keep and not WORDLIKE.fullmatch(str(tokenizer.decode([token_id])))
    ]


def save_tiny_captioner(
    model: Any,
    processor: Any,
    tokenizer: Any,
    vocab_size: int,
    *,
    end_token: int,
    directory: Path,
    source: Path,
) -> None:
    """Save a tiny captioner built with random weights into `directory`, generating captions of
    lowercase words only (`suppressed_tokens`, `end_token` allowed) and at least one new token;
    this lives in its generation_config.json only. `source`, the folder its tokenizer files
    were written to, is removed."""
    model.generation_config.min_new_tokens = 1
    model.generation_config.suppress_tokens = suppressed_tokens(
        tokenizer, vocab_size, keep=[end_token]
    )
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    for path in sorted(source.iterdir()):
        path.unlink()
    source.rmdir()


class Captioner(HFWrapper):
    """A transformers image-to-text model that captions batches of images; subclasses say how
    a prompt becomes the processor's text and where the new tokens start in `generate`'s output."""

    # Text the model is given when the params give no prompt.
    default_prompt: ClassVar[str] = ""

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
            prompt: Optional text: a prefix the caption continues (BLIP, BLIP-2), or the
                instruction (LLaVA); it is not returned. None uses the model's default.
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
        return CaptionItemEncoder(
            self.processor, self.processor_text(prompt or self.default_prompt)
        )

    def processor_text(self, prompt: str) -> str:
        """The text handed to the processor beside each image for `prompt`."""
        return prompt

    def prompt_length(self, inputs: Mapping[str, torch.Tensor]) -> int:
        """How many leading tokens of `generate`'s output repeat the input (not the caption)."""
        return int(inputs["input_ids"].shape[1])

    def generate(self, inputs: Mapping[str, Any], generation_config: Any) -> torch.Tensor:
        """The model's `generate` on processor inputs with these generation settings."""
        return self.model.generate(**inputs, generation_config=generation_config)

    def caption_encoded(
        self, batch: Mapping[str, torch.Tensor], num_beams: int = 3, max_new_tokens: int = 30
    ) -> list[str]:
        """`caption` on a batch made by `concat_encoded` of `item_encoder(prompt)` outputs (e.g.
        in decode workers); the arguments and the result are those of `caption`."""
        inputs = to_model_inputs(batch, self.device, self.dtype)
        # Pass the saved generation config explicitly: transformers 5 does not hand the top-level
        # generation_config.json to an inner language model's generate(). It also deprecates
        # mixing a config with keyword arguments, hence the copy.
        generation_config = copy.deepcopy(self.model.generation_config)
        generation_config.num_beams = num_beams
        generation_config.max_new_tokens = max_new_tokens
        with torch.inference_mode():
            output = self.generate(inputs, generation_config)
        new_tokens = output[:, self.prompt_length(inputs) :]
        captions = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [caption.strip() for caption in captions]
