"""open_clip wrapper: tiny preset, checkpoint-file round trip, fast and helpful missing weights."""

import time

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ModelsConfig
from pipeline.extract import encode_texts_once
from pipeline.models import WeightsMissing, check_weights
from pipeline.models.clip import TINY_CLIP, ClipEncoder
from pipeline.models.hf import ModelWeightsMissing


@pytest.fixture(scope="module")
def tiny():
    return ClipEncoder.load(preset="tiny", seed=0)


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            for w, h in ((300, 200), (64, 96))]  # fmt: skip


def test_tiny_embeddings_are_raw_and_deterministic(tiny):
    img = tiny.encode_images(_images())
    txt = tiny.encode_texts(["a photo of a cat", "a dog"])
    assert img.shape == (2, tiny.dim) and txt.shape == (2, tiny.dim)
    assert not np.allclose(np.linalg.norm(img, axis=1), 1.0)  # not normalised
    again = ClipEncoder.load(preset="tiny", seed=0)
    np.testing.assert_array_equal(again.encode_images(_images()), img)
    other = ClipEncoder.load(preset="tiny", seed=1)
    assert not np.allclose(other.encode_texts(["a dog"]), txt[1:])


def test_checkpoint_file_round_trip_uses_the_real_loading_path(tiny, tmp_path):
    ckpt = tmp_path / "weights.pt"
    torch.save(tiny.model.state_dict(), ckpt)
    loaded = ClipEncoder.load(name=TINY_CLIP, pretrained="", path=str(ckpt), preset="paper")
    assert str(ckpt) in loaded.weights_id
    np.testing.assert_array_equal(loaded.encode_images(_images()), tiny.encode_images(_images()))
    np.testing.assert_array_equal(loaded.encode_texts(["x y"]), tiny.encode_texts(["x y"]))


def test_missing_weights_fail_fast_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.perf_counter()
    with pytest.raises(ModelWeightsMissing) as err:
        ClipEncoder.load("ViT-L-14", "openai", preset="paper")
    assert time.perf_counter() - start < 10
    msg = str(err.value)
    assert "ViT-L-14/openai" in msg and "models.clip.path" in msg
    assert "models.preset=tiny" in msg and str(tmp_path / "hub") in msg
    with pytest.raises(ModelWeightsMissing, match="missing.pt"):
        ClipEncoder.load("ViT-L-14", "openai", path=str(tmp_path / "missing.pt"))


def test_run_preflight_lists_every_missing_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsMissing) as err:
        check_weights(ModelsConfig(), ["clip", "captioner", "grounder"])
    msg = str(err.value)
    for name in ("ViT-L-14/openai", "Salesforce/blip2-opt-2.7b", "IDEA-Research/grounding-dino-base"):
        assert name in msg
    check_weights(ModelsConfig(preset="tiny"), ["clip", "captioner"])  # nothing to check


class CountingEncoder:
    dim = 3

    def __init__(self):
        self.seen = []

    def encode_texts(self, texts):
        self.seen.extend(texts)
        return np.array([[len(t), t.count("a"), 1.0] for t in texts], np.float32)


def test_each_distinct_text_is_encoded_once():
    enc = CountingEncoder()
    texts = ["a cat", "a dog", "a cat", "sky", "a dog", "a cat"]
    out = encode_texts_once(enc, texts, batch_size=2)
    assert sorted(enc.seen) == ["a cat", "a dog", "sky"]
    np.testing.assert_array_equal(out, CountingEncoder().encode_texts(texts))
