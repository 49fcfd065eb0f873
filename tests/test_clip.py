"""open_clip wrapper: tiny preset, checkpoint-file round trip, fast and helpful missing weights."""

import time

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ModelsConfig
from pipeline.extract.encode import encode_texts_once
from pipeline.models import WeightsMissing, check_weights
from pipeline.models.clip import TINY_CLIP, ClipEncoder
from pipeline.models.hf import ModelWeightsMissing
from pipeline.rows.digest import file_digest


@pytest.fixture(scope="module")
def tiny():
    return ClipEncoder.load(preset="tiny", seed=0)


def _images():
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        for w, h in ((300, 200), (64, 96))
    ]


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
    assert loaded.weights_id == f"{TINY_CLIP}/file@sha256:{file_digest(ckpt)[:16]}"
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
        check_weights(ModelsConfig(), ["clip", "blip2", "grounder"])
    msg = str(err.value)
    for name in (
        "ViT-L-14/openai",
        "Salesforce/blip2-opt-2.7b",
        "IDEA-Research/grounding-dino-base",
    ):
        assert name in msg
    check_weights(ModelsConfig(preset="tiny"), ["clip", "blip2"])  # nothing to check


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


def test_encode_stage_sends_each_string_to_the_text_encoder_once_per_run(tmp_path, monkeypatch):
    """Two shards share captions and phrases; the encode stage must encode each string once."""
    from pipeline.config import BaseConfig, EncodeConfig
    from pipeline.extract import encode
    from pipeline.rows import store
    from tests.helpers import make_image

    ingest, caps, objs = tmp_path / "ingest", tmp_path / "captions", tmp_path / "objects"
    captions = [["a red car", "a dog"], ["a red car", "a cat on a mat"]]
    phrases = [[["car"], ["dog", "car"]], [["car"], []]]
    for k in range(2):
        ids = np.array([f"id{k}{i}" for i in range(2)], dtype=object)
        paths = [make_image(tmp_path / "img" / f"{k}{i}.png", 10 * k + i).name for i in range(2)]
        stats = [(tmp_path / "img" / p).stat() for p in paths]
        store.write_shard(
            ingest / store.shard_name(k),
            {
                "ids": ids,
                "path": np.array(paths, dtype=object),
                # what ingest records so that extraction can tell the files are unchanged
                "file_size": np.array([st.st_size for st in stats], dtype=np.int64),
                "file_mtime_ns": np.array([st.st_mtime_ns for st in stats], dtype=np.int64),
            },
            {"data_root": str(tmp_path / "img")},
        )
        store.write_shard(
            caps / store.shard_name(k),
            {"ids": ids, "caption": np.array(captions[k], dtype=object)},
            {},
        )
        flat = [p for per in phrases[k] for p in per]
        store.write_shard(
            objs / store.shard_name(k),
            {
                "ids": ids,
                "obj_offsets": np.cumsum([0] + [len(p) for p in phrases[k]]).astype(np.int64),
                "obj_boxes": np.tile(np.array([[2, 2, 30, 30]], np.float32), (len(flat), 1)),
                "obj_phrase": np.array(flat, dtype=object),
            },
            {},
        )

    sent: list[str] = []
    real_load = encode.loaded_model

    class Counting:
        def __init__(self, inner):
            self.inner, self.dim = inner, inner.dim

        def __getattr__(self, name):  # preprocess, device, encode_pixels, ...
            return getattr(self.inner, name)

        def encode_texts(self, texts):
            sent.extend(texts)
            return self.inner.encode_texts(texts)

        def tokenize(self, texts):  # the stage tokenizes ahead, then encodes the tokens
            sent.extend(texts)
            return self.inner.tokenize(texts)

    monkeypatch.setattr(encode, "loaded_model", lambda *a: Counting(real_load(*a)))
    models = ModelsConfig(preset="tiny")
    encode.run_encode(
        ingest,
        caps,
        objs,
        tmp_path / "clip",
        cfg=EncodeConfig(batch_size=2),
        crop_padding=0.0,
        models=models,
        base=BaseConfig(),
        dataset="t",
    )
    prompts = list(EncodeConfig().class_prompts)  # encoded once more, at the end of the run
    assert sorted(sent) == sorted({"a red car", "a dog", "a cat on a mat", "car", "dog", *prompts})
    out = store.read_shard(tmp_path / "clip" / store.shard_name(1))
    first = store.read_shard(tmp_path / "clip" / store.shard_name(0))
    np.testing.assert_array_equal(out["text_emb"][0], first["text_emb"][0])  # same caption


