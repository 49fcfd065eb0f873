"""Offline tests of the Hugging Face wrappers (BLIP-2, GroundingDINO, BERT, DINOv2) via `tiny`."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.models.bert import BertTextEncoder
from pipeline.models.blip2 import Blip2Captioner, concat_encoded
from pipeline.models.dinov2 import Dinov2ImageEncoder
from pipeline.models.grounding import GroundedObject, GroundingDinoGrounder, caption_to_query
from pipeline.models.hf import TINY_FORMAT_VERSION, HFWrapper, ModelWeightsMissing, resolve_dtype
from pipeline.rows.digest import tree_digest

WRAPPERS: list[type[HFWrapper]] = [
    Blip2Captioner,
    GroundingDinoGrounder,
    BertTextEncoder,
    Dinov2ImageEncoder,
]
IDS = [cls.tiny_name for cls in WRAPPERS]
SIZES = [(60, 40), (30, 100), (300, 200)]  # (width, height): landscape, portrait, larger
CAPTIONS = ["A cat sitting on a red table", "a dog.", "two people in the street next to a car"]
TEXTS = ["a cat", "a photo of a dog on the street " * 20, "", "A CAT"]


def _image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


IMAGES = [_image(w, h, seed) for seed, (w, h) in enumerate(SIZES)]


def _outputs(wrapper: HFWrapper) -> Any:
    """The wrapper's main call on fixed inputs, in a form that compares with ==."""
    if isinstance(wrapper, Blip2Captioner):
        return wrapper.caption(IMAGES, max_new_tokens=8)
    if isinstance(wrapper, GroundingDinoGrounder):
        return wrapper.ground(IMAGES, CAPTIONS, box_threshold=0.0, text_threshold=0.0)
    if isinstance(wrapper, BertTextEncoder):
        return wrapper.encode(TEXTS).tolist()
    if isinstance(wrapper, Dinov2ImageEncoder):
        return wrapper.encode(IMAGES).tolist()
    raise TypeError(type(wrapper))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One tiny-model build directory for the module, so each tiny model is built once."""
    directory = tmp_path_factory.mktemp("tiny")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MISALIGN_TINY_DIR", str(directory))
        yield directory


@pytest.fixture
def empty_hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    return home


# --- loading, provenance, determinism -------------------------------------------------------


@pytest.mark.parametrize("cls", WRAPPERS, ids=IDS)
def test_tiny_preset_loads_with_provenance_and_a_loud_warning(
    cls: type[HFWrapper], tiny_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline.models.hf"):
        wrapper = cls.load(preset="tiny", seed=0)
    assert wrapper.model_id == cls.tiny_name
    assert wrapper.weights_id == f"{cls.tiny_name}@seed0-random-format{TINY_FORMAT_VERSION}"
    assert wrapper.preset == "tiny"
    assert wrapper.dtype == torch.float32
    assert not wrapper.model.training
    assert any(
        "RANDOM" in r.getMessage() and cls.tiny_name in r.getMessage() for r in caplog.records
    )
    assert (tiny_dir / f"{cls.tiny_name}-seed0" / "model.safetensors").is_file()


@pytest.mark.parametrize("cls", WRAPPERS, ids=IDS)
def test_tiny_preset_is_deterministic_per_seed(cls: type[HFWrapper], tmp_path: Path) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MISALIGN_TINY_DIR", str(tmp_path / "first"))
        first = _outputs(cls.load(preset="tiny", seed=0))
        other_seed = _outputs(cls.load(preset="tiny", seed=1))
        mp.setenv("MISALIGN_TINY_DIR", str(tmp_path / "second"))  # a fresh build, same seed
        second = _outputs(cls.load(preset="tiny", seed=0))
    assert first == second
    assert first != other_seed


def test_tiny_build_leaves_the_global_rng_alone_and_is_reused(tiny_dir: Path) -> None:
    state = torch.get_rng_state()
    BertTextEncoder.load(preset="tiny", seed=5)
    assert torch.equal(state, torch.get_rng_state())
    weights = tiny_dir / "tiny-bert-seed5" / "model.safetensors"
    built = weights.stat().st_mtime_ns
    BertTextEncoder.load(preset="tiny", seed=5)
    assert weights.stat().st_mtime_ns == built
    assert [p.name for p in tiny_dir.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("cls", WRAPPERS, ids=IDS)
def test_save_pretrained_round_trip_through_the_paper_loader(
    cls: type[HFWrapper], tiny_dir: Path, tmp_path: Path
) -> None:
    tiny = cls.load(preset="tiny")
    tiny.save_pretrained(tmp_path / "saved")
    real = cls.load(model_id="org/some-model", path=tmp_path / "saved", preset="paper")
    assert real.model_id == "org/some-model"
    assert real.preset == "paper"
    # The folder's content identifies the weights (new weights at the same path: a new id).
    assert real.weights_id == f"org/some-model@sha256:{tree_digest(tmp_path / 'saved')[:16]}"
    assert _outputs(real) == _outputs(tiny)


@pytest.mark.parametrize("cls", WRAPPERS, ids=IDS)
def test_paper_preset_loads_from_the_hf_cache(
    cls: type[HFWrapper], tiny_dir: Path, empty_hf_home: Path
) -> None:
    tiny = cls.load(preset="tiny")
    # The layout huggingface_hub writes: refs/main names the snapshot holding the files.
    repo = empty_hf_home / "hub" / "models--org--cached-model"
    commit = "0123456789abcdef0123456789abcdef01234567"
    tiny.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    real = cls.load(model_id="org/cached-model", preset="paper")
    assert real.weights_id == f"org/cached-model@{commit}"
    assert _outputs(real) == _outputs(tiny)


@pytest.mark.parametrize("cls", WRAPPERS, ids=IDS)
def test_missing_weights_fail_fast_with_the_fix(cls: type[HFWrapper], empty_hf_home: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(ModelWeightsMissing) as info:
        cls.load(preset="paper")
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert f"'{cls.default_model_id}'" in message
    assert str(empty_hf_home / "hub") in message
    assert f"download {cls.default_model_id}" in message
    assert f"models.{cls.default_role}.path" in message
    assert "-S models.preset=tiny" in message
    assert isinstance(info.value, RuntimeError)


def test_hf_hub_cache_env_wins_over_hf_home(
    empty_hf_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(ModelWeightsMissing, match="elsewhere"):
        BertTextEncoder.load(preset="paper")


def test_missing_local_path_names_the_path_and_the_role(tmp_path: Path) -> None:
    with pytest.raises(ModelWeightsMissing) as info:
        Blip2Captioner.load(path=tmp_path / "nowhere", preset="paper", role="caption_model")
    assert str(tmp_path / "nowhere") in str(info.value)
    assert "models.caption_model.path" in str(info.value)


def test_incomplete_local_directory_is_missing_weights(tiny_dir: Path, tmp_path: Path) -> None:
    BertTextEncoder.load(preset="tiny").save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "model.safetensors").unlink()
    with pytest.raises(ModelWeightsMissing, match="saved"):
        BertTextEncoder.load(path=tmp_path / "saved", preset="paper")


def test_bad_preset_and_dtype_are_rejected_with_the_choices() -> None:
    with pytest.raises(ValueError, match="'paper', 'tiny'"):
        BertTextEncoder.load(preset="small")
    with pytest.raises(ValueError, match="float16"):
        BertTextEncoder.load(preset="tiny", dtype="half")


def test_dtype_rule() -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda:0") == torch.float16
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("float32", "cuda") == torch.float32
    assert resolve_dtype(torch.float16, "cpu") == torch.float16


# --- captioner ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def captioner(tiny_dir: Path) -> Blip2Captioner:
    return Blip2Captioner.load(preset="tiny")


def test_captioner_gives_one_nonempty_caption_per_image(captioner: Blip2Captioner) -> None:
    captions = captioner.caption(IMAGES)
    assert len(captions) == 3
    assert all(isinstance(c, str) and c and c == c.strip() for c in captions)


def test_captioner_handles_other_modes_and_empty_batches(captioner: Blip2Captioner) -> None:
    gray, rgba = IMAGES[0].convert("L"), IMAGES[1].convert("RGBA")
    assert len(captioner.caption([gray, rgba], num_beams=1, max_new_tokens=5)) == 2
    assert captioner.caption([]) == []


def test_captioner_returns_only_new_text_after_a_prompt(captioner: Blip2Captioner) -> None:
    prompt = "a photo of"
    captions = captioner.caption(IMAGES, prompt=prompt, max_new_tokens=4)
    assert len(captions) == 3
    assert all(c and not c.startswith(prompt) for c in captions)


@pytest.mark.parametrize("prompt", [None, "a photo of"])
def test_caption_inputs_made_per_image_equal_the_processor_on_the_batch(
    captioner: Blip2Captioner, prompt: str | None
) -> None:
    """What the decode workers make one image at a time, concatenated, is what the processor
    gives for the whole batch (images of other sizes and modes, one prompt)."""
    images = [*IMAGES, IMAGES[1].convert("L")]
    encode = captioner.item_encoder(prompt)
    batch = concat_encoded([encode(image) for image in images])
    whole = captioner.processor(
        images=[image.convert("RGB") for image in images],
        text=[prompt or ""] * len(images),
        return_tensors="pt",
    )
    assert set(batch) == set(whole) and {"pixel_values", "input_ids"} <= set(batch)
    for key, value in whole.items():
        assert batch[key].shape[0] == len(images) and torch.equal(batch[key], value), key


# --- grounder -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grounder(tiny_dir: Path) -> GroundingDinoGrounder:
    return GroundingDinoGrounder.load(preset="tiny")


def test_caption_to_query() -> None:
    assert caption_to_query("A Cat  on the Mat ") == "a cat on the mat."
    assert caption_to_query("a dog.") == "a dog."
    assert caption_to_query("a dog . ") == "a dog."
    assert caption_to_query("   ") == ""


def test_grounder_output_structure_on_images_of_different_sizes(
    grounder: GroundingDinoGrounder,
) -> None:
    # Random weights rarely pass real thresholds; 0/0 keeps every query for a structure check.
    results = grounder.ground(
        IMAGES, CAPTIONS, box_threshold=0.0, text_threshold=0.0, min_box_side=0
    )
    assert len(results) == len(IMAGES)
    tokenize = grounder.processor.tokenizer.tokenize
    for image, caption, objects in zip(IMAGES, CAPTIONS, results, strict=True):
        assert 1 <= len(objects) <= 10
        scores = [obj.score for obj in objects]
        assert scores == sorted(scores, reverse=True)
        query_tokens = set(tokenize(caption_to_query(caption)))
        for obj in objects:
            assert isinstance(obj, GroundedObject)
            assert all(isinstance(v, float) for v in (*obj.box, obj.score))
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
            assert 0.0 <= obj.score <= 1.0
            assert obj.phrase and set(tokenize(obj.phrase)) <= query_tokens - {"."}


def test_grounder_clips_boxes_and_drops_empty_ones(grounder: GroundingDinoGrounder) -> None:
    encoded = grounder.processor.tokenizer(["a cat."], return_tensors="pt")
    probs = torch.full((3, 256), 0.9)
    probs[2] = 0.1  # no token passes text_threshold: empty phrase
    detection = {
        "scores": torch.tensor([0.5, 0.8, 0.7]),
        "boxes": torch.tensor([[-5.0, -5.0, 500.0, 500.0], [10, 10, 10, 20], [1, 1, 5, 5]]),
    }
    objects = grounder._objects(
        detection,
        probs,
        encoded["input_ids"][0],
        encoded["attention_mask"][0],
        (40, 60),
        box_threshold=0.0,
        text_threshold=0.5,
        max_objects=10,
    )
    assert objects == [GroundedObject((0.0, 0.0, 60.0, 40.0), "a cat", 0.5)]


def test_grounder_keeps_the_top_max_objects(grounder: GroundingDinoGrounder) -> None:
    everything = grounder.ground(
        IMAGES[:1], CAPTIONS[:1], 0.0, 0.0, max_objects=100, min_box_side=0
    )[0]
    top3 = grounder.ground(IMAGES[:1], CAPTIONS[:1], 0.0, 0.0, max_objects=3, min_box_side=0)[0]
    assert len(everything) > 10  # the tiny model has 16 queries
    assert top3 == everything[:3]


def test_grounder_thresholds_and_empty_captions(grounder: GroundingDinoGrounder) -> None:
    assert grounder.ground(IMAGES, CAPTIONS, box_threshold=1.0) == [[], [], []]
    results = grounder.ground(IMAGES, ["", " . ", CAPTIONS[2]], 0.0, 0.0)
    assert results[0] == [] and results[1] == [] and results[2]
    # A caption's objects do not depend on the other images in the batch.
    alone = grounder.ground(IMAGES[2:], CAPTIONS[2:], 0.0, 0.0)[0]
    assert [o.phrase for o in alone] == [o.phrase for o in results[2]]
    assert grounder.ground([], []) == []
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        grounder.ground(IMAGES[:2], CAPTIONS[:1])


def test_grounding_items_carry_the_query_size_and_the_processor_inputs(
    grounder: GroundingDinoGrounder,
) -> None:
    encode = grounder.item_encoder()
    assert encode(IMAGES[0], " . ") == {"query": "", "size": (40, 60)}  # nothing to preprocess
    item = encode(IMAGES[1].convert("L"), "A dog")
    assert item["query"] == "a dog." and item["size"] == (100, 30)
    rgb = IMAGES[1].convert("L").convert("RGB")
    pixels = grounder.processor.image_processor(images=rgb, return_tensors="pt")
    tokens = grounder.processor.tokenizer("a dog.", return_tensors="pt")
    assert set(item) == {"query", "size", *pixels, *tokens}
    for key, value in {**pixels, **tokens}.items():
        assert torch.equal(item[key], value), key


# --- encoders -------------------------------------------------------------------------------


def test_bert_encoder_shapes_and_batching(tiny_dir: Path) -> None:
    encoder = BertTextEncoder.load(preset="tiny")
    embeddings = encoder.encode(TEXTS)
    assert embeddings.shape == (len(TEXTS), encoder.dim) and embeddings.dtype == np.float32
    assert np.allclose(encoder.encode(TEXTS, batch_size=1), embeddings, atol=1e-5)
    assert not np.allclose(embeddings[0], embeddings[1], atol=1e-3)
    assert np.array_equal(embeddings[0], embeddings[3])  # uncased
    assert encoder.encode([]).shape == (0, encoder.dim)


def test_dinov2_encoder_shapes_and_batching(tiny_dir: Path) -> None:
    encoder = Dinov2ImageEncoder.load(preset="tiny")
    images = [*IMAGES, IMAGES[0].convert("L")]
    embeddings = encoder.encode(images)
    assert embeddings.shape == (len(images), encoder.dim) and embeddings.dtype == np.float32
    assert np.allclose(encoder.encode(images, batch_size=1), embeddings, atol=1e-5)
    assert not np.allclose(embeddings[0], embeddings[1], atol=1e-3)
    assert encoder.encode([]).shape == (0, encoder.dim)


def test_stale_tiny_build_is_replaced(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MISALIGN_TINY_DIR", str(tmp_path))
        stale = tmp_path / "tiny-dinov2-seed0"
        stale.mkdir()
        (stale / "misalign_tiny.json").write_text('{"format_version": 0}')
        encoder = Dinov2ImageEncoder.load(preset="tiny")
    reference = Dinov2ImageEncoder.load(preset="tiny")  # from the module's tiny_dir
    assert _outputs(encoder) == _outputs(reference)


def test_tiny_grounder_handles_a_lone_square_image():
    """Regression: a batch of one square image made the tiny model's deepest feature map 1x1,
    where GroupNorm fails; the last batch of a shard is often a single image."""
    from pipeline.models.grounding import GroundingDinoGrounder

    grounder = GroundingDinoGrounder.load(preset="tiny")
    out = grounder.ground(
        [Image.new("RGB", (64, 64), "red")],
        ["a red square."],
        box_threshold=0.0,
        text_threshold=0.0,
    )
    assert len(out) == 1


# --- grounded phrases as whole caption words ------------------------------------------------

SPLIT_CAPTIONS = [
    "Several plates of food art on a table.",
    "A zebra grazing near two giraffes",
    "a dog's bowl",
]


def _caption_words(caption: str) -> set[str]:
    import string

    return {w.strip(string.punctuation) for w in caption_to_query(caption).split()} - {""}


def test_grounded_phrases_are_whole_caption_words(grounder: GroundingDinoGrounder) -> None:
    tokenize = grounder.processor.tokenizer.tokenize
    # The tiny WordPiece vocabulary splits these words into pieces.
    assert any(t.startswith("##") for t in tokenize("several plates of food"))
    results = grounder.ground(
        IMAGES, SPLIT_CAPTIONS, box_threshold=0.0, text_threshold=0.0, min_box_side=0
    )
    assert all(results)
    for caption, objects in zip(SPLIT_CAPTIONS, results, strict=True):
        for obj in objects:
            assert "##" not in obj.phrase
            assert set(obj.phrase.split()) <= _caption_words(caption), (obj.phrase, caption)


def test_a_selected_piece_brings_its_whole_word(grounder: GroundingDinoGrounder) -> None:
    query = caption_to_query("Several plates of food")
    encoded = grounder.processor.tokenizer([query], return_tensors="pt")
    ids = encoded["input_ids"][0]
    tokens = grounder.processor.tokenizer.convert_ids_to_tokens(ids.tolist())
    # Select one inner piece of "several" and one of "food", nothing else.
    probs = torch.zeros((1, 256))
    probs[0, tokens.index("##v")] = 0.9
    food = [i for i, t in enumerate(tokens) if t in ("##o", "##d")][-1]
    probs[0, food] = 0.9
    detection = {"scores": torch.tensor([0.9]), "boxes": torch.tensor([[1.0, 1.0, 30.0, 30.0]])}
    for q in (query, None):  # character offsets, and the "##"-grouping fallback
        (obj,) = grounder._objects(
            detection, probs, ids, encoded["attention_mask"][0], (40, 60), 0.0, 0.5, 10, query=q
        )
        assert obj.phrase == "several food"


def test_near_duplicate_and_tiny_boxes_are_dropped(grounder: GroundingDinoGrounder) -> None:
    encoded = grounder.processor.tokenizer(["a cat. a dog."], return_tensors="pt")
    ids = encoded["input_ids"][0]
    tokens = grounder.processor.tokenizer.convert_ids_to_tokens(ids.tolist())
    cat = [i for i, t in enumerate(tokens) if t in ("c", "##a", "##t", "cat")]
    dog = [i for i, t in enumerate(tokens) if t in ("d", "##o", "##g", "dog")]
    probs = torch.zeros((5, 256))
    for row, words in enumerate((cat, cat, dog, cat, cat)):
        probs[row, words] = 0.9
    detection = {
        "scores": torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]),
        "boxes": torch.tensor(
            [
                [10.0, 10.0, 50.0, 50.0],
                [11.0, 10.0, 50.0, 51.0],  # the first cat again (IoU 0.95)
                [10.0, 10.0, 50.0, 50.0],  # a dog in the same place: kept
                [0.0, 0.0, 30.0, 30.0],  # another cat, IoU 0.3 with the first: kept
                [5.0, 5.0, 9.0, 40.0],  # 4 px wide: dropped
            ]
        ),
    }
    objects = grounder._objects(
        detection,
        probs,
        ids,
        encoded["attention_mask"][0],
        (60, 60),
        0.0,
        0.5,
        10,
        query="a cat. a dog.",
        iou_threshold=0.8,
        min_box_side=8,
    )
    assert [(o.phrase, o.score) for o in objects] == [
        ("cat", pytest.approx(0.9)),
        ("dog", pytest.approx(0.7)),
        ("cat", pytest.approx(0.6)),
    ]


def test_bert_features_are_the_cls_state_of_last_hidden_state(tiny_dir: Path) -> None:
    """CT2 takes BERT's last_hidden_state[:, 0], not pooler_output."""
    encoder = BertTextEncoder.load(preset="tiny")
    batch = encoder.processor(
        TEXTS[:2], padding=True, truncation=True, max_length=64, return_tensors="pt"
    )
    with torch.inference_mode():
        out = encoder.model(**batch)
    got = encoder.encode(TEXTS[:2])
    np.testing.assert_allclose(got, out.last_hidden_state[:, 0].numpy(), atol=1e-5)
    assert not np.allclose(got, out.pooler_output.numpy(), atol=1e-3)


def test_the_grounder_defaults_are_the_ground_params() -> None:
    """A library call of `ground` gets the pipeline's boxes: one home for each threshold."""
    import dataclasses
    import inspect

    from pipeline.config import GroundConfig

    params = {f.name: f.default for f in dataclasses.fields(GroundConfig)}
    for method in (GroundingDinoGrounder.ground, GroundingDinoGrounder.ground_encoded):
        defaults = {
            name: p.default
            for name, p in inspect.signature(method).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        assert defaults == {k: params[k] for k in defaults}, method.__name__
        assert defaults["min_box_side"] == GroundConfig().min_box_side