def test_pooled_vision_output_is_the_embedding_before_projection(tiny):
    """encode.clip_pooled: the vision tower's output before `proj`; projecting it gives the
    CLIP image embedding."""

    images = [Image.new("RGB", (40, 30), (i * 60, 20, 200 - i * 50)) for i in range(3)]
    pooled = tiny.encode_images_pooled(images)
    assert pooled.shape == (3, tiny.pooled_dim) and tiny.pooled_dim != tiny.dim
    proj = tiny.model.visual.proj.detach().float().numpy()
    np.testing.assert_allclose(pooled @ proj, tiny.encode_images(images), atol=1e-4)
    assert tiny.model.visual.proj is not None  # restored


def _varied_images():
    """RGB, grayscale and RGBA images, larger and smaller than 224 px on a side."""
    rng = np.random.default_rng(3)
    out = []
    for (w, h), mode in (((640, 480), "RGB"), ((300, 200), "L"), ((100, 90), "RGBA")):
        arr = rng.integers(0, 255, (h, w, 4), dtype=np.uint8)
        out.append(Image.fromarray(arr, "RGBA").convert(mode))
    return out


def test_uint8_views_normalised_on_the_device_equal_open_clips_preprocessing(tiny):
    images = _varied_images()
    views = torch.stack([tiny.pixels(im) for im in images])
    assert views.dtype == torch.uint8  # a quarter of float32's bytes between processes
    reference = torch.stack([tiny.preprocess(im) for im in images])
    assert (tiny.normalise(views) - reference).abs().max() <= 1e-6
    with torch.inference_mode():
        diff = tiny.encode_pixels(views) - tiny.encode_pixels(reference)
    assert diff.abs().max() <= 1e-6


def test_center_crop_is_torchvisions_centercrop_without_resize(tiny):
    """encode.image_transform=center_crop: UFD's CenterCrop(224), smaller sides padded black."""
    from torchvision import transforms

    ufd = transforms.Compose(
        [
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(mean=tiny.mean, std=tiny.std),
        ]
    )
    images = _varied_images()
    views = torch.stack([tiny.center_crop_pixels()(im) for im in images])
    reference = torch.stack([ufd(im.convert("RGB")) for im in images])
    assert views.shape == (3, 3, 224, 224)
    # The 100x90 image sits in the middle of black padding (zeros before normalisation).
    assert int(views[2, :, :60].max()) == 0 and int(views[2, :, 100:124, 100:124].max()) > 0
    with torch.inference_mode():
        diff = tiny.encode_pixels(views) - tiny.encode_pixels(reference)
    assert diff.abs().max() <= 1e-6
    resized = torch.stack([tiny.pixels(im) for im in images])
    assert not torch.equal(views, resized)


def test_the_tiny_clip_follows_the_architecture(tmp_path, monkeypatch):
    """models.clip.id picks the tiny model's tower (ResNet for RN50, the id's patch size for
    a ViT), its seeded weights and its identity; an id the tiny preset cannot build is refused."""
    from pipeline.config import ConfigError, ModelSpec
    from pipeline.models.clip import tiny_checkpoint, tiny_config
    from pipeline.models.identity import weights_identity

    monkeypatch.setenv("MISALIGN_TINY_DIR", str(tmp_path / "tiny"))
    loaded = {a: ClipEncoder.load(name=a, preset="tiny", seed=0) for a in ("RN50", "ViT-B-16")}
    loaded["ViT-L-14"] = ClipEncoder.load(preset="tiny", seed=0)  # the default id
    assert type(loaded["RN50"].model.visual).__name__ == "ModifiedResNet"
    for arch, patch in (("ViT-B-16", 16), ("ViT-L-14", 14)):
        visual = loaded[arch].model.visual
        assert type(visual).__name__ == "VisionTransformer"
        assert visual.conv1.kernel_size == (patch, patch)
    embeddings = {a: m.encode_images(_images()) for a, m in loaded.items()}
    assert not np.allclose(embeddings["ViT-B-16"], embeddings["ViT-L-14"])
    for arch, model in loaded.items():
        models = ModelsConfig(preset="tiny", clip=ModelSpec(arch, "openai"))
        assert model.weights_id == weights_identity("clip", models, 0)
        assert model.weights_id == f"misalign-tiny-{arch}/random-seed0"
        # Saved once per architecture and seed, and loaded again exactly.
        assert tiny_checkpoint(0, arch).is_file()
        again = ClipEncoder.load(name=arch, preset="tiny", seed=0)
        np.testing.assert_array_equal(again.encode_images(_images()), embeddings[arch])
    assert tiny_checkpoint(0, "RN50") != tiny_checkpoint(0, "ViT-B-16")
    with pytest.raises(ConfigError, match="not an open_clip architecture"):
        tiny_config("ViT-Q-99")
    with pytest.raises(ConfigError, match="timm"):
        ClipEncoder.load(name="convnext_base", preset="tiny")
    # The stages' up-front weights check refuses it too, before anything loads.
    with pytest.raises(ConfigError, match="ViT-Q-99"):
        check_weights(ModelsConfig(preset="tiny", clip=ModelSpec("ViT-Q-99")), ["clip"])
